"""``python -m collectives.calibrate measure``: time every op and algorithm on this host (gloo ranks
spawned here, or the ranks of a launcher), keeping each cell's fastest repeat, as busbw-style rows
for ``calibrate fit``. The busbw benchmark does the same, and more, on any backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import algorithms
from .model import CostModel, default_params
from .schedule import Collective
from .topology import Topology, usable_cpus


BUSBW_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
                "all_gather": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
                "broadcast": lambda n: 1.0, "reduce": lambda n: 1.0}


def _time_one(comm, op: str, algo: str, nbytes: int, budget_s: float) -> float:
    import time

    import torch
    import torch.distributed as dist
    n, count, dev = comm.size, nbytes // 4, comm.device
    big, small = torch.ones(count, device=dev), torch.ones(count // n, device=dev)
    other = big.clone() if op == "all_to_all" else None
    call = {"all_reduce": lambda: comm.all_reduce(big, algorithm=algo),
            "reduce_scatter": lambda: comm.reduce_scatter(small, big, algorithm=algo),
            "all_gather": lambda: comm.all_gather(big, small, algorithm=algo),
            "broadcast": lambda: comm.broadcast(big, 0, algorithm=algo),
            "reduce": lambda: comm.reduce(big, 0, algorithm=algo),
            "all_to_all": lambda: comm.all_to_all(big, other, algorithm=algo)}[op]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    call()  # warm-up (and schedule build)
    sync()
    iters, spent = 0, 0.0
    dist.barrier(group=comm.group)
    while True:
        t0 = time.perf_counter()
        call()
        sync()
        spent += time.perf_counter() - t0
        iters += 1
        flag = torch.tensor([float(spent >= budget_s or iters >= 20)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=comm.group)  # all ranks stop together
        if flag.item():
            break
    mean = torch.tensor([spent / iters], device=dev)
    dist.all_reduce(mean, op=dist.ReduceOp.MAX, group=comm.group)
    return float(mean.item())


def _cells(ops: tuple[str, ...] | None, sizes: tuple[int, ...], repeats: int) -> list[tuple[str, str, int]]:
    ops = ops or tuple(c.value for c in Collective)
    return [(op, a, s) for op in ops for a in algorithms.supported(Collective(op)) for s in sizes] * repeats


def _rows(comm, cells: list, budget_s: float) -> list[dict[str, Any]]:
    import torch
    rows = []
    for op, algo, nbytes in cells:
        t = _time_one(comm, op, algo, nbytes, budget_s)
        algbw = nbytes / t / 1e9
        depth = comm._select(Collective(op), nbytes, torch.float32, algo)[1]  # as the call chose it
        rows.append({"op": op, "algorithm": algo, "bytes": nbytes, "count": nbytes // 4, "dtype": "float32",
                     "time_us": t * 1e6, "algbw": algbw, "busbw": algbw * BUSBW_FACTOR[op](comm.size),
                     "wrong": 0, "predicted_us": comm.model.predict(op, nbytes, algo, pipeline=depth) * 1e6,
                     "pipeline": depth,  # the depth it ran at (TOPOCOMM_PIPELINE included)
                     "in_place": op in ("all_reduce", "broadcast", "reduce")})
    return rows


def _fastest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[tuple, dict] = {}
    for row in rows:  # the fastest of each (op, algorithm, size), in first-seen order
        key = (row["op"], row["algorithm"], row["bytes"])
        best[key] = min(best.get(key, row), row, key=lambda r: r["time_us"])
    return list(best.values())


def _header(backend: str, n: int, repeats: int) -> dict[str, Any]:
    import platform
    import torch
    gpu = torch.cuda.get_device_name(0) if backend == "nccl" else None
    return {"machine": f"{platform.node()} ({usable_cpus()} CPUs{', ' + gpu if gpu else ''})",
            "backend": backend, "world_size": n, "torch": torch.__version__,
            "method": f"mean of up to 20 iterations (max over ranks), fastest of {repeats} passes",
            "load_average": os.getloadavg()}


def _measure_worker(rank: int, n: int, port: int, cells: list, out: str, budget_s: float) -> None:
    import torch
    import torch.distributed as dist

    from .communicator import Communicator
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    topo = Topology.local(n)
    comm = Communicator(topology=topo, profile=default_params(topo, "gloo"))
    rows = _rows(comm, cells, budget_s)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure_local(nproc: int = 4, sizes: tuple[int, ...] = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20),
                  ops: tuple[str, ...] | None = None, budget_s: float = 0.2,
                  repeats: int = 3) -> tuple[dict[str, Any], list[dict]]:
    """Times every (op, algorithm, size) with ``nproc`` local gloo ranks; busbw-style header and rows.

    Each cell is timed in ``repeats`` passes and keeps its fastest: on a shared
    machine, other processes only ever add time.
    """
    import socket
    import tempfile

    import torch.multiprocessing as mp
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(_measure_worker, args=(nproc, port, _cells(ops, sizes, repeats), out, budget_s),
                 nprocs=nproc, join=True)
        rows = _fastest(json.loads(Path(out).read_text()))
    return _header("gloo", nproc, repeats), rows


def measure_launched(sizes: tuple[int, ...] = (64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30),
                     ops: tuple[str, ...] | None = None, budget_s: float = 0.1,
                     repeats: int = 2) -> tuple[dict[str, Any], list[dict], Topology] | None:
    """The same under torchrun/mpirun (NCCL on GPUs): returns (header, rows, detected topology) on rank 0."""
    from .bootstrap import init
    comm = init()
    comm.model = CostModel(comm.topology, comm.backend, profile=default_params(comm.topology, comm.backend))
    rows = _fastest(_rows(comm, _cells(ops, sizes, repeats), budget_s))
    return (_header(comm.backend, comm.size, repeats), rows, comm.topology) if comm.rank == 0 else None
