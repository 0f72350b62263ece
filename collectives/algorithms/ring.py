"""Ring algorithms (Patarasuk & Yuan 2009; the pipelined chain for rooted ops).

Rank r sends to r+1 and receives from r-1 (mod n). For the blocked and
all-reduce forms the work buffer is cut into n chunks, one per rank:

- reduce-scatter: in step s rank r sends chunk r-s-1 and reduces chunk r-s-2
  into its own copy; after n-1 steps chunk r on rank r holds every
  contribution. Each chunk is reduced on exactly one path, so one order.
- all-gather: in step s rank r forwards chunk r-s and overwrites chunk r-s-1.
- all-reduce: reduce-scatter (rank r ends owning chunk r+1 in the unshifted
  form used here) followed by all-gather: 2(n-1) steps, each moving 1/n of
  the buffer, which is bandwidth-optimal.

Broadcast and reduce run the buffer as ``pipeline`` chunks down a chain that
starts at the root (broadcast) or ends at it (reduce): position p handles
chunk k in step k + p, so the chain is full after n-1 steps.
"""

from __future__ import annotations

from ..schedule import Collective, Recv, Schedule, Send, Step


def ring_reduce_scatter(world_size: int) -> Schedule:
    n = world_size
    ranks = tuple(
        tuple(Step((Send((r + 1) % n, (r - s - 1) % n, (r - s - 1) % n + 1),
                    Recv((r - 1) % n, (r - s - 2) % n, (r - s - 2) % n + 1, reduce=True)))
              for s in range(n - 1))
        for r in range(n))
    return Schedule(Collective.REDUCE_SCATTER, "ring", n, n, ranks)


def ring_all_gather(world_size: int) -> Schedule:
    n = world_size
    ranks = tuple(
        tuple(Step((Send((r + 1) % n, (r - s) % n, (r - s) % n + 1),
                    Recv((r - 1) % n, (r - s - 1) % n, (r - s - 1) % n + 1, reduce=False)))
              for s in range(n - 1))
        for r in range(n))
    return Schedule(Collective.ALL_GATHER, "ring", n, n, ranks)


def ring_all_reduce(world_size: int) -> Schedule:
    n = world_size
    ranks = []
    for r in range(n):
        right, left = (r + 1) % n, (r - 1) % n
        steps = []
        for s in range(n - 1):  # reduce-scatter: rank r ends owning chunk r+1
            a, b = (r - s) % n, (r - s - 1) % n
            steps.append(Step((Send(right, a, a + 1), Recv(left, b, b + 1, reduce=True))))
        for s in range(n - 1):  # all-gather of the owned chunks
            a, b = (r + 1 - s) % n, (r - s) % n
            steps.append(Step((Send(right, a, a + 1), Recv(left, b, b + 1, reduce=False))))
        ranks.append(tuple(steps))
    return Schedule(Collective.ALL_REDUCE, "ring", n, n, tuple(ranks))


def _chain(world_size: int, pipeline: int, first: int, reduce: bool) -> tuple[tuple[Step, ...], ...]:
    """Chunks flow along ranks first, first+1, ...; position p handles chunk k in step k+p."""
    n, k = world_size, pipeline
    ranks: list[tuple[Step, ...]] = [()] * n
    for p in range(n):
        r = (first + p) % n
        steps = []
        for t in range(k + n - 2):
            ops = []
            if p < n - 1 and 0 <= t - p < k:
                ops.append(Send((r + 1) % n, t - p, t - p + 1))
            if p > 0 and 0 <= t - p + 1 < k:
                ops.append(Recv((r - 1) % n, t - p + 1, t - p + 2, reduce=reduce))
            steps.append(Step(tuple(ops)))
        ranks[r] = tuple(steps)
    return tuple(ranks)


def ring_broadcast(world_size: int, root: int = 0, pipeline: int = 1) -> Schedule:
    ranks = _chain(world_size, pipeline, root, reduce=False)
    return Schedule(Collective.BROADCAST, "ring", world_size, pipeline, ranks, root=root)


def ring_reduce(world_size: int, root: int = 0, pipeline: int = 1) -> Schedule:
    ranks = _chain(world_size, pipeline, (root + 1) % world_size, reduce=True)
    return Schedule(Collective.REDUCE, "ring", world_size, pipeline, ranks, root=root)
