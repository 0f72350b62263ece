"""Policies: frozen dataclasses that configure zero()."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MixedPrecision:
    """Low-precision compute parameters over full-precision master shards.

    ``zero(..., mixed_precision=torch.bfloat16)`` is short for
    ``MixedPrecision(param_dtype=torch.bfloat16)``.
    """

    param_dtype: torch.dtype = torch.bfloat16
    """dtype of the parameters forward and backward compute with (and of their gradients)."""
    reduce_dtype: torch.dtype | None = None
    """dtype gradients are reduced and kept in; None: ``param_dtype`` (as the ZeRO paper counts them)."""
    master_dtype: torch.dtype = torch.float32
    """dtype of the master shards the optimizer steps, and of its state."""
    output_dtype: torch.dtype | None = None
    """Cast floating-point outputs of the root module to this dtype; None leaves them as computed."""
    cast_forward_inputs: bool = True
    """Cast floating-point inputs of the root module to ``param_dtype``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Precision:
    """The dtypes in force, resolved against the model's own dtype."""

    compute: torch.dtype
    reduce: torch.dtype
    master: torch.dtype
    policy: MixedPrecision | None

    @property
    def mixed(self) -> bool:
        return self.compute != self.master

    @classmethod
    def resolve(cls, option: MixedPrecision | torch.dtype | None, model_dtype: torch.dtype) -> Precision:
        if option is None:
            return cls(model_dtype, model_dtype, model_dtype, None)
        if isinstance(option, torch.dtype):
            option = MixedPrecision(param_dtype=option)
        if not isinstance(option, MixedPrecision):
            raise TypeError(f"mixed_precision: expected a torch.dtype or MixedPrecision, got {type(option).__name__}")
        for field in ("param_dtype", "master_dtype", "reduce_dtype", "output_dtype"):
            dt = getattr(option, field)
            if dt is not None and not dt.is_floating_point:
                raise ValueError(f"mixed_precision.{field}: expected a floating-point dtype, got {dt}")
        return cls(option.param_dtype, option.reduce_dtype or option.param_dtype, option.master_dtype, option)
