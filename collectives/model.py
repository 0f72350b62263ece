"""Cost model: predicted time of a collective on a Topology, and the choice of algorithm.

A Schedule is priced round by round ([Note: step semantics] in schedule.py; the
rounds are the rendezvous rounds of verify.py's Trace). In a round every
transfer costs ``alpha + bytes / bandwidth`` of the link it crosses (the
device's fabric port inside a node, the rank's NIC across nodes); transfers of
one round that share a port or a NIC split its bandwidth evenly; a rank that
reduces received data pays ``3 * bytes / memory bandwidth`` (read two
operands, write one: reductions are memory-bound). A rank's round time is its
slowest transfer plus its reductions, a round lasts as long as its slowest
rank, and rounds add up (a barrier per round: exact for lock-step schedules,
an upper bound where ranks drift).

[Note: structural lines] Pricing is split into a size- and parameter-free
part, cached per (algorithm, collective, world, nodes), and a cheap evaluation.
The first reduces every round to a few "lines" (tier, f, r): the fraction f
of the buffer that crosses the busiest resource of a transfer, while its rank
reduces the fraction r. Tiers: 0 a device's port into the node's fabric,
1 a NIC, 2 none (a reduction alone), 3 the pair of devices itself (one
stream between two GPUs does not fill a port: NCCL's p2p runs few channels,
and on a switchless NVLink mesh a pair owns only its own links). With
parameters theta a line costs ``step + alpha[tier] + (f / B[tier] + 3 r / R) * nbytes``
and a call adds a fixed ``call`` overhead, so the prediction is linear in
theta once each round's slowest line is known; calibrate.py fits theta that way. Identical rounds are stored once with a count, which is how
a 1,024-rank ring costs one round of work.

Ring, chain and the textbook (Thakur et al. 2005) structures are generated
directly as rounds for any world size; tests check them against pricing the
registry's Schedules at small world sizes. ``native`` is priced by a model of
the backend: NCCL's ring/tree x LL/LL128/Simple choice with its multi-channel
rings (one channel per NIC, so rings leave each node through every NIC), gloo's
ring, MPICH's algorithm families.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import algorithms
from .schedule import Collective, Recv, Schedule, Send
from .topology import Topology

OPS = tuple(c.value for c in Collective)
NATIVE = algorithms.NATIVE
_TIERS = ("intra", "inter", "local", "intra")  # tier 3 (a pair of devices) is intra-node too


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """What a prediction needs besides the schedule; calibrate.py fits these."""
    intra_alpha: float        # s per message inside a node
    intra_bandwidth: float    # bytes/s one direction of a device's fabric port
    pair_bandwidth: float     # bytes/s of one transfer between two devices of a node (<= intra_bandwidth)
    inter_alpha: float        # s per message across nodes
    inter_bandwidth: float    # bytes/s one direction of one NIC
    step_overhead: float      # s per schedule step of our executor (post, wait, launch)
    reduce_bandwidth: float   # bytes/s of memory traffic of a local reduction
    native_step: float        # s per step inside the backend's own collectives (gloo, MPI)
    call_overhead: float = 0.0  # s per collective call through the Communicator, any algorithm
    native: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # world -> op -> [alpha, s/byte]
    source: str = "defaults"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Params:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d.setdefault("pair_bandwidth", d.get("intra_bandwidth"))  # profiles older than the pair tier
        return cls(**d)


# Our executor's fixed cost per step (estimates until calibrated): NCCL: a grouped
# isend/irecv launch plus a reduction kernel, ~10-20 us from Python; gloo: measured
# 1.5-2 ms per p2p step with 4 ranks on this 2-core machine, ~0.1 ms on an idle
# many-core host; MPI (mpi4py): ~20 us.
_STEP = {"nccl": 15e-6, "gloo": 100e-6, "mpi": 20e-6}
_NATIVE_STEP = {"nccl": 0.0, "gloo": 30e-6, "mpi": 5e-6}
# One NCCL send/recv stream between two GPUs: 137-140 GB/s measured on H200 NVSwitch
# (collectives/profiles/nccl-h200-nvswitch.json), a third of the port; NCCL gives p2p few channels.
_NCCL_P2P_PAIR = 140e9
_CALL = {"nccl": 90e-6, "gloo": 300e-6, "mpi": 20e-6}  # Communicator overhead per call (same profiles)
# Reductions in float16/bfloat16 on CPU run scalar loops (no native half arithmetic): estimate 4x slower.
_CPU_HALF_SLOWDOWN = 4.0


def default_params(topo: Topology, backend: str) -> Params:
    nic = topo.nic or topo.intra
    # A switchless NVLink mesh splits a device's links evenly between its peers.
    peers = max(len(n) for n in topo.nodes) - 1 if topo.fabric == "nvlink" else 1
    pair = topo.intra.effective / max(peers, 1)
    if backend == "nccl" and topo.fabric != "pcie":
        pair = min(pair, _NCCL_P2P_PAIR)
    return Params(intra_alpha=topo.intra.latency, intra_bandwidth=topo.intra.effective, pair_bandwidth=pair,
                  inter_alpha=nic.latency, inter_bandwidth=nic.effective,
                  step_overhead=_STEP.get(backend, 50e-6),
                  reduce_bandwidth=topo.device_spec(0).memory_bandwidth,
                  native_step=_NATIVE_STEP.get(backend, 10e-6), call_overhead=_CALL.get(backend, 50e-6))


THETA = ("call", "step", "alpha_intra", "alpha_inter", "1/B_intra", "1/B_inter", "1/R", "1/B_pair")


def _theta(p: Params, dtype_slow: float = 1.0) -> np.ndarray:
    """Parameters in the order of THETA (what calibrate.py fits)."""
    return np.array([p.call_overhead, p.step_overhead, p.intra_alpha, p.inter_alpha, 1 / p.intra_bandwidth,
                     1 / p.inter_bandwidth, dtype_slow / p.reduce_bandwidth, 1 / p.pair_bandwidth])


def coefficients(L: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per line: latency a, seconds per byte over its link, seconds per byte of reduction."""
    t = L[:, 0].astype(int)
    a = theta[1] + np.array([theta[2], theta[3], 0.0, theta[2]])[t]
    return a, L[:, 1] * np.array([theta[4], theta[5], 0.0, theta[7]])[t], 3 * L[:, 2] * theta[6]


