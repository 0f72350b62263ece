"""CUDA-graph capture of our own algorithms' collective instances.

Launching a schedule from Python costs a few hundred microseconds a step
(grouped NCCL calls, events, stream waits); replaying a captured CUDA graph of
the same instance costs one launch. An instance is keyed by everything the
captured kernels depend on: the collective, algorithm, pipeline depth, op,
root, dtype, and the addresses and sizes of the caller's tensors (graphs read
and write fixed addresses). Training loops and benchmarks reuse the same
buffers (gradient buckets, flat shards), so they hit the cache.

[Note: capture is local] Capturing records kernels and moves no bytes, so
ranks need not agree on hits and misses: every rank replays exactly once per
call either way.

[Note: capture on the second call] An instance is captured the second time
its key is seen; the first call runs eagerly. Buffers whose address changes
on every call (ZeRO-3's gathered units are freed and re-allocated each step)
would otherwise pay a capture per call and fill the cache with graphs that
are never replayed. ``TOPOCOMM_GRAPH_WARMUP`` sets how many eager calls come
first (default 1; 0 captures at once, as the GPU correctness sweep does). Scratch buffers live in each graph's private memory pool;
the cache keeps at most ``max_graphs`` instances (least recently used go).
The NCCL communicator must exist before the first capture; the Communicator
creates it with its first exchange.

[Note: graph mixing] Our captured schedules and NCCL's own collectives (``native``)
share one NCCL communicator, and a replay may still be running when a native call
is issued. NCCL supports that only with its graph mixing on (the default). With
``NCCL_GRAPH_MIXING_SUPPORT=0`` in the environment it does not, and stream order
is not enough, so the cache then stays off and says so once. Set
``TOPOCOMM_CUDA_GRAPHS=1`` to capture anyway, where no call of ``native`` can
overlap a replay. With mixing off, 4 x H200 replays ran a quarter to a third
faster; one rank's replays also ran slowly less often (1 of 6 launches, against
about half with mixing on; benchmarks/results/gpu-h200x4-2026-11-27-costmodel.md).
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Callable, Hashable

import torch


def graphs_enabled() -> bool:
    """``$TOPOCOMM_CUDA_GRAPHS`` if set, else on unless NCCL's graph mixing is off ([Note: graph mixing])."""
    asked = os.environ.get("TOPOCOMM_CUDA_GRAPHS")
    if asked is not None:
        return asked not in ("0", "")
    if os.environ.get("NCCL_GRAPH_MIXING_SUPPORT", "").strip() == "0":
        warnings.warn("topocomm: NCCL_GRAPH_MIXING_SUPPORT=0, under which NCCL does not support captured and "
                      "non-captured calls on one communicator; our collectives run without CUDA graphs "
                      "(TOPOCOMM_CUDA_GRAPHS=1 captures them anyway)", RuntimeWarning, stacklevel=3)
        return False
    return True


class GraphCache:
    def __init__(self, stream: torch.cuda.Stream, max_graphs: int | None = None,
                 max_bytes: int | None = None, warmup: int | None = None) -> None:
        self.stream = stream
        self.max_graphs = max_graphs or int(os.environ.get("TOPOCOMM_GRAPH_CACHE", "64"))
        self.max_bytes = max_bytes or int(os.environ.get("TOPOCOMM_GRAPH_MAX_BYTES", str(1 << 30)))
        self.enabled = graphs_enabled()
        self._graphs: collections.OrderedDict[Hashable, torch.cuda.CUDAGraph] = collections.OrderedDict()
        self.warmup = int(os.environ.get("TOPOCOMM_GRAPH_WARMUP", "1")) if warmup is None else warmup
        if self.warmup < 0:
            raise ValueError(f"warmup: expected eager calls >= 0, got {self.warmup}")
        self._seen: collections.OrderedDict[Hashable, int] = collections.OrderedDict()  # eager calls so far
        self.captures = 0

    def wrap(self, key: Hashable, nbytes: int, run: Callable[[], None]) -> Callable[[], None]:
        """``run`` itself, or the replay of its captured graph."""
        if not self.enabled or nbytes > self.max_bytes:
            return run
        g = self._graphs.get(key)
        if g is None:
            calls = self._seen.pop(key, 0)
            if calls < self.warmup:  # [Note: capture on the second call]
                self._seen[key] = calls + 1
                while len(self._seen) > 4 * self.max_graphs:
                    self._seen.popitem(last=False)
                return run
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=self.stream):
                    run()
            except Exception as e:  # noqa: BLE001 - fall back to eager launches for good
                warnings.warn(f"topocomm: CUDA-graph capture failed ({type(e).__name__}: {e}); "
                              f"running collectives eagerly", RuntimeWarning, stacklevel=3)
                self.enabled = False
                torch.cuda.synchronize()
                return run
            self.captures += 1
            self._graphs[key] = g
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return g.replay

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()
