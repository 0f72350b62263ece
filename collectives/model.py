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
part, cached per (algorithm, collective, layout), and a cheap evaluation. The
first reduces every round to a few "lines" (tier, f, r, m, q, cut, side):

- f: the fraction of the buffer on the busiest resource of a transfer, of
  tier 0 (a device's port into the node's fabric), 1 (a NIC), 3 (the pair of
  devices itself: one stream between two GPUs does not fill a port, as NCCL
  gives p2p few channels, and on a switchless NVLink mesh a pair owns only
  its own links) or 2 (no transfer: a reduction alone);
- r: the fraction the rank reduces;
- m >= 1 where a host has more ranks working in the round than cores: busy
  ranks / cores, or less for a rank whose peers leave it the cores ([Note: shared
  cores] in rounds.py). CPU ranks' copies and reductions slow down m times, and
  a rank waiting on a descheduled peer pays a scheduler slice per step;
- q: the messages (transfers sent or received) the busier end handles in the
  round, at least its host's messages over its cores ([Note: messages] in
  rounds.py): direct's n-1 sends and n-1 receives a round cost more host work
  than halving-doubling's one of each, which a per-round cost cannot tell;
- cut, side: unequally loaded ranks sharing cores get lines of two stretches, for buffers up
  to cut bytes (side -1: messages fit a slot) and above (+1); others hold at all sizes (side 0).

With parameters theta a line costs
``step + alpha[tier] + [m > 1] sched + q msg + (w f / B[tier] + m 3 r / R) nbytes``, with
w = m for the host-bound tiers 0 and 3 and w = 1 for a NIC (tier 1): a slow
host does not slow the wire ([Note: CPU stretch] in rounds.py; an
oversubscribed inter-node transfer also gets a tier-0 line for the host's copy
of its bytes, so the slower of the two binds). A call adds a fixed ``call``
overhead, and buffer copies outside the rounds one line of tier 4 (SETUP: 2/3
r per byte copied, nothing else; [Note: set-up copies] in rounds.py), and on
GPUs a structure whose ranks sit out rounds a line of tier 5 (HOST: the step
alone) counted negatively, for the steps no rank's host posts ([Note: posted
ahead] in rounds.py), so a prediction is linear in theta once each round's
slowest line is known; calibrate.py fits theta that way. ``msg``
(Params.message_overhead) is 0 unless fitted, so profiles and backends without
it price as before.
Identical rounds are stored once with a count: a 1,024-rank ring costs one
round of work.

Ring, chain and the textbook (Thakur et al. 2005) structures are generated
directly as rounds for any world size; tests check them against pricing the
registry's Schedules at small world sizes. ``native`` is priced by a model of
the backend: NCCL's ring/tree x LL/LL128/Simple choice with its multi-channel
rings (one channel per NIC, so rings leave each node through every NIC), gloo's
ring, MPICH's algorithm families.

This module holds Plan and CostModel with its cache of structures; params.py
holds the parameters (Params, the defaults, theta); rounds.py and structures.py build the
structures, pricing.py evaluates them, native_model.py models the backends' own
collectives.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import algorithms
from .calibrate_profiles import find_profile, load_profile
from .native_model import direct_struct, nccl_options, native_structs, pairwise_struct
# calibrate.py and the tests also reach coefficients, round_lines and schedule_rounds through this module.
from .pricing import MessageCurve, _measured, binding, breakdown, evaluate
from .rounds import (HOST, SETUP, Busy, Struct, _Layout, coefficients, join, messages, price_schedule, round_lines,
                     copying_ranks, schedule_rounds, setup_struct)
from .structures import (binomial_struct, chain_struct, hd_struct, hierarchical_struct, ring_struct,
                         tree_all_reduce_struct)
from .execute import default_segment_bytes
# the parameters, and what calibrate.py and the tests reach through this module
from .params import (_CPU_HALF_SLOWDOWN, _WORLD_FIELDS, THETA, Params, _theta, default_params, for_topology,
                     for_world)
from .schedule import Collective
from .topology import Topology

OPS = tuple(c.value for c in Collective)
NATIVE = algorithms.NATIVE
_STREAMED_NATIVE_MARGIN = 1.05  # streamed_plan keeps native within this factor of the best ([Note: streamed calls])


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
_FEW_PIPELINES = (1, 2, 4, 8)  # staggered phases (hierarchical): each part adds a round, gains flatten fast


