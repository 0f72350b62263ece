"""benchmarks.busbw: parsing, busbw arithmetic, the nccl-tests layout, the check, and a real sweep."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _report
from benchmarks._ops import OPS, AllReduce, check_input, count_wrong
from benchmarks._sweep import Measurement, Result, Settings, check, run_size
from benchmarks.busbw import expand_algorithms, parse_args, parse_size, size_range
from collectives import algorithms
from collectives.ops import Reduction
from collectives.schedule import Collective

ROOT = Path(__file__).resolve().parent.parent
# Header and first row of nccl-tests 2.19.6 all_reduce_perf output (-g 4, 4 x H200, 2026-11-27):
# the layout our table reproduces column for column.
NCCL_TESTS_HEAD = (
    '#                                                              out-of-place                       in-place          ',
    '#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong ',
    '#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)         ',
)
NCCL_TESTS_ROW = '        1024           256     float     sum      -1    24.35    0.04    0.06       0    24.20    0.04    0.06       0'
ROW_KEYS = {"op", "algorithm", "bytes", "count", "dtype", "time_us", "algbw", "busbw", "wrong", "predicted_us",
            "in_place"}


# -- command line ------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("1024", 1024), ("1K", 1024), ("1k", 1024), ("64M", 64 << 20),
                                         ("1G", 1 << 30), ("1.5K", 1536), ("16MiB", 16 << 20), ("4KB", 4096)])
def test_sizes_parse_like_nccl_tests(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "1X", "-1K", "1 K B"])
def test_bad_sizes_are_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_size_steps():
    assert size_range(1024, 64 << 20, 4, 0) == tuple(1024 * 4 ** k for k in range(9))
    assert size_range(1024, 16 << 20, 4, 0)[-1] == 16 << 20
    assert size_range(1024, 5000, 2, 0) == (1024, 2048, 4096)
    assert size_range(1 << 20, 3 << 20, 1, 1 << 20) == (1 << 20, 2 << 20, 3 << 20)  # -f 1: add -i
    assert size_range(4096, 4096, 2, 0) == (4096,)
    for bad in [(2048, 1024, 2, 0), (1024, 2048, 1, 0), (0, 1024, 2, 0)]:
        with pytest.raises(ValueError):
            size_range(*bad)


def test_algo_all_expands_per_op_and_adds_auto():
    plan, notes = expand_algorithms("all", ["all_reduce", "reduce_scatter", "sendrecv"])
    assert plan["all_reduce"] == [*algorithms.supported(Collective.ALL_REDUCE), "auto"]
    assert plan["reduce_scatter"] == [*algorithms.supported(Collective.REDUCE_SCATTER), "auto"]
    assert {"ring", "native"} <= set(plan["all_reduce"]) and plan["sendrecv"] == ["native"]
    assert notes == []


def test_algo_list_keeps_order_and_notes_what_an_op_lacks():
    plan, notes = expand_algorithms("native,ring", ["all_reduce", "all_to_all"])
    assert plan == {"all_reduce": ["native", "ring"], "all_to_all": ["native"]}
    assert len(notes) == 1 and "all_to_all" in notes[0] and "ring" in notes[0]
    with pytest.raises(ValueError, match="unknown"):
        expand_algorithms("ring,warp_drive", ["all_reduce"])
    with pytest.raises(ValueError, match="no requested algorithm"):
        expand_algorithms("tree", ["all_to_all"])


def test_parse_args_defaults_and_flags():
    o = parse_args(["--op", "all_reduce,reduce_scatter", "--algo", "ring,native", "-b", "1K", "-e", "64M", "-f", "4",
                    "-n", "7", "-w", "2", "-c", "0", "-o", "max", "-d", "half", "-r", "1", "-a", "1",
                    "--nproc", "3", "--json", "x.json"])
    s = o.settings
    assert list(o.plan) == ["all_reduce", "reduce_scatter"] and o.plan["all_reduce"] == ["ring", "native"]
    assert s.sizes[0] == 1024 and s.sizes[-1] == 64 << 20 and len(s.sizes) == 9
    assert (s.iters, s.warmup, s.check, s.red, s.dtype, s.root, s.aggregate) == \
        (7, 2, False, Reduction.MAX, torch.float16, 1, 1)
    assert o.nproc == 3 and o.json == Path("x.json") and o.plot is None
    d = parse_args([])
    assert (d.settings.iters, d.settings.warmup, d.settings.aggregate, d.nproc) == (20, 5, 3, 4)
    assert list(parse_args(["--op", "all"]).plan) == list(OPS)


@pytest.mark.parametrize("argv", [["--op", "all_reduce,nope"], ["-o", "avg", "-d", "int32"], ["-n", "0"], ["--trials", "0"],
                                  ["-b", "1M", "-e", "1K"], ["--algo", "bogus"], ["-d", "complex64"],
                                  ["--settle-us", "-1"]])
def test_parse_args_rejects_bad_input(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)


# -- arithmetic and layout ----------------------------------------------------------


@pytest.mark.parametrize("op, factor", [("all_reduce", 1.5), ("all_gather", 0.75), ("reduce_scatter", 0.75),
                                        ("all_to_all", 0.75), ("broadcast", 1.0), ("reduce", 1.0),
                                        ("sendrecv", 1.0)])
def test_busbw_factors(op, factor):
    n = 4
    assert OPS[op].factor(n) == pytest.approx(factor)
    algbw, busbw = _report.bandwidths(1 << 30, 1e6, OPS[op].factor(n))  # 1 GiB in 1 s
    assert algbw == pytest.approx(1.073741824) and busbw == pytest.approx(1.073741824 * factor)
    assert OPS[op].factor(1) in (0.0, 1.0)


def test_size_convention_follows_nccl_tests():
    # 1 KiB of float on 4 ranks: all_reduce counts 256 elements, the blocked ops 64 per rank.
    assert dataclasses.astuple(OPS["all_reduce"].layout(1024, 4, 4)) == (1024, 256, 256, 256)
    ag = OPS["all_gather"].layout(1024, 4, 4)          # size is the output
    assert (ag.size, ag.count, ag.inp, ag.out) == (1024, 64, 64, 256)
    rs = OPS["reduce_scatter"].layout(1024, 4, 4)      # size is the input
    assert (rs.size, rs.count, rs.inp, rs.out) == (1024, 64, 256, 64)
    a2a = OPS["all_to_all"].layout(1000, 4, 3)         # rounded down to whole blocks
    assert (a2a.size, a2a.count, a2a.inp, a2a.out) == (996, 83, 249, 249)


def test_table_rows_match_the_nccl_tests_layout():
    head, row = NCCL_TESTS_HEAD, NCCL_TESTS_ROW
    buf = io.StringIO()
    table = _report.Table(Settings((1024,), torch.float32, Reduction.SUM), 4, buf)
    table.begin(OPS["all_reduce"], "ring")
    table.row(Result(OPS["all_reduce"].layout(1024, 4, 4), Measurement(24.35, 0), Measurement(24.20, 0), 30.0))
    table.end()
    got = buf.getvalue().splitlines()
    assert got[1] == head[0].rstrip()
    assert got[2].startswith(head[1].rstrip()) and got[3].startswith(head[2][:len(row)])
    assert got[4][:len(row)] == row and got[4].endswith("30.00")
    assert got[-3] == "# Out of bounds values : 0 OK"
    assert got[-2].startswith("# Avg bus bandwidth    : 0.06")


def test_time_column_precision():
    assert _report.fmt_time(24.354) == "  24.35"
    assert _report.fmt_time(4540.19) == " 4540.2"
    assert _report.fmt_time(26123.4) == "  26123"


# -- the check -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8])
@pytest.mark.parametrize("red", list(Reduction))
def test_check_inputs_reduce_exactly_in_any_order(dtype, red):
    if red is Reduction.AVG and not dtype.is_floating_point:
        return
    n = 5
    xs = [check_input(1000, r, n, dtype, red) for r in range(n)]
    fwd = AllReduce().expected(lambda r: xs[r], 0, n, red, 0)
    bwd = AllReduce().expected(lambda r: xs[n - 1 - r], 0, n, red, 0)
    assert count_wrong(fwd, bwd, red) == 0
    assert len(set(xs[0].tolist())) > 1 and not torch.equal(xs[0], xs[1])


def test_count_wrong_counts_mismatches():
    a = torch.arange(10, dtype=torch.float32)
    b = a.clone()
    b[[2, 7]] += 1
    b[9] = float("nan")
    assert count_wrong(a, b, Reduction.SUM) == 3
    assert count_wrong(a, a * (1 + 1e-7), Reduction.AVG) == 0  # avg on floats: a few ulp of slack
    with pytest.raises(ValueError):
        count_wrong(a, a[:5], None)


def corrupted_check(comm, mode: str) -> int:
    """Runs the check on a ring all-reduce whose result is then damaged (or never written)."""
    s = Settings((4096,), torch.float32, Reduction.SUM, iters=1, warmup=0)
    op = AllReduce()
    lay = op.layout(4096, 4, comm.size)
    inp, out = op.buffers(lay, False, comm.rank, s.dtype, comm.device)
    real = op.bind(comm, inp, out, "ring", s.red, 0)

    def damaged() -> None:
        real()
        if mode == "corrupt" and comm.rank == 1:
            out[[3, 500, 1023]] += 1
        if mode == "stale" and comm.rank == 0:
            out[:10].copy_(inp[:10])  # the input, not the sum: a missed reduction

    def skipped() -> None:  # a "bad algorithm" that moves nothing
        pass

    return check(comm, op, skipped if mode == "skip" else damaged, inp, out, s)


def test_wrong_counts_a_corrupted_result(pool):
    assert pool.run(2, "tests.test_busbw:corrupted_check", "none") == [0, 0]
    assert pool.run(2, "tests.test_busbw:corrupted_check", "corrupt") == [3, 3]
    stale = pool.run(2, "tests.test_busbw:corrupted_check", "stale")
    assert stale[0] == stale[1] and 0 < stale[0] <= 10
    assert pool.run(2, "tests.test_busbw:corrupted_check", "skip") == [2 * 1024, 2 * 1024]


def stalled_first_loop(comm, trials: int, interleave: bool) -> float:
    """Times a call that stalls (20 ms) only during the first timed loop: the slowest rank's time in us."""
    import time

    from benchmarks import _sweep

    calls = {"n": 0}
    s = Settings((4096,), torch.float32, Reduction.SUM, iters=2, warmup=0, check=False, trials=trials)

    def run() -> None:
        calls["n"] += 1
        time.sleep(0.02 if calls["n"] <= 2 else 0.001)

    op = AllReduce()
    lay = op.layout(4096, 4, comm.size)
    real = _sweep._bound
    _sweep._bound = lambda *a, **k: (run, None, None)
    try:
        if interleave:
            return _sweep.measure_interleaved(comm, op, ["ring"], lay, False, s)["ring"].time_us
        return _sweep.measure(comm, op, "ring", lay, False, s).time_us
    finally:
        _sweep._bound = real


