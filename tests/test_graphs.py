"""GraphCache's policy (when it captures, what it replays), with CUDA graphs stood in for on CPU.

The capture itself is exercised on GPUs by tests/test_cuda.py and tests.gpu_sweep.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from collectives.graphs import GraphCache


class _FakeGraph:
    made: list[_FakeGraph] = []

    def __init__(self) -> None:
        self.recorded = 0
        self.replays = 0
        _FakeGraph.made.append(self)

    def replay(self) -> None:
        self.replays += 1


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    _FakeGraph.made = []
    capturing = []

    @contextlib.contextmanager
    def graph(g, stream=None):
        capturing.append(g)
        try:
            yield
        finally:
            capturing.pop()

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return capturing


def _run(capturing, log):
    def run():
        log.append("captured" if capturing else "eager")
        if capturing:
            capturing[-1].recorded += 1
    return run


def test_first_call_is_eager_second_is_captured_then_replayed(fake_cuda_graphs) -> None:
    cache, log = GraphCache(stream=None, warmup=1), []
    run = _run(fake_cuda_graphs, log)
    cache.wrap("k", 64, run)()
    assert log == ["eager"] and cache.captures == 0
    fn = cache.wrap("k", 64, run)
    assert log == ["eager", "captured"] and cache.captures == 1
    fn()
    cache.wrap("k", 64, run)()
    assert cache.captures == 1 and _FakeGraph.made[0].replays == 2 and log == ["eager", "captured"]


def test_keys_seen_once_are_never_captured(fake_cuda_graphs) -> None:
    """Buffers at a new address every call (ZeRO-3's gathered units) cost no capture."""
    cache, log = GraphCache(stream=None, max_graphs=4, warmup=1), []
    for i in range(100):
        cache.wrap(("unit", i), 64, _run(fake_cuda_graphs, log))()
    assert cache.captures == 0 and log == ["eager"] * 100 and len(cache._seen) <= 16


def test_warmup_zero_captures_at_once_and_limits_hold(fake_cuda_graphs) -> None:
    cache, log = GraphCache(stream=None, max_graphs=2, max_bytes=100, warmup=0), []
    run = _run(fake_cuda_graphs, log)
    for k in ("a", "b", "c"):
        cache.wrap(k, 64, run)()
    assert cache.captures == 3 and list(cache._graphs) == ["b", "c"]  # least recently used went
    cache.wrap("big", 101, run)()  # over max_bytes: always eager
    assert log[-1] == "eager" and cache.captures == 3
    with pytest.raises(ValueError, match="warmup"):
        GraphCache(stream=None, warmup=-1)


def test_graph_mixing_off_keeps_graphs_off_unless_asked(monkeypatch) -> None:
    """[Note: graph mixing]: with NCCL_GRAPH_MIXING_SUPPORT=0 our replays may not share a communicator with
    native calls, so the cache stays off (with a warning) unless TOPOCOMM_CUDA_GRAPHS asks for it."""
    monkeypatch.delenv("TOPOCOMM_CUDA_GRAPHS", raising=False)
    monkeypatch.delenv("NCCL_GRAPH_MIXING_SUPPORT", raising=False)
    assert GraphCache(stream=None).enabled
    monkeypatch.setenv("NCCL_GRAPH_MIXING_SUPPORT", "0")
    with pytest.warns(RuntimeWarning, match="NCCL_GRAPH_MIXING_SUPPORT=0"):
        assert not GraphCache(stream=None).enabled
    monkeypatch.setenv("TOPOCOMM_CUDA_GRAPHS", "1")
    assert GraphCache(stream=None).enabled
    monkeypatch.setenv("TOPOCOMM_CUDA_GRAPHS", "0")
    monkeypatch.delenv("NCCL_GRAPH_MIXING_SUPPORT")
    assert not GraphCache(stream=None).enabled
