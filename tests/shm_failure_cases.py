"""Shared-memory transport cases for failures and clean-up, run inside the worker ranks (see
harness.py): size mismatches, silent, closed and dead peers, set-up that fails, and what is left
behind. Cases return what they observed; tests/test_shm.py judges it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time

import torch
import torch.distributed as dist

from collectives.shm import ShmTransport
from collectives.transport import PeerTimeoutError
from tests.cases import environ
from tests.shm_cases import _same, _transport, payload


def size_mismatch(comm) -> str:
    """Rank 0 sends 100 bytes, rank 1 expects 200: rank 1 raises naming rank 0 and both sizes."""
    t = _transport(comm)
    msg = ""
    try:
        if comm.rank == 0:
            t.post([(1, torch.zeros(100, dtype=torch.uint8))], [])[0][0].wait()
        elif comm.rank == 1:
            w = t.post([], [(0, torch.zeros(50, dtype=torch.float32))])[1][0]
            try:
                w.wait()
                msg = "no error"
            except RuntimeError as e:
                msg = str(e)
            try:
                w.wait()  # the same error again, no hang
                msg += "|no error the second time"
            except RuntimeError:
                pass
        comm.barrier()
    finally:
        t.close()
    return msg


def silent_peer(comm, timeout_s: float) -> str:
    """Rank 0 receives from rank 1, which never sends: rank 0 raises PeerTimeoutError naming rank 1
    within the timeout (rank 1 keeps its transport open meanwhile, so it is silent, not gone)."""
    t = _transport(comm, timeout_s=timeout_s)
    out = "silent"
    try:
        if comm.rank == 0:
            t0 = time.monotonic()
            w = t.post([], [(1, torch.empty(10))])[1][0]
            try:
                w.wait()
                out = "no error"
            except PeerTimeoutError as e:
                out = f"{time.monotonic() - t0:.2f}|{e.peer}|{e}"
        comm.barrier()
    finally:
        t.close()
    return out


def closed_peer(comm, child_s: float) -> str:
    """Rank 1 forks a child that lives ``child_s`` seconds, then closes its transport; rank 0's
    receive from it and its send to it (past the ring) raise ConnectionError naming rank 1 at once,
    not after the timeout nor when the child exits (a forked child drops its copies of the FIFOs)."""
    t = _transport(comm, timeout_s=20, slot_bytes=4096, slots=2)
    out = "closed"
    child = 0
    try:
        if comm.rank == 1:
            child = os.fork()
            if child == 0:
                time.sleep(child_s)
                os._exit(0)
            t.close()
        comm.barrier()
        if comm.rank == 0:
            t0 = time.monotonic()
            msgs = []
            for what, (sends, recvs) in (("receive", ([], [(1, torch.empty(10))])),
                                         ("send", ([(1, torch.empty(10_000))], []))):
                s, rv = t.post(sends, recvs)
                try:
                    (s + rv)[0].wait()
                    msgs.append(f"{what}: no error")
                except ConnectionError as e:
                    msgs.append(f"{what}: {e}")
            out = f"{time.monotonic() - t0:.2f}|" + "\n".join(msgs)
        comm.barrier()
    finally:
        t.close()
        if child:
            os.waitpid(child, 0)
    return out


def early_close(comm) -> list[str]:
    """Rank 1 sends a message that fits the ring and closes its transport before rank 0 receives:
    rank 0 still gets it (returning credits to a sender that has gone is no error); a second
    receive, for a message never sent, fails naming rank 1."""
    slot, slots = 64 << 10, 4  # pieces large enough to return each credit at once
    t = _transport(comm, slot_bytes=slot, slots=slots)
    problems = []
    numel = 3 * slot + 5
    try:
        if comm.rank == 1:
            t.post([(0, payload(1, 0, 0, numel, torch.uint8))], [])[0][0].wait()
            t.close()
        comm.barrier()
        if comm.rank == 0:
            got = torch.empty(numel, dtype=torch.uint8)
            t.post([], [(1, got)])[1][0].wait()
            if not _same(got, payload(1, 0, 0, numel, torch.uint8)):
                problems.append("message from a closed sender differs")
            try:
                t.post([], [(1, got)])[1][0].wait()
                problems.append("a receive nobody sends completed")
            except ConnectionError as e:
                if "rank 1" not in str(e):
                    problems.append(f"unclear error: {e}")
        comm.barrier()
    finally:
        t.close()
    return problems


@contextlib.contextmanager
def _private_base(comm):
    """A fresh TOPOCOMM_SHM_DIR under /dev/shm for one case, shared by its ranks: leftover checks
    then see this case's files only, whatever else runs on the host."""
    name = comm.exchange_json(f"/dev/shm/topocomm-test-{os.getpid()}-{time.time_ns()}" if comm.rank == 0 else "")[0]
    if comm.rank == 0:
        os.mkdir(name, 0o700)
    comm.barrier()
    try:
        with environ("TOPOCOMM_SHM_DIR", name):
            yield name
    finally:
        comm.barrier()
        if comm.rank == 0:
            shutil.rmtree(name, ignore_errors=True)


