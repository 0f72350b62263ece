"""Shared-memory transport cases that run inside the worker ranks (see harness.py).

Every case builds its own ``ShmTransport`` over the world (a collective call) and closes it at
the end. What a sender sends is a deterministic function of (src, dst, message index), so each
receiver computes the expected bytes locally. Cases return a list of problems (empty: passed).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import random
import time
import zlib

import torch
import torch.distributed as dist

from collectives.shm import ShmTransport
from collectives.transport import PeerTimeoutError

def _transport(comm, timeout_s: float = 30.0, **kw) -> ShmTransport:
    return ShmTransport(comm.group, timeout=datetime.timedelta(seconds=timeout_s), **kw)


def payload(src: int, dst: int, k: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Message ``k`` from ``src`` to ``dst``: random bytes (any bit pattern, NaNs included) seen as ``dtype``."""
    esize = torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator().manual_seed(1_000_003 * src + 7919 * dst + k)
    return torch.randint(0, 256, (numel * esize,), dtype=torch.uint8, generator=g).view(dtype)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and torch.equal(got.reshape(-1).view(torch.uint8),
                                                   want.reshape(-1).view(torch.uint8))


def _messages(slot: int) -> list[tuple[torch.dtype, int]]:
    """(dtype, numel): empty, 1 byte, 1000 elements, exactly one slot, several slots plus a tail."""
    out = [(torch.uint8, 0), (torch.uint8, 1), (torch.uint8, 3 * slot + 17)]
    for dt in (torch.float32, torch.bfloat16, torch.int64):
        es = torch.empty(0, dtype=dt).element_size()
        out += [(dt, 0), (dt, 1000), (dt, slot // es), (dt, 3 * slot // es + 5)]
    return out


def ring_exchange(comm, slot_bytes: int, slots: int) -> list[str]:
    """Everyone sends to r+1 and receives from r-1: one message at a time, then all at once."""
    n, r = comm.size, comm.rank
    nxt, prv = (r + 1) % n, (r - 1) % n
    t = _transport(comm, slot_bytes=slot_bytes, slots=slots)
    problems = []
    try:
        msgs = _messages(slot_bytes)
        for k, (dt, numel) in enumerate(msgs):  # one at a time, receive waited first
            got = torch.full((numel,), 3, dtype=dt)
            s, rv = t.post([(nxt, payload(r, nxt, k, numel, dt))], [(prv, got)])
            rv[0].wait()
            s[0].wait()
            s[0].wait()  # twice is harmless
            if not _same(got, payload(prv, r, k, numel, dt)):
                problems.append(f"one at a time: message {k} ({dt}, {numel}) differs")
        base = len(msgs)
        sends = [(nxt, payload(r, nxt, base + k, numel, dt)) for k, (dt, numel) in enumerate(msgs)]
        recvs = [(prv, torch.empty(numel, dtype=dt)) for dt, numel in msgs]
        sw, rw = t.post(sends, recvs)  # all at once, waited in reverse order, sends first
        for w in reversed(sw + rw):
            w.wait()
        for k, ((dt, numel), (_, got)) in enumerate(zip(msgs, recvs)):
            if not _same(got, payload(prv, r, base + k, numel, dt)):
                problems.append(f"all at once: message {k} ({dt}, {numel}) differs")
    finally:
        t.close()
        t.close()  # twice is harmless
    return problems


def many_outstanding(comm, count: int, slot_bytes: int, slots: int) -> list[str]:
    """``count`` messages of varied sizes to one peer, each its own post; the receiver posts its
    receives one by one too and waits them in a shuffled order: matched in posting order."""
    n, r = comm.size, comm.rank
    nxt, prv = (r + 1) % n, (r - 1) % n
    t = _transport(comm, slot_bytes=slot_bytes, slots=slots)
    rng = random.Random(42)
    sizes = [rng.choice([1, 7, 100, slot_bytes // 4, slot_bytes, 2 * slots * slot_bytes + 3]) for _ in range(count)]
    problems = []
    try:
        waits, recvs = [], []
        for k, m in enumerate(sizes):
            got = torch.empty(m, dtype=torch.float32)
            recvs.append(got)
            waits += t.post([], [(prv, got)])[1]
            waits += t.post([(nxt, payload(r, nxt, k, m, torch.float32))], [])[0]
        random.Random(r).shuffle(waits)
        for w in waits:
            w.wait()
        for k, (m, got) in enumerate(zip(sizes, recvs)):
            if not _same(got, payload(prv, r, k, m, torch.float32)):
                problems.append(f"message {k} ({m} floats) differs")
    finally:
        t.close()
    return problems


def all_pairs_sends_first(comm, numel: int, slot_bytes: int, slots: int) -> list[str]:
    """Every rank sends a message larger than the ring to every other rank and waits all its
    sends before any receive: progress must come from inside the send waits."""
    n, r = comm.size, comm.rank
    t = _transport(comm, slot_bytes=slot_bytes, slots=slots)
    problems = []
    try:
        peers = [p for p in range(n) if p != r]
        recvs = [(p, torch.empty(numel, dtype=torch.bfloat16)) for p in peers]
        sw, rw = t.post([(p, payload(r, p, 0, numel, torch.bfloat16)) for p in peers], recvs)
        for w in sw:
            w.wait()
        for w in rw:
            w.wait()
        for p, got in recvs:
            if not _same(got, payload(p, r, 0, numel, torch.bfloat16)):
                problems.append(f"from rank {p}: differs")
        # The same with separate posts: each rank posts its sends, waits them, then posts its receives.
        # Only messages that fit the ring can complete before their receive is posted.
        small = slot_bytes * slots // 4
        sw, _ = t.post([(p, payload(r, p, 1, small, torch.uint8)) for p in peers], [])
        for w in sw:
            w.wait()
        recvs = [(p, torch.empty(small, dtype=torch.uint8)) for p in peers]
        for w in t.post([], recvs)[1]:
            w.wait()
        for p, got in recvs:
            if not _same(got, payload(p, r, 1, small, torch.uint8)):
                problems.append(f"eager from rank {p}: differs")
    finally:
        t.close()
    return problems


def mixed_local(comm, numel: int) -> list[str]:
    """Ranks of the same parity talk through shared memory, the others through gloo, in one transport."""
    n, r = comm.size, comm.rank
    local = [p % 2 == r % 2 for p in range(n)]
    t = _transport(comm, peers_local=local, slot_bytes=4096, slots=2)
    problems = []
    try:
        want_local = tuple(p for p in range(n) if p != r and local[p])
        if t.local_peers != want_local:
            problems.append(f"local peers {t.local_peers}, expected {want_local}")
        peers = [p for p in range(n) if p != r]
        for rounds in range(2):
            recvs = [(p, torch.empty(numel + p, dtype=torch.float32)) for p in peers]
            sw, rw = t.post([(p, payload(r, p, rounds, numel + r, torch.float32)) for p in peers], recvs)
            for w in (sw + rw if rounds == 0 else rw + sw):
                w.wait()
            for p, got in recvs:
                if not _same(got, payload(p, r, rounds, numel + p, torch.float32)):
                    problems.append(f"round {rounds}: from rank {p} ({'shm' if local[p] else 'gloo'}) differs")
        problems += _collectives(comm, t, ("ring", "direct"), [1000 * n + 3], seg=1024)
    finally:
        t.close()
    return problems


def progress_during_gloo_wait(comm, numel: int) -> list[str]:
    """Ranks 0 and 2 share memory, rank 1 is remote to both. Rank 0 posts a shared-memory send
    larger than the ring to rank 2 and a gloo receive from rank 1, and waits the gloo one first;
    rank 1 sends only after hearing from rank 2, which needs rank 0's message first. Gloo alone
    would finish (its sends move in the background); so must we: the gloo wait keeps shared
    memory moving."""
    r = comm.rank
    t = _transport(comm, timeout_s=20, peers_local=[p % 2 == r % 2 for p in range(comm.size)],
                   slot_bytes=4096, slots=2)
    problems = []
    try:
        big = payload(0, 2, 0, numel, torch.float32)
        token = torch.zeros(4)
        if r == 0:
            sw, _ = t.post([(2, big)], [])
            _, rw = t.post([], [(1, token)])
            rw[0].wait()
            sw[0].wait()
        elif r == 1:
            t.post([], [(2, token)])[1][0].wait()
            t.post([(0, token + 1)], [])[0][0].wait()
        elif r == 2:
            got = torch.empty(numel)
            t.post([], [(0, got)])[1][0].wait()
            if not _same(got, big):
                problems.append("the shared-memory message differs")
            t.post([(1, torch.full((4,), 7.0))], [])[0][0].wait()
        if r in (0, 1) and not torch.all(token == (8.0 if r == 0 else 7.0)):
            problems.append(f"token {token.tolist()}")
    finally:
        t.close()
    return problems


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


# -- the library's collectives on the shared-memory transport ----------------------------------------------


def _input(rank: int, numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randint(-4, 5, (numel,), generator=g).to(dtype)  # small integers: every partial sum is exact


def _collectives(comm, t: ShmTransport, algos, counts, seg: int | None = None) -> list[str]:
    """all_reduce / reduce_scatter / all_gather with ``t`` swapped in as the executor's transport,
    against a float64 reference built from every rank's deterministic input."""
    n, r = comm.size, comm.rank
    ex = comm._executor
    old, old_seg = ex.transport, ex.max_segment_bytes
    problems = []
    ex.transport = t
    if seg is not None:
        ex.max_segment_bytes = seg
    try:
        for algo in algos:
            for count in counts:
                for dt in (torch.float32, torch.bfloat16):
                    seed = zlib.crc32(f"{algo}/{count}/{dt}".encode()) % 1000
                    ins = [_input(q, count, dt, seed) for q in range(n)]
                    total = torch.stack([x.double() for x in ins]).sum(0)
                    x = ins[r].clone()
                    comm.all_reduce(x, algorithm=algo)
                    if not torch.equal(x.double(), total):
                        problems.append(f"all_reduce {algo} {count} {dt}: wrong")
                    if algo == "tree":
                        continue
                    m = count // n
                    out = torch.empty(m, dtype=dt)
                    comm.reduce_scatter(out, ins[r][:m * n].clone(), algorithm=algo)
                    if not torch.equal(out.double(), total[r * m:(r + 1) * m]):
                        problems.append(f"reduce_scatter {algo} {count} {dt}: wrong")
                    gathered = torch.empty(m * n, dtype=dt)
                    comm.all_gather(gathered, ins[r][:m].clone(), algorithm=algo)
                    if not torch.equal(gathered, torch.cat([x[:m] for x in ins])):
                        problems.append(f"all_gather {algo} {count} {dt}: wrong")
        for count in [c for c in counts if c <= 100_000]:  # rooted collectives and all-to-all, small counts
            ins = [_input(q, count * n, torch.float32, 7) for q in range(n)]
            total = torch.stack([x.double() for x in ins]).sum(0)
            for algo in ("ring", "tree"):
                x = ins[r].clone()
                comm.broadcast(x, src=n - 1, algorithm=algo)
                if not torch.equal(x, ins[n - 1]):
                    problems.append(f"broadcast {algo} {count}: wrong")
                x = ins[r].clone()
                comm.reduce(x, dst=0, algorithm=algo)
                if not torch.equal(x.double() if r == 0 else x, total if r == 0 else ins[r]):
                    problems.append(f"reduce {algo} {count}: wrong")
            out = torch.empty(count * n)
            comm.all_to_all(out, ins[r].clone(), algorithm="pairwise")
            if not torch.equal(out, torch.cat([x[r * count:(r + 1) * count] for x in ins])):
                problems.append(f"all_to_all pairwise {count}: wrong")
    finally:
        ex.transport, ex.max_segment_bytes = old, old_seg
    return problems


def collectives(comm, algos, counts, slot_bytes: int, slots: int, seg: int | None = None) -> list[str]:
    t = _transport(comm, slot_bytes=slot_bytes, slots=slots)
    try:
        return _collectives(comm, t, algos, counts, seg)
    finally:
        t.close()


@contextlib.contextmanager
def _private_base(comm):
    """A fresh TOPOCOMM_SHM_DIR under /dev/shm for one case, shared by its ranks: leftover checks
    then see this case's files only, whatever else runs on the host."""
    name = comm.exchange_json(f"/dev/shm/topocomm-test-{os.getpid()}-{time.time_ns()}" if comm.rank == 0 else "")[0]
    if comm.rank == 0:
        os.mkdir(name, 0o700)
    comm.barrier()
    old = os.environ.get("TOPOCOMM_SHM_DIR")
    os.environ["TOPOCOMM_SHM_DIR"] = name
    try:
        yield name
    finally:
        if old is None:
            os.environ.pop("TOPOCOMM_SHM_DIR", None)
        else:
            os.environ["TOPOCOMM_SHM_DIR"] = old
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


def communicator_transports(comm, slots_env: str | None) -> dict:
    """A fresh Communicator on this group: which transport its collectives and its point-to-point
    calls use, whether an all-reduce is right, and the warnings set-up gave. ``slots_env`` is put in
    TOPOCOMM_SHM_SLOTS for the construction (an invalid value makes shared memory unavailable)."""
    import warnings

    from collectives import Communicator

    old = os.environ.get("TOPOCOMM_SHM_SLOTS")
    if slots_env is not None:
        os.environ["TOPOCOMM_SHM_SLOTS"] = slots_env
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = Communicator(comm.group, timeout=30)
    finally:
        if old is None:
            os.environ.pop("TOPOCOMM_SHM_SLOTS", None)
        else:
            os.environ["TOPOCOMM_SHM_SLOTS"] = old
    try:
        t = torch.arange(1000, dtype=torch.float64) * (comm.rank + 1)
        c.all_reduce(t, algorithm="ring")
        want = torch.arange(1000, dtype=torch.float64) * sum(range(1, comm.size + 1))
        return {"collectives": type(c._executor.transport).__name__, "p2p": type(c._p2p).__name__,
                "right": bool(torch.equal(t, want)), "warnings": [str(w.message) for w in caught]}
    finally:
        c.close()
