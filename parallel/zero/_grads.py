"""Where gradients go: all-reduced whole (stage 1) or reduce-scattered into shards during backward (stages 2, 3).

Both strategies hand the optimizer one gradient per unit, this rank's shard
(padded length, averaged over ranks), or None for every unit when no backward
ran since the last ``zero_grad``.

[Note: collective order] Every rank must issue the same collectives in the
same order. Units are launched strictly in ``order`` (a unit whose gradients
are complete waits for the units before it), so the sequence never depends on
the order in which autograd happens to finish them; at the end of backward the
units not yet launched go out in that order, parameters that got no gradient
counting as zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from collectives import Communicator, Handle

from .._buckets import streamed_algorithm
from ._api import Precision
from ._flat import flatten_into, slot_views
from ._units import Unit


class AllReducedGrads:
    """Stage 1: full gradients in one flat buffer per unit (the parameters' ``.grad`` are views of it),
    all-reduced when the optimizer steps; each rank then reads its own shard."""

    def __init__(self, units: list[Unit], comm: Communicator, precision: Precision) -> None:
        self.units, self.comm = units, comm
        self._dirty = False    # a backward accumulated local gradients since the last reduction
        self._reduced = False  # the buffers hold the average over ranks
        for u in units:
            u.grad_full = torch.zeros(u.layout.padded, dtype=precision.compute, device=comm.device)
            self._bind(u)

    def _mark(self, p: torch.Tensor) -> None:
        self._dirty = True

    @staticmethod
    def _bind(u: Unit) -> None:
        """Make every ``p.grad`` a view of the unit's buffer again, keeping a gradient found elsewhere."""
        for p, view in zip(u.params, slot_views(u.grad_full, u.layout)):
            g = p.grad
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
            else:
                continue
            p.grad = view

    @torch.no_grad()
    def shard_grads(self) -> list[torch.Tensor | None]:
        """All-reduce once per step (a second call, e.g. after clipping, returns the same shards)."""
        if self._dirty:
            for u in self.units:
                self._bind(u)
            handles = [self.comm.all_reduce(u.grad_full, op="avg", async_op=True,
                                           algorithm=streamed_algorithm(self.comm, "all_reduce", u.grad_full))
                       for u in self.units]
            for h in handles:
                h.wait()
            self._dirty, self._reduced = False, True
        if not self._reduced:
            return [None] * len(self.units)
        return [u.grad_full[u.shard_slice(self.comm.rank)] for u in self.units]

    def zero_grad(self) -> None:
        for u in self.units:
            u.grad_full.zero_()
            self._bind(u)
        self._dirty = self._reduced = False

    def install(self) -> None:
        for u in self.units:
            for p in u.params:
                p.register_post_accumulate_grad_hook(self._mark)


class ReduceScatteredGrads:
    """Stages 2 and 3: once a unit's gradients are all accumulated, they are copied into a flat bucket,
    dropped from the parameters and reduce-scattered asynchronously while backward goes on; each rank
    keeps (and accumulates, across backwards) only its shard."""

    def __init__(self, units: list[Unit], comm: Communicator, precision: Precision) -> None:
        self.units, self.comm, self.precision = units, comm, precision
        self.order: list[int] = [u.index for u in units]
        self.on_launched: Callable[[Unit], None] | None = None
        self._counts = [0] * len(units)
        self._ready: set[int] = set()
        self._next = 0  # position in ``order`` of the next unit to launch
        self._pending: list[tuple[Unit, torch.Tensor, Handle, bool]] = []
        self._in_backward = False
        self.copied = 0  # units whose gradients _launch had to copy into a bucket
        self._buckets: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # unit -> prepared bucket, views

    def install(self) -> None:
        for u in self.units:
            for p in u.params:
                p.register_post_accumulate_grad_hook(partial(self._on_grad, u))

    def _on_grad(self, u: Unit, p: torch.Tensor) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        self._counts[u.index] += 1
        if self._counts[u.index] == len(u.params):
            self._ready.add(u.index)
            while self._next < len(self.order) and self.order[self._next] in self._ready:
                self._launch(self.units[self.order[self._next]])
                self._next += 1

    @torch.no_grad()
    def prepare(self, u: Unit) -> None:
        """Before ``u``'s backward (stage 3): its parameters' gradients become views of one zeroed flat
        bucket, so autograd accumulates straight into what is reduce-scattered ([Note: gradient
        buckets in place])."""
        if u.index in self._buckets or any(p.grad is not None for p in u.params):
            return
        if any(p.dtype != self.precision.reduce for p in u.params):
            return
        bucket = torch.zeros(u.layout.padded, dtype=self.precision.reduce, device=self.comm.device)
        views = slot_views(bucket, u.layout)
        for p, view in zip(u.params, views):
            p.grad = view
        self._buckets[u.index] = (bucket, views)

    # [Note: gradient buckets in place]
    # Without prepare(), autograd allocates each parameter's gradient and _launch copies them into a
    # new flat bucket: for a moment the unit's gradients exist twice. On 4 x H200 (24 units of 39
    # MiB) stage 3's peak was 1.103x the model-state formula. With the gradients as views of the
    # bucket from the start, nothing is copied and the bucket is the only copy. A bucket whose
    # views were replaced (a hook assigning .grad) falls back to the copy in _launch.

    @torch.no_grad()
    def _launch(self, u: Unit) -> None:
        bucket, views = self._buckets.pop(u.index, (None, None))
        if views is None or any(p.grad is None or p.grad.data_ptr() != v.data_ptr()
                                for p, v in zip(u.params, views)):
            grads = [p.grad for p in u.params]
            bucket = torch.empty(u.layout.padded, dtype=self.precision.reduce, device=self.comm.device)
            flatten_into(bucket, u.layout, grads)
            self.copied += 1
        for p in u.params:
            p.grad = None
        fresh = u.grad_shard is None
        out = torch.empty(u.layout.shard, dtype=self.precision.reduce, device=self.comm.device)
        # The collective keeps the bucket alive until it is done (the CPU worker's closure; record_stream on
        # CUDA): holding it here too would keep every bucket, a whole model's gradients, until backward ends.
        handle = self.comm.reduce_scatter(out, bucket, op="avg", async_op=True,
                                           algorithm=streamed_algorithm(self.comm, "reduce_scatter", bucket))
        self._pending.append((u, out, handle, fresh))
        if fresh:
            u.grad_shard = out  # valid once the handle is waited for, in _finish
        if self.on_launched is not None:
            self.on_launched(u)

    def _finish(self) -> None:
        """End of backward: launch what is left, in order, and wait for every reduce-scatter."""
        for i in self.order[self._next:]:
            self._launch(self.units[i])
        for u, out, handle, fresh in self._pending:
            handle.wait()
            if not fresh:
                u.grad_shard.add_(out)
        self._pending.clear()
        self._counts = [0] * len(self.units)
        self._ready.clear()
        self._next = 0
        self._in_backward = False

    def shard_grads(self) -> list[torch.Tensor | None]:
        return [u.grad_shard for u in self.units]

    def zero_grad(self) -> None:
        for u in self.units:
            u.grad_shard = None
