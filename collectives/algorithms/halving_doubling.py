"""Recursive halving and doubling (Rabenseifner 2004; Thakur, Rabenseifner & Gropp 2005).

With m = 2^floor(log2 n) and r = n - m, the first 2r ranks fold in pairs:
rank 2i gives its data to rank 2i+1 in one extra first step, and the m
survivors (ranks 2i+1 for i < r, then ranks 2r..n-1; survivor s is the s-th of
them) run the power-of-two algorithm. Each survivor s ends the halving owning
a contiguous chunk range ``own[s]``:

- reduce-scatter step at distance d: s and s ^ d hold the same range (the
  union of ``own`` over the survivors that agree with s on the bits already
  done); each sends the partner's half and reduces its own. So the data
  halves every step and each chunk is reduced along one binomial tree.
- all-gather is the same run backwards: each step s sends everything it holds
  to s ^ d and receives (overwrites) what the partner holds.

Layouts:

- all-reduce: ``m`` chunks (one block). Distances go 1, 2, ..., m/2 in the
  reduce-scatter, so survivor s owns chunk bitreverse(s), and back down in
  the all-gather: the largest transfers go to the nearest ranks, which on a
  hierarchical machine are on the same node. The fold's even ranks send their
  whole buffer at the start and get the result back at the end: 2 log2 m
  steps, plus 2 when n is not a power of two.
- reduce-scatter and all-gather: ``n`` chunks, one per block (rank). Survivor
  s owns its own block, plus its folded partner's: the ranges are contiguous
  in survivor order, so distances go m/2, ..., 1 (the ranges may differ in
  size for non-powers of two; every transfer names one range). In the
  reduce-scatter fold rank 2i keeps its own block and sends the others; its
  partner returns the block, reduced over the other n-1 ranks, at the end.
  In the all-gather fold rank 2i sends its block to 2i+1 first and gets every
  other block back at the end. log2 m steps, plus 2 for non-powers of two.
"""

from __future__ import annotations

from ..schedule import Collective, Op, Recv, Schedule, Send, Step

_Range = tuple[int, int]


def _fold(n: int) -> tuple[int, list[int]]:
    """Number of folded pairs r and the survivors' ranks, in survivor order."""
    m = 1 << (n.bit_length() - 1)
    r = n - m
    return r, [2 * i + 1 for i in range(r)] + list(range(2 * r, n))


def _span(own: list[_Range], s: int, mask: int) -> _Range:
    """The chunks held by survivor s's group: survivors agreeing with s on the bits of mask."""
    group = [own[t] for t in range(len(own)) if t & mask == s & mask]
    lo, hi = min(a for a, _ in group), max(b for _, b in group)
    assert sum(b - a for a, b in group) == hi - lo, "owned ranges of a group must tile one range"
    return lo, hi


def _halving(grid: list[list[list[Op]]], at: int, ranks: list[int], own: list[_Range],
             dists: list[int], gather: bool) -> None:
    """Adds the reduce-scatter over ``dists`` (or, with ``gather``, its reverse) from step ``at``."""
    masks = [sum(dists[:i + 1]) for i in range(len(dists))]
    order = list(zip(dists, masks))
    if gather:
        order.reverse()
    for i, (d, mask) in enumerate(order):
        for s, rank in enumerate(ranks):
            peer = ranks[s ^ d]
            if gather:
                (a, b), (c, e) = _span(own, s, mask), _span(own, s ^ d, mask)
                grid[rank][at + i] += [Send(peer, a, b), Recv(peer, c, e, reduce=False)]
            else:
                (a, b), (c, e) = _span(own, s ^ d, mask), _span(own, s, mask)
                grid[rank][at + i] += [Send(peer, a, b), Recv(peer, c, e, reduce=True)]


def _bitreverse(s: int, bits: int) -> int:
    return int(f"{s:0{bits}b}"[::-1], 2) if bits else 0


def _grid(n: int, nsteps: int) -> list[list[list[Op]]]:
    return [[[] for _ in range(nsteps)] for _ in range(n)]


