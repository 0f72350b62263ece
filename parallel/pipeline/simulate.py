"""Check a pipeline schedule and dry-run it: no processes, no tensors.

``verify`` checks the program statically: every (stage, micro-batch) is run
forward and backward exactly once on its rank, forward first, after the
stage's inputs exist; every lowered send has its receive, in FIFO order
([Note: communication semantics] in schedule.py). ``simulate`` then plays the
program on a clock where a forward costs ``forward_cost`` time units and a
backward ``backward_cost`` (communication is free), reports the number of
steps, the bubble fraction and the peak number of micro-batches whose
activations each stage holds, and raises ``ScheduleError`` on a deadlock,
naming what each rank waits for.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .lowering import lower
from .schedule import (B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, PipelineSchedule, ScheduleError,
                       batches, format_grid, peer)


def verify(s: PipelineSchedule) -> None:
    """Raise ``ScheduleError`` unless ``s`` (lowered or not) is a complete, well-ordered program."""
    last = s.nstages - 1
    seen: dict[Action, tuple[int, int]] = {}
    for r, prog in enumerate(s.ranks):
        for pos, a in enumerate(prog):
            if not (0 <= a.stage < s.nstages and 0 <= a.microbatch < s.nmicro):
                raise ScheduleError(f"rank {r}: {a} is out of range (stages={s.nstages}, microbatches={s.nmicro})")
            if s.rank_of(a.stage) != r:
                raise ScheduleError(f"rank {r}: {a} belongs to rank {s.rank_of(a.stage)}")
            if a in seen:
                raise ScheduleError(f"rank {r}: {a} appears twice")
            seen[a] = (r, pos)
    for st in range(s.nstages):
        for i in range(s.nmicro):
            for k in (F, B):
                if Action(st, k, i) not in seen:
                    raise ScheduleError(f"rank {s.rank_of(st)}: {Action(st, k, i)} is missing")

    def before(x: Action, y: Action, why: str) -> None:
        if x not in seen or seen[x][1] > seen[y][1]:
            raise ScheduleError(f"rank {seen[y][0]}: {y} needs {x} first ({why})")

    lowered = s.lowered
    for st in range(s.nstages):
        for i in range(s.nmicro):
            f, b = Action(st, F, i), Action(st, B, i)
            before(f, b, "backward after forward")
            prev_local = st > 0 and s.rank_of(st - 1) == s.rank_of(st)
            next_local = st < last and s.rank_of(st + 1) == s.rank_of(st)
            if prev_local:
                before(Action(st - 1, F, i), f, "input from the previous stage")
            if next_local:
                before(Action(st + 1, B, i), b, "output gradient from the next stage")
            if lowered and st > 0 and not prev_local:
                before(Action(st, RECV_F, i), f, "input received")
                _after(seen, b, Action(st, SEND_B, i), "input gradient sent after the backward")
            if lowered and st < last and not next_local:
                before(Action(st, RECV_B, i), b, "output gradient received")
                _after(seen, f, Action(st, SEND_F, i), "output sent after the forward")
    if lowered:
        for a, (r, _) in seen.items():
            if not a.kind.compute:
                pr, other = peer(s, a)
                if other not in seen or pr == r:
                    raise ScheduleError(f"rank {r}: {a} has no matching {other} on rank {pr}")
        _check_fifo(s)


def _after(seen: dict[Action, tuple[int, int]], x: Action, y: Action, why: str) -> None:
    if y not in seen or seen[y][1] < seen[x][1]:
        raise ScheduleError(f"rank {seen[x][0]}: {y} must follow {x} ({why})")


def _check_fifo(s: PipelineSchedule) -> None:
    sends: dict[tuple[int, int], list[Action]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[Action]] = defaultdict(list)
    for r, prog in enumerate(s.ranks):
        for a in prog:
            if a.kind.send:
                sends[(r, peer(s, a)[0])].append(a)
            elif a.kind.recv:
                recvs[(peer(s, a)[0], r)].append(a)
    for (src, dst), out in sends.items():
        inn = recvs.get((src, dst), [])
        for k, (x, y) in enumerate(zip(out, inn)):
            if peer(s, x)[1] != y:
                raise ScheduleError(f"rank {src} -> rank {dst}: message {k} is sent as {x} but received as {y}; "
                                    "sends and receives between two ranks must come in the same order")


@dataclass(frozen=True)
class Simulation:
    schedule: PipelineSchedule  # lowered
    steps: int  # time units from the first action to the last
    starts: tuple[tuple[tuple[int, Action], ...], ...]  # per rank: (start time, compute action)
    peak_activations: tuple[int, ...]  # per stage: most micro-batches forwarded but not yet backwarded
    forward_cost: int = 1
    backward_cost: int = 1

    @property
    def busy(self) -> int:
        """Time units one rank computes (every rank does the same amount)."""
        return self.schedule.stages_per_rank * self.schedule.nmicro * (self.forward_cost + self.backward_cost)

    @property
    def bubble(self) -> float:
        """Idle fraction of the step: 1 - busy / steps."""
        return 1.0 - self.busy / self.steps if self.steps else 0.0

    def cost(self, a: Action) -> int:
        return self.forward_cost if a.kind is F else self.backward_cost

    def grid(self) -> str:
        """The timeline: a rank x time grid of compute actions, '-' where the rank idles."""
        s = self.schedule
        rows = []
        for prog in self.starts:
            row = ["-"] * self.steps
            for t, a in prog:
                for k in range(self.cost(a)):
                    row[t + k] = str(a)
            rows.append(row)
        header = (f"# timeline {s.name} ranks={s.nranks} stages={s.nstages} microbatches={s.nmicro} "
                  f"steps={self.steps} bubble={self.bubble:.3f}")
        return format_grid(header, rows, [str(t) for t in range(self.steps)])


def ideal_bubble(nranks: int, nmicro: int, stages_per_rank: int = 1) -> float:
    """(p - 1) / (v m + p - 1): the idle fraction of GPipe/1F1B (v = 1) and interleaved 1F1B."""
    return (nranks - 1) / (stages_per_rank * nmicro + nranks - 1)


def peak_activations(s: PipelineSchedule) -> tuple[int, ...]:
    """Per stage, the most micro-batches whose forward has run and backward has not (program order)."""
    held, peak = [0] * s.nstages, [0] * s.nstages
    for prog in s.ranks:
        for a in prog:
            if a.kind is F:
                held[a.stage] += 1
                peak[a.stage] = max(peak[a.stage], held[a.stage])
            elif a.kind is B:
                held[a.stage] -= 1
    return tuple(peak)


def simulate(s: PipelineSchedule, forward_cost: int = 1, backward_cost: int = 1,
             strict: bool = True) -> Simulation:
    """Verify, lower (if needed) and dry-run ``s``; communication takes no time.

    ``strict`` (default): [Note: communication semantics] 4, each rank's batches run one at a time in
    program order and a transfer needs both of its batches running (NCCL). Otherwise a send completes
    when posted and a receive once its send is posted (buffered, gloo-like).
    """
    if forward_cost < 1 or backward_cost < 1:
        raise ValueError("forward_cost and backward_cost must be positive integers")
    s = lower(s)
    verify(s)
    n = s.nranks
    items = [batches(prog) for prog in s.ranks]
    where: dict[Action, tuple[int, int]] = {}  # communication action -> (rank, batch number on that rank)
    nbatch = [0] * n
    for r, prog in enumerate(items):
        for it in prog:
            if not isinstance(it, Action):
                where.update((a, (r, nbatch[r])) for a in it)
                nbatch[r] += 1
    pc, free_at = [0] * n, [0] * n
    posted = [0] * n  # batches this rank has posted
    head = [0] * n  # the batch at the front of this rank's queue (== posted: queue empty)
    queue: list[list[tuple[Action, ...]]] = [[] for _ in range(n)]
    done: set[Action] = set()
    starts: list[list[tuple[int, Action]]] = [[] for _ in range(n)]

    def needs(a: Action) -> Action | None:
        """The receive a compute action consumes, if its neighbour stage is on another rank."""
        if a.kind is F and a.stage > 0 and s.rank_of(a.stage - 1) != s.rank_of(a.stage):
            return Action(a.stage, RECV_F, a.microbatch)
        if a.kind is B and a.stage < s.nstages - 1 and s.rank_of(a.stage + 1) != s.rank_of(a.stage):
            return Action(a.stage, RECV_B, a.microbatch)
        return None

    def running(a: Action) -> bool:
        r, k = where[a]
        return head[r] == k and posted[r] > k

    def step_host(r: int, t: int) -> bool:
        moved = False
        while pc[r] < len(items[r]) and free_at[r] <= t:
            it = items[r][pc[r]]
            if isinstance(it, Action):
                need = needs(it)
                if need is not None and need not in done:
                    break
                starts[r].append((t, it))
                free_at[r] = t + (forward_cost if it.kind is F else backward_cost)
            else:
                queue[r].append(it)
                posted[r] += 1
            pc[r] += 1
            moved = True
        return moved

    def step_queue(r: int) -> bool:
        moved = False
        while head[r] < posted[r]:
            batch = queue[r][head[r]]
            for a in batch:
                if a in done:
                    continue
                other = peer(s, a)[1]
                if strict:
                    ok = running(a) and running(other)
                else:
                    ok = a.kind.send or where[other][1] < posted[where[other][0]]
                if ok:
                    done.add(a)
                    if strict or a.kind.recv:
                        done.add(other)
                    moved = True
            if not all(a in done for a in batch):
                break
            head[r] += 1
            moved = True
        return moved

    t = 0
    while True:
        moved = True
        while moved:
            moved = False
            for r in range(n):
                moved |= step_host(r, t)
            for r in range(n):
                moved |= step_queue(r)
        if all(pc[r] == len(items[r]) and head[r] == posted[r] for r in range(n)):
            break
        later = [f for f in free_at if f > t]
        if not later:
            raise ScheduleError(_deadlock_report(s, items, pc, queue, head, posted, done, needs))
        t = min(later)
    return Simulation(s, max(free_at, default=0), tuple(tuple(x) for x in starts), peak_activations(s),
                      forward_cost, backward_cost)


def _deadlock_report(s: PipelineSchedule, items, pc, queue, head, posted, done, needs) -> str:
    lines = [f"{s.name}: deadlock (ranks={s.nranks}, stages={s.nstages}, microbatches={s.nmicro}):"]
    for r in range(s.nranks):
        parts = []
        if pc[r] < len(items[r]):
            it = items[r][pc[r]]
            if isinstance(it, Action):
                parts.append(f"{it} waits for {needs(it)}")
        if head[r] < posted[r]:
            waiting = [a for a in queue[r][head[r]] if a not in done]
            parts.append("queue blocked on " + ", ".join(
                f"{a} (rank {peer(s, a)[0]}'s {peer(s, a)[1]} not running)" for a in waiting))
        lines.append(f"  rank {r}: " + ("; ".join(parts) or "done"))
    return "\n".join(lines)
