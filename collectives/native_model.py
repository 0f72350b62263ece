"""Models of the backends' own collectives (the ``native`` algorithm).

NCCL is priced from its tuning model (src/graph/tuning.cc): ring/tree x
LL/LL128/Simple, with multi-channel rings (one channel per NIC, so rings leave
each node through every NIC). gloo's and MPICH's algorithms are given as
Structs built from rounds.py's generators, which model.py prices like our own
and takes the fastest of. The all-at-once structures (direct, pairwise,
gather) live here too: our direct and pairwise algorithms use them as well.
"""

from __future__ import annotations

import math

from collections import Counter

import numpy as np

from .rounds import Struct, _collect, _Layout, _pareto, _when, join, round_lines, setup_struct
from .structures import binomial_struct, hd_struct, ring_struct
from .schedule import Collective
from .topology import Topology


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
    NVLink SHARP (NVLS) is not modelled: the published 365-370 GB/s H100 figure
    and the machines lent here run without it (NCCL_NVLS_ENABLE=0).
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
                 # gloo's reduce-scatter is an all-reduce of a copy of the whole buffer plus a slice: the
                 # same copies as ours ([Note: set-up copies] in rounds.py)
                 C.REDUCE_SCATTER: ("allreduce+slice", lambda: join(ring_struct(lay, C.ALL_REDUCE),
                                                                    setup_struct(lay, C.REDUCE_SCATTER))),
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
                         ("scatter+allgather",
                          lambda: join(hd_struct(lay, C.ALL_GATHER), ring_struct(lay, C.ALL_GATHER)))],
           C.REDUCE: [("binomial", lambda: binomial_struct(lay, 1, True)),
                      ("rs+gather", lambda: join(hd_struct(lay, C.REDUCE_SCATTER), gather_struct(lay)))],
           C.ALL_TO_ALL: [("pairwise", lambda: pairwise_struct(lay))]}[coll]
    return fam


# -- all-at-once structures (ours and the backends') -------------------------

def direct_struct(lay: _Layout, coll: Collective) -> Struct:
    """algorithms/direct.py: every rank sends 1/n to every other at once (reduce-scatter reduces
    the n-1 arrivals; all-reduce is reduce-scatter then all-gather)."""
    n = len(lay.node)
    if n < 2:
        return ()
    red = (n - 1) / n
    if lay.cpus:  # ranks share CPUs: price the n(n-1) transfers one by one
        src = np.repeat(np.arange(n), n - 1)
        dst = (src + np.tile(np.arange(1, n), n)) % n
        rs = round_lines(lay, src, dst, 1 / n, np.arange(n), red)
        ag = round_lines(lay, src, dst, 1 / n)
    else:  # uniform r and m: each tier's busiest resource decides, so count loads directly
        local = np.bincount(lay.node)[lay.node]             # ranks on each rank's node
        nic = np.bincount(lay.nic, (n - local) / n)         # each NIC: its ranks' traffic to other nodes
        both = 1 if lay.device else 2  # a CPU rank copies its sends and its receives on one thread ([Note: one thread])
        rows = [(0.0, both * (local.max() - 1) / n), (3.0, 1 / n)] if local.max() > 1 else []
        rows += [(1.0, nic.max())] if nic.max() > 0 else []
        q = 2.0 * (n - 1)  # every rank sends n-1 messages and receives n-1
        rs = _pareto(_when(np.array([(t, f, red, 1.0, q) for t, f in rows])))
        ag = _pareto(_when(np.array([(t, f, 0.0, 1.0, q) for t, f in rows])))
    return _collect({Collective.REDUCE_SCATTER: [rs], Collective.ALL_GATHER: [ag]}.get(coll, [rs, ag]))


def pairwise_struct(lay: _Layout) -> Struct:
    """algorithms/pairwise.py: in round s rank r sends its block for r+s to r+s."""
    n = len(lay.node)
    if n < 2:
        return ()
    r = np.arange(n)
    if lay.cpus:
        return _collect([round_lines(lay, r, (r + s) % n, 1 / n) for s in range(1, n)])
    # No reductions, so a round's lines are its busiest port per tier: vectorise over all rounds.
    src = np.broadcast_to(r, (n - 1, n))
    dst = (src + np.arange(1, n)[:, None]) % n
    inter = lay.node[src] != lay.node[dst]
    m = n + int(lay.nic.max()) + 1
    off = (np.arange(n - 1) * m)[:, None]
    ptx = np.where(inter, n + lay.nic[src], src) + off
    prx = np.where(inter, n + lay.nic[dst], dst) + off
    tx, rx = np.bincount(ptx.ravel(), minlength=m * (n - 1)), np.bincount(prx.ravel(), minlength=m * (n - 1))
    if not lay.device:  # [Note: one thread] in rounds.py
        cpu = (np.arange(m * (n - 1)) % m) < n
        tx[cpu] = rx[cpu] = tx[cpu] + rx[cpu]
    load = np.maximum(tx[ptx], rx[prx]) / n
    counts: Counter = Counter()  # one transfer per pair a round: the pair line carries 1/n
    for a, b in zip(np.where(inter, 0.0, load).max(axis=1), np.where(inter, load, 0.0).max(axis=1)):
        # every rank sends one message and receives one
        rows = ((0.0, a, 0.0, 1.0, 2.0), (1.0, b, 0.0, 1.0, 2.0), (3.0, 1 / n if a > 0 else 0.0, 0.0, 1.0, 2.0))
        counts[tuple(row for row in rows if row[1] > 0)] += 1
    return tuple((c, _when(np.array(key))) for key, c in counts.items())


def gather_struct(lay: _Layout) -> Struct:
    """Every rank sends its 1/n block to rank 0 in one round (the tail of gloo's reduce)."""
    n = len(lay.node)
    return _collect([round_lines(lay, np.arange(1, n), np.zeros(n - 1, np.int64), 1 / n)]) if n > 1 else ()
