"""``init()``: start the communication layer from whatever launched us, once.

Sources, in this order (``launch_env`` reads them; the first that applies wins):

- an already initialised torch.distributed (``init`` wraps it);
- torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (required once any of
  RANK, WORLD_SIZE or TORCHELASTIC_RUN_ID is set), LOCAL_RANK,
  LOCAL_WORLD_SIZE, GROUP_RANK (the agent, i.e. the node);
- an MPI launcher (Open MPI, MPICH/Hydra, Intel MPI, MVAPICH, PMIx): through
  mpi4py, rank 0 picks an address and a free port (or takes MASTER_ADDR /
  MASTER_PORT) and broadcasts them; local ranks and the node index come from
  MPI's shared-memory split;
- a SLURM step (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
  SLURM_NODEID, SLURM_TASKS_PER_NODE, MASTER_ADDR or the first host of
  SLURM_JOB_NODELIST, MASTER_PORT or 29500 + job id mod 1000;
- else a single process.

A source that is only partly there (e.g. RANK without MASTER_PORT) is an
error that lists what is missing, never a silent single-process run.

The backend is ``backend``, else ``$TOPOCOMM_BACKEND``, else nccl when CUDA is
available and gloo otherwise; ``"mpi"`` gives a ``collectives.mpi.MpiCommunicator``
(no torch.distributed). With nccl the GPU is ``local_rank % device_count``.

[Note: node identity] ``init`` exports LOCAL_RANK, LOCAL_WORLD_SIZE and, when
the launcher names nodes (SLURM_NODEID, MPI's shared-memory split), GROUP_RANK,
unless already set. Topology detection groups ranks by GROUP_RANK, so every
launcher yields the same node map torchrun does.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from collections.abc import Mapping

import torch
import torch.distributed as dist

from .communicator import Communicator

_default: Communicator | None = None

_TORCHRUN_TRIGGERS = ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")
_TORCHRUN_REQUIRED = {
    "RANK": "this process's global rank",
    "WORLD_SIZE": "the number of ranks",
    "MASTER_ADDR": "the host of rank 0's store",
    "MASTER_PORT": "the port of rank 0's store",
}
# (rank, size, local rank, local size) variables of each MPI family.
_MPI_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),          # MPICH/Hydra, Intel MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("PMIX_RANK", "", "", ""),                                               # PMIx (srun --mpi=pmix, prterun)
)
_SLURM_PORT_BASE = 29500


class LaunchError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"init: {name}={env[name]!r} is not an integer") from None


def _checked(info: dict, source: str) -> dict:
    r, n, lr, ln = info["rank"], info["world_size"], info["local_rank"], info["local_world_size"]
    if n < 1 or not 0 <= r < n:
        raise LaunchError(f"init ({source}): rank {r} is not in [0, world size {n})")
    if ln < 1 or not 0 <= lr < ln or ln > n:
        raise LaunchError(f"init ({source}): local rank {lr} / local world size {ln} do not fit world size {n}")
    return info


def launch_env(env: Mapping[str, str] | None = None) -> dict:
    """What the launcher told us: source, rank, world_size, local_rank, local_world_size, node
    (index of this rank's node, or None if the launcher does not say), master_addr, master_port.

    ``env`` defaults to ``os.environ``. The MPI source initialises MPI (mpi4py) to agree on the address.
    """
    env = os.environ if env is None else env
    if any(k in env for k in _TORCHRUN_TRIGGERS):
        return _torchrun_env(env)
    family = next((f for f in _MPI_VARS if f[0] in env), None)
    if family is not None:
        return _mpi_env(env, family)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return _slurm_env(env)
    # Also a SLURM batch script outside srun: one process.
    return {"source": "single", "rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1, "node": 0,
            "master_addr": "127.0.0.1", "master_port": 0}


def _torchrun_env(env: Mapping[str, str]) -> dict:
    missing = [k for k in _TORCHRUN_REQUIRED if not env.get(k)]
    if missing:
        have = [k for k in (*_TORCHRUN_REQUIRED, "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK") if env.get(k)]
        raise LaunchError(
            "init: incomplete torchrun environment: missing " +
            ", ".join(f"{k} ({_TORCHRUN_REQUIRED[k]})" for k in missing) +
            f"; have {', '.join(have) or 'none of them'}. Launch with torchrun, or set all of "
            f"{', '.join(_TORCHRUN_REQUIRED)} (and LOCAL_RANK, LOCAL_WORLD_SIZE on several nodes)")
    rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    lsize = _int(env, "LOCAL_WORLD_SIZE") if env.get("LOCAL_WORLD_SIZE") else size
    lrank = _int(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else rank % lsize
    node = _int(env, "GROUP_RANK") if env.get("GROUP_RANK") else None
    return _checked({"source": "torchrun", "rank": rank, "world_size": size, "local_rank": lrank,
                     "local_world_size": lsize, "node": node, "master_addr": env["MASTER_ADDR"],
                     "master_port": _int(env, "MASTER_PORT")}, "torchrun")


def _mpi_env(env: Mapping[str, str], family: tuple[str, str, str, str]) -> dict:
    try:
        from mpi4py import MPI
    except ImportError:
        return _mpi_env_without_mpi4py(env, family)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    lrank, lsize = local.Get_rank(), local.Get_size()
    node = _mpi_node_index(comm, local)
    local.Free()
    if rank == 0:
        addr = env.get("MASTER_ADDR") or host_address(multi_node=lsize < size)
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port()
        msg = f"{addr} {port}".encode()
    else:
        msg = b""
    buf = bytearray(msg.ljust(256))
    comm.Bcast(buf, root=0)
    addr, port = bytes(buf).decode().split()
    return _checked({"source": "mpi", "rank": rank, "world_size": size, "local_rank": lrank, "local_world_size": lsize,
                     "node": node, "master_addr": addr, "master_port": int(port)}, "mpi")


def _mpi_node_index(comm, local) -> int:
    """Index of this rank's node: nodes numbered by their lowest global rank."""
    import numpy as np
    from mpi4py import MPI

    leader = np.array([comm.Get_rank()], dtype=np.int64)
    local.Allreduce(MPI.IN_PLACE, leader, op=MPI.MIN)
    leaders = np.empty(comm.Get_size(), dtype=np.int64)
    comm.Allgather(leader, leaders)
    return int(np.searchsorted(np.unique(leaders), leader[0]))


def _mpi_env_without_mpi4py(env: Mapping[str, str], family: tuple[str, str, str, str]) -> dict:
    rank_v, size_v, lrank_v, lsize_v = family
    missing = [v for v in (size_v or "(world size)", "MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        raise LaunchError(f"init: launched by MPI ({rank_v} is set) but mpi4py is not installed, and "
                          f"{', '.join(missing)} missing: pip install mpi4py, or export MASTER_ADDR and MASTER_PORT")
    size = _int(env, size_v)
    lsize = _int(env, lsize_v) if lsize_v and env.get(lsize_v) else size
    lrank = _int(env, lrank_v) if lrank_v and env.get(lrank_v) else _int(env, rank_v) % lsize
    return _checked({"source": "mpi", "rank": _int(env, rank_v), "world_size": size, "local_rank": lrank,
                     "local_world_size": lsize, "node": None, "master_addr": env["MASTER_ADDR"],
                     "master_port": _int(env, "MASTER_PORT")}, "mpi")


def _slurm_env(env: Mapping[str, str]) -> dict:
    ntasks_v = "SLURM_NTASKS" if "SLURM_NTASKS" in env else "SLURM_NPROCS"
    missing = [v for v in (ntasks_v, "SLURM_LOCALID", "SLURM_NODEID") if v not in env]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_STEP_NODELIST", "")
    if not env.get("MASTER_ADDR") and not nodelist:
        missing.append("MASTER_ADDR or SLURM_JOB_NODELIST")
    if missing:
        raise LaunchError(f"init: incomplete SLURM environment: missing {', '.join(missing)} "
                          f"(launch the ranks with srun inside the allocation)")
    size, node = _int(env, ntasks_v), _int(env, "SLURM_NODEID")
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    if node < len(per_node):
        lsize = per_node[node]
    elif env.get("SLURM_NTASKS_PER_NODE"):
        lsize = _int(env, "SLURM_NTASKS_PER_NODE")
    else:
        lsize = size
    addr = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
    port = (_int(env, "MASTER_PORT") if env.get("MASTER_PORT")
            else _SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0") or 0) % 1000)
    return _checked({"source": "slurm", "rank": _int(env, "SLURM_PROCID"), "world_size": size,
                     "local_rank": _int(env, "SLURM_LOCALID"), "local_world_size": lsize, "node": node,
                     "master_addr": addr, "master_port": port}, "slurm")


# -- SLURM lists -------------------------------------------------------------------

def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``a[1-2,5],b`` -> [``a[1-2,5]``, ``b``]."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return [s for s in (x.strip() for x in out) if s]


def expand_nodelist(nodelist: str) -> list[str]:
    """Hosts of a SLURM node list: ``gpu[01-03,07],login-a`` -> gpu01, gpu02, gpu03, gpu07, login-a.

    Each item may have bracket groups (``r[1-2]n[01-02]``); numbers keep their zero padding.
    """
    hosts: list[str] = []
    for item in _split_top(nodelist):
        m = re.search(r"\[([^\]]*)\]", item)
        if m is None:
            hosts.append(item)
            continue
        head, tail = item[:m.start()], item[m.end():]
        for part in m.group(1).split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.extend(head + str(i).zfill(width) + rest for rest in expand_nodelist(tail) or [""])
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in _split_top(spec.replace("(", "[").replace(")", "]")):
        m = re.fullmatch(r"(\d+)(?:\[x(\d+)\])?", item)
        if m is None:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


# -- addresses ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def host_address(multi_node: bool = True) -> str:
    """An address of this host the other ranks can reach: the hostname's when it is not loopback, else
    (several nodes) the source address of the default route; 127.0.0.1 for a single node."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    if not multi_node or not ipaddress.ip_address(addr).is_loopback:
        return addr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks the route
            return s.getsockname()[0]
        except OSError:
            return addr


# -- init ---------------------------------------------------------------------------

def _export(info: dict) -> None:
    """[Note: node identity]"""
    os.environ.setdefault("LOCAL_RANK", str(info["local_rank"]))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info["local_world_size"]))
    if info.get("node") is not None:
        os.environ.setdefault("GROUP_RANK", str(info["node"]))


def _join_agent_store(backend: str, info: dict, timeout: datetime.timedelta) -> None:
    """Join through torchrun's shared store, on a key space of this restart attempt's own.

    [Note: stale store keys] torchrun keeps one store for every attempt and never clears it, so
    a restarted group would read the dead group's addresses (pytorch/pytorch#135712). Ranks of a
    restarted group may also come up seconds apart, so joining may take up to JOIN_TIMEOUT_S
    even when ``timeout`` (which bounds every operation afterwards) is shorter.
    """
    join = datetime.timedelta(seconds=max(timeout.total_seconds(), JOIN_TIMEOUT_S))
    store = dist.TCPStore(str(info["master_addr"]), int(info["master_port"]), is_master=False, timeout=join)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"topocomm/attempt-{attempt}", store),
                            rank=int(info["rank"]), world_size=int(info["world_size"]), timeout=join)
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None and join != timeout:
        set_timeout(timeout)


JOIN_TIMEOUT_S = 120.0


def init(timeout: float = 600, backend: str | None = None) -> Communicator:
    """Initialise from the launcher's environment (idempotent) and return the default Communicator.

    ``backend``: "nccl", "gloo", "mpi" or None ($TOPOCOMM_BACKEND, else nccl with CUDA, gloo without).
    """
    global _default
    if _default is not None and (_default.backend == "mpi" or dist.is_initialized()):
        return _default
    backend = backend or os.environ.get("TOPOCOMM_BACKEND") or None
    if backend == "mpi":
        from .mpi import MpiCommunicator

        _export(launch_env())
        _default = MpiCommunicator(timeout=timeout)
        return _default
    td = datetime.timedelta(seconds=float(timeout))
    if not dist.is_initialized():
        info = launch_env()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(info["local_rank"]) % torch.cuda.device_count())
        _export(info)
        if info["source"] == "single":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=td)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _join_agent_store(backend, info, td)
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


def shutdown() -> None:
    """Close every communicator (the default one included) and destroy the process group ``init()`` created.

    Use it instead of ``dist.destroy_process_group()``: on NCCL, destroying the group while CUDA graphs
    that captured its kernels are alive was seen to hang."""
    global _default
    from .communicator import close_all

    _default = None
    close_all()
    if dist.is_initialized():
        dist.destroy_process_group()
