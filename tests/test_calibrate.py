"""Calibration: fits recovering known parameters (one world size, several, each on its own), saving
and finding profiles, the NNLS solver the fits use, and checking a profile against sweeps."""

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
    rows = [{"op": op, "algorithm": a, "bytes": s, "time_us": model.predict(op, s, a, in_place=True) * 1e6}
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


def test_cpu_profiles_match_the_cpu_model_first(tmp_path, monkeypatch, capsys):
    """[Note: CPU model]: a CPU profile fitted on this CPU model wins; one of another model that agrees on the rest
    still applies where none was fitted here; one of another core count never does. A fit refuses CPU sweeps
    taken on different CPU models, naming them."""
    from collectives import calibrate_profiles
    from collectives.topology import cpu_name

    topo = Topology.local(4, cpus=2)
    key = calibrate.hardware_key(topo, "gloo")
    assert key["cpu"] == cpu_name() and key["cpus"] == 2
    assert "cpu" not in calibrate.hardware_key(Topology.preset("dgx-h100"), "nccl")  # GPUs: the device decides
    monkeypatch.delenv("TOPOCOMM_PROFILE", raising=False)
    monkeypatch.setattr(calibrate_profiles, "PROFILE_DIR", tmp_path)
    base = M.default_params(topo, "gloo")
    here, other, cores = (dataclasses.replace(base, step_overhead=x) for x in (1e-4, 2e-4, 3e-4))
    calibrate.save_profile(tmp_path / "a-other.json", other, {**key, "cpu": "Another CPU"}, {})
    calibrate.save_profile(tmp_path / "b-cores.json", cores, {**key, "cpus": 8}, {})
    assert calibrate.find_profile(topo, "gloo") == other
    calibrate.save_profile(tmp_path / "c-here.json", here, key, {})
    assert calibrate.find_profile(topo, "gloo") == here
    assert calibrate.find_profile(Topology.local(4, cpus=8), "gloo") == cores
    assert calibrate.find_profile(Topology.local(4, cpus=4), "gloo") is None

    model = M.CostModel(Topology.local(4, cpus=0), "gloo", profile=base)
    paths = []
    for name in ("Some CPU", "Another CPU"):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"header": {"backend": "gloo", "world_size": 4, "machine": "x (0 CPUs)",
                                                    "cpu": name}, "rows": _sweep(model)}))
    with pytest.raises(SystemExit):
        calibrate.main(["fit", *map(str, paths), "--save", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert "Some CPU" in err and "Another CPU" in err and not (tmp_path / "p.json").exists()
    calibrate.main(["fit", str(paths[0]), "--save", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text())["match"]["cpu"] == "Some CPU"


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


def _sweep(model, scale=None, sizes=(1 << 12, 1 << 18, 1 << 22)):
    """busbw-shaped rows timed at ``model``'s predictions, times scaled by ``scale[(op, algorithm, bytes)]``."""
    rows = []
    for op, algos in (("all_reduce", ("ring", "halving_doubling", "native")), ("all_gather", ("ring", "direct"))):
        for a in algos:
            for s in sizes:
                for ip in (False, True):  # in place, an all-gather copies no own block
                    t = model.predict(op, s, a, in_place=ip) * 1e6 * (scale or {}).get((op, a, s), 1.0)
                    copy = 1.0 if ip or op != "all_reduce" else 3.0  # busbw's out-of-place all-reduce times a copy too
                    rows.append({"op": op, "algorithm": a, "bytes": s, "in_place": ip, "time_us": t * copy})
    return rows


def test_check_scores_rows_and_picks_against_the_measurements():
    from collectives import calibrate_check as CC

    model = M.CostModel(Topology.local(4, cpus=0), "gloo")
    exact = CC.score(model, _sweep(model), min_bytes=1 << 16)
    # 2 sizes x (3 all-reduce algorithms in place; 2 all-gather algorithms x 2 modes): the 4 KiB rows and
    # the out-of-place all-reduce rows (they time a copy too, here 3x slower) don't count
    assert (exact["rows"], exact["rows_within"], exact["cells"], exact["picks_within"]) == (14, 1.0, 4, 1.0)
    assert exact["level"] == pytest.approx(1.0)
    # [Note: sweep level]: a machine 20% slower throughout misses no row and no pick, at a level of 1 / 1.2
    slow = CC.score(model, [{**r, "time_us": 1.2 * r["time_us"]} for r in _sweep(model)], min_bytes=1 << 16)
    assert (slow["rows_within"], slow["picks_within"], slow["level"]) == (1.0, 1.0, pytest.approx(1 / 1.2))
    pick = model.plan("all_gather", 1 << 22, candidates=("ring", "direct")).algorithm
    other = ({"ring", "direct"} - {pick}).pop()
    t_pick, t_other = (model.predict("all_gather", 1 << 22, a, in_place=True) for a in (pick, other))
    # the pick, measured at twice the other's time (in place, the row a cell compares): its two rows are off by
    # about t_pick / (2 t_other) <= 0.5
    off = CC.score(model, _sweep(model, {("all_gather", pick, 1 << 22): 2 * t_other / t_pick}), min_bytes=1 << 16)
    assert set(off["row_misses"]) == {("all_gather", pick, 1 << 22, ip) for ip in (False, True)}
    assert off["rows_within"] == pytest.approx(12 / 14)
    assert off["level"] == pytest.approx(1.0)  # two rows of fourteen move no median
    assert off["picks_within"] == 0.75
    assert off["pick_misses"] == [("all_gather", 1 << 22, pick, pytest.approx(2.0))]


def test_check_agreement_uses_the_other_sweeps_mean():
    from collectives import calibrate_check as CC

    model = M.CostModel(Topology.local(4, cpus=0), "gloo")
    nbytes = 1 << 18
    by_time = sorted(("ring", "halving_doubling", "native"), key=lambda a: model.predict("all_reduce", nbytes, a))
    fast, second = by_time[:2]
    f, s = (model.predict("all_reduce", nbytes, a) for a in (fast, second))
    assert s > 1.05 * f, "the case needs a clear fastest all-reduce at 256 KiB"
    # the third sweep's fastest runs at 2x the second: the others' mean puts it at f/2 + s, behind the
    # second, so the first two sweeps' pick is the second (a miss: it ran s > 1.05 f there) and the third's
    # pick is the fastest of the first two (a miss: 2s there); each sweep's row of it is off by (1 + 2s/f)/2
    # or 2s/f from the others' mean, both over 25%
    base = _sweep(model)
    out = CC.agreement([base, base, _sweep(model, {("all_reduce", fast, nbytes): 2 * s / f})], min_bytes=1 << 16)
    assert [(o["rows"], o["cells"]) for o in out] == [(14, 4)] * 3
    assert [o["rows_within"] for o in out] == pytest.approx([13 / 14] * 3)
    assert [o["picks_within"] for o in out] == [0.75] * 3


def test_check_pools_sweeps_into_each_rows_median(tmp_path, capsys):
    from collectives import calibrate_check as CC

    topo = Topology.local(4, cpus=0)
    params = M.default_params(topo, "gloo")
    model = M.CostModel(topo, "gloo", profile=params)
    pick = model.plan("all_gather", 1 << 22, candidates=("ring", "direct")).algorithm
    key = ("all_gather", pick, 1 << 22)
    # the pick's 4 MiB rows at 1x, 2x and 1.1x its price: one sweep misses them, their median (1.1x) does not
    sweeps = [_sweep(model), _sweep(model, {key: 2.0}), _sweep(model, {key: 1.1})]
    sweeps[2] = [r for r in sweeps[2] if r["bytes"] != 1 << 18]  # rows some sweeps lack: their median over the rest
    pooled = {(r["op"], r["algorithm"], r["bytes"], r["in_place"]): r["time_us"]
              for r in CC.pooled_rows(sweeps, 1 << 16)}
    assert len(pooled) == 14
    want = model.predict("all_gather", 1 << 22, pick, in_place=True) * 1e6
    assert pooled[(*key, True)] == pytest.approx(1.1 * want)
    ring = model.predict("all_reduce", 1 << 18, "ring") * 1e6
    assert pooled[("all_reduce", "ring", 1 << 18, True)] == pytest.approx(ring)

    profile = tmp_path / "p.json"
    calibrate.save_profile(profile, params, calibrate.hardware_key(topo, "gloo"), {})
    paths = []
    for i, rows in enumerate(sweeps):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps({"header": {"backend": "gloo", "world_size": 4, "machine": "x (0 CPUs)"},
                                         "rows": rows}))
    calibrate.main(["check", str(profile), *map(str, paths)])
    lines = {ln.split("  ")[0]: ln.split() for ln in capsys.readouterr().out.splitlines()}
    assert lines["s1.json"][1] == f"{12 / 14:.0%}"  # its two 2x rows miss
    assert lines["s1.json"][3:6] == ["14", "4", "1.00"]  # two rows of fourteen move no median
    assert lines["median of 3 sweeps, 4 ranks"][-5:] == ["100%", "100%", "14", "4", "1.00"]
    calibrate.main(["check", str(profile), *map(str, paths[:2])])  # two sweeps: no median line
    assert "median of" not in capsys.readouterr().out


def test_check_command_prints_each_sweep(tmp_path, capsys):
    topo = Topology.local(4, cpus=0)
    params = M.default_params(topo, "gloo")
    profile = tmp_path / "p.json"
    calibrate.save_profile(profile, params, calibrate.hardware_key(topo, "gloo"), {})
    model = M.CostModel(topo, "gloo", profile=params)
    paths = []
    for i, scale in enumerate((None, {("all_gather", "ring", 1 << 22): 1.5})):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps({"header": {"backend": "gloo", "world_size": 4, "machine": "x (0 CPUs)"},
                                         "rows": _sweep(model, scale)}))
    calibrate.main(["check", str(profile), *map(str, paths), "-v"])
    out = capsys.readouterr().out
    assert "s0.json" in out and "s1.json" in out
    assert "row  all_gather ring 4194304 in-place: predicted/measured 0.67" in out

    # bad input: the file that is wrong, said before anything is scored
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"op": "all_reduce", "bytes": 1024}]))
    gpu = tmp_path / "gpu.json"  # a GPU sweep that records no topology would be priced as CPU ranks
    gpu.write_text(json.dumps({"header": {"backend": "nccl", "world_size": 4, "gpu": "H200"}, "rows": _sweep(model)}))
    for args, words in (([str(profile), str(bad)], ["bad.json", "row 0 has no algorithm, time_us"]),
                        ([str(profile), str(gpu)], ["gpu.json", "records no topology", "--topology"]),
                        ([str(paths[0]), str(paths[1])], ["s0.json", "not a profile"]),
                        ([str(profile), str(tmp_path / "missing.json")], ["missing.json"])):
        with pytest.raises(SystemExit):
            calibrate.main(["check", *args])
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