def lined_up_calls(comm) -> list[str]:
    """The calls one interleaved measurement makes, in order: 'line-up' for the all-reduce that starts
    ranks together, the algorithm's name for each timed call."""
    from benchmarks import _sweep

    events: list[str] = []
    s = Settings((4096,), torch.float32, Reduction.SUM, iters=3, warmup=0, check=False, trials=2)
    op = AllReduce()
    lay = op.layout(4096, 4, comm.size)
    real_bound, real_all_reduce = _sweep._bound, comm.all_reduce

    def all_reduce(t, *a, algorithm="auto", **k):
        if algorithm == _sweep.START_TOGETHER and t.numel() == 1:
            events.append("line-up")
        return real_all_reduce(t, *a, algorithm=algorithm, **k)

    _sweep._bound = lambda c, o, a, *rest: ((lambda: events.append(a)), None, None)
    comm.all_reduce = all_reduce
    try:
        _sweep.measure_interleaved(comm, op, ["ring", "direct"], lay, False, s)
    finally:
        _sweep._bound = real_bound
        del comm.all_reduce
    return events


def settled_calls(comm) -> tuple[list, float]:
    """One interleaved measurement of an instant call with a 20 ms settle: what the sweep slept, in order
    with the calls, and the time it reported (us)."""
    import time
    import types

    from benchmarks import _sweep

    events: list = []
    s = Settings((4096,), torch.float32, Reduction.SUM, iters=2, warmup=0, check=False, trials=1, settle_us=20000)
    op = AllReduce()
    lay = op.layout(4096, 4, comm.size)
    real_bound, real_time = _sweep._bound, _sweep.time

    def sleep(seconds: float) -> None:
        events.append(seconds)
        time.sleep(seconds)

    _sweep._bound = lambda *a, **k: ((lambda: events.append("call")), None, None)
    _sweep.time = types.SimpleNamespace(perf_counter=time.perf_counter, sleep=sleep)
    try:
        t = _sweep.measure_interleaved(comm, op, ["ring"], lay, False, s)["ring"].time_us
    finally:
        _sweep._bound, _sweep.time = real_bound, real_time
    return events, t


