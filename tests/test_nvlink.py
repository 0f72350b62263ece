"""The NVLink direct all-reduce ([Note: NVLink direct] in collectives/nvlink.py) without GPUs: its kernel
under Triton's interpreter, its passes, and how calibration and the cost model price it."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
import sys

import pytest

import collectives.model as M
from collectives import calibrate, nvlink
from collectives.topology import Topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_under_the_interpreter_matches_a_float64_reference():
    """Every case of tests/nvlink_kernel.py: ranks agree bitwise, errors stay within the README's bound."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "tests.nvlink_kernel"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(_cases())} cases passed" in proc.stdout


def _cases():
    from tests.nvlink_kernel import CASES
    return CASES


@pytest.mark.parametrize("n,world,itemsize", [(0, 2, 4), (1, 2, 4), (5000, 2, 4), (5000, 3, 2), (1 << 20, 4, 4),
                                              (4099, 2, 2), (17, 8, 8)])
def test_passes_cover_the_tensor_and_fit_the_buffer(n, world, itemsize):
    capacity = 1 << 14
    ps = nvlink.pieces(n, capacity, world, itemsize)
    assert [a for a, _ in ps] == ([0] + [b for _, b in ps[:-1]] if ps else []) and (ps[-1][1] if ps else 0) == n
    for a, b in ps:
        assert b > a and world * nvlink.chunk_of(b - a, world) * itemsize <= capacity
        assert nvlink.chunk_of(b - a, world) % nvlink.ALIGN == 0
    # [Note: vector width]: only a short last pass may have a length that is not a multiple of 16
    assert all((b - a) % nvlink.VECTOR == 0 for a, b in ps[:-1])
    if ps and (ps[-1][1] - ps[-1][0]) % nvlink.VECTOR:
        assert ps[-1][1] - ps[-1][0] < nvlink.VECTOR or len(ps) == 1


def test_flags_cover_the_tiles_of_the_smallest_dtype():
    capacity, world = 1 << 20, 4
    tiles = -(-(capacity // (world * 2)) // nvlink.BLOCK)
    assert nvlink.flag_words(capacity, world) == (world + 1) * tiles


def _rows(kernel_s, sizes):
    rows = [{"op": "all_reduce", "algorithm": "direct", "bytes": s, "time_us": kernel_s(s) * 1e6, "path": "nvlink"}
            for s in sizes]
    rows += [{"op": "all_reduce", "algorithm": "native", "bytes": s, "time_us": (20e-6 + s / 300e9) * 1e6}
             for s in sizes]
    return rows


def test_calibration_prices_the_kernel_from_its_own_rows():
    """Rows busbw marks path=nvlink get a measured table of their own, like native; the model uses it for
    direct all-reduce on one NVLink node only, and auto picks direct where its table is faster."""
    topo = Topology.preset("dgx-h200")
    sizes = [1 << k for k in range(16, 31, 2)]
    kernel = lambda s: 15e-6 + s / 340e9  # noqa: E731 - faster than native's line everywhere
    params, summary = calibrate.fit_sweeps([(topo, _rows(kernel, sizes))], "nccl")
    fit = params.kernels["8"]["all_reduce"]
    assert fit[:2] == pytest.approx([15e-6, 1 / 340e9], rel=1e-3)
    model = M.CostModel(topo, "nccl", profile=params)
    for s in sizes:
        assert model.predict("all_reduce", s, "direct") == pytest.approx(kernel(s), rel=1e-6)
    assert model.plan("all_reduce", 1 << 26).algorithm == "direct"
    assert model.terms("all_reduce", 1 << 26, "direct")["variant"] == "measured NVLink kernel"
    assert summary["within_25pct"] == 1.0
    # Not for an op without a table of its own, nor on two nodes (there direct runs over send/recv).
    structural = M.CostModel(topo, "nccl", profile=replace(params, kernels={}))
    assert model.predict("reduce_scatter", 1 << 26, "direct") != pytest.approx(kernel(1 << 26), rel=1e-3)
    two = Topology.preset("dgx-h200", nodes=2)
    assert not two.one_nvlink_node and topo.one_nvlink_node
    assert M.CostModel(two, "nccl", profile=params).predict("all_reduce", 1 << 26, "direct") != pytest.approx(
        kernel(1 << 26), rel=1e-3)
    assert structural.predict("all_reduce", 1 << 26, "direct") != pytest.approx(kernel(1 << 26), rel=1e-3)


def test_kernel_rows_stay_out_of_the_fit_of_our_other_algorithms():
    """A ring row fit with and without kernel rows beside it gives the same parameters."""
    topo = Topology.preset("dgx-h200")
    truth = M.CostModel(topo, "nccl", profile=replace(M.default_params(topo, "nccl"), step_overhead=1e-4))
    sizes = [1 << k for k in range(16, 31, 2)]
    ring = [{"op": op, "algorithm": "ring", "bytes": s, "time_us": truth.predict(op, s, "ring") * 1e6}
            for op in ("all_reduce", "reduce_scatter") for s in sizes]
    alone, _ = calibrate.fit_sweeps([(topo, ring)], "nccl")
    both, _ = calibrate.fit_sweeps([(topo, ring + _rows(lambda s: 1e-6 + s / 1e12, sizes))], "nccl")
    assert M._theta(both) == pytest.approx(M._theta(alone))
    assert not alone.kernels and both.kernels


def test_the_executor_hands_only_direct_all_reduce_and_reduce_scatter_to_the_kernel():
    """run_collective's dispatch ([Note: NVLink direct]): direct all-reduce and reduce-scatter of float data go
    to the kernel, untouched by the executor's own steps; other algorithms, ops and dtypes do not."""
    import torch

    from collectives import algorithms
    from collectives.execute import Executor, run_collective
    from collectives.ops import Reduction
    from collectives.schedule import Collective

    class Transport:
        rank, size, backend = 0, 2, "nccl"

        def post(self, sends, recvs):
            raise AssertionError("the kernel's calls must not reach the transport")

    calls = []
    peers = object.__new__(nvlink.NvlinkPeers)  # no GPU: only takes() and a recording run()
    peers.run = lambda *args: calls.append(args)
    ex = Executor(Transport())
    ex.nvlink = peers
    out, inp = torch.ones(8), torch.ones(16)
    for coll in (Collective.ALL_REDUCE, Collective.REDUCE_SCATTER):
        src = inp if coll is Collective.REDUCE_SCATTER else None
        run_collective(ex, algorithms.build("direct", coll, 2), Reduction.SUM, out, src, torch.bfloat16)
    assert [(c[0], c[3], c[4]) for c in calls] == [(Collective.ALL_REDUCE, Reduction.SUM, torch.bfloat16),
                                                   (Collective.REDUCE_SCATTER, Reduction.SUM, torch.bfloat16)]
    assert calls[1][2] is inp and calls[0][1] is out
    for name, coll in (("ring", Collective.ALL_REDUCE), ("direct", Collective.ALL_GATHER)):
        assert not peers.takes(algorithms.build(name, coll, 2), out, Reduction.SUM, None)
    direct = algorithms.build("direct", Collective.ALL_REDUCE, 2)
    assert not peers.takes(direct, torch.ones(8, dtype=torch.int32), Reduction.SUM, None)
    assert peers.takes(direct, out, Reduction.MAX, None)
