"""Where parameters live: replicated (stages 1 and 2) or sharded (stage 3).

Both strategies start every rank from rank 0's values, give each unit a
master shard (the tensor the optimizer steps) and, after a step, make the
compute parameters reflect the updated masters (``publish``).

[Note: parameter views] The module keeps its own ``nn.Parameter`` objects;
their ``.data`` are views into the unit's flat compute buffer ``unit.full``.
Stage 3 frees that buffer between uses by resizing its storage to zero bytes
and re-allocates it (same storage object, so every view, including those
autograd saved for backward, sees the new bytes) before an all-gather fills
it. ``p.data = view`` gives the parameter the view's storage but keeps the
parameter's own version counter, so writing the buffer never trips
autograd's in-place checks on tensors saved for backward.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from collectives import Communicator, Handle

from .._buckets import streamed_algorithm
from ._api import Precision
from ._flat import flatten_into, slot_views
from ._units import Unit


def _synced_flat(unit: Unit, comm: Communicator) -> torch.Tensor:
    """The unit's parameters as one padded flat tensor (their own dtype), rank 0's values on every rank."""
    p0 = unit.params[0]
    flat = torch.empty(unit.layout.padded, dtype=p0.dtype, device=comm.device)
    with torch.no_grad():
        flatten_into(flat, unit.layout, [p.detach() for p in unit.params])
    comm.broadcast(flat, src=0)
    return flat


def _bind(unit: Unit) -> None:
    for p, view in zip(unit.params, slot_views(unit.full, unit.layout)):
        p.data = view


class ReplicatedParams:
    """Stages 1 and 2: all compute parameters on every rank; the optimizer steps this rank's shard of each unit."""

    def __init__(self, units: list[Unit], comm: Communicator, precision: Precision) -> None:
        self.units, self.comm, self.precision = units, comm, precision
        for u in units:
            flat = _synced_flat(u, comm)
            block = flat[u.shard_slice(comm.rank)]
            if precision.mixed:
                u.master = block.to(precision.master, copy=True)
                u.full = flat.to(precision.compute)
            else:
                u.master = block.detach()  # the optimizer updates the compute buffer in place
                u.full = flat
            _bind(u)

    def install(self, root: nn.Module) -> None:
        pass

    def after_forward(self) -> None:
        pass

    @torch.no_grad()
    def publish(self) -> None:
        """All-gather every unit's updated shard into its compute buffer (in place)."""
        handles = []
        for u in self.units:
            block = u.full[u.shard_slice(self.comm.rank)]
            if self.precision.mixed:
                block.copy_(u.master)
            handles.append(self.comm.all_gather(u.full, block, async_op=True,
                                                algorithm=streamed_algorithm(self.comm, "all_gather", u.full)))
        for h in handles:
            h.wait()

    def reload(self) -> None:
        """The masters were overwritten (a checkpoint was loaded): refresh the compute parameters."""
        self.publish()


class _State(enum.Enum):
    RESHARDED = "resharded"
    GATHERING = "gathering"
    GATHERED = "gathered"