def test_interleaved_calls_settle_off_the_clock(pool):
    """[Note: interleaved timing]: each rank pauses after each timed call, and the pause is not timed."""
    for events, t in pool.run(2, "tests.test_busbw:settled_calls"):
        assert events == ["call", 0.02, "call", 0.02]
        assert t < 5000  # two instant calls; the 20 ms pauses after them are off the clock
    assert parse_args([]).settings.settle_us == 2000
    assert parse_args(["--settle-us", "0"]).settings.settle_us == 0


def test_interleaved_calls_start_together(pool):
    """[Note: interleaved timing]: every timed call comes right after a line-up all-reduce of our own."""
    for events in pool.run(2, "tests.test_busbw:lined_up_calls"):
        assert len(events) == 2 * 3 * 2 * 2  # iters x trials x algorithms, each with its line-up
        assert events[0::2] == ["line-up"] * 12
        assert sorted(events[1::2]) == ["direct"] * 6 + ["ring"] * 6


def spread_passes(comm, interleave: bool) -> tuple[list[str], dict, int]:
    """run_spread over two cells (4 and 8 KiB) of an instant call, the first cell's out-of-place call
    stalling 20 ms in the second pass: the calls and checks in order, each (cell, mode)'s reported time
    in us and check count, and the progress steps."""
    import time
    import types

    from benchmarks import _sweep

    events: list[str] = []
    bound = {"n": 0}
    s = Settings((4096, 8192), torch.float32, Reduction.SUM, iters=2, warmup=0, check=True, trials=3, settle_us=0,
                 interleave=interleave)
    op = AllReduce()

    def fake_bound(c, o, algorithm, lay, in_place, settings):
        name = f"{lay.size // 1024}K-{'ip' if in_place else 'oop'}"
        bound["n"] += 1
        stall = name == "4K-oop" and bound["n"] == 5  # the first cell's out-of-place call, second pass

        def run() -> None:
            events.append(name)
            if stall:
                time.sleep(0.02)
        return run, name, None

    def fake_check(c, o, run, inp, out, settings) -> int:
        events.append(f"check {inp}")
        return 7

    progress = types.SimpleNamespace(steps=0, show=lambda text: None)
    progress.step = lambda: setattr(progress, "steps", progress.steps + 1)
    real = _sweep._bound, _sweep.check
    _sweep._bound, _sweep.check = fake_bound, fake_check
    try:
        got = _sweep.run_spread(comm, [(op, ["ring"], 4096), (op, ["ring"], 8192)], s, progress)
    finally:
        _sweep._bound, _sweep.check = real
    times = {f"{r.layout.size // 1024}K": [(m.time_us, m.wrong) for m in (r.out_of_place, r.in_place)]
             for cell in got for r in cell.values()}
    return events, times, progress.steps


