"""One rank's part of a sweep: timing, the correctness check, the model's prediction.

Timing follows nccl-tests: warm-up calls, a barrier, ``iters`` timed calls,
the mean per call; every rank times itself and the ranks' means are combined
(by default the slowest rank's, ``-a 3``) with a native all-reduce. With
``trials`` above 1 the timed loop runs that many times and the median of the
trials' combined means is reported ([Note: trials]); where calls are
interleaved, the trials are passes over the whole sweep ([Note: spread trials]). On CUDA the
device is synchronised before the clock starts and before it stops, so the
time covers the kernels and the host work that launches them.

The check (``-c 1``) runs once more after the timed calls, on fresh inputs
that depend on rank and index, and counts the elements of each rank's output
that differ from the result computed locally ([Note: check values] in
_ops.py); the counts are summed over ranks.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable

import torch

from collectives.sizes import format_size
from collectives.ops import Reduction

from ._ops import BenchOp, Layout, check_input, count_wrong

AUTO = "auto"
START_TOGETHER = "halving_doubling"  # the all-reduce that lines ranks up before an interleaved call
AGGREGATES = {0: "rank 0", 1: "mean over ranks", 2: "fastest rank", 3: "slowest rank"}


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    sizes: tuple[int, ...]
    dtype: torch.dtype
    red: Reduction
    root: int = 0
    iters: int = 20
    warmup: int = 5
    check: bool = True
    aggregate: int = 3
    interleave: bool | None = None  # None: on CPU ([Note: interleaved timing]), not on GPUs
    trials: int = 1  # timed loops per cell; the median of their means is reported ([Note: trials])
    settle_us: int = 2000  # interleaved: each rank's pause after each timed call ([Note: interleaved timing])
    spread: bool | None = None  # trials in passes over the sweep ([Note: spread trials]); None: interleaved, trials > 1


@dataclasses.dataclass(frozen=True, slots=True)
class Measurement:
    time_us: float
    wrong: int | None  # None: not checked


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """One size of one (op, algorithm) block: both modes, the model's prediction, and auto's pick."""

    layout: Layout
    out_of_place: Measurement | None
    in_place: Measurement | None
    predicted_us: float | None
    chosen: str | None = None  # the algorithm "auto" planned


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _aggregate(comm, values: list[float], how: int) -> list[float]:
    """Each value combined over ranks as ``how`` says (one collective for all of them)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm.device)
    if how == 0:
        comm.broadcast(t, src=0, algorithm="native")
    elif how == 1:
        comm.all_reduce(t, op="sum", algorithm="native")
        t /= comm.size
    else:
        comm.all_reduce(t, op="min" if how == 2 else "max", algorithm="native")
    return t.tolist()


# [Note: trials]
# On GPUs a small call takes 20-100 us, and one hiccup of the host (a page fault, a context switch, a
# late launch on one of the ranks) in a loop of 5-20 calls moves the slowest rank's mean by 10-100%:
# the same cell gave 277 us at 4 MiB and 79 us at 16 MiB in one sweep. Repeating the timed loop and
# reporting the median of the loops keeps such a stretch out of the figure without hiding a
# systematic cost, which every loop pays. Each loop is combined over ranks first (the slowest rank's
# mean by default), so the figure stays the time a whole collective took. -n 20 --trials 1 is the
# nccl-tests measurement.


def _poison(t: torch.Tensor) -> None:
    """Fill an output with a value the check input never produces, so unwritten elements count as wrong."""
    t.fill_(255 if t.dtype == torch.uint8 else -1)


def _bound(comm, op: BenchOp, algorithm: str, lay: Layout, in_place: bool,
           s: Settings) -> tuple[Callable[[], None], torch.Tensor, torch.Tensor]:
    """One call of ``algorithm`` on fresh buffers holding the check input: (run, inp, out)."""
    inp, out = op.buffers(lay, in_place, comm.rank, s.dtype, comm.device)
    inp.copy_(check_input(lay.inp, comm.rank, comm.size, s.dtype, s.red, comm.device))
    return op.bind(comm, inp, out, algorithm, s.red, s.root), inp, out


