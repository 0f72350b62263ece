"""Direct (all-pairs) algorithms, for fabrics where every pair of ranks has its
own path: NVSwitch, a full NVLink mesh, or shared memory.

The work buffer is cut into n chunks, chunk j owned by rank j.

- reduce-scatter: one step. Rank r sends chunk j to rank j for every j != r
  and receives chunk r from every other rank, reducing the n-1 arrivals into
  its own copy in the order r+1, r+2, ... (mod n), one fixed order per chunk.
- all-gather: one step. Rank r sends chunk r to every other rank and receives
  chunk j from rank j.
- all-reduce: reduce-scatter then all-gather, 2 steps.

Every rank moves the same (n-1)/n of the buffer each way as in a ring, but in
one step instead of n-1, through all its links at once: latency 2 alpha
instead of 2(n-1) alpha, and no link carries more than one transfer at a time
when each pair has its own path. On a ring-shaped fabric it would oversubscribe
links; the cost model prices that.
"""

from __future__ import annotations

from ..schedule import Collective, Recv, Schedule, Send, Step


def _reduce_scatter_step(n: int, r: int) -> Step:
    peers = [(r + k) % n for k in range(1, n)]
    return Step(tuple(Send(p, p, p + 1) for p in peers) + tuple(Recv(p, r, r + 1, reduce=True) for p in peers))


def _all_gather_step(n: int, r: int) -> Step:
    peers = [(r + k) % n for k in range(1, n)]
    return Step(tuple(Send(p, r, r + 1) for p in peers) + tuple(Recv(p, p, p + 1, reduce=False) for p in peers))


def direct_reduce_scatter(world_size: int) -> Schedule:
    n = world_size
    ranks = tuple((_reduce_scatter_step(n, r),) if n > 1 else () for r in range(n))
    return Schedule(Collective.REDUCE_SCATTER, "direct", n, n, ranks)


def direct_all_gather(world_size: int) -> Schedule:
    n = world_size
    ranks = tuple((_all_gather_step(n, r),) if n > 1 else () for r in range(n))
    return Schedule(Collective.ALL_GATHER, "direct", n, n, ranks)


def direct_all_reduce(world_size: int) -> Schedule:
    n = world_size
    ranks = tuple((_reduce_scatter_step(n, r), _all_gather_step(n, r)) if n > 1 else () for r in range(n))
    return Schedule(Collective.ALL_REDUCE, "direct", n, n, ranks)
