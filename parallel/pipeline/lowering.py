"""Lowering: give a compute-only pipeline schedule its sends and receives.

A send goes right after the compute action that produces its tensor. Where a
receive goes matters more: under [Note: communication semantics] 4 (each
rank's batches run in order, a transfer needs both sides running) the naive
place, right before the consumer, deadlocks interleaved 1F1B: two ranks each
send a gradient first and post the matching receive only later.

[Note: time-ordered lowering] We give every transfer a time ``T``, the end of
its producer in a dataflow timing of the compute program (forward 1 unit,
backward 2 by default), and a key ``(T, direction, sender stage,
micro-batch)`` that both sides compute alike. Each rank posts a receive in the
gap after its last compute action that ends by ``T`` (before the consumer,
which starts at or after ``T``), and orders each gap's actions by key. Every
rank's communication queue is then sorted by one global order of transfers,
so the smallest unfinished transfer is always at the head of both its queues:
no deadlock, whatever the real durations. ``simulate`` checks it anyway.
"""

from __future__ import annotations

from .schedule import B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, PipelineSchedule, ScheduleError


def _dependency(s: PipelineSchedule, a: Action) -> Action | None:
    """The compute action whose result ``a`` consumes from a neighbouring stage (None at the ends)."""
    if a.kind is F:
        return Action(a.stage - 1, F, a.microbatch) if a.stage > 0 else None
    return Action(a.stage + 1, B, a.microbatch) if a.stage < s.nstages - 1 else None


def compute_times(s: PipelineSchedule, forward_cost: int = 1,
                  backward_cost: int = 2) -> dict[Action, tuple[int, int]]:
    """(start, end) of every compute action when each starts as soon as its rank and its input are free.

    Raises ScheduleError when the compute order alone is circular (some rank waits forever).
    """
    progs = [[a for a in prog if a.kind.compute] for prog in s.ranks]
    times: dict[Action, tuple[int, int]] = {}
    pc, free = [0] * s.nranks, [0] * s.nranks
    moved = True
    while moved:
        moved = False
        for r, prog in enumerate(progs):
            while pc[r] < len(prog):
                a = prog[pc[r]]
                dep = _dependency(s, a)
                if dep is not None and dep not in times:
                    break
                start = max(free[r], times[dep][1] if dep is not None else 0)
                free[r] = start + (forward_cost if a.kind is F else backward_cost)
                times[a] = (start, free[r])
                pc[r] += 1
                moved = True
    if any(pc[r] < len(p) for r, p in enumerate(progs)):
        stuck = "; ".join(f"rank {r} at {p[pc[r]]} (needs {_dependency(s, p[pc[r]])})"
                          for r, p in enumerate(progs) if pc[r] < len(p))
        raise ScheduleError(f"{s.name}: the compute order deadlocks: {stuck}")
    return times


def _transfers(s: PipelineSchedule, times: dict[Action, tuple[int, int]]):
    """Yield (rank, T, key, action) for both sides of every transfer between different ranks."""
    last = s.nstages - 1
    for st in range(s.nstages):
        for i in range(s.nmicro):
            if st < last and s.rank_of(st) != s.rank_of(st + 1):
                t = times[Action(st, F, i)][1]
                key = (t, 0, st, i)
                yield s.rank_of(st), t, key, Action(st, SEND_F, i)
                yield s.rank_of(st + 1), t, key, Action(st + 1, RECV_F, i)
            if st > 0 and s.rank_of(st) != s.rank_of(st - 1):
                t = times[Action(st, B, i)][1]
                key = (t, 1, st, i)
                yield s.rank_of(st), t, key, Action(st, SEND_B, i)
                yield s.rank_of(st - 1), t, key, Action(st - 1, RECV_B, i)


def lower(s: PipelineSchedule, forward_cost: int = 1, backward_cost: int = 2) -> PipelineSchedule:
    """``s`` with its sends and receives ([Note: time-ordered lowering]); a lowered ``s`` comes back as is."""
    if s.lowered:
        return s
    times = compute_times(s, forward_cost, backward_cost)
    computes = [[a for a in prog if a.kind.compute] for prog in s.ranks]
    ends = [[times[a][1] for a in prog] for prog in computes]
    gaps: list[list[list[tuple[tuple, Action]]]] = [[[] for _ in range(len(p) + 1)] for p in computes]
    for r, t, key, a in _transfers(s, times):
        g = sum(1 for e in ends[r] if e <= t)  # after every compute action that has ended by T
        gaps[r][g].append((key, a))
    progs = []
    for r, prog in enumerate(computes):
        out: list[Action] = []
        for g, gap in enumerate(gaps[r]):
            out += [a for _, a in sorted(gap)]
            if g < len(prog):
                out.append(prog[g])
        progs.append(tuple(out))
    return PipelineSchedule(s.name, s.nranks, s.nstages, s.nmicro, tuple(progs))
