"""The cost model's parameters: Params (what calibrate.py fits), the documented defaults per backend,
per-world-size fields, a profile applied to a multi-node topology, and theta (the parameters as the
vector a prediction is linear in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .topology import Topology

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
    op_overhead: dict[str, float] = field(default_factory=dict)  # op -> s more per call of our schedules
    oversubscribed_step: float = 1e-3  # s more per step when a host's busy ranks outnumber its cores
    message_overhead: float = 0.0  # s of host work per message a rank sends or receives ([Note: messages])
    nodes: int = 1            # nodes of the run it was calibrated on: one node measures no inter-node link
    native: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # world -> op -> [alpha, s/byte]
    # world -> op -> the same, for our kernel over NVLink (direct all-reduce, reduce-scatter: [Note: NVLink direct])
    kernels: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # [bytes, seconds] of one ring step's message by size ([Note: message size] in pricing.py); [] = flat
    pair_curve: list[list[float]] = field(default_factory=list)
    # the same for a transfer whose ends only send or only receive in the round ([Note: one way]); [] = flat
    one_way_curve: list[list[float]] = field(default_factory=list)
    # world -> fields fitted on that many ranks of the same machine ([Note: per-world profiles])
    worlds: dict[str, Any] = field(default_factory=dict)
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
# Communicator overhead per call, any algorithm: 140 us measured through NCCL on H200 (same profile);
# gloo and MPI: estimates.
_CALL = {"nccl": 140e-6, "gloo": 300e-6, "mpi": 20e-6}
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
                  native_step=_NATIVE_STEP.get(backend, 10e-6), call_overhead=_CALL.get(backend, 50e-6),
                  nodes=topo.num_nodes)


# [Note: per-world profiles]
# How fast one device moves bytes to a peer depends on how many peers it serves at once: on H200
# NVSwitch one NCCL p2p stream between two GPUs measured about 310 GB/s, and each of three at once
# about 195 GB/s; our executor's per-step cost differs as well. One set of fields fitted across
# world sizes fits neither (calibrate fit, joint fit: 2-GPU rows within 25% rose to 72%, 4-GPU rows
# fell to 63%). A profile therefore may carry fields fitted on other world sizes of the same
# machine, which replace the base fields for a communicator of that size; a world size without
# its own keeps the base (the largest measured).
_WORLD_FIELDS = ("call_overhead", "step_overhead", "intra_alpha", "inter_alpha", "intra_bandwidth",
                 "inter_bandwidth", "pair_bandwidth", "reduce_bandwidth", "oversubscribed_step", "native_step",
                 "message_overhead", "pair_curve", "one_way_curve", "op_overhead")


def for_world(p: Params, world_size: int) -> Params:
    """``p`` with the fields fitted on ``world_size`` ranks, where it has them."""
    over = p.worlds.get(str(world_size))
    return replace(p, **{k: v for k, v in over.items() if k in _WORLD_FIELDS}) if over else p


def for_topology(p: Params, topo: Topology) -> Params:
    """A found profile (shipped, or ``$TOPOCOMM_PROFILE``) applied to ``topo``.

    Profiles are matched on the hardware of one node (calibrate_profiles.hardware_key), and one calibrated on
    one node has only default inter-node terms and straight-line fits of ``native`` measured inside a
    node. On a multi-node topology such a profile takes the inter-node link from the topology
    (detected, or stated by ``$TOPOCOMM_NIC_GBPS``) and prices ``native`` by its backend model.
    """
    if topo.num_nodes < 2 or p.nodes > 1 or topo.nic is None:
        return p
    return replace(p, inter_alpha=topo.nic.latency, inter_bandwidth=topo.nic.effective, native={}, kernels={},
                   source=f"{p.source} + inter-node {topo.nic.kind} from the topology")


THETA = ("call", "step", "alpha_intra", "alpha_inter", "1/B_intra", "1/B_inter", "1/R", "1/B_pair", "sched", "msg")


def _theta(p: Params, dtype_slow: float = 1.0) -> np.ndarray:
    """Parameters in the order of THETA (what calibrate.py fits)."""
    return np.array([p.call_overhead, p.step_overhead, p.intra_alpha, p.inter_alpha, 1 / p.intra_bandwidth,
                     1 / p.inter_bandwidth, dtype_slow / p.reduce_bandwidth, 1 / p.pair_bandwidth,
                     p.oversubscribed_step, p.message_overhead])
