"""The pipeline schedule IR: who computes which micro-batch of which stage, in what order.

A model cut into ``nstages`` stages runs ``nmicro`` micro-batches. An
``Action`` is ``(stage, kind, microbatch)`` and prints as ``"2F0"`` (stage 2,
forward, micro-batch 0); communication actions print as ``"2SEND_F0"``. A
``PipelineSchedule`` is, per rank, the ordered list of its actions. The
generators (``gpipe``, ``one_f_one_b``, ``interleaved``) write compute actions
only; ``lower`` (lowering.py) adds the sends and receives; ``simulate``
(simulate.py) dry-runs the lowered program, detects deadlocks and counts time
steps.

[Note: placement] Stage ``s`` lives on rank ``s % nranks`` ("looping"
placement): with one stage per rank stage s is rank s; with v stages per rank
rank r holds stages r, r + p, r + 2p, ... A schedule never says otherwise, so
every consumer computes placement with ``rank_of``.

[Note: communication semantics] (the runtime and the simulator rely on these)

1. ``SEND_F(s, i)`` ships stage s's output of micro-batch i to stage s + 1,
   where ``RECV_F(s + 1, i)`` takes it; ``SEND_B(s, i)`` ships the gradient of
   stage s's input to stage s - 1, where ``RECV_B(s - 1, i)`` takes it.
   Neighbouring stages on the same rank hand tensors over in memory, with no
   communication action.
2. Between two ranks, the k-th send from a to b matches the k-th receive on b
   from a (one tag, FIFO); a lowered schedule names the same (stage,
   micro-batch) on both sides of every match, and the verifier checks it.
3. A maximal run of consecutive communication actions on a rank is one batch:
   its transfers are posted together, without blocking the rank. A compute
   action waits only for the receives it consumes; sends are waited for at
   the end of the step.
4. A rank's batches form its communication queue and run in program order,
   one at a time; a transfer happens when the batches holding its two sides
   are both running (NCCL: one grouped call per batch on one stream). This is
   the strictest backend behaviour and the simulator's default; a schedule
   that passes it also runs where sends are buffered (gloo).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple


class ScheduleError(ValueError):
    """A pipeline schedule is malformed, mismatched or deadlocks."""


class Kind(str, enum.Enum):
    F = "F"
    B = "B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def compute(self) -> bool:
        return self in (Kind.F, Kind.B)

    @property
    def send(self) -> bool:
        return self in (Kind.SEND_F, Kind.SEND_B)

    @property
    def recv(self) -> bool:
        return self in (Kind.RECV_F, Kind.RECV_B)


F, B, SEND_F, RECV_F, SEND_B, RECV_B = Kind.F, Kind.B, Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B

_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B)(\d+)$")


class Action(NamedTuple):
    stage: int
    kind: Kind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _ACTION_RE.match(text.strip())
        if not m:
            raise ValueError(f"cannot parse pipeline action {text!r}; expected e.g. '2F0', '1B3' or '0SEND_F2'")
        return cls(int(m.group(1)), Kind(m.group(2)), int(m.group(3)))


def rank_of(stage: int, nranks: int) -> int:
    """The rank holding ``stage`` ([Note: placement])."""
    return stage % nranks


@dataclass(frozen=True)
class PipelineSchedule:
    name: str
    nranks: int
    nstages: int
    nmicro: int
    ranks: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if len(self.ranks) != self.nranks:
            raise ScheduleError(f"{len(self.ranks)} rank programs for nranks={self.nranks}")
        if self.nstages % self.nranks:
            raise ScheduleError(f"nstages {self.nstages} is not a multiple of nranks {self.nranks}")

    @property
    def stages_per_rank(self) -> int:
        return self.nstages // self.nranks

    @property
    def lowered(self) -> bool:
        return any(not a.kind.compute for prog in self.ranks for a in prog)

    def rank_of(self, stage: int) -> int:
        return rank_of(stage, self.nranks)

    def stages_of(self, rank: int) -> list[int]:
        return list(range(rank, self.nstages, self.nranks))

    def __str__(self) -> str:
        return format_schedule(self)


# -- generators: compute actions only ------------------------------------------------


def _check_sizes(nranks: int, nmicro: int) -> None:
    if nranks < 1:
        raise ValueError(f"nranks: expected >= 1, got {nranks}")
    if nmicro < 1:
        raise ValueError(f"chunks: expected >= 1 micro-batches, got {nmicro}")


def gpipe(nranks: int, nmicro: int) -> PipelineSchedule:
    """All forwards, then all backwards: every stage holds all ``nmicro`` activations at the peak."""
    _check_sizes(nranks, nmicro)
    progs = tuple(tuple([Action(r, F, i) for i in range(nmicro)] + [Action(r, B, i) for i in range(nmicro)])
                  for r in range(nranks))
    return PipelineSchedule("gpipe", nranks, nranks, nmicro, progs)


def one_f_one_b(nranks: int, nmicro: int) -> PipelineSchedule:
    """1F1B (PipeDream-flush): rank r runs p-1-r warm-up forwards, then alternates, then drains.

    Rank r holds at most p - r micro-batches' activations (min with nmicro), instead of GPipe's nmicro;
    the number of time steps, and so the bubble, is GPipe's.
    """
    _check_sizes(nranks, nmicro)
    progs = []
    for r in range(nranks):
        warm = min(nranks - 1 - r, nmicro)
        prog = [Action(r, F, i) for i in range(warm)]
        for i in range(nmicro - warm):
            prog += [Action(r, F, warm + i), Action(r, B, i)]
        prog += [Action(r, B, i) for i in range(nmicro - warm, nmicro)]
        progs.append(tuple(prog))
    return PipelineSchedule("1f1b", nranks, nranks, nmicro, tuple(progs))


def interleaved(nranks: int, nmicro: int, stages_per_rank: int = 2) -> PipelineSchedule:
    """Interleaved 1F1B (Megatron-LM): v stages per rank, micro-batches in rounds of p.

    Rank r's k-th forward is micro-batch ``(k // pv) * p + k % p`` of its local stage ``(k // p) % v``;
    backwards walk the local stages in reverse. Warm-up: ``2 (p - 1 - r) + (v - 1) p`` forwards. The
    bubble shrinks to ``(p - 1) / (v m + p - 1)`` of the step, at the price of v times the messages.
    """
    _check_sizes(nranks, nmicro)
    v = stages_per_rank
    if v < 1:
        raise ValueError(f"stages_per_rank: expected >= 1, got {v}")
    if nmicro % nranks:
        raise ValueError(f"chunks: the interleaved schedule needs a multiple of the {nranks} pipeline ranks, "
                         f"got {nmicro} micro-batches")
    p, total = nranks, nmicro * v

    def local(k: int, backward: bool) -> tuple[int, int]:
        group, within = divmod(k, p * v)
        chunk = within // p
        return (v - 1 - chunk if backward else chunk), group * p + within % p

    progs = []
    for r in range(p):
        # v == 1 is plain 1F1B; Megatron's extra p - 1 - r forwards only pay off across chunks
        warm = min((p - 1 - r) * (2 if v > 1 else 1) + (v - 1) * p, total)
        fwd = [Action(c * p + r, F, i) for c, i in (local(k, False) for k in range(total))]
        bwd = [Action(c * p + r, B, i) for c, i in (local(k, True) for k in range(total))]
        prog = fwd[:warm]
        for k in range(total - warm):
            prog += [fwd[warm + k], bwd[k]]
        prog += bwd[total - warm:]
        progs.append(tuple(prog))
    return PipelineSchedule("interleaved", p, p * v, nmicro, tuple(progs))


SCHEDULES = ("gpipe", "1f1b", "interleaved")


def build(name: str, nranks: int, nmicro: int, stages_per_rank: int | None = None) -> PipelineSchedule:
    """The named schedule's compute program; ``stages_per_rank`` applies to ``interleaved`` only (default 2)."""
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
    if key == "gpipe":
        _only_one(name, stages_per_rank)
        return gpipe(nranks, nmicro)
    if key in ("1f1b", "onefoneb"):
        _only_one(name, stages_per_rank)
        return one_f_one_b(nranks, nmicro)
    if key in ("interleaved", "interleaved1f1b"):
        return interleaved(nranks, nmicro, 2 if stages_per_rank is None else stages_per_rank)
    raise ValueError(f"schedule: unknown {name!r}; use one of {', '.join(SCHEDULES)}")


