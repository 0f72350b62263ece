"""Structures generated round by round for any world size, without building a Schedule.

Ring, pipelined chain, windowed (pipelined) trees, double binary tree,
binomial tree, halving-doubling and hierarchical: each returns the Struct that
pricing the registry's Schedule round by round would give (rounds.py,
price_schedule; tests/test_model.py checks them against each other), built
from round_lines and the other pieces of rounds.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .rounds import (Struct, _active, _collect, _host_line, _Layout, _lines, _pareto, edge_loads, join, round_lines,
                     worked)
from .schedule import Collective


def ring_struct(lay: _Layout, coll: Collective) -> Struct:
    """Ring reduce-scatter / all-gather / all-reduce: every round every rank sends 1/n to r+1."""
    n = len(lay.node)
    src = np.arange(n)
    dst = (src + 1) % n
    rs = round_lines(lay, src, dst, 1 / n, dst, np.full(n, 1 / n))
    ag = round_lines(lay, src, dst, 1 / n)
    phases = {Collective.REDUCE_SCATTER: [rs], Collective.ALL_GATHER: [ag]}.get(coll, [rs, ag])
    return _collect([lines for lines in phases for _ in range(n - 1)])


def chain_struct(lay: _Layout, pipeline: int, first: int = 0, reduce: bool = False) -> Struct:
    """Pipelined chain (ring broadcast/reduce): edge p carries chunk t-p in round t.

    Round t runs the edges p in [t-k+1, t]; a reducing edge's receiver reduces 1/k,
    and its sender's line is dominated by it. When no port serves two edges, a
    round's lines depend only on which kinds of edge its window holds.
    """
    n, k = len(lay.node), pipeline
    if n < 2:
        return ()
    src = (first + np.arange(n - 1)) % n
    dst = (src + 1) % n
    full = edge_loads(lay, src, dst, 1 / k)
    # a port or NIC serves several edges, ranks share CPUs, or calls overlap ([Note: back to back])
    if full[:, 1].max() > 1 / k or lay.cpus or lay.back_to_back:
        return windowed_struct(lay, src, dst, np.arange(n - 1), k, 1 / k, reduce, k + n - 2)
    r = 1 / k if reduce else 0.0
    kinds, ids = np.unique(full, axis=0, return_inverse=True)
    ids = ids.ravel()
    prefix = np.zeros((len(ids) + 1, len(kinds)), np.int64)
    prefix[1:] = np.cumsum(np.eye(len(kinds), dtype=np.int64)[ids], axis=0)
    counts: Counter = Counter()
    for t in range(k + n - 2):
        lo, hi = max(0, t - k + 1), min(t, n - 2)
        # the window's edges are consecutive: with two or more, every edge has an end that sends and receives
        counts[tuple(np.flatnonzero(prefix[hi + 1] - prefix[lo])), 1 + (hi > lo)] += 1
    # [Note: posted ahead]: an inner rank posts k + 1 steps (receive part 0, ..., send part k - 1), an end k
    host = _host_line(lay, (k + (n > 2)) - (k + n - 2))
    # with two or more edges in the window every edge has an end that sends and receives ([Note: one way])
    return join(tuple((c, _pareto(_lines(kinds[list(key)], np.full(len(key), r), np.ones(len(key)), np.full(len(key), q),
                                         np.full(len(key), q > 1))))
                      for (key, q), c in counts.items()), host)


def windowed_struct(lay: _Layout, src: np.ndarray, dst: np.ndarray, start: np.ndarray, pipeline: int,
                    frac: float, reduce: bool | np.ndarray, nrounds: int) -> Struct:
    """Edges that each carry one chunk a round for rounds [start, start + pipeline) (pipelined trees);
    ``reduce`` (per edge or for all) says whether the receiver reduces it."""
    src, dst, start = (np.asarray(x, np.int64) for x in (src, dst, start))
    red = np.broadcast_to(np.asarray(reduce, bool), src.shape)
    starts = np.unique(start)
    rounds, memo, windows = [], {}, []
    for t in range(nrounds):
        key = (np.searchsorted(starts, t - pipeline + 1), np.searchsorted(starts, t, side="right"))
        if key not in memo:  # the active edges are those whose start lies in the window
            on = (start >= t - pipeline + 1) & (start <= t)
            memo[key] = (on, None if lay.back_to_back
                         else round_lines(lay, src[on], dst[on], frac, dst[on & red], frac))
        windows.append(memo[key][0])
        rounds.append(memo[key][1])

    def lines_of(t: int, rank: int) -> np.ndarray:  # [Note: back to back]
        on = windows[t]
        return round_lines(lay, src[on], dst[on], frac, dst[on & red], frac, rank=rank)

    if not lay.device:
        return _collect(rounds)
    # each edge keeps both its ends busy for rounds [start, start + pipeline): count open windows per rank
    open_ = np.zeros((len(lay.node), nrounds + 1))
    for end in (src, dst):
        np.add.at(open_, (end, np.clip(start, 0, nrounds)), 1)
        np.add.at(open_, (end, np.clip(start + pipeline, 0, nrounds)), -1)
    return worked(lay, rounds, (np.cumsum(open_, axis=1)[:, :nrounds] > 0).T, lines_of)


def _tree_shape(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Height (leaves 0) and depth (root 0) of every node of a tree given by parents (-1: root)."""
    n = len(parent)
    depth = np.zeros(n, np.int64)
    cur = parent.copy()
    while (cur >= 0).any():
        depth += cur >= 0
        cur = np.where(cur >= 0, parent[np.maximum(cur, 0)], -1)
    height = np.zeros(n, np.int64)
    for v in np.argsort(-depth, kind="stable"):
        if parent[v] >= 0:
            height[parent[v]] = max(height[parent[v]], height[v] + 1)
    return height, depth