@pytest.mark.parametrize("interleave", [True, False])
def test_spread_trials_take_one_trial_per_cell_each_pass(pool, interleave):
    """[Note: spread trials]: pass p times trial p of every cell before pass p + 1 begins; a cell reports
    its median trial; the check runs once per cell and mode, in the last pass."""
    for events, times, steps in pool.run(2, "tests.test_busbw:spread_passes", interleave):
        one_pass = ["4K-oop"] * 2 + ["4K-ip"] * 2 + ["8K-oop"] * 2 + ["8K-ip"] * 2
        last = ["4K-oop"] * 2 + ["check 4K-oop"] + ["4K-ip"] * 2 + ["check 4K-ip"] + \
            ["8K-oop"] * 2 + ["check 8K-oop"] + ["8K-ip"] * 2 + ["check 8K-ip"]
        assert events == one_pass * 2 + last
        assert steps == 2 * 3  # cells x passes
        assert set(times) == {"4K", "8K"}
        for cell in times.values():
            for time_us, wrong in cell:
                assert time_us < 10000 and wrong == 7  # the stalled pass is not the median
    assert parse_args([]).settings.spread is None  # on where interleaved with more than one trial
    assert parse_args(["--spread", "0"]).settings.spread is False


@pytest.mark.parametrize("interleave", [False, True])
def test_trials_report_the_median_loop(pool, interleave):
    """--trials: a stall confined to one loop of -n calls moves the mean of one loop, not the median of three."""
    one = pool.run(2, "tests.test_busbw:stalled_first_loop", 1, interleave)
    three = pool.run(2, "tests.test_busbw:stalled_first_loop", 3, interleave)
    assert min(one) >= 20000  # one loop: both calls stalled
    assert max(three) < 10000  # three loops: the median loop never stalled
    assert parse_args(["--trials", "3"]).settings.trials == 3