# ---------------------------------------------------------------------------
# Structural pricing: rounds -> lines (tier, f, r)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """Rank -> node and rank -> global NIC index, as arrays."""
    node: np.ndarray
    nic: np.ndarray
    key: tuple

    @classmethod
    def of(cls, topo: Topology) -> _Layout:
        node = np.array(topo.node_of(), dtype=np.int64)
        nic = node * max(topo.nics_per_node, 1) + np.array(topo.nic_of(), dtype=np.int64)
        return cls(node, nic, (tuple(map(tuple, topo.nodes)), topo.nics_per_node))


Struct = tuple[tuple[int, np.ndarray], ...]  # ((count, lines (m, 3)), ...)


def edge_loads(lay: _Layout, src: np.ndarray, dst: np.ndarray, frac: float | np.ndarray) -> np.ndarray:
    """Per transfer (inter?, port load, pair load): fractions of the buffer on its busier port and on its pair.

    Transfers of a round that share a device port, a NIC or a pair of devices
    split its bandwidth, so a transfer ends when its resource has moved
    everything posted on it.
    """
    n = len(lay.node)
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    frac = np.broadcast_to(np.asarray(frac, float), src.shape)
    inter = lay.node[src] != lay.node[dst]
    ptx = np.where(inter, n + lay.nic[src], src)   # port ids: devices 0..n-1, NICs n..
    prx = np.where(inter, n + lay.nic[dst], dst)
    m = n + int(lay.nic.max()) + 1
    port = np.maximum(np.bincount(ptx, frac, m)[ptx], np.bincount(prx, frac, m)[prx])
    _, idx = np.unique(src * n + dst, return_inverse=True)
    pair = np.bincount(idx.ravel(), frac)[idx.ravel()] if len(src) else frac
    return np.column_stack([inter.astype(float), port, np.where(inter, 0.0, pair)])


