"""Tree algorithms: NCCL's pipelined double binary tree, and binomial trees.

All-reduce (double binary tree, Sanders, Speck & Traeff 2009; NCCL 2.4).
The work buffer is cut into ``2 * pipeline`` chunks: chunks ``[0, p)`` travel
on tree 0 and chunks ``[p, 2p)`` on tree 1, at the same time. Tree 0 is NCCL's
in-order binary tree over ranks 0..n-1: rank 0 is the root (one child), odd
ranks are the leaves and even ranks the interior nodes. Tree 1 is tree 0
mirrored (r -> n-1-r) for even n, shifted by one (r -> r+1) for odd n, so the
leaves of tree 0 are interior nodes of tree 1 and every rank does interior
work in at most one tree (rank 0, for odd n, in both).

In each tree, with h(v) the height of node v (leaves 0), d(v) its depth and
H the root's height, chunk k of that tree moves:

- up: v sends k to its parent in step k + h(v); the parent reduces it in the
  same step. h(parent) > h(v), so a node has reduced k from all its children
  before it forwards k;
- down: the root holds the full chunk after step k + H - 1; node v receives k
  (overwrite) from its parent in step k + H + d(v) - 1 and forwards it to its
  children in step k + H + d(v).

So a rank sends and receives at most one chunk per tree edge per step, the
pipeline is full after H steps, and the whole run takes p - 1 + 2H steps
(H ~ log2 n). Every chunk is reduced up one tree and then copied down from its
root, so all ranks hold the same reduction order.

Broadcast and reduce (binomial trees) cut the buffer into ``pipeline`` chunks.
With v = (r - root) mod n and L = ceil(log2 n), broadcast round j has every v
< 2^j send to v + 2^j; chunk k runs round j in step k + j, so L rounds for one
chunk and L + p - 1 steps in all. Reduce runs the same tree backwards: v sends
to v - 2^floor(log2 v), chunk k in step k + L - 1 - floor(log2 v).
"""

from __future__ import annotations

from ..schedule import Collective, Op, Recv, Schedule, Send, Step


def _steps(grid: list[list[list[Op]]]) -> tuple[tuple[Step, ...], ...]:
    """Per-rank step tuples; ops sorted so two messages between one pair match in order."""
    def key(o: Op) -> tuple[int, int, int]:
        return (isinstance(o, Recv), o.peer, o.start)
    return tuple(tuple(Step(tuple(sorted(ops, key=key))) for ops in row) for row in grid)


def btree_parents(n: int) -> list[int]:
    """NCCL's binary tree: parent of every rank (-1 for the root, rank 0).

    A rank with lowest set bit b hangs below (r ^ b) | 2b, or below r ^ b when
    that is out of range; so odd ranks are leaves and the root has one child.
    """
    parent = [-1] * n
    for r in range(1, n):
        bit = r & -r
        up = (r ^ bit) | (bit << 1)
        parent[r] = up if up < n else r ^ bit
    return parent


def double_tree_parents(n: int) -> tuple[list[int], list[int]]:
    """Parents in NCCL's two complementary trees (mirrored for even n, shifted for odd)."""
    first = btree_parents(n)
    if n % 2:
        fwd, back = (lambda r: (r + 1) % n), (lambda r: (r - 1) % n)
    else:
        fwd = back = (lambda r: n - 1 - r)
    second = [-1 if first[back(r)] < 0 else fwd(first[back(r)]) for r in range(n)]
    return first, second


def _shape(parent: list[int]) -> tuple[list[list[int]], list[int], list[int]]:
    """Children, height (leaves 0) and depth (root 0) of every node of a tree."""
    n = len(parent)
    children: list[list[int]] = [[] for _ in range(n)]
    for r, p in enumerate(parent):
        if p >= 0:
            children[p].append(r)
    depth = [0] * n
    for r in range(n):
        v = r
        while parent[v] >= 0:
            v = parent[v]
            depth[r] += 1
    height = [0] * n
    for r in sorted(range(n), key=lambda x: -depth[x]):
        if parent[r] >= 0:
            height[parent[r]] = max(height[parent[r]], height[r] + 1)
    return children, height, depth


def _tree_all_reduce_ops(grid: list[list[list[Op]]], parent: list[int], first: int, p: int) -> None:
    """Adds one tree's reduce-then-broadcast of chunks [first, first + p) to ``grid``."""
    children, height, depth = _shape(parent)
    top = height[parent.index(-1)]
    for v, up in enumerate(parent):
        for k in range(p):
            c = first + k
            for ch in children[v]:
                grid[v][k + height[ch]].append(Recv(ch, c, c + 1, reduce=True))
                grid[v][k + top + depth[v]].append(Send(ch, c, c + 1))
            if up >= 0:
                grid[v][k + height[v]].append(Send(up, c, c + 1))
                grid[v][k + top + depth[v] - 1].append(Recv(up, c, c + 1, reduce=False))


def _check(world_size: int, pipeline: int, root: int = 0) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if pipeline < 1:
        raise ValueError(f"pipeline must be positive, got {pipeline}")
    if not 0 <= root < world_size:
        raise ValueError(f"root must be in 0..{world_size - 1}, got {root}")


def tree_all_reduce(world_size: int, pipeline: int = 1) -> Schedule:
    _check(world_size, pipeline)
    n, p = world_size, pipeline
    trees = double_tree_parents(n)
    nsteps = 0 if n == 1 else max(p - 1 + 2 * _shape(t)[1][t.index(-1)] for t in trees)
    grid: list[list[list[Op]]] = [[[] for _ in range(nsteps)] for _ in range(n)]
    if n > 1:
        for i, parent in enumerate(trees):
            _tree_all_reduce_ops(grid, parent, i * p, p)
    return Schedule(Collective.ALL_REDUCE, "tree", n, 2 * p, _steps(grid))


def _binomial(world_size: int, root: int, pipeline: int, reduce: bool) -> tuple[tuple[Step, ...], ...]:
    _check(world_size, pipeline, root)
    n, p = world_size, pipeline
    rounds = (n - 1).bit_length()
    nsteps = 0 if n == 1 else p + rounds - 1
    grid: list[list[list[Op]]] = [[[] for _ in range(nsteps)] for _ in range(n)]
    for v in range(1, n):
        j = v.bit_length() - 1  # v hangs below v - 2^j, reached in broadcast round j
        child, parent = (v + root) % n, (v - (1 << j) + root) % n
        rnd = rounds - 1 - j if reduce else j
        for k in range(p):
            if reduce:
                grid[child][k + rnd].append(Send(parent, k, k + 1))
                grid[parent][k + rnd].append(Recv(child, k, k + 1, reduce=True))
            else:
                grid[parent][k + rnd].append(Send(child, k, k + 1))
                grid[child][k + rnd].append(Recv(parent, k, k + 1, reduce=False))
    return _steps(grid)


def tree_broadcast(world_size: int, root: int = 0, pipeline: int = 1) -> Schedule:
    ranks = _binomial(world_size, root, pipeline, reduce=False)
    return Schedule(Collective.BROADCAST, "tree", world_size, pipeline, ranks, root=root)


def tree_reduce(world_size: int, root: int = 0, pipeline: int = 1) -> Schedule:
    ranks = _binomial(world_size, root, pipeline, reduce=True)
    return Schedule(Collective.REDUCE, "tree", world_size, pipeline, ranks, root=root)