def every_op(comm, dtype_name: str, red: str, nbytes: int) -> dict[str, list]:
    """run_size for every op and algorithm: {op/algorithm: [oop wrong, ip wrong, predicted?]}."""
    s = Settings((nbytes,), getattr(torch, dtype_name), Reduction(red), root=comm.size - 1, iters=1, warmup=0)
    got = {}
    for name, op in OPS.items():
        for algo in [*op.algorithms(), *(("auto",) if name != "sendrecv" else ())]:
            r = run_size(comm, op, algo, nbytes, s)
            got[f"{name}/{algo}"] = [r.out_of_place.wrong, r.in_place.wrong if r.in_place else None,
                                     r.predicted_us is not None, r.chosen]
    return got


@pytest.mark.parametrize("size, dtype, red, nbytes", [(3, "float32", "sum", 4000), (2, "bfloat16", "max", 1000),
                                                      (3, "int32", "prod", 4096)])
def test_every_op_and_algorithm_checks_clean(pool, size, dtype, red, nbytes):
    results = pool.run(size, "tests.test_busbw:every_op", dtype, red, nbytes)
    assert all(r == results[0] for r in results)
    for key, (oop, ip, predicted, chosen) in results[0].items():
        assert oop == 0, key
        assert ip in (0, None), key
        if key.endswith("/auto"):
            assert chosen in algorithms.names(), key
        if not key.startswith("sendrecv"):
            assert predicted, key


# -- a real sweep through the command line --------------------------------------------


def test_tiny_sweep_with_nproc_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    env = {**os.environ, "RES_OPTIONS": "timeout:1 attempts:1"}
    for k in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_PROCID"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "benchmarks.busbw", "--op", "all_reduce,reduce_scatter", "--algo", "all",
           "-b", "1K", "-e", "4K", "-f", "4", "-n", "2", "-w", "1", "--trials", "2", "--nproc", "2", "--timeout", "60",
           "--json", str(out), "--plot", str(png)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "# Out of bounds values : 0 OK" in p.stdout and "# Avg bus bandwidth" in p.stdout
    assert "Summary all_reduce" in p.stdout
    doc = json.loads(out.read_text())
    h = doc["header"]
    assert h["world_size"] == 2 and h["backend"] == "gloo" and h["torch"] == torch.__version__
    assert h["interleave"] and h["spread"] and h["trials"] == 2  # on CPU: trials in passes over the sweep
    assert {"hostname", "cpu", "date", "command", "nccl"} <= set(h)
    rows = doc["rows"]
    # rows of pipelined algorithms carry the depth they ran at (calibration fits only those)
    piped = [r for r in rows if r["algorithm"] in algorithms.names() and algorithms.pipelined(r["algorithm"],
                                                                                          Collective(r["op"]))]
    assert piped and all(set(r) == ROW_KEYS | {"pipeline"} and r["pipeline"] >= 1 for r in piped)
    assert rows and all(set(r) == ROW_KEYS for r in rows if r not in piped)
    assert all(r["wrong"] == 0 for r in rows)
    assert {r["algorithm"] for r in rows if r["op"] == "all_reduce"} == \
        {*algorithms.supported(Collective.ALL_REDUCE), "auto"}
    assert {r["bytes"] for r in rows} == {1024, 4096} and {r["in_place"] for r in rows} == {False, True}
    r = next(r for r in rows if r["op"] == "all_reduce" and r["algorithm"] == "ring")
    assert r["busbw"] == pytest.approx(r["algbw"] * 1.0) and r["algbw"] == pytest.approx(
        r["bytes"] / r["time_us"] / 1e3)
    assert png.stat().st_size > 10_000