def _only_one(name: str, stages_per_rank: int | None) -> None:
    if stages_per_rank not in (None, 1):
        raise ValueError(f"stages_per_rank: {name!r} runs one stage per rank; use schedule='interleaved' "
                         f"for {stages_per_rank}")


# -- helpers on lowered schedules ----------------------------------------------------


def peer(s: PipelineSchedule, a: Action) -> tuple[int, Action]:
    """The rank and action on the other side of a communication action."""
    match a.kind:
        case Kind.SEND_F:
            other = Action(a.stage + 1, RECV_F, a.microbatch)
        case Kind.RECV_F:
            other = Action(a.stage - 1, SEND_F, a.microbatch)
        case Kind.SEND_B:
            other = Action(a.stage - 1, RECV_B, a.microbatch)
        case Kind.RECV_B:
            other = Action(a.stage + 1, SEND_B, a.microbatch)
        case _:
            raise ValueError(f"{a} is a compute action; it has no peer")
    return s.rank_of(other.stage), other


def batches(prog: tuple[Action, ...]) -> list[Action | tuple[Action, ...]]:
    """A rank's program as compute actions and batches (plain tuples) of consecutive communication actions.

    An Action is a NamedTuple too: tell the two apart with ``isinstance(item, Action)``.
    """
    items: list[Action | tuple[Action, ...]] = []
    run: list[Action] = []
    for a in prog:
        if a.kind.compute:
            if run:
                items.append(tuple(run))
                run = []
            items.append(a)
        else:
            run.append(a)
    if run:
        items.append(tuple(run))
    return items


