"""The schedule IR: a collective algorithm written down as data.

A Schedule says, for every rank, a list of steps. A step is a set of sends and
receives of chunk ranges with peers. The buffer an algorithm works on (the
"work" buffer) is cut into ``nchunks`` chunks; ``chunk_bounds`` decides which
elements each chunk covers, identically on every rank.

[Note: step semantics] (the executor, the verifier and the cost model all rely
on these; change them in one place only)

1. Every send of a step reads the work buffer as it was when the step began.
2. A step's transfers are all posted together and the step ends when all of
   them have completed. The k-th send from rank a to rank b matches the k-th
   receive on b from a, counted over the whole schedule.
3. After the transfers, receives are applied in the order they are listed:
   ``reduce=True`` combines the received data into the local chunks with the
   reduction op (local op received); ``reduce=False`` overwrites them.
4. A step never both sends a chunk and overwrites it by a receive, so an
   overwriting receive may land in the work buffer directly.
5. A matched send and receive name the same chunk range, except in all-to-all,
   whose blocks all have the same size and where only the counts must agree.

Chunk layout: the work buffer of ``count`` elements is first cut into
``blocks`` equal blocks (1 for all-reduce, broadcast and reduce; the world size
for reduce-scatter, all-gather and all-to-all, whose blocks are the per-rank
slices), and each block into ``nchunks // blocks`` nearly equal chunks: the
first ``n % k`` chunks of a block get one element more.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class Collective(str, enum.Enum):
    ALL_REDUCE = "all_reduce"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_GATHER = "all_gather"
    BROADCAST = "broadcast"
    REDUCE = "reduce"
    ALL_TO_ALL = "all_to_all"

    @property
    def blocked(self) -> bool:
        """True where the work buffer is one block per rank."""
        return self in (Collective.REDUCE_SCATTER, Collective.ALL_GATHER, Collective.ALL_TO_ALL)

    @property
    def rooted(self) -> bool:
        return self in (Collective.BROADCAST, Collective.REDUCE)

    @property
    def reduces(self) -> bool:
        return self in (Collective.ALL_REDUCE, Collective.REDUCE_SCATTER, Collective.REDUCE)


class Buffer(str, enum.Enum):
    WORK = "work"
    INPUT = "input"  # the caller's input; all-to-all sends read it directly


@dataclass(frozen=True, slots=True)
class Send:
    peer: int
    start: int
    stop: int
    buffer: Buffer = Buffer.WORK

    @property
    def nchunks(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Recv:
    peer: int
    start: int
    stop: int
    reduce: bool

    @property
    def nchunks(self) -> int:
        return self.stop - self.start


Op = Send | Recv


@dataclass(frozen=True, slots=True)
class Step:
    ops: tuple[Op, ...] = ()

    @property
    def sends(self) -> tuple[Send, ...]:
        return tuple(o for o in self.ops if isinstance(o, Send))

    @property
    def recvs(self) -> tuple[Recv, ...]:
        return tuple(o for o in self.ops if isinstance(o, Recv))


@dataclass(frozen=True)
class Schedule:
    collective: Collective
    algorithm: str
    world_size: int
    nchunks: int
    ranks: tuple[tuple[Step, ...], ...]
    root: int | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.ranks) != self.world_size:
            raise ValueError(f"Schedule has {len(self.ranks)} rank lists for world_size {self.world_size}")
        if self.collective.blocked and self.nchunks % self.world_size:
            raise ValueError(f"{self.collective.value}: nchunks {self.nchunks} is not a multiple of the world size")

    @property
    def blocks(self) -> int:
        return self.world_size if self.collective.blocked else 1

    @property
    def nsteps(self) -> int:
        return max((len(s) for s in self.ranks), default=0)

    def steps(self, rank: int) -> tuple[Step, ...]:
        return self.ranks[rank]

    def bounds(self, count: int) -> list[int]:
        """Element offsets of the chunk boundaries for a work buffer of ``count`` elements."""
        key = ("bounds", count)
        if key not in self._cache:
            self._cache[key] = chunk_bounds(count, self.nchunks, self.blocks)
        return self._cache[key]

    def __str__(self) -> str:
        return format_schedule(self)


def chunk_bounds(count: int, nchunks: int, blocks: int = 1) -> list[int]:
    """Offsets ``b`` with chunk i covering elements ``[b[i], b[i+1])`` (see the module note)."""
    if nchunks % blocks:
        raise ValueError(f"nchunks {nchunks} is not a multiple of blocks {blocks}")
    if count % blocks:
        raise ValueError(f"count {count} does not split into {blocks} equal blocks")
    per_block, sub = count // blocks, nchunks // blocks
    base, extra = divmod(per_block, sub)
    bounds = [0]
    for b in range(blocks):
        for i in range(sub):
            bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


# ---------------------------------------------------------------------------
# Text form: a rank x step grid that parses back.
#
#   # all_reduce ring world=3 chunks=3
#   rank | step 0          | step 1
#   0    | S1[0] R2[2]+    | S1[2] R2[1]=
#
# S<peer>[a:b] sends chunks a..b-1 (Si<peer> reads the input buffer);
# R<peer>[a:b]+ receives and reduces, R<peer>[a:b]= receives and overwrites;
# a single chunk prints as [a]; an empty step prints as "-".
# ---------------------------------------------------------------------------

def _fmt_range(start: int, stop: int) -> str:
    return f"[{start}]" if stop == start + 1 else f"[{start}:{stop}]"


def format_op(op: Op) -> str:
    if isinstance(op, Send):
        tag = "Si" if op.buffer is Buffer.INPUT else "S"
        return f"{tag}{op.peer}{_fmt_range(op.start, op.stop)}"
    return f"R{op.peer}{_fmt_range(op.start, op.stop)}{'+' if op.reduce else '='}"


def format_schedule(s: Schedule) -> str:
    root = f" root={s.root}" if s.root is not None else ""
    header = f"# {s.collective.value} {s.algorithm} world={s.world_size} chunks={s.nchunks}{root}"
    cells = [[" ".join(format_op(o) for o in st.ops) or "-" for st in s.ranks[r]] for r in range(s.world_size)]
    nsteps = s.nsteps
    for row in cells:
        row.extend([""] * (nsteps - len(row)))
    titles = [f"step {i}" for i in range(nsteps)]
    widths = [max([len(titles[i])] + [len(row[i]) for row in cells]) for i in range(nsteps)]
    rw = max(4, len(str(s.world_size - 1)))

    def line(first: str, row: list[str]) -> str:
        return " | ".join([first.ljust(rw)] + [c.ljust(w) for c, w in zip(row, widths)]).rstrip()

    return "\n".join([header, line("rank", titles)] + [line(str(r), row) for r, row in enumerate(cells)]) + "\n"


_OP_RE = re.compile(r"^(Si|S|R)(\d+)\[(\d+)(?::(\d+))?\]([+=]?)$")
_HEADER_RE = re.compile(r"^#\s*(\w+)\s+(\S+)\s+world=(\d+)\s+chunks=(\d+)(?:\s+root=(\d+))?\s*$")


def parse_op(text: str) -> Op:
    m = _OP_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse schedule op {text!r}")
    kind, peer, start, stop, mode = m.groups()
    a = int(start)
    b = int(stop) if stop is not None else a + 1
    if kind == "R":
        if not mode:
            raise ValueError(f"receive {text!r} needs '+' (reduce) or '=' (overwrite)")
        return Recv(int(peer), a, b, reduce=mode == "+")
    if mode:
        raise ValueError(f"send {text!r} takes no '+' or '='")
    return Send(int(peer), a, b, Buffer.INPUT if kind == "Si" else Buffer.WORK)


def parse_schedule(text: str) -> Schedule:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    m = _HEADER_RE.match(lines[0]) if lines else None
    if not m:
        raise ValueError("schedule text must start with '# <collective> <algorithm> world=N chunks=C [root=R]'")
    coll, algo, world, nchunks, root = m.groups()
    ranks: list[tuple[Step, ...]] = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.split("|")]
        steps = [Step(tuple(parse_op(t) for t in c.split() if t != "-")) for c in cells[1:] if c != ""]
        ranks.append(tuple(steps))
    return Schedule(Collective(coll), algo, int(world), int(nchunks), tuple(ranks),
                    root=int(root) if root is not None else None)
