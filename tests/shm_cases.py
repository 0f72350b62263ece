"""Shared-memory transport cases that run inside the worker ranks (see harness.py).

Every case builds its own ``ShmTransport`` over the world (a collective call) and closes it at
the end. What a sender sends is a deterministic function of (src, dst, message index), so each
receiver computes the expected bytes locally. Cases return a list of problems (empty: passed).
"""

from __future__ import annotations

import datetime
import random
import zlib

import torch

from collectives.shm import ShmTransport
from tests.cases import environ


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


def communicator_transports(comm, slots_env: str | None) -> dict:
    """A fresh Communicator on this group: which transport its collectives and its point-to-point
    calls use, whether an all-reduce is right, and the warnings set-up gave. ``slots_env`` is put in
    TOPOCOMM_SHM_SLOTS for the construction (an invalid value makes shared memory unavailable)."""
    import warnings

    from collectives import Communicator

    with environ("TOPOCOMM_SHM_SLOTS", slots_env), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = Communicator(comm.group, timeout=30)
    try:
        t = torch.arange(1000, dtype=torch.float64) * (comm.rank + 1)
        c.all_reduce(t, algorithm="ring")
        want = torch.arange(1000, dtype=torch.float64) * sum(range(1, comm.size + 1))
        return {"collectives": type(c._executor.transport).__name__, "p2p": type(c._p2p).__name__,
                "right": bool(torch.equal(t, want)), "warnings": [str(w.message) for w in caught]}
    finally:
        c.close()
