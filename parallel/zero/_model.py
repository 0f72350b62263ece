"""ZeroModel: the module as zero() returns it, and the state the functions of this package share."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_map

from collectives import Communicator

from ._api import Precision
from ._units import Unit


class ParamStrategy(Protocol):
    """Where parameters live (_params.py)."""

    def install(self, root: nn.Module) -> None: ...
    def after_forward(self) -> None: ...
    def publish(self) -> None: ...  # the masters changed (a step): update what forward computes with
    def reload(self) -> None: ...   # the masters were overwritten (a checkpoint)


class GradStrategy(Protocol):
    """Where gradients go (_grads.py)."""

    def install(self) -> None: ...
    def shard_grads(self) -> list[torch.Tensor | None]: ...
    def zero_grad(self) -> None: ...


@dataclasses.dataclass(eq=False)
class ZeroState:
    comm: Communicator
    stage: int
    precision: Precision
    units: list[Unit]
    params: ParamStrategy
    grads: GradStrategy
    module: nn.Module
    names: dict[int, str]  # id(parameter) -> its canonical name (the first of named_parameters())


def _cast(tree: object, dtype: torch.dtype) -> object:
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


class ZeroModel(nn.Module):
    """Wraps the user's module (``.module``, parameters under their original names).

    Use it as the module: ``loss = model(x).sum(); loss.backward()``. Its
    parameters' storage belongs to ZeRO: in stage 3 they hold data only while
    their unit is gathered, so read weights through ``parallel.full_state_dict``
    rather than ``state_dict()``.
    """

    def __init__(self, module: nn.Module, state: ZeroState) -> None:
        super().__init__()
        self.module = module
        self._zero = state

    @property
    def stage(self) -> int:
        return self._zero.stage

    def forward(self, *args: object, **kwargs: object) -> object:
        policy = self._zero.precision.policy
        if policy is not None and policy.cast_forward_inputs:
            args, kwargs = _cast((args, kwargs), policy.param_dtype)
        out = self.module(*args, **kwargs)
        self._zero.params.after_forward()
        if policy is not None and policy.output_dtype is not None:
            out = _cast(out, policy.output_dtype)
        return out


def zero_state(model: object) -> ZeroState:
    if not isinstance(model, ZeroModel):
        raise TypeError(f"model: expected the model returned by parallel.zero(), got {type(model).__name__}")
    return model._zero