def _loop_means(comm, run: Callable[[], None], s: Settings, trials: int) -> list[float]:
    """This rank's mean time per call (s) of ``trials`` loops of ``s.iters`` back-to-back calls, after the warm-up."""
    for _ in range(s.warmup):
        run()
    means = []
    for _ in range(trials):
        _sync(comm.device)
        comm.barrier()
        _sync(comm.device)
        t0 = time.perf_counter()
        for _ in range(s.iters):
            run()
        _sync(comm.device)
        means.append((time.perf_counter() - t0) / max(1, s.iters))
    return means


def measure(comm, op: BenchOp, algorithm: str, lay: Layout, in_place: bool, s: Settings) -> Measurement:
    means, wrong = _cell_means(comm, op, [algorithm], lay, in_place, s, False, max(1, s.trials), s.check)[algorithm]
    return Measurement(statistics.median(_aggregate(comm, means, s.aggregate)) * 1e6, wrong)


def _interleaved_means(comm, runs: dict[str, tuple], s: Settings, trials: int,
                       first: int = 0) -> dict[str, list[float]]:
    """This rank's mean time per call (s) of each algorithm in ``runs``, per trial, their calls taken in
    turn ([Note: interleaved timing]): iteration k times one call of each, in an order shuffled by
    ``first + k``."""
    for run, _, _ in runs.values():
        for _ in range(s.warmup):
            run()
    _sync(comm.device)
    comm.barrier()
    total = {a: [0.0] * trials for a in runs}
    token = torch.zeros(1, device=comm.device)
    for k in range(s.iters * trials):
        order = list(runs)
        random.Random(first + k).shuffle(order)  # the same order on every rank
        for a in order:
            run = runs[a][0]
            comm.all_reduce(token, algorithm=START_TOGETHER)  # off the clock ([Note: interleaved timing])
            _sync(comm.device)
            t0 = time.perf_counter()
            run()
            _sync(comm.device)
            total[a][k // s.iters] += time.perf_counter() - t0
            if s.settle_us:
                time.sleep(s.settle_us * 1e-6)  # off the clock: keep its cores free for ranks still in the call
    return {a: [t / s.iters for t in ts] for a, ts in total.items()}


def measure_interleaved(comm, op: BenchOp, algorithms: list[str], lay: Layout, in_place: bool,
                        s: Settings) -> dict[str, Measurement]:
    """Every algorithm's Measurement at one layout, their timed calls taken in turn ([Note: interleaved
    timing]): iteration k times one call of each algorithm, in an order shuffled by k, before
    iteration k + 1 begins."""
    got = _cell_means(comm, op, algorithms, lay, in_place, s, True, max(1, s.trials), s.check)
    return {a: Measurement(statistics.median(_aggregate(comm, means, s.aggregate)) * 1e6, wrong)
            for a, (means, wrong) in got.items()}


def _cell_means(comm, op: BenchOp, algorithms: list[str], lay: Layout, in_place: bool, s: Settings,
                interleave: bool, trials: int, checked: bool,
                first: int = 0) -> dict[str, tuple[list[float], int | None]]:
    """Each algorithm's per-trial means on this rank at one layout, and its check count where ``checked``
    (else None): the algorithms' calls taken in turn where ``interleave`` (orders shuffled from ``first``),
    else one algorithm's loops after another's, each algorithm's buffers bound only while it runs."""
    if interleave:
        runs = {a: _bound(comm, op, a, lay, in_place, s) for a in algorithms}
        means = _interleaved_means(comm, runs, s, trials, first)
        return {a: (means[a], check(comm, op, run, inp, buf, s) if checked else None)
                for a, (run, inp, buf) in runs.items()}
    out = {}
    for a in algorithms:
        run, inp, buf = _bound(comm, op, a, lay, in_place, s)
        means = _loop_means(comm, run, s, trials)
        out[a] = (means, check(comm, op, run, inp, buf, s) if checked else None)
    return out


def _result(comm, op: BenchOp, algorithm: str, lay: Layout, oop: Measurement | None,
            ip: Measurement | None, s: Settings) -> Result:
    predicted, chosen = predict(comm, op, algorithm, lay.size, s.dtype)
    return Result(lay, oop, ip, predicted, chosen)


def run_spread(comm, cells: list[tuple[BenchOp, list[str], int]], s: Settings, progress) -> list[dict[str, Result]]:
    """run_sizes (run_size for each algorithm where not interleaved) for every (op, algorithms, bytes) of
    ``cells``, each cell's trials taken one per pass over all of them ([Note: spread trials]); the check
    runs in the last pass. ``progress`` has show(text) and step(), called once per cell and pass."""
    passes = max(1, s.trials)
    lays = [op.layout(nbytes, s.dtype.itemsize, comm.size) for op, _, nbytes in cells]
    means: dict[tuple[int, bool, str], list[float]] = {}
    wrong: dict[tuple[int, bool, str], int | None] = {}
    how = "interleaved" if s.interleave else "in turn"
    for p in range(passes):
        for i, (op, algorithms, nbytes) in enumerate(cells):
            progress.show(f"pass {p + 1}/{passes}: {op.name} {format_size(nbytes)} {len(algorithms)} algorithms {how}")
            for in_place in (False, True) if op.has_in_place else (False,):
                got = _cell_means(comm, op, algorithms, lays[i], in_place, s, bool(s.interleave), 1,
                                  s.check and p == passes - 1, first=p * s.iters)
                for a, (m, w) in got.items():
                    means.setdefault((i, in_place, a), []).extend(m)
                    wrong[(i, in_place, a)] = w
            progress.step()
    keys = list(means)
    combined = iter(_aggregate(comm, [m for k in keys for m in means[k]], s.aggregate))  # one collective
    times = {k: statistics.median([next(combined) for _ in means[k]]) * 1e6 for k in keys}

    def measured(k: tuple[int, bool, str]) -> Measurement | None:
        return Measurement(times[k], wrong[k]) if k in times else None

    return [{a: _result(comm, op, a, lays[i], measured((i, False, a)), measured((i, True, a)), s) for a in algorithms}
            for i, (op, algorithms, _) in enumerate(cells)]


# [Note: interleaved timing]
# With ranks time-sharing cores (4 ranks on the 2-core reference machine), the same cell measured
# twice differed by up to 2-3x: the load the machine is under drifts over seconds, and timing one
# algorithm's 20 calls, then the next's, gives each algorithm a different stretch of it. Comparing
# algorithms (the summary's fastest, and auto against the best) then measures the drift. Taking
# the algorithms' calls in turn spreads the drift over all of them. The order is shuffled every
# iteration (the same shuffle on every rank), because a call also pays for the skew the previous one
# left between ranks: in a fixed cycle gloo's own all-reduce left the call after it 1.2-2x slower
# than the same algorithm's own column. Shuffling spreads that cost but does not remove it: with
# gloo's broadcast among the algorithms, the chain broadcast took 570-1410 us at 64 KiB-1 MiB, and
# 330-930 us without it, while the tree broadcast did not move (205-690 us either way). So before
# each timed call the ranks line up, off the clock, with a one-element all-reduce of our own
# (halving-doubling over the shared-memory transport; START_TOGETHER): every rank leaves it after
# its last exchange, at much the same moment whatever ran before. With it the chain took 380-970
# us with or without gloo's broadcast (benchmarks/results/cpu-gloo-4rank.md). A barrier through gloo
# is no such line: the calls after it ran 1.3-1.9x slower. Each call is timed on its own
# (a host-synchronous call on CPU); on GPUs, where that would add a synchronisation per call, the
# nccl-tests way (back-to-back calls, one synchronisation) stays the default.
# A rank that finishes its part of a call early then went straight into the next line-up, and with
# 4 ranks on 2 cores its work there took cores from the ranks still in the call: after a tree
# reduce the two leaves run the line-up's first exchange with each other while the root and the
# inner rank wait to be woken, and those waits grew from tens of us to 250-450 us. Which algorithm
# of a rooted collective ran fastest at 64-256 KiB then depended on which all-reduce did the lining
# up. So each rank pauses after each timed call (``settle_us``, 2 ms; off the clock), and the next
# line-up starts once the ranks still in the call are done with it or nearly.


# [Note: spread trials]
# Interleaving gives the algorithms of one cell (op, size) the same moment of the machine; the cells
# get different moments. On the 2-core reference machine, twelve sweeps of one all-ops command
# (--trials 5, a cell's trials back to back) put a row 12.0% from its median over them (the standard
# deviation of the log ratio). Split in two, the part that moved every algorithm of a cell together
# (the machine's own speed) deviated 10.5%, and what was left of each row 7.2%. Neighbouring cells,
# 10 s apart, moved together (correlation 0.54); cells ten apart, a minute and a half, barely (0.21);
# fifteen apart, not at all (0.07). So the sweep can take its trials in passes: pass p runs trial p of
# every cell (warm-up calls, then -n calls) before pass p + 1 begins, and a cell's median trial draws
# on --trials moments minutes apart rather than one. Twelve sweeps taken so: 9.0% from their median,
# the cell part 7.3% and the row part 5.8%; 38 of their 1,800 rows lay over 25% from it, against 117
# (benchmarks/results/cpu-gloo-4rank.md). It is the default where calls are interleaved (CPU) and
# --trials is above 1; the tables then print once every pass is done. On 4 x H200, five spread launches
# against six back to back strayed further from their median (19.9% against 13.1%) and missed more
# picks, so back-to-back trials stay the default there (gpu-h200x4-2026-11-27-costmodel.md).


def check(comm, op: BenchOp, run: Callable[[], None], inp: torch.Tensor, out: torch.Tensor, s: Settings) -> int:
    """Mismatching output elements of one call on check inputs, summed over ranks."""
    n, rank = comm.size, comm.rank

    def x(r: int) -> torch.Tensor:
        return check_input(inp.numel(), r, n, s.dtype, s.red, comm.device)

    _poison(out)
    inp.copy_(x(rank))
    run()
    _sync(comm.device)
    wrong = count_wrong(out, op.expected(x, rank, n, s.red, s.root), s.red if op.reduces else None)
    total = torch.tensor([wrong], dtype=torch.int64, device=comm.device)
    comm.all_reduce(total, op="sum", algorithm="native")
    return int(total.item())


def predict(comm, op: BenchOp, algorithm: str, nbytes: int, dtype: torch.dtype) -> tuple[float | None, str | None]:
    """The model's time in microseconds (None where it has no answer) and, for auto, its pick."""
    if op.name == "sendrecv":
        return None, None
    try:
        if algorithm == AUTO:
            plan = comm.plan(op.name, nbytes, dtype)
            return plan.predicted_s * 1e6, plan.algorithm
        return comm.model.predict(op.name, nbytes, algorithm, dtype) * 1e6, None
    except (ValueError, KeyError, NotImplementedError):
        return None, None


def run_sizes(comm, op: BenchOp, algorithms: list[str], nbytes: int, s: Settings) -> dict[str, Result]:
    """run_size for every algorithm at once, interleaved ([Note: interleaved timing])."""
    lay = op.layout(nbytes, s.dtype.itemsize, comm.size)
    oop = measure_interleaved(comm, op, algorithms, lay, False, s)
    ip = measure_interleaved(comm, op, algorithms, lay, True, s) if op.has_in_place else {}
    return {a: _result(comm, op, a, lay, oop[a], ip.get(a), s) for a in algorithms}


def run_size(comm, op: BenchOp, algorithm: str, nbytes: int, s: Settings) -> Result:
    lay = op.layout(nbytes, s.dtype.itemsize, comm.size)
    oop = measure(comm, op, algorithm, lay, False, s)
    ip = measure(comm, op, algorithm, lay, True, s) if op.has_in_place else None
    return _result(comm, op, algorithm, lay, oop, ip, s)
