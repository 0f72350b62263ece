"""Starting a benchmark's ranks: under a launcher, or as N local processes.

Every benchmark runs the same way: under torchrun / mpirun / srun each process
is one rank; run plainly with ``--nproc N`` it re-runs its own module as N
local processes carrying torchrun's variables (gloo on CPU).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

LAUNCHER_ENV = ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_PROCID")
SPAWNED = "TOPOCOMM_BENCH_SPAWNED"  # set in ranks started by spawn(): the local world size


def launched() -> bool:
    """True under torchrun, mpirun/mpiexec or srun (or as one of spawn()'s ranks)."""
    return any(k in os.environ for k in LAUNCHER_ENV)


def spawned() -> int | None:
    """The local world size if this process is one of spawn()'s ranks."""
    value = os.environ.get(SPAWNED)
    return int(value) if value else None


def spawn(module: str, argv: list[str], nproc: int) -> int:
    """Run ``python -m module argv`` on ``nproc`` local ranks; the first failure stops the rest."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parent.parent)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "RES_OPTIONS": "timeout:1 attempts:1",
            SPAWNED: str(nproc), "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    base.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the cores
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv], stdin=subprocess.DEVNULL,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.05)
        if failed:  # the others may wait on the dead rank: give them a moment to fail by themselves
            deadline = time.monotonic() + 5
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)
        return failed[0] if failed else 0
    except KeyboardInterrupt:
        return 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def write_json(path: Path, doc: object) -> None:
    """Write a result document (creating its folder) and say where it went."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"# wrote {path}", flush=True)
