"""``init()``: start torch.distributed from whatever launched us, once.

Sources, in order: an already initialised torch.distributed; torchrun
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK); an MPI launcher
(Open MPI, MPICH/Hydra, PMIx: rank 0 picks an address and a free port and
shares them over MPI through mpi4py); SLURM (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, MASTER_ADDR or the first host of SLURM_JOB_NODELIST); else a
single process. The backend is nccl when CUDA is available, gloo otherwise;
the GPU is chosen by the local rank.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from .communicator import Communicator

_default: Communicator | None = None

_TORCHRUN = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_MPI_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _first(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if n in os.environ), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[012-015,020],cpu1``."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    return prefix + rest.split("-")[0].split("]")[0]


def launch_env() -> dict[str, str | int]:
    """What the launcher told us: rank, world_size, local_rank, local_world_size, master addr/port, source."""
    env = os.environ
    present = [k for k in _TORCHRUN if k in env]
    if present:
        missing = [k for k in _TORCHRUN if k not in env]
        if missing:
            raise RuntimeError(f"init: incomplete torchrun environment: {', '.join(missing)} missing "
                               f"(have {', '.join(present)})")
        return {"source": "torchrun", "rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0)),
                "local_world_size": int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                "master_addr": env["MASTER_ADDR"], "master_port": int(env["MASTER_PORT"])}
    if _first(_MPI_RANK) is not None and _first(_MPI_SIZE) is not None:
        return _mpi_env()
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        if not addr:
            raise RuntimeError("init: SLURM environment without MASTER_ADDR or SLURM_JOB_NODELIST")
        ntasks = int(env["SLURM_NTASKS"])
        return {"source": "slurm", "rank": int(env["SLURM_PROCID"]), "world_size": ntasks,
                "local_rank": int(env.get("SLURM_LOCALID", 0)),
                "local_world_size": int(env.get("SLURM_NTASKS_PER_NODE", str(ntasks)).split("(")[0]),
                "master_addr": addr, "master_port": int(env.get("MASTER_PORT", 29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))}
    return {"source": "single", "rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1,
            "master_addr": "127.0.0.1", "master_port": 0}


def _mpi_env() -> dict[str, str | int]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr, port = (os.environ.get("MASTER_ADDR", socket.gethostbyname(socket.gethostname())),
                  int(os.environ.get("MASTER_PORT", 0)) or _free_port()) if rank == 0 else (None, None)
    addr, port = comm.bcast((addr, port), root=0)
    return {"source": "mpi", "rank": rank, "world_size": size, "local_rank": local.Get_rank(),
            "local_world_size": local.Get_size(), "master_addr": addr, "master_port": port}


def init(timeout: float = 600, backend: str | None = None) -> Communicator:
    """Initialise torch.distributed from the launcher's environment (idempotent) and return the default Communicator."""
    global _default
    if _default is not None and dist.is_initialized():
        return _default
    td = datetime.timedelta(seconds=float(timeout))
    if not dist.is_initialized():
        info = launch_env()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(info["local_rank"]) % torch.cuda.device_count())
        os.environ.setdefault("LOCAL_RANK", str(info["local_rank"]))
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(info["local_world_size"]))
        if info["source"] == "single":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=td)
        else:
            dist.init_process_group(backend, init_method=f"tcp://{info['master_addr']}:{info['master_port']}",
                                    rank=int(info["rank"]), world_size=int(info["world_size"]), timeout=td)
    _default = Communicator(timeout=td)
    return _default


def default_communicator() -> Communicator:
    """The communicator behind the module-level functions (created on first use)."""
    global _default
    if _default is None:
        if not dist.is_initialized():
            raise RuntimeError("collectives: not initialised; call collectives.init() first")
        _default = Communicator()
    return _default
