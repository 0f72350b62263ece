"""The model's newer terms and how calibration fits them: the pair tier's message-size curve ([Note:
message size] in collectives/pricing.py), NCCL's per-step cost, per-collective call overheads
([Note: per-op calls] in collectives/calibrate.py), steps posted ahead on GPUs ([Note: posted ahead]
in collectives/rounds.py), and one-way transfers ([Note: one way] in collectives/pricing.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import collectives.model as M
from collectives import algorithms, calibrate
from collectives.schedule import Collective
from collectives.pricing import MessageCurve
from collectives.topology import Topology

MiB = 1 << 20
# One message per step: 0.1 ms at 256 KiB (per-step cost), 1 MiB at 1 GB/s, 16 MiB and up at 2 GB/s.
POINTS = [[256 << 10, 1e-4], [MiB, MiB / 1e9], [16 * MiB, 16 * MiB / 2e9], [64 * MiB, 64 * MiB / 2e9]]
BASE = dict(intra_alpha=0.0, intra_bandwidth=1e12, pair_bandwidth=2e9, inter_alpha=0.0, inter_bandwidth=1e9,
            step_overhead=1e-4, reduce_bandwidth=1e12, native_step=0.0, call_overhead=0.0, oversubscribed_step=0.0)


def _model(segment: int = 1 << 40, **over) -> M.CostModel:
    return M.CostModel(Topology.local(4, cpus=0), "nccl", profile=M.Params(**{**BASE, **over}), segment_bytes=segment)


def test_slowdown_is_one_at_the_fastest_rate_and_flat_below_the_knee():
    c = MessageCurve.of(POINTS, segment=1 << 40)
    lines = np.array([[3.0, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0]])  # a pair line and a port line
    sizes = np.array([64 << 10, 256 << 10, MiB, 4 * MiB, 16 * MiB, 1 << 30], dtype=float)
    g = c.factor(lines, sizes)
    # 1 MiB is the knee (the first step at least twice the smallest): it and everything below run 2x slower
    np.testing.assert_allclose(g[0], [2.0, 2.0, 2.0, 1.5, 1.0, 1.0])  # 4 MiB: halfway on log size
    np.testing.assert_allclose(g[1], 1.0)  # only tier-3 lines follow the curve
    assert MessageCurve.of(POINTS[:1], 1 << 40) is None and MessageCurve.of([], 1 << 40) is None


def test_ring_all_gather_pays_its_message_size_rate():
    """Ring all-gather on 4 ranks sends one message of S/4 per step: at 1 MiB messages the curve prices
    the bytes as a pair of half the bandwidth would; at 16 MiB and up as the fitted bandwidth itself."""
    curved = _model(pair_curve=POINTS)
    flat, half = _model(), _model(pair_bandwidth=1e9)
    for nbytes, like in ((4 * MiB, half), (64 * MiB, flat), (1 << 30, flat)):
        assert curved.predict("all_gather", nbytes, "ring") == pytest.approx(like.predict("all_gather", nbytes, "ring"))
    assert curved.predict("all_gather", 4 * MiB, "ring") > flat.predict("all_gather", 4 * MiB, "ring")


def test_one_way_transfers_keep_the_flat_rate():
    """[Note: one way] in collectives/pricing.py: the curve, measured on ring steps, slows the transfers of
    rounds in which a rank sends and receives at once, not a chain's lone transfers."""
    curved, step, S = _model(pair_curve=POINTS), BASE["step_overhead"], MiB
    # in one part: 3 rounds of one transfer each, at the flat 2 GB/s (1 MiB is below the curve's knee: 2x there)
    assert curved.predict("broadcast", S, "ring", pipeline=1) == pytest.approx(3 * (step + S / 2e9), rel=1e-9)
    # in two parts of 512 KiB: the first and last rounds carry one transfer, the middle two relay at half the rate
    two = 4 * step + S / 2 / 2e9 * (1 + 2 + 2 + 1)
    assert curved.predict("broadcast", S, "ring", pipeline=2) == pytest.approx(two, rel=1e-9)


def test_reducing_transfers_move_in_segments():
    """A reduce-scatter's transfers end in reductions, which the executor posts in segments: with a
    1 MiB segment its 16 MiB messages move at the 1 MiB rate."""
    nbytes = 64 * MiB
    seg = _model(segment=MiB, pair_curve=POINTS).predict("reduce_scatter", nbytes, "ring")
    whole = _model(pair_curve=POINTS).predict("reduce_scatter", nbytes, "ring")
    assert seg == pytest.approx(_model(segment=MiB, pair_bandwidth=1e9).predict("reduce_scatter", nbytes, "ring"))
    assert whole == pytest.approx(_model().predict("reduce_scatter", nbytes, "ring"))
    # all-gather's transfers overwrite: no segments, the same price with either segment size
    assert _model(segment=MiB, pair_curve=POINTS).predict("all_gather", nbytes, "ring") == pytest.approx(
        _model(pair_curve=POINTS).predict("all_gather", nbytes, "ring"))


