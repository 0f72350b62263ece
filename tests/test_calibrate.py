"""Calibration: fits recovering known parameters (one world size, several, each on its own), saving
and finding profiles, and the NNLS solver the fits use."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import collectives.model as M
from collectives import calibrate
from collectives.topology import Topology


def test_fit_recovers_known_parameters(tmp_path):
    topo = Topology.local(4, cpus=0)
    truth = M.Params(intra_alpha=0.0, intra_bandwidth=2e9, pair_bandwidth=0.8e9, inter_alpha=0.0,
                     inter_bandwidth=1e9, step_overhead=1.5e-3, reduce_bandwidth=3e9, native_step=0.4e-3,
                     call_overhead=0.3e-3, oversubscribed_step=0.0)
    model = M.CostModel(topo, "gloo", profile=truth)
    rows = [{"op": op, "algorithm": a, "bytes": s, "time_us": model.predict(op, s, a) * 1e6}
            for op in ("all_reduce", "reduce_scatter", "all_gather")
            for a in ("ring", "halving_doubling", "direct", "native") for s in (1 << 18, 1 << 20, 1 << 22, 1 << 24)]
    params, summary = calibrate.fit(rows, topo, "gloo")
    # alpha_intra keeps its default and rides with the step overhead (one column on one node)
    assert params.step_overhead + params.intra_alpha == pytest.approx(truth.step_overhead, rel=0.02)
    assert params.call_overhead == pytest.approx(truth.call_overhead, rel=0.05)
    assert params.pair_bandwidth == pytest.approx(truth.pair_bandwidth, rel=0.02)
    assert params.intra_bandwidth == pytest.approx(truth.intra_bandwidth, rel=0.02)
    assert params.reduce_bandwidth == pytest.approx(truth.reduce_bandwidth, rel=0.05)
    assert summary["within_25pct"] == 1.0
    path = tmp_path / "p.json"
    calibrate.save_profile(path, params, calibrate.hardware_key(topo, "gloo"), {"rows": len(rows)})
    assert calibrate.load_profile(path) == params
    assert json.loads(path.read_text())["match"]["backend"] == "gloo"


def test_fit_of_two_world_sizes_shares_theta_and_keeps_a_native_line_each():
    """Sweeps on 2 and 4 ranks of one machine kind: each priced on its own topology, one theta."""
    truth = M.Params(intra_alpha=0.0, intra_bandwidth=2e9, pair_bandwidth=0.8e9, inter_alpha=0.0,
                     inter_bandwidth=1e9, step_overhead=1.5e-3, reduce_bandwidth=3e9, native_step=0.0,
                     call_overhead=0.3e-3, oversubscribed_step=0.0)
    sizes = (1 << 18, 1 << 20, 1 << 22, 1 << 24)
    native = {2: (1e-4, 1e-9), 4: (2e-4, 2e-9)}  # the backend's own lines: alpha, seconds per byte
    sweeps = []
    for n in (2, 4):
        topo = Topology.local(n, cpus=0)
        model = M.CostModel(topo, "nccl", profile=truth)
        rows = [{"op": op, "algorithm": a, "bytes": s, "time_us": model.predict(op, s, a) * 1e6}
                for op in ("all_reduce", "reduce_scatter") for a in ("ring", "direct") for s in sizes]
        rows += [{"op": "all_reduce", "algorithm": "native", "bytes": s,
                  "time_us": (native[n][0] + native[n][1] * s) * 1e6} for s in sizes]
        sweeps.append((topo, rows))
    params, summary = calibrate.fit_sweeps(sweeps, "nccl")
    assert max(abs(r - 1) for r in summary["ratios"].values()) < 0.02  # every row of both sweeps, one theta
    assert params.pair_bandwidth == pytest.approx(truth.pair_bandwidth, rel=0.02)
    for n, (alpha, beta) in native.items():
        assert params.native[str(n)]["all_reduce"][:2] == pytest.approx([alpha, beta], rel=1e-3)
    assert summary["within_25pct"] == 1.0 and summary["rows"] == 2 * (16 + 4)
    assert any(k.startswith("2r/") for k in summary["ratios"]) and any(k.startswith("4r/") for k in summary["ratios"])


def test_per_world_fit_keeps_each_world_sizes_own_fields(tmp_path):
    """Two world sizes whose pairs move bytes at different rates: a fit per world size recovers both,
    and a model for each size prices with its own fields ([Note: per-world profiles])."""
    base = dict(intra_alpha=0.0, intra_bandwidth=2e9, inter_alpha=0.0, inter_bandwidth=1e9,
                reduce_bandwidth=3e9, native_step=0.0, call_overhead=0.3e-3, oversubscribed_step=0.0)
    truth = {2: M.Params(pair_bandwidth=1.6e9, step_overhead=0.5e-3, **base),
             4: M.Params(pair_bandwidth=0.8e9, step_overhead=1.5e-3, **base)}
    sizes = (1 << 18, 1 << 20, 1 << 22, 1 << 24)
    sweeps = []
    for n in (2, 4):
        topo = Topology.local(n, cpus=0)
        model = M.CostModel(topo, "nccl", profile=truth[n])
        rows = [{"op": op, "algorithm": a, "bytes": s, "time_us": model.predict(op, s, a) * 1e6}
                for op in ("all_reduce", "reduce_scatter") for a in ("ring", "direct") for s in sizes]
        sweeps.append((topo, rows))
    joint, joint_summary = calibrate.fit_sweeps(sweeps, "nccl")
    params, summary = calibrate.fit_per_world(sweeps, "nccl")
    assert joint_summary["within_25pct"] < 1.0  # one set of fields cannot fit both
    assert max(abs(r - 1) for r in summary["ratios"].values()) < 0.02
    assert params.worlds["2"]["step_overhead"] < params.step_overhead  # 2 ranks: cheaper steps, as measured
    path = tmp_path / "p.json"
    calibrate.save_profile(path, params, calibrate.hardware_key(sweeps[1][0], "nccl"), {})
    for n in (2, 4):  # a model of either size, from the saved profile, prices as that size's truth
        topo = Topology.local(n, cpus=0)
        fitted, real = M.CostModel(topo, "nccl", profile=str(path)), M.CostModel(topo, "nccl", profile=truth[n])
        for s in sizes:
            assert fitted.predict("all_reduce", s, "ring") == pytest.approx(real.predict("all_reduce", s, "ring"),
                                                                            rel=0.02)
    # A world size measured by neither keeps the base (the largest measured).
    assert M.CostModel(Topology.local(3, cpus=0), "nccl", profile=params).params.step_overhead == params.step_overhead


def test_profile_lookup(tmp_path, monkeypatch):
    topo = Topology.local(4)
    params = M.default_params(topo, "gloo")
    path = tmp_path / "mine.json"
    calibrate.save_profile(path, params, {"backend": "gloo"}, {})
    monkeypatch.setenv("TOPOCOMM_PROFILE", str(path))
    assert M.CostModel(topo, "gloo").params == params
    monkeypatch.delenv("TOPOCOMM_PROFILE")
    assert calibrate.find_profile(Topology.preset("dgx-h100"), "nccl") is None  # no H100 profile shipped yet
    shipped = calibrate.find_profile(topo, "gloo")
    if calibrate.hardware_key(topo, "gloo").get("cpus") == 2:  # the machine the gloo profile was measured on
        assert shipped is not None and shipped.source == "calibrated"


def test_nnls():
    A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert calibrate.nnls(A, np.array([1.0, -1.0, 0.0])) == pytest.approx([0.5, 0.0])


def test_sweeps_are_priced_at_the_segment_size_they_ran_with(tmp_path):
    """[Note: whole transfers on CUDA]: a busbw header says how transfers were cut; NCCL sweeps from before
    it did ran with 32 MiB segments, and a large reducing transfer priced that way moves at the 32 MiB
    message rate of the pair curve."""
    row = {"op": "all_reduce", "algorithm": "ring", "bytes": 1 << 30, "time_us": 1.0, "in_place": True}

    def rows(header):
        p = tmp_path / "s.json"
        p.write_text(json.dumps({"header": header, "rows": [row, {**row, "algorithm": "auto"}]}))
        return calibrate.load_rows(p)[1]

    legacy = rows({"backend": "nccl"})
    assert [r["segment_bytes"] for r in legacy] == [32 << 20]  # and the auto row is dropped
    whole = rows({"backend": "nccl", "segment_bytes": 1 << 40})
    assert whole[0]["segment_bytes"] == 1 << 40
    assert "segment_bytes" not in rows({"backend": "gloo"})[0]  # gloo sweeps keep the model's default

    topo = Topology.local(4, cpus=0)
    curve = [[1 << 20, 8e-5], [1 << 25, 4e-4], [1 << 30, 3e-3]]  # 32 MiB moves at 84 GB/s, 1 GiB at 358
    params = dataclasses.replace(M.default_params(topo, "nccl"), pair_curve=curve)
    cut = calibrate.sweep_model(topo, "nccl", params, legacy).predict("all_reduce", 1 << 30, "ring")
    went_whole = calibrate.sweep_model(topo, "nccl", params, whole).predict("all_reduce", 1 << 30, "ring")
    assert cut > 1.2 * went_whole
    small = [calibrate.sweep_model(topo, "nccl", params, r).predict("all_reduce", 1 << 20, "ring") for r in (legacy, whole)]
    assert small[0] == pytest.approx(small[1])  # 256 KiB chunks: nothing to cut