# -- text form: a rank x step grid that parses back --------------------------------------
#
#   # pipeline 1f1b ranks=2 stages=2 microbatches=3
#   rank | 0   | 1   | 2   | 3   | 4   | 5
#   0    | 0F0 | 0F1 | 0B0 | 0F2 | 0B1 | 0B2
#   1    | 1F0 | 1B0 | 1F1 | 1B1 | 1F2 | 1B2
#
# Columns are positions in each rank's program, not time: ``simulate(...).grid()`` draws time.

_HEADER_RE = re.compile(r"^#\s*pipeline\s+(\S+)\s+ranks=(\d+)\s+stages=(\d+)\s+microbatches=(\d+)\s*$")


def format_grid(header: str, rows: list[list[str]], titles: list[str]) -> str:
    ncols = max([len(r) for r in rows] + [len(titles)], default=0)
    rows = [r + [""] * (ncols - len(r)) for r in rows]
    titles = titles + [""] * (ncols - len(titles))
    widths = [max([len(titles[i])] + [len(r[i]) for r in rows]) for i in range(ncols)]
    rw = max(4, len(str(len(rows) - 1)))

    def line(first: str, row: list[str]) -> str:
        return " | ".join([first.ljust(rw)] + [c.ljust(w) for c, w in zip(row, widths)]).rstrip()

    return "\n".join([header, line("rank", titles)] + [line(str(r), row) for r, row in enumerate(rows)]) + "\n"


def format_schedule(s: PipelineSchedule) -> str:
    header = f"# pipeline {s.name} ranks={s.nranks} stages={s.nstages} microbatches={s.nmicro}"
    rows = [[str(a) for a in prog] for prog in s.ranks]
    return format_grid(header, rows, [str(i) for i in range(max(map(len, rows), default=0))])


def parse_schedule(text: str) -> PipelineSchedule:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    m = _HEADER_RE.match(lines[0]) if lines else None
    if not m:
        raise ValueError("pipeline schedule text must start with "
                         "'# pipeline <name> ranks=P stages=S microbatches=M'")
    name, nranks, nstages, nmicro = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    progs = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.split("|")][1:]
        progs.append(tuple(Action.parse(c) for c in cells if c and c != "-"))
    return PipelineSchedule(name, nranks, nstages, nmicro, tuple(progs))