def _steps(grid: list[list[list[Op]]]) -> tuple[tuple[Step, ...], ...]:
    return tuple(tuple(Step(tuple(ops)) for ops in row) for row in grid)


def _check(world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")


def _ranges(lo: int, hi: int, skip: int) -> list[_Range]:
    """[lo, hi) without chunk ``skip``, as at most two non-empty ranges."""
    return [(a, b) for a, b in ((lo, skip), (skip + 1, hi)) if a < b]


def halving_doubling_all_reduce(world_size: int) -> Schedule:
    _check(world_size)
    n = world_size
    r, ranks = _fold(n)
    m, k = len(ranks), len(ranks).bit_length() - 1
    dists = [1 << j for j in range(k)]
    own = [(_bitreverse(s, k), _bitreverse(s, k) + 1) for s in range(m)]
    f = 1 if r else 0
    grid = _grid(n, 2 * k + 2 * f)
    for i in range(r):
        grid[2 * i][0].append(Send(2 * i + 1, 0, m))
        grid[2 * i + 1][0].append(Recv(2 * i, 0, m, reduce=True))
        grid[2 * i + 1][-1].append(Send(2 * i, 0, m))
        grid[2 * i][-1].append(Recv(2 * i + 1, 0, m, reduce=False))
    _halving(grid, f, ranks, own, dists, gather=False)
    _halving(grid, f + k, ranks, own, dists, gather=True)
    return Schedule(Collective.ALL_REDUCE, "halving_doubling", n, m, _steps(grid))


def _block_owners(n: int, r: int, ranks: list[int]) -> list[_Range]:
    """Survivor 2i+1 owns blocks 2i and 2i+1; the others their own block."""
    return [(x - 1, x + 1) if x < 2 * r else (x, x + 1) for x in ranks]


def _blocked_setup(n: int) -> tuple[int, list[int], int, int, list[list[list[Op]]]]:
    """For the blocked forms: folded pairs r, survivors, log2 of their count, fold steps f (0 or 1,
    at each end), and an empty grid of k halving steps plus the fold steps."""
    _check(n)
    r, ranks = _fold(n)
    k = len(ranks).bit_length() - 1
    f = 1 if r else 0
    return r, ranks, k, f, _grid(n, k + 2 * f)


def halving_doubling_reduce_scatter(world_size: int) -> Schedule:
    n = world_size
    r, ranks, k, f, grid = _blocked_setup(n)
    for i in range(r):
        lo, hi = 2 * i, 2 * i + 1
        for a, b in _ranges(0, n, lo):
            grid[lo][0].append(Send(hi, a, b))
            grid[hi][0].append(Recv(lo, a, b, reduce=True))
        grid[hi][-1].append(Send(lo, lo, lo + 1))
        grid[lo][-1].append(Recv(hi, lo, lo + 1, reduce=True))
    dists = [1 << j for j in reversed(range(k))]
    _halving(grid, f, ranks, _block_owners(n, r, ranks), dists, gather=False)
    return Schedule(Collective.REDUCE_SCATTER, "halving_doubling", n, n, _steps(grid))


def halving_doubling_all_gather(world_size: int) -> Schedule:
    n = world_size
    r, ranks, k, f, grid = _blocked_setup(n)
    for i in range(r):
        lo, hi = 2 * i, 2 * i + 1
        grid[lo][0].append(Send(hi, lo, lo + 1))
        grid[hi][0].append(Recv(lo, lo, lo + 1, reduce=False))
        for a, b in _ranges(0, n, lo):
            grid[hi][-1].append(Send(lo, a, b))
            grid[lo][-1].append(Recv(hi, a, b, reduce=False))
    dists = [1 << j for j in reversed(range(k))]
    _halving(grid, f, ranks, _block_owners(n, r, ranks), dists, gather=True)
    return Schedule(Collective.ALL_GATHER, "halving_doubling", n, n, _steps(grid))
