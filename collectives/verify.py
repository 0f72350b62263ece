"""Symbolic verification of a Schedule, with no processes.

``verify(schedule)`` runs the schedule on symbols instead of numbers and
raises ``ScheduleError`` unless:

- every send has its matching receive (same pair, same order, same size);
- the schedule cannot deadlock when each transfer completes only once both
  sides have posted it (rendezvous, the strictest transport);
- no contribution is reduced into a chunk twice, no uninitialised chunk is
  sent or reduced, and no chunk is overwritten by a receive in the step that
  sends it ([Note: step semantics] in schedule.py);
- the collective's postcondition holds: e.g. for all-reduce every rank holds
  every contribution exactly once in every chunk, and all ranks hold the same
  reduction expression, so the results are bitwise identical on every rank.

A chunk's symbolic value is a pair (contributions, expression): the set of
source tokens as a bit mask, and an interned id of the reduction tree that
produced it (commutative, since IEEE addition and the other ops are).
It returns the number of rounds the rendezvous simulation took, and the round
in which each rank ran each step (the cost model prices rounds).
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule import Buffer, Collective, Schedule, Send

EMPTY = (0, -1)


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Trace:
    rounds: int
    step_round: tuple[tuple[int, ...], ...]  # step_round[rank][i]: the round rank ran step i


class _Exprs:
    """Interns reduction trees so equal expressions get equal ids."""

    def __init__(self) -> None:
        self.ids: dict[tuple, int] = {}

    def leaf(self, token: int) -> int:
        return self.ids.setdefault(("leaf", token), len(self.ids))

    def combine(self, a: int, b: int) -> int:
        key = ("op", min(a, b), max(a, b))
        return self.ids.setdefault(key, len(self.ids))


def _token(coll: Collective, n: int, src: int, dst_block: int) -> int:
    return src * n + dst_block if coll is Collective.ALL_TO_ALL else src


def _initial(s: Schedule, exprs: _Exprs) -> tuple[list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
    """Work and input buffers' symbolic values on every rank at the start."""
    n, c, coll = s.world_size, s.nchunks, s.collective
    per = c // s.blocks
    work: list[list[tuple[int, int]]] = []
    inp: list[list[tuple[int, int]]] = []
    for r in range(n):
        if coll.reduces:
            row = [(1 << r, exprs.leaf(r))] * c
        elif coll is Collective.BROADCAST:
            row = [(1 << r, exprs.leaf(r)) if r == s.root else EMPTY] * c
        elif coll is Collective.ALL_GATHER:
            row = [(1 << r, exprs.leaf(r)) if i // per == r else EMPTY for i in range(c)]
        else:  # all-to-all: the executor copies the rank's own block before the schedule runs
            tok = [_token(coll, n, r, i // per) for i in range(c)]
            inp.append([(1 << t, exprs.leaf(t)) for t in tok])
            row = [(1 << tok[i], exprs.leaf(tok[i])) if i // per == r else EMPTY for i in range(c)]
        work.append(list(row))
        if coll is not Collective.ALL_TO_ALL:
            inp.append([])
    return work, inp


def _match(s: Schedule) -> dict[tuple[int, int, int], tuple[int, int]]:
    """Pairs each op (rank, step, index) with its counterpart, checking counts and sizes."""
    n = s.world_size
    sends: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    recvs: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for r in range(n):
        for si, st in enumerate(s.ranks[r]):
            for oi, op in enumerate(st.ops):
                if not 0 <= op.peer < n or op.peer == r:
                    raise ScheduleError(f"rank {r} step {si}: peer {op.peer} is out of range or itself")
                if not 0 <= op.start < op.stop <= s.nchunks:
                    raise ScheduleError(f"rank {r} step {si}: chunk range [{op.start}:{op.stop}] is empty or outside 0..{s.nchunks}")
                if isinstance(op, Send):
                    sends.setdefault((r, op.peer), []).append((r, si, oi))
                else:
                    recvs.setdefault((op.peer, r), []).append((r, si, oi))
    partner: dict[tuple[int, int, int], tuple[int, int]] = {}
    for pair in set(sends) | set(recvs):
        ss, rr = sends.get(pair, []), recvs.get(pair, [])
        if len(ss) != len(rr):
            raise ScheduleError(f"rank {pair[0]} sends {len(ss)} messages to rank {pair[1]}, which receives {len(rr)}")
        for (a, sa, oa), (b, sb, ob) in zip(ss, rr):
            x, y = s.ranks[a][sa].ops[oa], s.ranks[b][sb].ops[ob]
            same = (x.start, x.stop) == (y.start, y.stop)
            if not same and not (s.collective is Collective.ALL_TO_ALL and x.nchunks == y.nchunks):
                raise ScheduleError(f"rank {a} step {sa} sends chunks [{x.start}:{x.stop}] to rank {b}, "
                                    f"whose step {sb} receives [{y.start}:{y.stop}]")
            partner[(a, sa, oa)] = (b, sb)
            partner[(b, sb, ob)] = (a, sa)
    return partner


def _simulate(s: Schedule, partner: dict[tuple[int, int, int], tuple[int, int]]) -> Trace:
    """Rendezvous simulation: a step ends in a round where every counterpart is posted."""
    n = s.world_size
    at = [0] * n
    step_round: list[list[int]] = [[] for _ in range(n)]
    rounds = 0
    while any(at[r] < len(s.ranks[r]) for r in range(n)):
        ready = []
        for r in range(n):
            if at[r] >= len(s.ranks[r]):
                continue
            st = s.ranks[r][at[r]]
            if all(at[partner[(r, at[r], oi)][0]] == partner[(r, at[r], oi)][1] for oi in range(len(st.ops))):
                ready.append(r)
        if not ready:
            stuck = ", ".join(f"rank {r} at step {at[r]}" for r in range(n) if at[r] < len(s.ranks[r]))
            raise ScheduleError(f"deadlock: no rank can finish its step ({stuck})")
        for r in ready:
            step_round[r].append(rounds)
            at[r] += 1
        rounds += 1
    return Trace(rounds, tuple(tuple(x) for x in step_round))


def verify(s: Schedule) -> Trace:
    """Check a schedule (see the module docstring); return its rendezvous trace."""
    if s.collective.rooted and (s.root is None or not 0 <= s.root < s.world_size):
        raise ScheduleError(f"{s.collective.value} needs a root in 0..{s.world_size - 1}, got {s.root}")
    partner = _match(s)
    trace = _simulate(s, partner)
    exprs = _Exprs()
    work, inp = _initial(s, exprs)
    n = s.world_size
    # Dataflow run: a rank posts its step (its sends read the state as the step
    # begins), then applies the receives once every matching send has posted.
    mail: dict[tuple[int, int, int], list[list[tuple[int, int]]]] = {}
    at, posted = [0] * n, [False] * n
    progress = True
    while progress:
        progress = False
        for r in range(n):
            if at[r] >= len(s.ranks[r]):
                continue
            i = at[r]
            st = s.ranks[r][i]
            if not posted[r]:
                _post(s, r, i, work, inp, partner, mail)
                posted[r] = progress = True
            need: dict[int, int] = {}
            for o in st.recvs:
                need[o.peer] = need.get(o.peer, 0) + 1
            if all(len(mail.get((r, i, p), ())) >= k for p, k in need.items()):
                _apply(r, i, st.recvs, work, mail, exprs)
                at[r] += 1
                posted[r] = False
                progress = True
    _check_post(s, work)
    return trace


def _post(s: Schedule, r: int, i: int, work, inp, partner, mail) -> None:
    st = s.ranks[r][i]
    overwritten = {c for o in st.recvs if not o.reduce for c in range(o.start, o.stop)}
    received = [c for o in st.recvs for c in range(o.start, o.stop)]
    if len(received) != len(set(received)) and overwritten & {c for c in received if received.count(c) > 1}:
        raise ScheduleError(f"rank {r} step {i}: a chunk is overwritten by one receive and touched by another "
                            f"in the same step")
    for oi, op in enumerate(st.ops):
        if not isinstance(op, Send):
            continue
        if op.buffer is Buffer.INPUT and s.collective is not Collective.ALL_TO_ALL:
            raise ScheduleError(f"rank {r} step {i}: only all-to-all sends from the input buffer")
        vals = (inp[r] if op.buffer is Buffer.INPUT else work[r])[op.start:op.stop]
        if any(v == EMPTY for v in vals):
            raise ScheduleError(f"rank {r} step {i}: sends uninitialised chunks [{op.start}:{op.stop}] to {op.peer}")
        if op.buffer is Buffer.WORK and overwritten & set(range(op.start, op.stop)):
            raise ScheduleError(f"rank {r} step {i}: overwrites chunks it sends in the same step")
        peer, pstep = partner[(r, i, oi)]
        mail.setdefault((peer, pstep, r), []).append(vals)


def _apply(r: int, i: int, recvs, work, mail, exprs: _Exprs) -> None:
    for op in recvs:
        vals = mail[(r, i, op.peer)].pop(0)
        for k, v in zip(range(op.start, op.stop), vals):
            if not op.reduce:
                work[r][k] = v
                continue
            mine = work[r][k]
            if mine == EMPTY:
                raise ScheduleError(f"rank {r} step {i}: reduces into uninitialised chunk {k}")
            if mine[0] & v[0]:
                raise ScheduleError(f"rank {r} step {i}: chunk {k} would count contributions "
                                    f"{_ranks(mine[0] & v[0])} twice")
            work[r][k] = (mine[0] | v[0], exprs.combine(mine[1], v[1]))


def _ranks(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _check_post(s: Schedule, work: list[list[tuple[int, int]]]) -> None:
    n, c, coll = s.world_size, s.nchunks, s.collective
    per = c // s.blocks
    full = (1 << n) - 1

    def want(r: int, k: int) -> int | None:
        """Required contribution mask of chunk k on rank r (None: don't care)."""
        if coll is Collective.ALL_REDUCE:
            return full
        if coll is Collective.REDUCE_SCATTER:
            return full if k // per == r else None
        if coll is Collective.REDUCE:
            return full if r == s.root else None
        if coll is Collective.BROADCAST:
            return 1 << s.root
        if coll is Collective.ALL_GATHER:
            return 1 << (k // per)
        return 1 << _token(coll, n, k // per, r)  # all-to-all: block j on rank r came from rank j

    for r in range(n):
        for k in range(c):
            w = want(r, k)
            if w is not None and work[r][k][0] != w:
                raise ScheduleError(f"{coll.value} ({s.algorithm}, world {n}): rank {r} chunk {k} ends with "
                                    f"contributions {_ranks(work[r][k][0])}, expected {_ranks(w)}")
    if coll is Collective.ALL_REDUCE:
        for k in range(c):
            if len({work[r][k][1] for r in range(n)}) != 1:
                raise ScheduleError(f"all_reduce ({s.algorithm}): chunk {k} is reduced in different orders "
                                    f"on different ranks, so results would not be bitwise identical")