def leftovers(comm) -> list[str]:
    """Nothing is left under the shared-memory directory once a transport is built, and close()
    gives the fds back."""
    problems = []
    with _private_base(comm) as base:
        fds_before = len(os.listdir("/proc/self/fd"))
        t = _transport(comm)
        fds_open = len(os.listdir("/proc/self/fd"))
        comm.barrier()  # every rank is past its clean-up
        if os.listdir(base):
            problems.append(f"left in {base}: {os.listdir(base)}")
        t.close()
    if fds_open - fds_before != 4 * (comm.size - 1):
        problems.append(f"{fds_open - fds_before} fds opened, expected {4 * (comm.size - 1)}")
    if len(os.listdir("/proc/self/fd")) != fds_before:
        problems.append("close() left fds open")
    try:
        t.post([((comm.rank + 1) % comm.size, torch.zeros(1))], [])
        problems.append("post() after close() did not raise")
    except RuntimeError:
        pass
    t.group = None  # what Communicator.close() does: the process group must be let go
    if t.group is not None or t._fallback.group is not None:
        problems.append("setting group = None kept a reference to the process group")
    return problems


def bad_setup(comm) -> list[str]:
    """Set-up problems raise on every rank alike (nobody is left blocked) and leave nothing behind:
    ranks disagreeing on the slot geometry or on which pairs are local, and one rank failing to
    create its channels. The world is fine afterwards."""
    n, r = comm.size, comm.rank
    problems = []

    def expect(what: str, exc: type[Exception], words: list[str], **kw) -> None:
        try:
            _transport(comm, **kw).close()
            problems.append(f"{what}: no error")
        except exc as e:
            if not all(w in str(e) for w in words):
                problems.append(f"{what}: unclear error: {e}")

    with _private_base(comm) as base:
        expect("geometry", ValueError, ["disagree", "slot"], slot_bytes=4096 * (r + 1))
        local = [True] * n
        if r == 1:
            local[0] = False
        expect("peers_local", ValueError, ["rank 0", "rank 1", "peers_local"], peers_local=local)
        if r == n - 1:
            os.environ["TOPOCOMM_SHM_DIR"] = "/nonexistent-topocomm-test"
        try:
            expect("creation", RuntimeError, [f"rank {n - 1}" if r != n - 1 else "nonexistent-topocomm-test"])
        finally:
            os.environ["TOPOCOMM_SHM_DIR"] = base
        comm.barrier()
        if os.listdir(base):
            problems.append(f"left in {base}: {os.listdir(base)}")
    t = _transport(comm)
    try:
        got = torch.empty(5)
        s, rv = t.post([((r + 1) % n, torch.full((5,), float(r)))], [((r - 1) % n, got)])
        for w in rv + s:
            w.wait()
        if not torch.all(got == (r - 1) % n):
            problems.append(f"exchange after the failures: {got.tolist()}")
    finally:
        t.close()
    return problems


# -- a peer that really dies (its own two processes, not the pool) ------------------------------------------


def death_worker(rank: int, port: int, conn) -> None:
    """Rank 1 dies (os._exit) in the middle of a message larger than the ring; rank 0, waiting on it,
    must raise ConnectionError naming rank 1. Reports (seconds, message) through ``conn``."""
    os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    t = ShmTransport(dist.group.WORLD, timeout=datetime.timedelta(seconds=30), slot_bytes=4096, slots=2)
    numel = 100_000
    if rank == 1:
        t.post([(0, payload(1, 0, 0, numel, torch.uint8))], [])  # fills the ring, no more
        dist.barrier()
        time.sleep(0.2)
        os._exit(3)
    got = torch.empty(numel, dtype=torch.uint8)
    w = t.post([], [(1, got)])[1][0]
    dist.barrier()
    t0 = time.monotonic()
    try:
        w.wait()
        result = "no error"
    except ConnectionError as e:
        result = str(e)
    except BaseException as e:  # noqa: BLE001
        result = f"{type(e).__name__}: {e}"
    conn.send((time.monotonic() - t0, result))
    conn.close()
    os._exit(0)  # the peer is gone: skip process-group teardown
