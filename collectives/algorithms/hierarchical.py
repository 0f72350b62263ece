"""Hierarchical all-reduce: rings inside each node, one ring per rail across nodes.

``nodes`` lists each node's global ranks; a rank's local index is its position
in its node's tuple. The schedule is composed from smaller ones (ring.py,
tree.py) whose ranks are mapped onto global ranks and whose chunk ranges are
scaled into the larger buffer.

Equal node sizes (L ranks a node, N nodes): the buffer is cut into L * N
chunks, L groups of N consecutive chunks.

1. Intra-node ring reduce-scatter over the L groups (the first half of
   ``ring_all_reduce(L)``, each of its chunks scaled to a group): local index
   i ends owning group g(i) = (i + 1) mod L, reduced over its node. L-1 steps.
2. Inter-node ring all-reduce of group g(i) among the N ranks of local index
   i (one ring per rail, all rails at once; ``ring_all_reduce(N)`` on the
   group's N chunks). 2(N-1) steps, each moving 1/(L N) of the buffer over
   every rail, so inter-node links carry 2(N-1)/(L N) of it in all.
3. Intra-node ring all-gather of the groups (the second half of
   ``ring_all_reduce(L)``). L-1 steps.

With one node this is ``ring_all_reduce(L)``, and with one rank a node (in
rank order) ``ring_all_reduce(N)``. Each chunk is reduced along one path and
then copied, so all ranks hold the same reduction order.

Unequal node sizes fall back to leaders (local index 0): a binomial reduce of
the whole buffer to the leader inside each node, a ring all-reduce among the
leaders on N chunks, and a binomial broadcast inside each node.

Pipelined (``pipeline`` k > 1): the buffer is cut into k parts, each running the
schedule above on its own chunks, part p starting p steps after part p-1. Step t
then carries part p's step t - p for every p: the intra-node phases of one part
travel while another part is on the inter-node rails, so the slow links are not
left idle while nodes reduce and gather locally. k - 1 more steps, each moving
1/k as much.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..schedule import Collective, Op, Recv, Schedule, Send, Step
from .ring import ring_all_reduce
from .tree import tree_broadcast, tree_reduce

Nodes = tuple[tuple[int, ...], ...]
_Grid = list[list[list[Op]]]


def check_nodes(world_size: int, nodes: Sequence[Sequence[int]] | None) -> Nodes:
    """``nodes`` as a tuple of tuples, checked to partition ranks 0..world_size-1 (None: one node)."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if nodes is None:
        return (tuple(range(world_size)),)
    out = tuple(tuple(int(r) for r in node) for node in nodes)
    flat = sorted(r for node in out for r in node)
    if any(not node for node in out) or flat != list(range(world_size)):
        raise ValueError(f"nodes must split ranks 0..{world_size - 1} into non-empty nodes, each rank once; "
                         f"got {nodes!r}")
    return out


def _embed(grid: _Grid, sub: Schedule, members: Sequence[int], at: int, steps: range | None = None,
           scale: int = 1, offset: int = 0) -> None:
    """Adds ``sub``'s steps (``steps``, default all) to ``grid`` from step ``at`` on.

    Sub-rank q becomes global rank members[q]; sub-chunk c becomes chunks
    [offset + c * scale, offset + (c + 1) * scale).
    """
    steps = range(sub.nsteps) if steps is None else steps
    for q, rank in enumerate(members):
        row = sub.steps(q)
        for t, i in enumerate(steps):
            if i >= len(row):
                continue
            for o in row[i].ops:
                a, b = offset + o.start * scale, offset + o.stop * scale
                peer = members[o.peer]
                grid[rank][at + t].append(Send(peer, a, b, o.buffer) if isinstance(o, Send)
                                          else Recv(peer, a, b, reduce=o.reduce))


def _steps(grid: _Grid) -> tuple[tuple[Step, ...], ...]:
    return tuple(tuple(Step(tuple(ops)) for ops in row) for row in grid)


def _rails(n: int, nodes: Nodes) -> Schedule:
    nn, local = len(nodes), len(nodes[0])
    intra, inter = ring_all_reduce(local), ring_all_reduce(nn)
    half, mid = local - 1, 2 * (nn - 1)
    grid: _Grid = [[[] for _ in range(2 * half + mid)] for _ in range(n)]
    for node in nodes:
        _embed(grid, intra, node, 0, range(half), scale=nn)
        _embed(grid, intra, node, half + mid, range(half, 2 * half), scale=nn)
    for i in range(local):
        rail = [node[i] for node in nodes]
        _embed(grid, inter, rail, half, offset=(i + 1) % local * nn)
    return Schedule(Collective.ALL_REDUCE, "hierarchical", n, local * nn, _steps(grid))


def _leaders(n: int, nodes: Nodes) -> Schedule:
    nn = len(nodes)
    depth = max((len(node) - 1).bit_length() for node in nodes)
    ring = ring_all_reduce(nn)
    grid: _Grid = [[[] for _ in range(2 * depth + ring.nsteps)] for _ in range(n)]
    for node in nodes:
        _embed(grid, tree_reduce(len(node), 0), node, 0, scale=nn)
        _embed(grid, tree_broadcast(len(node), 0), node, depth + ring.nsteps, scale=nn)
    _embed(grid, ring, [node[0] for node in nodes], depth)
    return Schedule(Collective.ALL_REDUCE, "hierarchical", n, nn, _steps(grid))


def hierarchical_all_reduce(world_size: int, nodes: Sequence[Sequence[int]] | None = None,
                            pipeline: int = 1) -> Schedule:
    nodes_ = check_nodes(world_size, nodes)
    if pipeline < 1:
        raise ValueError(f"pipeline: expected >= 1 parts, got {pipeline}")
    base = _rails(world_size, nodes_) if len({len(node) for node in nodes_}) == 1 else _leaders(world_size, nodes_)
    return staggered(base, pipeline)


def staggered(s: Schedule, parts: int) -> Schedule:
    """``parts`` copies of ``s`` on consecutive chunk ranges, copy p delayed by p steps (see the module note).

    Chunk layouts of one block only (all-reduce, broadcast, reduce). Ops of one step are listed part by
    part on every rank, so a pair's transfers keep one order at both ends.
    """
    if parts == 1 or s.nsteps == 0:
        return s
    if s.blocks != 1:
        raise ValueError(f"staggered: {s.collective.value} cuts its buffer into blocks; stagger a one-block schedule")
    n = s.world_size
    grid: _Grid = [[[] for _ in range(s.nsteps + parts - 1)] for _ in range(n)]
    for p in range(parts):
        _embed(grid, s, range(n), p, offset=p * s.nchunks)
    return Schedule(s.collective, s.algorithm, n, s.nchunks * parts, _steps(grid), root=s.root)