def test_fit_with_a_measured_curve_recovers_the_pair_bandwidth(tmp_path):
    """Rows priced with a curve: a fit given the same curve recovers B_pair and prices every row, and the
    curve travels through the saved profile (per world size)."""
    topo = Topology.local(4, cpus=0)
    truth = M.Params(**BASE, pair_curve=POINTS)
    model = M.CostModel(topo, "nccl", profile=truth)
    rows = [{"op": op, "algorithm": a, "bytes": s, "time_us": model.predict(op, s, a) * 1e6}
            for op in ("all_reduce", "reduce_scatter", "all_gather") for a in ("ring", "halving_doubling", "direct")
            for s in (1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26)]
    params, summary = calibrate.fit_per_world([(topo, rows)], "nccl", curves={4: {"pair_curve": POINTS}})
    assert params.pair_curve == POINTS
    assert params.pair_bandwidth == pytest.approx(truth.pair_bandwidth, rel=0.02)
    assert max(abs(r - 1) for r in summary["ratios"].values()) < 0.02
    flat, _ = calibrate.fit_per_world([(topo, rows)], "nccl")  # without the curve the same rows fit worse
    flat_err = max(abs(M.CostModel(topo, "nccl", profile=flat).predict(r["op"], r["bytes"], r["algorithm"])
                       / (r["time_us"] * 1e-6) - 1) for r in rows)
    assert flat_err > 0.05
    path = tmp_path / "p.json"
    calibrate.save_profile(path, params, calibrate.hardware_key(topo, "nccl"), {})
    assert calibrate.load_profile(path).pair_curve == POINTS


def test_a_world_sizes_own_curve_replaces_the_base():
    p = M.Params(**BASE, pair_curve=POINTS, worlds={"2": {"pair_curve": []}})
    assert M.CostModel(Topology.local(4, cpus=0), "nccl", profile=p).curve is not None
    assert M.CostModel(Topology.local(2, cpus=0), "nccl", profile=p).curve is None
    assert M.CostModel(Topology.local(4, cpus=0), "nccl", profile=replace(p, pair_curve=[])).curve is None


def test_load_curve_reads_the_benchmark_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"header": {"world_size": 4}, "points": [[1048576, 1e-4], [16777216, 1e-3]]}')
    assert calibrate.load_curve(path) == (4, [[1048576.0, 1e-4], [16777216.0, 1e-3]])
    path.write_text('{"header": {"world_size": 4}, "points": [[1048576, 1e-4]]}')
    with pytest.raises(ValueError, match="at least 2 points"):
        calibrate.load_curve(path)


def test_nccl_fit_recovers_per_step_and_per_message_costs():
    """On NCCL a step's messages are one grouped launch, each peer one more p2p operation in it: rows made
    with a per-step and a per-message cost give both back (direct's one round of 6 messages against
    halving-doubling's and ring's rounds of 2 tell them apart), and direct's round stays cheaper than
    halving-doubling's two, as on 4 x H200 (calibrate._fit_theta, [Note: messages])."""
    topo = Topology.local(4, cpus=0)
    truth = replace(M.default_params(topo, "nccl"), step_overhead=8e-6, call_overhead=2e-5, message_overhead=1.5e-6)
    model = M.CostModel(topo, "nccl", profile=truth)
    rows = [{"op": op, "algorithm": a, "bytes": s, "time_us": model.predict(op, s, a) * 1e6}
            for op in ("reduce_scatter", "all_gather") for a in ("ring", "halving_doubling", "direct")
            for s in (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)]
    params, summary = calibrate.fit(rows, topo, "nccl")
    assert params.message_overhead == pytest.approx(truth.message_overhead, rel=0.05)
    # alpha_intra keeps its default and rides with the step overhead (one column on one node)
    assert params.step_overhead + params.intra_alpha == pytest.approx(truth.step_overhead + truth.intra_alpha, rel=0.05)
    assert summary["within_25pct"] == 1.0
    fitted = M.CostModel(topo, "nccl", profile=params)
    assert fitted.predict("all_gather", 1 << 16, "direct") < fitted.predict("all_gather", 1 << 16, "halving_doubling")