def tree_all_reduce_struct(lay: _Layout, pipeline: int) -> Struct:
    """algorithms/tree.py's double binary tree, both trees at once, each on half the chunks:
    the child->parent edge (reduced) starts at height(child), parent->child at H + depth(parent)."""
    from .algorithms.tree import double_tree_parents
    n, p = len(lay.node), pipeline
    if n < 2:
        return ()
    src, dst, start, up, total = [], [], [], [], 0
    for parent in map(np.array, double_tree_parents(n)):
        height, depth = _tree_shape(parent)
        top = int(height[parent == -1][0])
        total = max(total, p - 1 + 2 * top)
        ch = np.flatnonzero(parent >= 0)
        src += [ch, parent[ch]]
        dst += [parent[ch], ch]
        start += [height[ch], top + depth[parent[ch]]]
        up += [np.ones(len(ch), bool), np.zeros(len(ch), bool)]
    return windowed_struct(lay, np.concatenate(src), np.concatenate(dst), np.concatenate(start), p,
                           1 / (2 * p), np.concatenate(up), total)


def binomial_struct(lay: _Layout, pipeline: int, reduce: bool) -> Struct:
    """algorithms/tree.py's pipelined binomial broadcast from rank 0 (reduce: the tree backwards)."""
    n = len(lay.node)
    if n < 2:
        return ()
    v = np.arange(1, n)
    j = np.floor(np.log2(v)).astype(np.int64)
    parent = v - (1 << j)
    levels = (n - 1).bit_length()
    if reduce:
        return windowed_struct(lay, v, parent, levels - 1 - j, pipeline, 1 / pipeline, True, pipeline + levels - 1)
    return windowed_struct(lay, parent, v, j, pipeline, 1 / pipeline, False, pipeline + levels - 1)


