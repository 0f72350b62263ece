"""Timing helpers shared by the benchmarks: device-inclusive per-call times, the slowest rank's."""

from __future__ import annotations

import statistics
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


def issued_and_done(comm, fn: Callable[[], None], iters: int = 50, trials: int = 5) -> tuple[float, float]:
    """Microseconds per call on this rank, medians of ``trials`` loops: the host's time to issue ``iters``
    back-to-back calls, and the time until they have finished (the probes in benchmarks/probes)."""
    issued, done = [], []
    for _ in range(trials):
        sync(comm)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        t1 = time.perf_counter()
        if comm.device.type == "cuda":
            torch.cuda.synchronize(comm.device)
        issued.append((t1 - t0) / iters * 1e6)
        done.append((time.perf_counter() - t0) / iters * 1e6)
    return round(statistics.median(issued), 2), round(statistics.median(done), 2)
