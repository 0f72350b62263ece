"""Persistent gloo worker groups for the test suite.

Starting a process group costs a second or two per world (importing torch),
so each world size is started once per session and fed test cases:
``pool.run(n, "tests.cases:fn", *args)`` calls ``fn(comm, *args)`` on every
rank of an n-rank gloo world (``comm`` is that rank's Communicator over the
world) and returns the per-rank results in rank order.

A case that raises on any rank fails with that rank's traceback. A case that
does not finish within its bound fails as a hang; the world is killed and the
next case gets a fresh one, so a stuck collective never stalls CI.
"""

from __future__ import annotations

import collections
import importlib
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

DEFAULT_TIMEOUT_S = float(os.environ.get("TOPOCOMM_TEST_TIMEOUT", "180"))
ERROR_GRACE_S = 10.0


class RankFailure(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, conn: Connection, env: dict[str, str]) -> None:
    os.environ.update(env)
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    from collectives import Communicator

    comm = Communicator(timeout=120)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        target, args, kwargs = msg
        try:
            mod, fn = target.split(":")
            result = getattr(importlib.import_module(mod), fn)(comm, *args, **kwargs)
            conn.send(("ok", result))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class World:
    def __init__(self, size: int, env: dict[str, str] | None = None) -> None:
        self.size = size
        ctx = mp.get_context("spawn")
        port = _free_port()
        full_env = {"RES_OPTIONS": "timeout:1 attempts:1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.conns: list[Connection] = []
        self.procs = []
        for r in range(size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, size, port, child, full_env), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, target: str, *args: Any, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
        for c in self.conns:
            c.send((target, args, kwargs))
        results: list[Any] = [None] * self.size
        errors: dict[int, str] = {}
        pending = set(range(self.size))
        deadline = time.monotonic() + timeout
        while pending:
            for r in list(pending):
                if self.conns[r].poll(0.005):
                    try:
                        status, value = self.conns[r].recv()
                    except (EOFError, OSError):
                        status, value = "error", f"rank {r} died (exit code {self.procs[r].exitcode})"
                    pending.discard(r)
                    if status == "ok":
                        results[r] = value
                    else:
                        errors[r] = value
                        # The others may be blocked on the failed rank: give them a grace period, no more.
                        deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
            if pending and time.monotonic() > deadline:
                self.kill()
                if not errors:
                    raise RankFailure(f"{target}: hang: ranks {sorted(pending)} of {self.size} did not finish "
                                      f"within {timeout:.0f} s")
                errors.update({r: "(still blocked after another rank failed; world restarted)" for r in pending})
                break
        if errors:
            raise RankFailure(f"{target} failed on ranks {sorted(errors)} of {self.size}:" +
                              "".join(f"\n--- rank {r} ---\n{e}" for r, e in sorted(errors.items())))
        return results

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)

    def close(self) -> None:
        for c, p in zip(self.conns, self.procs):
            if p.is_alive():
                try:
                    c.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for p in self.procs:
            p.join(10)
        self.kill()


class WorkerPool:
    """Worlds by size, started on first use; at most ``max_live`` kept at once (least recently used goes)."""

    def __init__(self, max_live: int = 3) -> None:
        self.max_live = max_live
        self.worlds: collections.OrderedDict[tuple, World] = collections.OrderedDict()

    def world(self, size: int, env: dict[str, str] | None = None) -> World:
        key = (size, tuple(sorted((env or {}).items())))
        w = self.worlds.get(key)
        if w is not None and not w.alive:
            w.kill()
            del self.worlds[key]
            w = None
        if w is None:
            while len(self.worlds) >= self.max_live:
                _, old = self.worlds.popitem(last=False)
                old.close()
            w = self.worlds[key] = World(size, env)
        self.worlds.move_to_end(key)
        return w

    def run(self, size: int, target: str, *args: Any, env: dict[str, str] | None = None,
            timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
        w = self.world(size, env)
        try:
            return w.run(target, *args, timeout=timeout, **kwargs)
        except RankFailure:
            if not w.alive:
                self.worlds.pop(next(k for k, v in self.worlds.items() if v is w), None)
            raise

    def discard(self, size: int, env: dict[str, str] | None = None) -> None:
        """Close a world whose state a test spoiled on purpose (e.g. by leaving transfers unmatched)."""
        w = self.worlds.pop((size, tuple(sorted((env or {}).items()))), None)
        if w is not None:
            w.close()

    def close(self) -> None:
        while self.worlds:
            _, w = self.worlds.popitem()
            w.close()


if __name__ == "__main__":  # pragma: no cover - manual smoke run
    pool = WorkerPool()
    print(pool.run(int(sys.argv[1]) if len(sys.argv) > 1 else 2, "tests.cases:ping"))
    pool.close()


def run_torchrun(module: str, nproc: int, timeout: float = 900):
    """``torchrun --nproc-per-node nproc -m module`` from the repository root, NVLink multicast off;
    returns the CompletedProcess (GPU tests use it to drive NCCL worlds)."""
    import subprocess

    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "RES_OPTIONS": "timeout:1 attempts:1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", module]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