def hd_struct(lay: _Layout, coll: Collective, full: bool = False) -> Struct:
    """algorithms/halving_doubling.py round by round (Thakur et al. 2005; pairs 2i, 2i+1 fold).

    ``full`` gives recursive doubling all-reduce instead (whole buffer every step, MPICH's short-message choice).
    """
    n = len(lay.node)
    if n < 2:
        return ()
    m = 1 << (n.bit_length() - 1)
    r, k = n - m, m.bit_length() - 1
    surv = np.concatenate([2 * np.arange(r) + 1, np.arange(2 * r, n)]).astype(np.int64)
    even, odd = 2 * np.arange(r), 2 * np.arange(r) + 1
    s = np.arange(m)
    rounds, who, args = [], [], []

    def add(src: np.ndarray, dst: np.ndarray, *rest) -> None:
        rounds.append(round_lines(lay, src, dst, *rest))
        who.append(np.concatenate([src, dst]))
        args.append((src, dst, *rest))

    def lines_of(t: int, rank: int) -> np.ndarray:  # [Note: back to back]
        return round_lines(lay, *args[t], rank=rank)

    if coll is Collective.ALL_REDUCE:
        if r:
            add(even, odd, 1.0, odd, 1.0)
        for i in range(k):
            f = 1.0 if full else 1 / (2 << i)
            add(surv, surv[s ^ (1 << i)], f, surv, f)
        for i in range(0 if full else k):
            f = 1 / (m >> i)  # the all-gather runs the halving backwards: 1/m, 2/m, ..., 1/2
            add(surv, surv[s ^ (m >> (i + 1))], f)
        if r:
            add(odd, even, 1.0)
        return worked(lay, rounds, _active(n, *who), lines_of)
    # Blocked layouts: survivor s owns blocks [lo_s, hi_s) (two for the folded pairs), in survivor order.
    lo = np.where(surv < 2 * r, surv - 1, surv)
    hi = surv + 1

    def span(group: int, t: np.ndarray) -> np.ndarray:  # size of the block range of t's group, in blocks
        first = (t // group) * group
        return hi[first + group - 1] - lo[first]

    # The fold moves all blocks but the even rank's own: those before it and those after (rank 0: after)
    fold_src = np.concatenate([even[1:], even])
    fold_dst = np.concatenate([odd[1:], odd])
    fold_frac = np.concatenate([even[1:] / n, (n - 1 - even) / n])
    if coll is Collective.REDUCE_SCATTER:
        if r:
            add(fold_src, fold_dst, fold_frac, odd, (n - 1) / n)
        for i in range(k):  # distances m/2, ..., 1: groups of m >> (i+1) survivors
            d = m >> (i + 1)
            f = span(d, s ^ d) / n
            add(surv, surv[s ^ d], f, surv, span(d, s) / n)
        if r:
            add(odd, even, 1 / n, even, 1 / n)
    else:  # all-gather: the reduce-scatter's steps reversed, sending what the group holds
        if r:
            add(even, odd, 1 / n)
        for i in reversed(range(k)):
            d = m >> (i + 1)
            add(surv, surv[s ^ d], span(d, s) / n)
        if r:
            add(fold_dst, fold_src, fold_frac)
    return worked(lay, rounds, _active(n, *who), lines_of)


def hierarchical_struct(lay: _Layout, nodes: tuple[tuple[int, ...], ...], parts: int = 1) -> Struct | None:
    """algorithms/hierarchical.py with equal nodes: intra ring RS, one ring per rail, intra ring AG;
    with ``parts`` > 1, staggered parts (a round carries every part's current phase, each 1/parts)."""
    if len({len(x) for x in nodes}) != 1:
        return None
    arr = np.array(nodes, np.int64)
    N, L = arr.shape
    src = arr.ravel()
    intra, rail = np.roll(arr, -1, axis=1).ravel(), np.roll(arr, -1, axis=0).ravel()
    f = 1 / (L * N)
    # the phases in order: (destinations, fraction moved, reduces?, rounds)
    phases = [(intra, 1 / L, True, L - 1), (rail, f, True, N - 1), (rail, f, False, N - 1), (intra, 1 / L, False, L - 1)]
    kinds = [i for i, (_, _, _, count) in enumerate(phases) for _ in range(count)]
    if not kinds:
        return ()
    lines: dict[tuple[int, ...], np.ndarray] = {}
    rounds = []
    for t in range(len(kinds) + parts - 1):
        active = [0] * len(phases)  # parts in each phase during round t
        for i in kinds[max(0, t - parts + 1):t + 1]:
            active[i] += 1
        key = tuple(active)
        if key not in lines:
            # one transfer per part in each phase (each its own message), each moving 1/parts of the phase's share
            used = [i for i, c in enumerate(active) for _ in range(c)]
            red = [i for i in used if phases[i][2]]
            lines[key] = round_lines(lay, np.tile(src, len(used)), np.concatenate([phases[i][0] for i in used]),
                                     np.repeat([phases[i][1] / parts for i in used], len(src)),
                                     np.concatenate([phases[i][0] for i in red]) if red else None,
                                     np.repeat([phases[i][1] / parts for i in red], len(src)) if red else 0.0)
        rounds.append(lines[key])
    return _collect(rounds)
