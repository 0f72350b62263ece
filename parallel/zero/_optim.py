"""The optimizer: the user's optimizer class, stepping this rank's flat master shards.

``zero(module, torch.optim.AdamW, ...)`` returns an instance of a subclass of
``torch.optim.AdamW`` whose parameters are the units' master shards, so LR
schedulers, ``param_groups``, hooks and ``state_dict`` behave as usual (the
state is this rank's shard; ``parallel.save_checkpoint`` saves all of it).
Only ``step`` and ``zero_grad`` change: ``step`` collects the gradient shards
from the gradient strategy, runs the class's own step, and publishes the
updated masters to the compute parameters. ``clip_grad_norm_`` clips by the
global norm over every rank's shards (the model's ``.grad`` are not whole in
stages 2 and 3, so ``torch.nn.utils.clip_grad_norm_`` cannot be used).

[Note: element-wise optimizers] A flat shard mixes pieces of several
parameters, so the optimizer must treat every element independently of the
tensor it sits in: SGD (momentum, Nesterov), Adam, AdamW, Adamax, NAdam,
RAdam, Adagrad, Adadelta, RMSprop, Rprop and ASGD are. Not LBFGS (closures
and global line searches), SparseAdam (sparse gradients), Adafactor (factored
moments over matrix rows and columns, parameter-norm step sizes), Muon (matrix
orthogonalisation), nor anything with per-tensor norms (LAMB, LARS); those
raise. All parameters share one parameter group (the keyword arguments).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from collectives import Communicator

from ._model import GradStrategy, ParamStrategy
from ._units import Unit

_NOT_ELEMENTWISE = tuple(getattr(torch.optim, n) for n in ("LBFGS", "SparseAdam", "Adafactor", "Muon")
                         if hasattr(torch.optim, n))


@dataclasses.dataclass(eq=False)
class _Binding:
    units: list[Unit]
    params: ParamStrategy
    grads: GradStrategy
    comm: Communicator
    base_step: Callable


class ShardedOptimizerMixin:
    """Mixed in before the user's optimizer class; see the module docstring."""

    _zero: _Binding

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        z = self._zero
        grads = z.grads.shard_grads()
        if all(g is None for g in grads):
            return loss
        for chunk in _chunks(z.units, grads):
            for u, g in chunk:
                u.master.grad = g if g.dtype == u.master.dtype else g.to(u.master.dtype)
            z.base_step(self)
            for u, _ in chunk:
                u.master.grad = None
        z.params.publish()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._zero.grads.zero_grad()
        for u in self._zero.units:
            u.master.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale the gradients the next ``step`` uses so that their global norm is at most ``max_norm``
        (collective), as ``torch.nn.utils.clip_grad_norm_`` does on the whole model; returns the norm
        before clipping (float32, on every rank). Call it between backward and step."""
        z = self._zero
        grads = [g for g in z.grads.shard_grads() if g is not None]
        dev = z.comm.device
        p = float(norm_type)
        if math.isinf(p):
            local = torch.stack([g.abs().max().float() for g in grads if g.numel()] or [torch.zeros((), device=dev)])
            total = local.max().reshape(1)
            z.comm.all_reduce(total, op="max")
            norm = total[0]
        else:
            total = torch.zeros(1, dtype=torch.float32, device=dev)
            for g in grads:  # padding is zero, so whole shards can be summed
                total += g.float().abs().pow(p).sum()
            z.comm.all_reduce(total, op="sum")
            norm = total[0].pow(1.0 / p)
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
        return norm


def _chunks(units: list[Unit], grads: list[torch.Tensor | None]) -> list[list[tuple[Unit, torch.Tensor]]]:
    """Units with gradients, grouped so that at most one unit's worth of up-cast gradients exists at once.

    When gradients already have the master dtype nothing is copied and one chunk takes every unit.
    """
    pairs = [(u, g) for u, g in zip(units, grads) if g is not None]
    if all(g.dtype == u.master.dtype for u, g in pairs):
        return [pairs]
    cap = max(u.master.numel() for u, _ in pairs)
    out: list[list[tuple[Unit, torch.Tensor]]] = []
    size = cap + 1
    for u, g in pairs:
        n = u.master.numel()
        if size + n > cap:
            out.append([])
            size = 0
        out[-1].append((u, g))
        size += n
    return out


_CLASSES: dict[type, type] = {}


def _unhooked_step(cls: type[torch.optim.Optimizer]) -> Callable:
    """``cls.step`` without the hook-running wrapper torch adds on first use (ours runs the hooks once)."""
    fn = cls.step
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


def sharded_optimizer(optimizer_class: type[torch.optim.Optimizer], units: list[Unit], params: ParamStrategy,
                      grads: GradStrategy, comm: Communicator, kwargs: dict) -> torch.optim.Optimizer:
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class: expected a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if issubclass(optimizer_class, _NOT_ELEMENTWISE):
        raise ValueError(f"optimizer_class: {optimizer_class.__name__} is not element-wise, so it cannot step flat "
                         f"shards; use SGD, Adam, AdamW, Adagrad, RMSprop or another element-wise optimizer")
    sub = _CLASSES.get(optimizer_class)
    if sub is None:
        sub = _CLASSES[optimizer_class] = type(f"Sharded{optimizer_class.__name__}",
                                               (ShardedOptimizerMixin, optimizer_class), {"__module__": __name__})
    opt = sub.__new__(sub)
    opt._zero = _Binding(units, params, grads, comm, _unhooked_step(optimizer_class))
    sub.__init__(opt, [u.master for u in units], **kwargs)
    return opt