def test_fit_recovers_each_collectives_call_overhead(tmp_path):
    """Rows made with different call costs per collective: the fit finds each (the least as call_overhead),
    prices every row, and a model of the saved profile charges each collective its own."""
    topo = Topology.local(4, cpus=0)
    extra = {"all_reduce": 30e-6, "all_gather": 20e-6, "broadcast": 0.0}
    truth = M.Params(**{**BASE, "call_overhead": 7e-6, "op_overhead": extra})
    model = M.CostModel(topo, "nccl", profile=truth)
    rows = [{"op": op, "algorithm": a, "bytes": s, "time_us": model.predict(op, s, a, pipeline=1) * 1e6,
             "pipeline": 1}
            for op in extra for a in ("ring", "halving_doubling", "direct", "tree")
            if a in algorithms.supported(Collective(op)) for s in (1 << 16, 1 << 18, 1 << 20, 1 << 24)]
    params, summary = calibrate.fit(rows, topo, "nccl")
    assert params.call_overhead == pytest.approx(truth.call_overhead, rel=0.05)
    for op, v in extra.items():
        assert params.op_overhead[op] == pytest.approx(v, abs=0.5e-6)
    assert max(abs(r - 1) for r in summary["ratios"].values()) < 0.02
    fitted = M.CostModel(topo, "nccl", profile=params)
    assert fitted.predict("all_reduce", 1 << 16, "ring") - fitted.predict("broadcast", 1 << 16, "ring", pipeline=1) \
        > 20e-6
    # a collective no row measured pays the call overhead alone; native is priced without these terms
    assert M.CostModel(topo, "nccl", profile=replace(params, op_overhead={})).predict("all_reduce", 1 << 16, "ring") \
        == pytest.approx(fitted.predict("all_reduce", 1 << 16, "ring") - params.op_overhead["all_reduce"])


def test_fit_command_takes_a_curve_file(tmp_path, capsys):
    """``calibrate fit SWEEP --pair-curve CURVE --per-world --save P``: the profile carries the curve of the
    sweep's world size and names the file it came from."""
    import json

    topo = Topology.local(4, cpus=0)
    model = M.CostModel(topo, "nccl", profile=M.Params(**BASE, pair_curve=POINTS))
    rows = [{"op": "all_gather", "algorithm": a, "bytes": s, "time_us": model.predict("all_gather", s, a) * 1e6}
            for a in ("ring", "direct") for s in (1 << 18, 1 << 20, 1 << 22, 1 << 24)]
    sweep, curve, out = tmp_path / "sweep.json", tmp_path / "curve.json", tmp_path / "p.json"
    sweep.write_text(json.dumps({"header": {"backend": "nccl", "world_size": 4, "topology": topo.to_json()},
                                 "rows": rows}))
    curve.write_text(json.dumps({"header": {"world_size": 4}, "points": POINTS}))
    calibrate.main(["fit", str(sweep), "--pair-curve", str(curve), "--per-world", "--save", str(out)])
    doc = json.loads(out.read_text())
    assert doc["params"]["pair_curve"] == POINTS and doc["meta"]["pair_curves"] == [str(curve)]
    assert "within 25%: 100%" in capsys.readouterr().out


def test_gpu_hosts_pay_a_step_per_step_they_post():
    """[Note: posted ahead] in collectives/rounds.py: on GPUs a chain broadcast's 7 rounds over 8 ranks cost
    the devices 7 latencies and the hosts 2 steps each (receive, then send); on CPU every round costs a step.
    A ring, where every rank works every round, pays a step per round on both."""
    step, alpha = 1e-4, 1e-6
    p = M.Params(**{**BASE, "step_overhead": step, "intra_alpha": alpha, "pair_bandwidth": 1e15})
    gpu = M.CostModel(Topology.preset("dgx-h100", 1), "nccl", profile=p)
    cpu = M.CostModel(Topology.local(8, cpus=0), "nccl", profile=p)
    assert gpu.topology.world_size == 8 and gpu._lay.device and not cpu._lay.device
    C = Collective
    assert gpu.predict(C.BROADCAST, 8, "ring", pipeline=1) == pytest.approx(2 * step + 7 * alpha, rel=1e-6)
    assert cpu.predict(C.BROADCAST, 8, "ring", pipeline=1) == pytest.approx(7 * (step + alpha), rel=1e-6)
    # pipelined in 4 parts: 10 rounds, and an inner rank posts 5 steps (receive part 0 ... send part 3)
    assert gpu.predict(C.BROADCAST, 8, "ring", pipeline=4) == pytest.approx(5 * step + 10 * alpha, rel=1e-6)
    for model in (gpu, cpu):
        assert model.predict(C.ALL_GATHER, 8, "ring") == pytest.approx(7 * (step + alpha), rel=1e-6)
    # the fit sees the same count: the step column of a chain broadcast on GPUs is 2, its latency column 7
    x = calibrate.features(gpu, C.BROADCAST, "ring", 8.0, M._theta(gpu.params), pipeline=1)
    assert (x[1], x[2]) == (2.0, 7.0)
