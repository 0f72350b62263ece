"""Argument checks for the public API. Every check runs before any byte moves,
raises ValueError or TypeError naming the argument, and leaves the
communicator as it was."""

from __future__ import annotations

import torch

from .ops import DTYPES, FLOAT_DTYPES, Reduction, parse_reduction


def check_tensor(name: str, t: object, device: torch.device | None, backend: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; use one of "
                        f"{', '.join(str(d).replace('torch.', '') for d in DTYPES)}")
    if t.layout is not torch.strided:
        raise ValueError(f"{name}: only dense strided tensors are supported, got layout {t.layout}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: tensor must be contiguous (call .contiguous() first)")
    if backend == "nccl":
        if t.device.type != "cuda" or (device is not None and t.device != device):
            raise ValueError(f"{name}: the nccl backend needs tensors on {device}, got {t.device}")
    elif t.device.type != "cpu":
        raise ValueError(f"{name}: the {backend} backend needs CPU tensors, got {t.device}")
    return t


def check_op(op: object, dtype: torch.dtype) -> Reduction:
    red = parse_reduction(op)
    if red is Reduction.AVG and dtype not in FLOAT_DTYPES:
        raise ValueError(f"op: 'avg' needs a floating-point tensor, got {dtype}")
    return red


def check_pair(out_name: str, out: torch.Tensor, inp_name: str, inp: torch.Tensor,
               out_per_in: tuple[int, int]) -> None:
    """out.numel() * a == inp.numel() * b, same dtype, same device."""
    if out.dtype != inp.dtype:
        raise TypeError(f"{inp_name}: dtype {inp.dtype} differs from {out_name}'s {out.dtype}")
    if out.device != inp.device:
        raise ValueError(f"{inp_name}: device {inp.device} differs from {out_name}'s {out.device}")
    a, b = out_per_in
    if out.numel() * a != inp.numel() * b:
        raise ValueError(f"{out_name}/{inp_name}: sizes do not match: {out_name}.numel()={out.numel()}, "
                         f"{inp_name}.numel()={inp.numel()}; expected {out_name}.numel() * {a} == "
                         f"{inp_name}.numel() * {b}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def check_no_alias(out_name: str, out: torch.Tensor, inp_name: str, inp: torch.Tensor,
                   allowed: torch.Tensor | None = None) -> None:
    """inp must not overlap out, except by being exactly ``allowed`` (an in-place layout)."""
    if not overlaps(out, inp):
        return
    if allowed is not None and inp.data_ptr() == allowed.data_ptr() and inp.numel() == allowed.numel():
        return
    raise ValueError(f"{inp_name}: overlaps {out_name} in memory; only the in-place layout "
                     f"(the input being this rank's own block of the output) is allowed")


def check_rank(name: str, r: object, size: int, me: int | None = None) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name}: expected an int rank, got {type(r).__name__}")
    if not 0 <= r < size:
        raise ValueError(f"{name}: rank {r} is out of range for a group of size {size}")
    if me is not None and r == me:
        raise ValueError(f"{name}: rank {r} is this rank; point-to-point needs another rank")
    return r


_WIRE = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def check_compress(compress: object, dtype: torch.dtype) -> torch.dtype | None:
    """The wire dtype for ``compress`` (None: no compression)."""
    if compress is None:
        return None
    wire = _WIRE.get(compress) if isinstance(compress, str) else None
    if wire is None:
        raise ValueError(f"compress: unknown {compress!r}; use None, 'bf16' or 'fp16'")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compress: {compress!r} applies to float32/float64 tensors, got {dtype}")
    return wire
