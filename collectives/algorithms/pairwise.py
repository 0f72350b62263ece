"""Pairwise-exchange all-to-all (the MPICH / NCCL long-message scheme).

The work buffer is the output: n blocks, one chunk each, block j holding what
rank j sent to this rank. The executor copies the rank's own block from the
input before the schedule runs. In step s (1..n-1) rank r sends input block
(r+s) mod n straight from the input buffer to rank (r+s) mod n, and receives
(overwrites) work block (r-s) mod n from rank (r-s) mod n. Each step is a
permutation of the ranks, so every rank sends and receives exactly one block
a step: n-1 steps.
"""

from __future__ import annotations

from ..schedule import Buffer, Collective, Recv, Schedule, Send, Step


def pairwise_all_to_all(world_size: int) -> Schedule:
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    n = world_size
    ranks = tuple(
        tuple(Step((Send((r + s) % n, (r + s) % n, (r + s) % n + 1, Buffer.INPUT),
                    Recv((r - s) % n, (r - s) % n, (r - s) % n + 1, reduce=False)))
              for s in range(1, n))
        for r in range(n))
    return Schedule(Collective.ALL_TO_ALL, "pairwise", n, n, ranks)
