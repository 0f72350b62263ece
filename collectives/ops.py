"""Reduction ops: names, torch.distributed equivalents, and the local combine."""

from __future__ import annotations

import enum

import torch
import torch.distributed as dist

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
DTYPES = FLOAT_DTYPES + INT_DTYPES


class Reduction(str, enum.Enum):
    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"
    PROD = "prod"

    @property
    def torch_op(self) -> dist.ReduceOp:
        return _TO_TORCH[self]

    def combine(self, acc: torch.Tensor, incoming: torch.Tensor) -> None:
        """acc <- acc (op) incoming, in place, in acc's dtype. AVG combines as SUM (the executor divides once at the end)."""
        if self in (Reduction.SUM, Reduction.AVG):
            acc.add_(incoming)
        elif self is Reduction.PROD:
            acc.mul_(incoming)
        elif self is Reduction.MAX:
            torch.maximum(acc, incoming, out=acc)
        else:
            torch.minimum(acc, incoming, out=acc)


_TO_TORCH = {
    Reduction.SUM: dist.ReduceOp.SUM,
    Reduction.AVG: dist.ReduceOp.AVG,
    Reduction.MAX: dist.ReduceOp.MAX,
    Reduction.MIN: dist.ReduceOp.MIN,
    Reduction.PROD: dist.ReduceOp.PRODUCT,
}
_FROM_TORCH = {str(v).split(".")[-1].upper(): k for k, v in _TO_TORCH.items()}
_FROM_TORCH["PRODUCT"] = Reduction.PROD


def parse_reduction(op: object) -> Reduction:
    """A Reduction from "sum"/"avg"/"max"/"min"/"prod" or a torch.distributed.ReduceOp member."""
    if isinstance(op, Reduction):
        return op
    if isinstance(op, str):
        try:
            return Reduction(op.lower())
        except ValueError:
            pass
        raise ValueError(f"op: unknown reduction {op!r}; use one of {', '.join(r.value for r in Reduction)}")
    name = getattr(op, "name", None) or str(op).split(".")[-1]
    red = _FROM_TORCH.get(str(name).upper())
    if red is None:
        raise ValueError(f"op: unsupported reduction {op!r}; use one of {', '.join(r.value for r in Reduction)}")
    return red