def _lines(loads: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Lines of transfers: one on the port or NIC (tier 0/1), one on the pair for intra-node ones (tier 3)."""
    intra = loads[:, 0] == 0
    return np.concatenate([np.column_stack([loads[:, 0], loads[:, 1], r]),
                           np.column_stack([np.full(intra.sum(), 3.0), loads[intra, 2], r[intra]])])


def round_lines(lay: _Layout, src: np.ndarray, dst: np.ndarray, frac: float | np.ndarray,
                red_rank: np.ndarray | None = None, red_frac: float | np.ndarray = 0.0) -> np.ndarray:
    """The lines of one round: transfers src->dst moving ``frac`` of the buffer; ranks reducing."""
    n = len(lay.node)
    red = np.zeros(n)
    if red_rank is not None and len(red_rank):
        np.add.at(red, np.asarray(red_rank, np.int64), np.broadcast_to(red_frac, np.shape(red_rank)))
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    # Both ends of a transfer wait for it; the end that also reduces more finishes last.
    lines = [_lines(edge_loads(lay, src, dst, frac), np.maximum(red[src], red[dst]))]
    busy = np.zeros(n, bool)
    busy[src] = True
    busy[dst] = True
    lonely = np.flatnonzero((red > 0) & ~busy)
    lines.append(np.column_stack([np.full(len(lonely), 2.0), np.zeros(len(lonely)), red[lonely]]))
    out = np.concatenate(lines)
    return _pareto(out) if len(out) else np.zeros((0, 3))


def _pareto(lines: np.ndarray) -> np.ndarray:
    """Drop lines that another line of the same tier beats in both f and r (vectorised)."""
    lines = np.round(lines, 12)
    keep = []
    for t in np.unique(lines[:, 0]):
        sub = lines[lines[:, 0] == t]
        sub = sub[np.lexsort((-sub[:, 2], -sub[:, 1]))]  # f descending, then r descending
        best_r = np.maximum.accumulate(np.concatenate([[-1.0], sub[:-1, 2]]))
        keep.append(sub[sub[:, 2] > best_r])
    return np.concatenate(keep)


def _collect(rounds: list[np.ndarray]) -> Struct:
    counts: Counter = Counter()
    arrays: dict[bytes, np.ndarray] = {}
    for lines in rounds:
        k = lines.tobytes()
        counts[k] += 1
        arrays[k] = lines
    return tuple((c, arrays[k]) for k, c in counts.items() if len(arrays[k]))


def evaluate(struct: Struct, theta: np.ndarray, nbytes: np.ndarray, step: float | None = None) -> np.ndarray:
    """Predicted seconds at each size in ``nbytes`` (an array); ``step`` overrides the step overhead."""
    th = theta.copy()
    if step is not None:
        th[1] = step
    total = np.full(np.shape(nbytes), th[0])
    for count, L in struct:
        a, bl, br = coefficients(L, th)
        total = total + count * np.max(a[:, None] + (bl + br)[:, None] * nbytes[None, :], axis=0)
    return total


def breakdown(struct: Struct, theta: np.ndarray, nbytes: float) -> dict[str, float]:
    """Seconds spent on latency, bytes per tier and reduction, following each round's slowest line."""
    out = dict.fromkeys(("latency", "intra", "inter", "reduce"), 0.0)
    out["latency"] = theta[0]
    for count, L in struct:
        a, bl, br = coefficients(L, theta)
        j = int(np.argmax(a + (bl + br) * nbytes))
        out["latency"] += count * a[j]
        out["reduce"] += count * br[j] * nbytes
        if int(L[j, 0]) != 2:
            out[_TIERS[int(L[j, 0])]] += count * bl[j] * nbytes
    return out


# -- rounds of a Schedule -----------------------------------------------------

def schedule_rounds(s: Schedule) -> list[list[int]]:
    """Rendezvous round of every (rank, step), as verify.py's Trace defines it, in O(ops)."""
    n = s.world_size
    sends: dict[tuple[int, int], list[int]] = {}
    recvs: dict[tuple[int, int], list[int]] = {}
    partners: list[list[list[tuple[int, int]]]] = [[[] for _ in s.ranks[r]] for r in range(n)]
    for r in range(n):
        for i, st in enumerate(s.ranks[r]):
            for op in st.ops:
                (sends.setdefault((r, op.peer), []) if isinstance(op, Send)
                 else recvs.setdefault((op.peer, r), [])).append(i)
    for (a, b), ss in sends.items():
        for i, j in zip(ss, recvs.get((a, b), [])):
            partners[a][i].append((b, j))
            partners[b][j].append((a, i))
    rnd: list[list[int]] = [[-1] * len(s.ranks[r]) for r in range(n)]
    at, stack, waiting = [0] * n, list(range(n)), {}
    while stack:
        r = stack.pop()
        while at[r] < len(rnd[r]):
            i = at[r]
            t, blocked = (rnd[r][i - 1] + 1 if i else 0), None
            for p, j in partners[r][i]:
                if j and rnd[p][j - 1] < 0:
                    blocked = (p, j - 1)
                    break
                t = max(t, rnd[p][j - 1] + 1 if j else 0)
            if blocked:
                waiting.setdefault(blocked, []).append(r)
                break
            rnd[r][i] = t
            at[r] += 1
            stack.extend(waiting.pop((r, i), ()))
    if any(at[r] < len(rnd[r]) for r in range(n)):
        raise ValueError(f"{s.algorithm} {s.collective.value}: schedule deadlocks; run verify() on it")
    return rnd


def price_schedule(s: Schedule, lay: _Layout) -> Struct:
    """Structural lines of every round of a Schedule (the generic path, any algorithm)."""
    rnd = schedule_rounds(s)
    per: dict[int, tuple[list, list, list, list, list]] = {}
    for r in range(s.world_size):
        for i, st in enumerate(s.ranks[r]):
            src, dst, frac, rr, rf = per.setdefault(rnd[r][i], ([], [], [], [], []))
            for op in st.ops:
                if isinstance(op, Send):
                    src.append(r)
                    dst.append(op.peer)
                    frac.append(op.nchunks / s.nchunks)
                elif isinstance(op, Recv) and op.reduce:
                    rr.append(r)
                    rf.append(op.nchunks / s.nchunks)
    rounds = [round_lines(lay, np.array(a, np.int64), np.array(b, np.int64), np.array(f, float),
                          np.array(c, np.int64), np.array(d, float)) for a, b, f, c, d in per.values()]
    return _collect(rounds)


# -- rounds generated from known structures (any world size, no Schedule) ----

def ring_struct(lay: _Layout, coll: Collective) -> Struct:
    """Ring reduce-scatter / all-gather / all-reduce: every round every rank sends 1/n to r+1."""
    n = len(lay.node)
    src = np.arange(n)
    dst = (src + 1) % n
    rs = round_lines(lay, src, dst, 1 / n, dst, np.full(n, 1 / n))
    ag = round_lines(lay, src, dst, 1 / n)
    if coll is Collective.REDUCE_SCATTER:
        return _collect([rs] * (n - 1))
    if coll is Collective.ALL_GATHER:
        return _collect([ag] * (n - 1))
    return _collect([rs] * (n - 1) + [ag] * (n - 1))


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
    if full[:, 1].max() > 1 / k:  # a port or NIC serves several edges (nodes not contiguous)
        return windowed_struct(lay, src, dst, np.arange(n - 1), k, 1 / k, reduce, k + n - 2)
    r = 1 / k if reduce else 0.0
    kinds, ids = np.unique(full, axis=0, return_inverse=True)
    ids = ids.ravel()
    prefix = np.zeros((len(ids) + 1, len(kinds)), np.int64)
    prefix[1:] = np.cumsum(np.eye(len(kinds), dtype=np.int64)[ids], axis=0)
    counts: Counter = Counter()
    for t in range(k + n - 2):
        lo, hi = max(0, t - k + 1), min(t, n - 2)
        counts[tuple(np.flatnonzero(prefix[hi + 1] - prefix[lo]))] += 1
    return tuple((c, _pareto(_lines(kinds[list(key)], np.full(len(key), r)))) for key, c in counts.items())


def windowed_struct(lay: _Layout, src: np.ndarray, dst: np.ndarray, start: np.ndarray, pipeline: int,
                    frac: float, reduce: bool | np.ndarray, nrounds: int) -> Struct:
    """Edges that each carry one chunk a round for rounds [start, start + pipeline) (pipelined trees);
    ``reduce`` (per edge or for all) says whether the receiver reduces it."""
    src, dst, start = (np.asarray(x, np.int64) for x in (src, dst, start))
    red = np.broadcast_to(np.asarray(reduce, bool), src.shape)
    starts = np.unique(start)
    rounds, memo = [], {}
    for t in range(nrounds):
        key = (np.searchsorted(starts, t - pipeline + 1), np.searchsorted(starts, t, side="right"))
        if key not in memo:  # the active edges are those whose start lies in the window
            on = (start >= t - pipeline + 1) & (start <= t)
            memo[key] = round_lines(lay, src[on], dst[on], frac, dst[on & red], frac)
        rounds.append(memo[key])
    return _collect(rounds)


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
    rounds = []
    if coll is Collective.ALL_REDUCE:
        if r:
            rounds.append(round_lines(lay, even, odd, 1.0, odd, 1.0))
        for i in range(k):
            f = 1.0 if full else 1 / (2 << i)
            rounds.append(round_lines(lay, surv, surv[s ^ (1 << i)], f, surv, f))
        for i in range(0 if full else k):
            f = 1 / (m >> i)  # the all-gather runs the halving backwards: 1/m, 2/m, ..., 1/2
            rounds.append(round_lines(lay, surv, surv[s ^ (m >> (i + 1))], f))
        if r:
            rounds.append(round_lines(lay, odd, even, 1.0))
        return _collect(rounds)
    # Blocked layouts: survivor s owns blocks [lo_s, hi_s) (two for the folded pairs), in survivor order.
    lo = np.where(surv < 2 * r, surv - 1, surv)
    hi = surv + 1

    def span(group: int, t: np.ndarray) -> np.ndarray:  # size of the block range of t's group, in blocks
        first = (t // group) * group
        return hi[first + group - 1] - lo[first]

    if coll is Collective.REDUCE_SCATTER:
        if r:
            rounds.append(round_lines(lay, even, odd, (n - 1) / n, odd, (n - 1) / n))
        for i in range(k):  # distances m/2, ..., 1: groups of m >> (i+1) survivors
            d = m >> (i + 1)
            f = span(d, s ^ d) / n
            rounds.append(round_lines(lay, surv, surv[s ^ d], f, surv, span(d, s) / n))
        if r:
            rounds.append(round_lines(lay, odd, even, 1 / n, even, 1 / n))
    else:  # all-gather: the reduce-scatter's steps reversed, sending what the group holds
        if r:
            rounds.append(round_lines(lay, even, odd, 1 / n))
        for i in reversed(range(k)):
            d = m >> (i + 1)
            rounds.append(round_lines(lay, surv, surv[s ^ d], span(d, s) / n))
        if r:
            rounds.append(round_lines(lay, odd, even, (n - 1) / n))
    return _collect(rounds)


def hierarchical_struct(lay: _Layout, nodes: tuple[tuple[int, ...], ...]) -> Struct | None:
    """algorithms/hierarchical.py with equal nodes: intra ring RS, one ring per rail, intra ring AG."""
    if len({len(x) for x in nodes}) != 1:
        return None
    arr = np.array(nodes, np.int64)
    N, L = arr.shape
    src = arr.ravel()
    intra, rail = np.roll(arr, -1, axis=1).ravel(), np.roll(arr, -1, axis=0).ravel()
    parts = []
    if L > 1:
        parts += [round_lines(lay, src, intra, 1 / L, intra, 1 / L)] * (L - 1)
    if N > 1:
        f = 1 / (L * N)
        parts += [round_lines(lay, src, rail, f, rail, f)] * (N - 1) + [round_lines(lay, src, rail, f)] * (N - 1)
    if L > 1:
        parts += [round_lines(lay, src, intra, 1 / L)] * (L - 1)
    return _collect(parts)


def direct_struct(lay: _Layout, coll: Collective) -> Struct:
    """algorithms/direct.py: every rank sends 1/n to every other at once (reduce-scatter reduces
    the n-1 arrivals; all-reduce is reduce-scatter then all-gather)."""
    n = len(lay.node)
    if n < 2:
        return ()
    src = np.repeat(np.arange(n), n - 1)
    dst = (src + np.tile(np.arange(1, n), n)) % n
    rs = round_lines(lay, src, dst, 1 / n, np.arange(n), (n - 1) / n)
    ag = round_lines(lay, src, dst, 1 / n)
    return _collect({Collective.REDUCE_SCATTER: [rs], Collective.ALL_GATHER: [ag]}.get(coll, [rs, ag]))


def pairwise_struct(lay: _Layout) -> Struct:
    """algorithms/pairwise.py: in round s rank r sends its block for r+s to r+s."""
    n = len(lay.node)
    if n < 2:
        return ()
    r = np.arange(n)
    # No reductions, so a round's lines are its busiest port per tier: vectorise over all rounds.
    src = np.broadcast_to(r, (n - 1, n))
    dst = (src + np.arange(1, n)[:, None]) % n
    inter = lay.node[src] != lay.node[dst]
    m = n + int(lay.nic.max()) + 1
    off = (np.arange(n - 1) * m)[:, None]
    ptx = np.where(inter, n + lay.nic[src], src) + off
    prx = np.where(inter, n + lay.nic[dst], dst) + off
    load = np.maximum(np.bincount(ptx.ravel(), minlength=m * (n - 1))[ptx],
                      np.bincount(prx.ravel(), minlength=m * (n - 1))[prx]) / n
    counts: Counter = Counter()  # one transfer per pair a round: the pair line carries 1/n
    for a, b in zip(np.where(inter, 0.0, load).max(axis=1), np.where(inter, load, 0.0).max(axis=1)):
        rows = ((0.0, a, 0.0), (1.0, b, 0.0), (3.0, 1 / n if a > 0 else 0.0, 0.0))
        counts[tuple(row for row in rows if row[1] > 0)] += 1
    return tuple((c, np.array(key)) for key, c in counts.items())


def gather_struct(lay: _Layout) -> Struct:
    """Every rank sends its 1/n block to rank 0 in one round (the tail of gloo's reduce)."""
    n = len(lay.node)
    return _collect([round_lines(lay, np.arange(1, n), np.zeros(n - 1, np.int64), 1 / n)]) if n > 1 else ()


def join(*parts: Struct) -> Struct:
    counts: Counter = Counter()
    arrays: dict[bytes, np.ndarray] = {}
    for part in parts:
        for c, L in part:
            counts[L.tobytes()] += c
            arrays[L.tobytes()] = L
    return tuple((c, arrays[k]) for k, c in counts.items())


# ---------------------------------------------------------------------------
# native: models of the backends' own collectives
# ---------------------------------------------------------------------------

# NCCL src/graph/tuning.cc (2.19+), microseconds, per protocol (LL, LL128, Simple).
_NCCL_BASE = {"tree": (6.8, 14.0, 8.4), "ring": (6.6, 14.0, 8.4)}
_NCCL_HW = {"nvlink": {"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4)},
            "pci": {"tree": (1.0, 1.9, 4.0), "ring": (1.0, 2.5, 5.7)},
            "net": {"tree": (5.0, 8.5, 14.0), "ring": (2.7, 4.0, 14.0)}}
_PROTOS = ("LL", "LL128", "Simple")


def nccl_options(topo: Topology, coll: Collective) -> list[tuple[str, float, float, str]]:
    """NCCL's candidates as (label, latency s, algorithm bandwidth B/s, bottleneck tier).

    Rings run one channel per NIC: each channel leaves every node once, through
    its own NIC, so a node's NICs carry the inter-node traffic in parallel and
    a device's port carries (L-1)/L of its ring traffic (L ranks per node).
    Tree all-reduce (double binary tree between nodes, chains inside) moves the
    buffer up and down once: algbw = busbw / 2, as NCCL's tuning model has it.
    """
    n, N = topo.world_size, topo.num_nodes
    L = n // N
    intra = topo.intra.effective
    hw = "pci" if topo.fabric == "pcie" else "nvlink"
    net = topo.nics_per_node * topo.nic.effective if N > 1 and topo.nic else math.inf
    node_limit = intra * L / (L - 1) if L > 1 else math.inf
    ring_bus = min(node_limit, net) if N > 1 else intra
    tier = "inter" if net < node_limit and N > 1 else "intra"
    steps = {Collective.ALL_REDUCE: 2 * (n - 1), Collective.REDUCE_SCATTER: n - 1, Collective.ALL_GATHER: n - 1}
    nsteps, inter_steps = steps.get(coll, n), {Collective.ALL_REDUCE: 2 * (N - 1)}.get(coll, N - 1)
    out = []
    ll128 = topo.fabric in ("nvswitch", "nvlink")  # NCCL enables LL128 by default on NVLink only
    for p, proto in enumerate(_PROTOS):
        if proto == "LL128" and not ll128:
            continue
        factor = {"LL": 1 / 4 if (N > 1 or coll.reduces) else 1 / 3, "LL128": 0.92, "Simple": 1.0}[proto]
        if coll is Collective.ALL_TO_ALL:  # grouped send/recv: intra share over the port, rest over the NICs
            if proto != "Simple":
                continue
            t_byte = max((L - 1) / n / intra, (n - L) / n / (net / L) if N > 1 else 0.0)
            lat = _NCCL_BASE["ring"][p] + _NCCL_HW["net" if N > 1 else hw]["ring"][p]
            out.append((f"p2p/{proto}", lat * 1e-6, 1 / t_byte if t_byte else math.inf, tier))
            continue
        lat = (_NCCL_BASE["ring"][p] + (nsteps - inter_steps) * _NCCL_HW[hw]["ring"][p]
               + inter_steps * _NCCL_HW["net"]["ring"][p])
        ratio = {Collective.ALL_REDUCE: n / (2 * (n - 1)), Collective.REDUCE_SCATTER: n / (n - 1),
                 Collective.ALL_GATHER: n / (n - 1)}.get(coll, 1.0)
        out.append((f"ring/{proto}", lat * 1e-6, ring_bus * factor * ratio, tier))
        if coll is Collective.ALL_REDUCE:
            tfac = {"LL": 0.9 / 3.8, "LL128": 0.9 * (7 / 9 if N == 1 else 0.915), "Simple": 0.9}[proto]
            tree_bus = min(intra, net) * tfac
            tlat = _NCCL_BASE["tree"][p] + 2 * ((L - 1) * _NCCL_HW[hw]["tree"][p]
                                                 + math.log2(N) * _NCCL_HW["net"]["tree"][p])
            out.append((f"tree/{proto}", tlat * 1e-6, tree_bus / 2, "inter" if net < intra else "intra"))
    return out


def native_structs(backend: str, lay: _Layout, coll: Collective) -> list[tuple[str, Struct]]:
    """gloo's and MPICH's algorithms for ``coll`` as (label, Struct); the model takes the fastest."""
    C = Collective
    pow2 = len(lay.node) & (len(lay.node) - 1) == 0
    if backend == "gloo":
        return [{C.ALL_REDUCE: ("ring", lambda: ring_struct(lay, C.ALL_REDUCE)),
                 # gloo's reduce-scatter is an all-reduce of the whole buffer plus a slice
                 C.REDUCE_SCATTER: ("allreduce+slice", lambda: ring_struct(lay, C.ALL_REDUCE)),
                 C.ALL_GATHER: ("ring", lambda: ring_struct(lay, C.ALL_GATHER)),
                 C.BROADCAST: ("binomial", lambda: binomial_struct(lay, 1, False)),
                 C.REDUCE: ("ring-rs+gather", lambda: join(ring_struct(lay, C.REDUCE_SCATTER), gather_struct(lay))),
                 C.ALL_TO_ALL: ("all-at-once", lambda: direct_struct(lay, C.ALL_GATHER))}[coll]]
    # MPICH (Thakur, Rabenseifner & Gropp 2005): the families its thresholds switch between.
    fam = {C.ALL_REDUCE: [("recursive-doubling", lambda: hd_struct(lay, coll, full=True)),
                          ("rabenseifner", lambda: hd_struct(lay, coll)),
                          ("ring", lambda: ring_struct(lay, coll))],
           C.REDUCE_SCATTER: [("recursive-halving", lambda: hd_struct(lay, coll)),
                              ("ring", lambda: ring_struct(lay, coll))],
           C.ALL_GATHER: [("ring", lambda: ring_struct(lay, coll))]
           + ([("recursive-doubling", lambda: hd_struct(lay, coll))] if pow2 else []),
           # van de Geijn: scatter (the all-gather's rounds reversed, no reduction) then ring all-gather
           C.BROADCAST: [("binomial", lambda: binomial_struct(lay, 1, False)),
                         ("scatter+allgather", lambda: join(hd_struct(lay, C.ALL_GATHER), ring_struct(lay, C.ALL_GATHER)))],
           C.REDUCE: [("binomial", lambda: binomial_struct(lay, 1, True)),
                      ("rs+gather", lambda: join(hd_struct(lay, C.REDUCE_SCATTER), gather_struct(lay)))],
           C.ALL_TO_ALL: [("pairwise", lambda: pairwise_struct(lay))]}[coll]
    return fam


# ---------------------------------------------------------------------------
# Plans and the model
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    op: str
    nbytes: int
    algorithm: str
    predicted_s: float
    alternatives: dict[str, float]
    pipeline: int = 1
    reason: str = ""
    dtype: str = "float32"

    @property
    def algbw(self) -> float:
        return self.nbytes / self.predicted_s if self.predicted_s > 0 else math.inf


_PIPELINES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SUB = 4  # size buckets per octave for the choice cache


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def size_bucket(nbytes: int) -> tuple[int, int]:
    b = int(nbytes).bit_length()
    return (b, (int(nbytes) >> max(b - 3, 0)) & 3) if b >= 3 else (b, 0)


def _bucket_size(key: tuple[int, int]) -> int:
    b, sub = key
    return (2 ** (b - 1)) if b < 3 else int((4 + sub + 0.5) * 2 ** (b - 3))


class CostModel:
    """Predicts collective times on a Topology for a backend and chooses the algorithm.

    ``profile``: a Params, a path to a JSON profile, or None to use
    ``$TOPOCOMM_PROFILE`` or a shipped profile matching the hardware, else the
    documented defaults (calibrate.find_profile).
    """

    def __init__(self, topology: Topology, backend: str = "gloo", profile: Params | str | os.PathLike | None = None):
        from . import calibrate
        self.topology, self.backend = topology, backend
        if profile is None:
            profile = calibrate.find_profile(topology, backend)
        elif not isinstance(profile, Params):
            profile = calibrate.load_profile(profile)
        self.params: Params = profile if profile is not None else default_params(topology, backend)
        self._lay = _Layout.of(topology)
        self._nodes = tuple(map(tuple, topology.nodes))
        self._choices: dict[tuple, Plan] = {}
        self._plans: dict[tuple, Plan] = {}

    # -- pricing --------------------------------------------------------------
    def _theta(self, dtype: Any) -> np.ndarray:
        half = _dtype_name(dtype) in ("float16", "bfloat16") and self.topology.devices[0] == "cpu"
        return _theta(self.params, _CPU_HALF_SLOWDOWN if half else 1.0)

    def struct(self, coll: Collective, algorithm: str, pipeline: int = 1) -> Struct:
        """Structural lines of our ``algorithm`` (cached across models of the same layout)."""
        key = (self._lay.key, coll, algorithm, pipeline, _GENERIC_ONLY)
        if key not in _STRUCTS:
            if len(_STRUCTS) > 2048:
                _STRUCTS.clear()
            _STRUCTS[key] = _structure(self._lay, self._nodes, coll, algorithm, pipeline)
        return _STRUCTS[key]

    def sweep(self, op: str | Collective, nbytes: Any, algorithm: str, dtype: Any = "float32",
              pipeline: int | None = None) -> np.ndarray:
        """Predicted seconds at every size of ``nbytes`` (vectorised); best pipeline unless given."""
        coll, S = Collective(op), np.atleast_1d(np.asarray(nbytes, dtype=float))
        if self.topology.world_size < 2:
            return np.zeros_like(S)
        if algorithm == NATIVE:
            return np.min([t for _, t in self._native(coll, S, dtype)], axis=0)
        theta = self._theta(dtype)
        ks = [pipeline] if pipeline else (_PIPELINES if algorithms.pipelined(algorithm, coll) else (1,))
        return np.min([evaluate(self.struct(coll, algorithm, k), theta, S) for k in ks], axis=0)

    def _native(self, coll: Collective, S: np.ndarray, dtype: Any) -> list[tuple[str, np.ndarray]]:
        fit = self.params.native.get(str(self.topology.world_size), {}).get(coll.value)
        if fit:
            return [("measured", fit[0] + fit[1] * S)]
        if self.backend == "nccl":
            call = self.params.call_overhead
            return [(lab, call + lat + S / bw) for lab, lat, bw, _ in nccl_options(self.topology, coll)]
        theta = self._theta(dtype)
        return [(label, evaluate(self._native_struct(coll, label, make), theta, S, step=self.params.native_step))
                for label, make in native_structs(self.backend, self._lay, coll)]

    def _native_struct(self, coll: Collective, label: str, make) -> Struct:
        key = (self._lay.key, coll, f"{NATIVE}:{self.backend}:{label}", 1, False)
        if key not in _STRUCTS:
            _STRUCTS[key] = make()
        return _STRUCTS[key]

    def predict(self, op: str | Collective, nbytes: int, algorithm: str, dtype: Any = "float32",
                pipeline: int | None = None) -> float:
        return float(self.sweep(op, [nbytes], algorithm, dtype, pipeline)[0])

    def best_pipeline(self, op: str | Collective, nbytes: int, algorithm: str, dtype: Any = "float32") -> int:
        coll = Collective(op)
        if algorithm == NATIVE or not algorithms.pipelined(algorithm, coll) or self.topology.world_size < 2:
            return 1
        S, theta = np.array([float(nbytes)]), self._theta(dtype)
        times = [evaluate(self.struct(coll, algorithm, k), theta, S)[0] for k in _PIPELINES]
        return _PIPELINES[int(np.argmin(times))]

    # -- choice ----------------------------------------------------------------
    def choose(self, op: str | Collective, nbytes: int, dtype: Any = "float32",
               candidates: tuple[str, ...] | list[str] | None = None) -> str:
        return self._bucket_plan(op, nbytes, dtype, candidates).algorithm

    def _bucket_plan(self, op, nbytes, dtype, candidates) -> Plan:
        key = (op, size_bucket(nbytes), dtype, tuple(candidates) if candidates else None)
        plan = self._choices.get(key)
        if plan is None:
            # Chosen at the bucket's representative size, so every rank picks the same algorithm.
            plan = self._choices[key] = self._exact_plan(op, _bucket_size(key[1]), dtype, candidates, None)
        return plan

    def plan(self, op: str | Collective, nbytes: int, dtype: Any = "float32",
             candidates: tuple[str, ...] | list[str] | None = None) -> Plan:
        """The algorithm choose() runs for this size, with every alternative priced at exactly ``nbytes``.

        Cached per exact size: a training loop asks for the same few sizes on every step.
        """
        key = (op, int(nbytes), dtype, tuple(candidates) if candidates else None)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 4096:
                self._plans.clear()
            op = Collective(op).value
            pick = self._bucket_plan(op, nbytes, dtype, candidates)
            plan = self._plans[key] = self._exact_plan(op, nbytes, dtype, candidates, pick.algorithm)
        return plan

    def _exact_plan(self, op, nbytes: int, dtype, candidates, pick: str | None) -> Plan:
        coll = Collective(op)
        names = tuple(candidates) if candidates else algorithms.supported(coll)
        alts = {a: self.predict(coll, nbytes, a, dtype) for a in names}
        algo = pick if pick is not None else min(alts, key=lambda a: (alts[a], a != NATIVE))
        k = self.best_pipeline(coll, nbytes, algo, dtype)
        return Plan(coll.value, int(nbytes), algo, alts[algo], alts, k,
                    self.reason(coll, nbytes, algo, dtype, k), _dtype_name(dtype))

    # -- explanation -----------------------------------------------------------
    def terms(self, op: str | Collective, nbytes: int, algorithm: str, dtype: Any = "float32",
              pipeline: int = 1) -> dict[str, float]:
        """Seconds of latency, intra-node bytes, inter-node bytes and reduction of one prediction."""
        coll = Collective(op)
        if self.topology.world_size < 2:
            return dict.fromkeys(("latency", "intra", "inter", "reduce"), 0.0)
        if algorithm != NATIVE:
            return breakdown(self.struct(coll, algorithm, pipeline), self._theta(dtype), float(nbytes))
        fit = self.params.native.get(str(self.topology.world_size), {}).get(coll.value)
        if fit:
            return {"latency": fit[0], "intra": fit[1] * nbytes, "inter": 0.0, "reduce": 0.0, "variant": "measured"}
        if self.backend == "nccl":
            lab, lat, bw, tier = min(nccl_options(self.topology, coll), key=lambda o: o[1] + nbytes / o[2])
            return {"latency": self.params.call_overhead + lat, "intra": 0.0, "inter": 0.0, "reduce": 0.0,
                    tier: nbytes / bw, "variant": lab}
        S, theta = np.array([float(nbytes)]), self._theta(dtype)
        theta[1] = self.params.native_step
        lab, struct = min(((label, self._native_struct(coll, label, make))
                           for label, make in native_structs(self.backend, self._lay, coll)),
                          key=lambda o: evaluate(o[1], theta, S)[0])
        return {**breakdown(struct, theta, float(nbytes)), "variant": lab}

    def reason(self, op: str | Collective, nbytes: int, algorithm: str, dtype: Any = "float32",
               pipeline: int = 1) -> str:
        d = self.terms(op, nbytes, algorithm, dtype, pipeline)
        parts = {k: v for k, v in d.items() if k != "variant"}
        total = sum(parts.values()) or 1.0
        top = max(parts, key=parts.get)
        topo = self.topology
        link = {"intra": f"intra-node {topo.intra.kind}",
                "inter": f"inter-node {topo.nic.kind if topo.nic else topo.intra.kind}",
                "reduce": f"local reduction ({topo.devices[0]} memory bandwidth)", "latency": "per-step latency"}
        kind = "latency-bound" if top == "latency" else "bandwidth-bound"
        variant = f" [{d['variant']}]" if "variant" in d else ""
        return f"{kind}: {link[top]} {100 * parts[top] / total:.0f}% of the time{variant}"


def _structure(lay: _Layout, nodes: tuple, coll: Collective, algorithm: str, pipeline: int) -> Struct:
    """Structures known round by round (any world size, no Schedule), else the registry's Schedule priced."""
    C = Collective
    fast = {("ring", C.ALL_REDUCE): lambda: ring_struct(lay, coll),
            ("ring", C.REDUCE_SCATTER): lambda: ring_struct(lay, coll),
            ("ring", C.ALL_GATHER): lambda: ring_struct(lay, coll),
            ("ring", C.BROADCAST): lambda: chain_struct(lay, pipeline, 0),
            ("ring", C.REDUCE): lambda: chain_struct(lay, pipeline, 1, reduce=True),
            ("tree", C.ALL_REDUCE): lambda: tree_all_reduce_struct(lay, pipeline),
            ("tree", C.BROADCAST): lambda: binomial_struct(lay, pipeline, False),
            ("tree", C.REDUCE): lambda: binomial_struct(lay, pipeline, True),
            ("halving_doubling", C.ALL_REDUCE): lambda: hd_struct(lay, coll),
            ("halving_doubling", C.REDUCE_SCATTER): lambda: hd_struct(lay, coll),
            ("halving_doubling", C.ALL_GATHER): lambda: hd_struct(lay, coll),
            ("hierarchical", C.ALL_REDUCE): lambda: hierarchical_struct(lay, nodes),
            ("direct", C.ALL_REDUCE): lambda: direct_struct(lay, coll),
            ("direct", C.REDUCE_SCATTER): lambda: direct_struct(lay, coll),
            ("direct", C.ALL_GATHER): lambda: direct_struct(lay, coll),
            ("pairwise", C.ALL_TO_ALL): lambda: pairwise_struct(lay)}.get((algorithm, coll))
    out = fast() if fast is not None and not _GENERIC_ONLY else None
    if out is not None:
        return out
    s = algorithms.build(algorithm, coll, len(lay.node), root=0, nodes=nodes, pipeline=pipeline)
    return price_schedule(s, lay)


_GENERIC_ONLY = False  # tests flip it to price every algorithm from its Schedule
_STRUCTS: dict[tuple, Struct] = {}