def _pipelines(algorithm: str) -> tuple[int, ...]:
    return _FEW_PIPELINES if algorithm == "hierarchical" else _PIPELINES


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
    documented defaults (calibrate_profiles.find_profile). ``segment_bytes``: the executor's largest segment
    of a reducing transfer (default: the Communicator's default for the backend). ``aside``: own-block
    copies run beside the schedule (execute.py [Note: own block aside]; older sweeps: not). ``back_to_back``:
    n > 1 prices a call's share of n calls made back to back and waited for together, as busbw times them
    (on devices; [Note: back to back] in rounds.py); 0 or 1, a call alone.
    """

    def __init__(self, topology: Topology, backend: str = "gloo", profile: Params | str | os.PathLike | None = None,
                 segment_bytes: int | None = None, aside: bool = True, back_to_back: int = 0):
        self.topology, self.backend = topology, backend
        if profile is None:
            profile = find_profile(topology, backend)
            profile = for_topology(profile, topology) if profile is not None else None
        elif not isinstance(profile, Params):
            profile = load_profile(profile)
        params = profile if profile is not None else default_params(topology, backend)
        self.params: Params = for_world(params, topology.world_size)
        self.curve = MessageCurve.of(self.params.pair_curve, segment_bytes or default_segment_bytes(backend),
                                     self.params.one_way_curve)
        self._lay, self._nodes, self.aside = _Layout.of(topology), tuple(map(tuple, topology.nodes)), aside
        stream = _Layout.of(topology, back_to_back=True) if back_to_back and back_to_back > 1 else None
        self._stream = stream if stream is not None and stream.back_to_back else None  # devices only
        self.back_to_back = int(back_to_back) if self._stream is not None else 0
        self._choices: dict[tuple, Plan] = {}
        self._plans: dict[tuple, Plan] = {}

    # -- pricing --------------------------------------------------------------
    def _theta(self, dtype: Any) -> np.ndarray:
        half = _dtype_name(dtype) in ("float16", "bfloat16") and self.topology.devices[0] == "cpu"
        return _theta(self.params, _CPU_HALF_SLOWDOWN if half else 1.0)

    def _op_theta(self, coll: Collective, dtype: Any) -> np.ndarray:
        """theta for our schedules of ``coll``: the call overhead plus the collective's own ([Note: per-op calls])."""
        theta = self._theta(dtype)
        theta[0] += self.params.op_overhead.get(coll.value, 0.0)
        return theta

    def _native_theta(self, dtype: Any) -> np.ndarray:
        """theta for the backend's own algorithms: its own per-step cost, and none of our transport's
        per-message cost (gloo and MPI move their messages themselves; native_step covers them)."""
        theta = self._theta(dtype)
        theta[1], theta[9] = self.params.native_step, 0.0
        return theta

    def struct(self, coll: Collective, algorithm: str, pipeline: int = 1, in_place: bool = False,
               stream: bool = False) -> Struct:
        """Structural lines of one call of our ``algorithm`` (cached across models of the same layout);
        ``in_place``: the call's input is its output's own block ([Note: set-up copies] in rounds.py);
        ``stream``: the rounds its busiest rank works, back to back ([Note: back to back] in rounds.py)."""
        lay = self._stream if stream and self._stream is not None else self._lay
        key = (lay.key, coll, algorithm, pipeline, _GENERIC_ONLY, self.aside, in_place)
        if key not in _STRUCTS:
            if len(_STRUCTS) > 2048:
                _STRUCTS.clear()
            _STRUCTS[key] = _structure(lay, self._nodes, coll, algorithm, pipeline, self.aside, in_place)
        return _STRUCTS[key]

    def structs(self, coll: Collective, algorithm: str, pipeline: int = 1,
                in_place: bool = False) -> tuple[tuple[float, Struct], ...]:
        """(weight, Struct) pairs whose weighted sum prices a call: the call alone, or back to back its
        share of n calls, the busiest rank's rounds n - 1 times and one whole call ([Note: back to back])."""
        call = self.struct(coll, algorithm, pipeline, in_place)
        n = self.back_to_back
        if not n:
            return ((1.0, call),)
        return ((1 - 1 / n, self.struct(coll, algorithm, pipeline, in_place, stream=True)), (1 / n, call))

    def sweep(self, op: str | Collective, nbytes: Any, algorithm: str, dtype: Any = "float32",
              pipeline: int | None = None, in_place: bool = False) -> np.ndarray:
        """Predicted seconds at every size of ``nbytes`` (vectorised); best pipeline unless given.
        ``in_place``: an all-gather whose input is its output's own block, which no copy fills."""
        coll, S = Collective(op), np.atleast_1d(np.asarray(nbytes, dtype=float))
        if self.topology.world_size < 2:
            return np.zeros_like(S)
        if algorithm == NATIVE:
            return np.min([t for _, t in self._native(coll, S, dtype)], axis=0)
        fit = self._kernel(coll, algorithm)
        if fit:
            return _measured(fit, S)
        ks = [pipeline] if pipeline else (_pipelines(algorithm) if algorithms.pipelined(algorithm, coll) else (1,))
        return np.min(self._depth_times(coll, algorithm, ks, self._op_theta(coll, dtype), S, in_place), axis=0)

    def _depth_times(self, coll: Collective, algorithm: str, ks, theta: np.ndarray, S: np.ndarray,
                     in_place: bool = False) -> np.ndarray:
        """depths x sizes: predicted seconds of our ``algorithm`` in each number of parts of ``ks``."""
        return np.array([sum(w * evaluate(st, theta, S, curve=self.curve)
                             for w, st in self.structs(coll, algorithm, k, in_place)) for k in ks])

    def _kernel(self, coll: Collective, algorithm: str) -> list | None:
        """The measured fit of ``algorithm`` where it runs as our NVLink kernel ([Note: NVLink direct]):
        direct all-reduce and reduce-scatter with NCCL on one NVLink node, calibrated at this world size."""
        if not algorithms.nvlink_kernel(algorithm, coll) or self.backend != "nccl" or not self.topology.one_nvlink_node:
            return None
        return self.params.kernels.get(str(self.topology.world_size), {}).get(coll.value) or None

    def _native(self, coll: Collective, S: np.ndarray, dtype: Any) -> list[tuple[str, np.ndarray]]:
        fit = self.params.native.get(str(self.topology.world_size), {}).get(coll.value)
        if fit:
            return [("measured", _measured(fit, S))]
        if self.backend == "nccl":
            call = self.params.call_overhead
            return [(lab, call + lat + S / bw) for lab, lat, bw, _ in nccl_options(self.topology, coll)]
        theta = self._native_theta(dtype)
        return [(label, evaluate(self._native_struct(coll, label, make), theta, S))
                for label, make in native_structs(self.backend, self._lay, coll)]

    def _native_struct(self, coll: Collective, label: str, make) -> Struct:
        key = (self._lay.key, coll, f"{NATIVE}:{self.backend}:{label}", 1, False)
        if key not in _STRUCTS:
            _STRUCTS[key] = make()
        return _STRUCTS[key]

    def predict(self, op: str | Collective, nbytes: int, algorithm: str, dtype: Any = "float32",
                pipeline: int | None = None, in_place: bool = False) -> float:
        return float(self.sweep(op, [nbytes], algorithm, dtype, pipeline, in_place)[0])

    def best_pipeline(self, op: str | Collective, nbytes: int, algorithm: str, dtype: Any = "float32") -> int:
        coll = Collective(op)
        if algorithm == NATIVE or not algorithms.pipelined(algorithm, coll) or self.topology.world_size < 2:
            return 1
        ks = _pipelines(algorithm)
        times = self._depth_times(coll, algorithm, ks, self._theta(dtype), np.array([float(nbytes)]))[:, 0]
        return ks[int(np.argmin(times))]

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

    def streamed_plan(self, op: str | Collective, nbytes: int, dtype: Any = "float32",
                      candidates: tuple[str, ...] | list[str] | None = None) -> Plan:
        """The pick for one call of a stream of back-to-back asynchronous calls ([Note: streamed calls]).

        On a device backend each alternative is priced by what it adds over its own zero-byte call;
        on host backends this is plan().
        """
        if self.backend != "nccl" or self.topology.world_size < 2:
            return self.plan(op, nbytes, dtype, candidates)
        key = ("streamed", op, int(nbytes), dtype, tuple(candidates) if candidates else None)
        plan = self._plans.get(key)
        if plan is None:
            coll = Collective(op)
            names = tuple(candidates) if candidates else algorithms.supported(coll)
            alts = {a: max(self.predict(coll, nbytes, a, dtype) - self.predict(coll, 0, a, dtype), 0.0)
                    for a in names}
            algo = min(alts, key=lambda a: (alts[a], a != NATIVE))
            if NATIVE in alts and alts[NATIVE] <= _STREAMED_NATIVE_MARGIN * alts[algo]:
                algo = NATIVE
            k = self.best_pipeline(coll, nbytes, algo, dtype)
            plan = self._plans[key] = Plan(coll.value, int(nbytes), algo, alts[algo], alts, k,
                                           "streamed: fixed per-call costs overlap the previous call",
                                           _dtype_name(dtype))
        return plan

    # [Note: streamed calls]
    # DataParallel and ZeRO issue their bucket reductions back to back, asynchronously, while the
    # backward pass runs. On a GPU the host's cost of one call (the Python API, the launch of each
    # step) then overlaps the device's work on the previous one, and what the stream of calls waits
    # for is the device: the bytes. A prediction of one call alone (plan()) charges the fixed costs in
    # full, and on 4 x H200 it ranked our two-step `direct` ahead of NCCL's all-reduce for 25 MiB
    # buckets, which in training measured 3.59 ms of communication per step against 2.55 ms for
    # native. streamed_plan() ranks by the size-dependent part instead. On CPU the same thread pays
    # every cost, so nothing overlaps and it falls back to plan(). Within 5% of the best, native is
    # kept: the size-dependent parts of a 2-GPU all-gather tie for every algorithm, and ours, run
    # eagerly on buffers that move every step (ZeRO-3's gathered units), cost host time that this
    # ranking leaves out (stage 3 ran at 0.65-0.69x FSDP2 on 2 x H200 with ring picked on a tie,
    # 1.02x with native).

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
        native = algorithm == NATIVE
        fit = (self.params.native.get(str(self.topology.world_size), {}).get(coll.value) if native
               else self._kernel(coll, algorithm))
        if fit:
            return {"latency": fit[0], "intra": fit[1] * nbytes, "inter": 0.0, "reduce": 0.0,
                    "variant": "measured" if native else "measured NVLink kernel"}
        if not native:
            return breakdown(self.struct(coll, algorithm, pipeline), self._op_theta(coll, dtype), float(nbytes), self.curve)
        if self.backend == "nccl":
            lab, lat, bw, tier = min(nccl_options(self.topology, coll), key=lambda o: o[1] + nbytes / o[2])
            return {"latency": self.params.call_overhead + lat, "intra": 0.0, "inter": 0.0, "reduce": 0.0,
                    tier: nbytes / bw, "variant": lab}
        S, theta = np.array([float(nbytes)]), self._native_theta(dtype)
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


def _structure(lay: _Layout, nodes: tuple, coll: Collective, algorithm: str, pipeline: int,
               aside: bool = True, in_place: bool = False) -> Struct:
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
            ("hierarchical", C.ALL_REDUCE): lambda: hierarchical_struct(lay, nodes, pipeline),
            ("direct", C.ALL_REDUCE): lambda: direct_struct(lay, coll),
            ("direct", C.REDUCE_SCATTER): lambda: direct_struct(lay, coll),
            ("direct", C.ALL_GATHER): lambda: direct_struct(lay, coll),
            ("pairwise", C.ALL_TO_ALL): lambda: pairwise_struct(lay)}.get((algorithm, coll))
    out = fast() if fast is not None and not _GENERIC_ONLY else None
    if out is None:
        s = algorithms.build(algorithm, coll, len(lay.node), root=0, nodes=nodes, pipeline=pipeline)
        out = price_schedule(s, lay)
    setup = setup_struct(lay, coll, algorithm=algorithm if aside else None, in_place=in_place)
    if isinstance(out, Busy):  # back to back: the busiest rank's rounds, and its copies ([Note: back to back])
        return out.struct(setup, copying_ranks(len(lay.node), coll))
    return join(out, setup) if out else out


_GENERIC_ONLY = False  # tests flip it to price every algorithm from its Schedule
_STRUCTS: dict[tuple, Struct] = {}
