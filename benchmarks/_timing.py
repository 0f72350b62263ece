"""Timing helpers shared by the training benchmarks: device-inclusive per-call times, the slowest rank's."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def sync(comm) -> None:
    """Wait for this rank's device work, then for every rank."""
    if comm.device.type == "cuda":
        torch.cuda.synchronize(comm.device)
    comm.barrier()


def timed(comm, fn: Callable[[], None], iters: int) -> float:
    """Seconds per call of ``fn`` on this rank, device work included (ranks start together)."""
    sync(comm)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if comm.device.type == "cuda":
        torch.cuda.synchronize(comm.device)
    return (time.perf_counter() - t0) / iters


def slowest(comm, seconds: list[float]) -> list[float]:
    """Each entry's maximum over ranks."""
    t = torch.tensor(seconds, dtype=torch.float64, device=comm.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