class ShardedParams:
    """Stage 3: each rank holds only its shard of each unit; a unit is all-gathered around its module's use.

    [Note: stage-3 schedule] Forward: a unit's module pre-hook gathers it
    (waiting for a prefetch if one is in flight) and prefetches the next unit
    in forward order; its post-hook frees it and hooks its outputs so that the
    gradient reaching them gathers it again before its backward, prefetching
    the next unit in backward order. Its gradients are reduce-scattered once
    all of them are accumulated (ReduceScatteredGrads), which frees it again.
    The root unit stays gathered between forward and backward when grad mode
    is on (its backward comes first). Orders are those of the first forward;
    units outside it are never prefetched. At the end of backward every unit
    is freed.
    """

    def __init__(self, units: list[Unit], comm: Communicator, precision: Precision) -> None:
        self.units, self.comm, self.precision = units, comm, precision
        for u in units:
            flat = _synced_flat(u, comm)
            u.master = flat[u.shard_slice(comm.rank)].to(precision.master, copy=True)
            u.gather_src = u.master.to(precision.compute, copy=True) if precision.mixed else u.master
            u.full = torch.empty(u.layout.padded, dtype=precision.compute, device=comm.device)
            _bind(u)
            del flat
            u.full.untyped_storage().resize_(0)
        self._state = [_State.RESHARDED] * len(units)
        self._handles: list[Handle | None] = [None] * len(units)
        self._pre_order: list[int] = []   # units in the order their forward started (first forward)
        self._post_order: list[int] = []  # ... and finished
        self._recording = True
        self._in_backward = False
        self._root: nn.Module | None = None
        self.on_order: Callable[[list[int]], None] | None = None
        self.on_pre_backward: Callable[[Unit], None] | None = None

    # -- gather and free -----------------------------------------------------

    def _gather(self, u: Unit) -> None:
        i = u.index
        if self._state[i] is not _State.RESHARDED:
            return
        u.full.untyped_storage().resize_(u.full.numel() * u.full.element_size())
        self._handles[i] = self.comm.all_gather(u.full, u.gather_src, async_op=True,
                                                 algorithm=streamed_algorithm(self.comm, "all_gather", u.full))
        self._state[i] = _State.GATHERING

    def _wait(self, u: Unit) -> None:
        i = u.index
        if self._state[i] is _State.GATHERING:
            self._handles[i].wait()
            self._handles[i] = None
            self._state[i] = _State.GATHERED

    def unshard(self, u: Unit) -> None:
        self._gather(u)
        self._wait(u)

    def reshard(self, u: Unit) -> None:
        self._wait(u)
        if self._state[u.index] is _State.GATHERED:
            u.full.untyped_storage().resize_(0)
            self._state[u.index] = _State.RESHARDED

    def _prefetch(self, order: list[int], u: Unit) -> None:
        try:
            nxt = order[order.index(u.index) + 1]
        except (ValueError, IndexError):
            return
        self._gather(self.units[nxt])

    # -- hooks ---------------------------------------------------------------

    def install(self, root: nn.Module) -> None:
        self._root = root
        for u in self.units:
            u.module.register_forward_pre_hook(partial(self._pre_forward, u))
            u.module.register_forward_hook(partial(self._post_forward, u))

    def _pre_forward(self, u: Unit, module: nn.Module, args: tuple) -> None:
        if self._recording and u.index not in self._pre_order:
            self._pre_order.append(u.index)
        self.unshard(u)
        if not self._recording:
            self._prefetch(self._pre_order, u)

    def _post_forward(self, u: Unit, module: nn.Module, args: tuple, output: object) -> None:
        if self._recording and u.index not in self._post_order:
            self._post_order.append(u.index)
        grad = torch.is_grad_enabled()
        if not (grad and module is self._root):
            self.reshard(u)
        if not grad:
            return
        tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(tensors, partial(self._pre_backward, u), mode="any")

    def after_forward(self) -> None:
        """Called by the root wrapper once the whole forward has run."""
        if self._recording and self._pre_order:
            self._recording = False
            if self.on_order is not None:
                seen = list(reversed(self._pre_order))
                self.on_order(seen + [u.index for u in self.units if u.index not in seen])

    def _pre_backward(self, u: Unit, grad: torch.Tensor | None) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        self.unshard(u)
        if self.on_pre_backward is not None:
            self.on_pre_backward(u)
        self._prefetch(self._post_order[::-1], u)

    def _after_backward(self) -> None:
        self._in_backward = False
        for u in self.units:
            self.reshard(u)

    # -- optimizer side ------------------------------------------------------

    @torch.no_grad()
    def publish(self) -> None:
        """Refresh the compute-dtype shards the next all-gathers read."""
        if self.precision.mixed:
            for u in self.units:
                u.gather_src.copy_(u.master)

    def reload(self) -> None:
        """The masters were overwritten (a checkpoint was loaded): refresh the shards, drop gathered copies."""
        self.publish()
        for u in self.units:
            self.reshard(u)
