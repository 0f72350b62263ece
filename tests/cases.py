"""Test cases that run inside the worker ranks (see harness.py).

Every rank builds every rank's input deterministically, so each rank computes
the expected result locally (in float64 / int64) and checks its own output
against it: the reference is independent of the code under test.

Inputs are small integers (sum/avg: -4..4, max/min: -50..50, prod: +-1 with one
factor 2 per element), so every partial result is exact in every dtype,
float16 and bfloat16 included, and results can be compared exactly whatever
order the algorithm reduces in; only "avg" needs a tolerance (one rounding of
the final division).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int32": torch.int32, "int64": torch.int64,
          "int8": torch.int8, "uint8": torch.uint8}
_BLOCKED_IN = {"reduce_scatter", "all_to_all"}  # input holds a block per rank


@contextlib.contextmanager
def environ(key: str, value: str | None) -> Iterator[None]:
    """``os.environ[key] = value`` inside the block (None: left as it is), then as it was before."""
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def ping(comm) -> tuple[int, int]:
    return comm.rank, comm.size


def make_input(dtype: torch.dtype, op: str, numel: int, rank: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    unsigned = dtype == torch.uint8
    if op == "prod":
        sign = torch.ones(numel, dtype=torch.int64) if unsigned else torch.randint(0, 2, (numel,), generator=g) * 2 - 1
        two = (torch.arange(numel) + rank) % size == 0
        vals = sign * torch.where(two, 2, 1)
    elif op in ("max", "min"):
        lo = 0 if unsigned else -50
        vals = torch.randint(lo, 51, (numel,), generator=g)
    else:
        vals = torch.randint(0 if unsigned else -4, 5, (numel,), generator=g)
    return vals.to(dtype)


def _reduce(stack: torch.Tensor, op: str, dtype: torch.dtype) -> torch.Tensor:
    wide = stack.double() if dtype.is_floating_point else stack.long()
    if op in ("sum", "avg"):
        r = wide.sum(0)
        if op == "avg":
            r = r / stack.shape[0]
    elif op == "prod":
        r = wide.prod(0)
    elif op == "max":
        r = wide.max(0).values
    else:
        r = wide.min(0).values
    return r.to(dtype)


def expected(coll: str, dtype: torch.dtype, op: str, count: int, rank: int, size: int, root: int,
             seed: int) -> torch.Tensor:
    numel_in = count * size if coll in _BLOCKED_IN else count
    inputs = torch.stack([make_input(dtype, op, numel_in, r, size, seed) for r in range(size)])
    if coll == "all_reduce":
        return _reduce(inputs, op, dtype)
    if coll == "reduce_scatter":
        return _reduce(inputs, op, dtype)[rank * count:(rank + 1) * count]
    if coll == "all_gather":
        return inputs.reshape(-1)
    if coll == "broadcast":
        return inputs[root]
    if coll == "reduce":
        return _reduce(inputs, op, dtype) if rank == root else inputs[rank]
    if coll == "all_to_all":
        return inputs[:, rank * count:(rank + 1) * count].reshape(-1)
    raise ValueError(coll)


def run_one(comm, coll: str, algorithm: str, dtype: torch.dtype, op: str, count: int, root: int,
            seed: int, in_place: bool = False) -> torch.Tensor:
    """Run one collective on this rank's input; return what the caller sees as the result."""
    size, rank = comm.size, comm.rank
    numel_in = count * size if coll in _BLOCKED_IN else count
    dev = comm.device
    x = make_input(dtype, op, numel_in, rank, size, seed).to(dev)
    kw = {"algorithm": algorithm}
    if coll == "all_reduce":
        comm.all_reduce(x, op=op, **kw)
        return x
    if coll == "reduce":
        comm.reduce(x, dst=root, op=op, **kw)
        return x
    if coll == "broadcast":
        comm.broadcast(x, src=root, **kw)
        return x
    if coll == "reduce_scatter":
        out = x[rank * count:(rank + 1) * count] if in_place else torch.empty(count, dtype=dtype, device=dev)
        comm.reduce_scatter(out, x, op=op, **kw)
        return out.clone()
    if coll == "all_gather":
        if in_place:
            out = torch.empty(count * size, dtype=dtype, device=dev)
            out[rank * count:(rank + 1) * count].copy_(x)
            comm.all_gather(out, out[rank * count:(rank + 1) * count], **kw)
        else:
            out = torch.empty(count * size, dtype=dtype, device=dev)
            comm.all_gather(out, x, **kw)
        return out
    if coll == "all_to_all":
        out = torch.empty(count * size, dtype=dtype, device=dev)
        comm.all_to_all(out, x, **kw)
        return out
    raise ValueError(coll)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _close(got: torch.Tensor, want: torch.Tensor, op: str) -> bool:
    if op == "avg":
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(want.dtype, 1e-6)
        return torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
    return torch.equal(got, want)


def sweep(comm, cases: list[tuple]) -> list[tuple[str, str | None]]:
    """Run cases (coll, algorithm, dtype name, op, count, root, seed, in_place).

    Returns per case (error message or "", digest of an all-reduce result or None).
    """
    out: list[tuple[str, str | None]] = []
    default_segment = comm._executor.max_segment_bytes
    for coll, algo, dt, op, count, root, seed, in_place in cases:
        dtype = DTYPES[dt]
        # Small cases run with tiny segments so the multi-segment paths are exercised too.
        comm._executor.max_segment_bytes = 256 if count <= 1000 else default_segment
        try:
            got = run_one(comm, coll, algo, dtype, op, count, root, seed, in_place).cpu()
            want = expected(coll, dtype, op, count, comm.rank, comm.size, root, seed)
            if got.dtype != want.dtype or got.shape != want.shape:
                err = f"shape/dtype {tuple(got.shape)}/{got.dtype}, expected {tuple(want.shape)}/{want.dtype}"
            elif not _close(got, want, op):
                bad = (got.double() != want.double()).nonzero()
                err = f"{bad.numel()} wrong elements, first at {bad[0].item() if bad.numel() else '?'}"
            else:
                err = ""
            out.append((err, _digest(got) if coll == "all_reduce" else None))
        except Exception as e:  # noqa: BLE001 - report per case; a raising case must raise on all ranks alike
            out.append((f"raised {type(e).__name__}: {e}", None))
    comm._executor.max_segment_bytes = default_segment
    return out


def launched_main(run_all) -> None:
    """Run ``run_all(comm)`` on a world started by a launcher (torchrun: the CUDA tests), print one line
    per rank, and exit 1 on any problem."""
    import sys

    import collectives

    comm = collectives.init(timeout=120)
    found = run_all(comm)
    print(f"rank {comm.rank} on {comm.device} ({comm.backend}): " + ("ok" if not found else "; ".join(found)),
          flush=True)
    collectives.shutdown()
    sys.exit(1 if found else 0)


def wrong_error(name: str, exc: type[Exception], call) -> str | None:
    """None when ``call()`` raises ``exc`` with ``name`` in its message; else what happened instead."""
    try:
        call()
        return f"{name}: no error"
    except exc as e:
        return None if name in str(e) else f"{name}: message does not name it: {e}"
    except Exception as e:  # noqa: BLE001
        return f"{name}: raised {type(e).__name__} instead of {exc.__name__}: {e}"


def bad_inputs(comm) -> list[str]:
    """Try each bad call; return a description of each one that did not fail as promised.

    Every bad call must raise ValueError/TypeError naming its argument before
    any byte moves; afterwards the communicator must still work.
    """
    n = comm.size
    f = torch.zeros(4 * n)
    i = torch.zeros(4 * n, dtype=torch.int32)
    nc = torch.zeros(4 * n, 2).t()  # non-contiguous
    bad = [
        ("t", TypeError, lambda: comm.all_reduce([1.0, 2.0])),
        ("t", ValueError, lambda: comm.all_reduce(nc)),
        ("t", TypeError, lambda: comm.all_reduce(torch.zeros(3, dtype=torch.complex64))),
        ("t", ValueError, lambda: comm.all_reduce(torch.zeros(3, device="meta"))),
        ("op", ValueError, lambda: comm.all_reduce(f, op="median")),
        ("op", ValueError, lambda: comm.all_reduce(i, op="avg")),
        ("op", ValueError, lambda: comm.all_reduce(f, op=torch.distributed.ReduceOp.BAND)),
        ("algorithm", ValueError, lambda: comm.all_reduce(f, algorithm="bogus")),
        ("algorithm", ValueError, lambda: comm.all_reduce(f, algorithm="pairwise")),
        ("algorithm", TypeError, lambda: comm.all_reduce(f, algorithm=3)),
        ("out", ValueError, lambda: comm.reduce_scatter(torch.zeros(5), torch.zeros(4 * n))),
        ("inp", TypeError, lambda: comm.reduce_scatter(torch.zeros(4), torch.zeros(4 * n, dtype=torch.float64))),
        ("out", ValueError, lambda: comm.all_gather(torch.zeros(4 * n + 1), torch.zeros(4))),
        ("inp", ValueError, lambda: comm.all_gather(torch.zeros(4 * n), nc[:4, 0])),
        ("src", ValueError, lambda: comm.broadcast(f, src=n)),
        ("src", ValueError, lambda: comm.broadcast(f, src=-1)),
        ("src", TypeError, lambda: comm.broadcast(f, src="0")),
        ("dst", ValueError, lambda: comm.reduce(f, dst=n + 3)),
        ("dst", ValueError, lambda: comm.send(f, dst=comm.rank)),
        ("src", ValueError, lambda: comm.recv(f, src=n)),
        ("inp", TypeError, lambda: comm.all_to_all(torch.zeros(4 * n), torch.zeros(4 * n, dtype=torch.int64))),
        ("inp", ValueError, lambda: comm.all_to_all(torch.zeros(4 * n), torch.zeros(4 * n + 4))),
        ("nbytes", ValueError, lambda: comm.plan("all_reduce", -1)),
        ("compress", ValueError, lambda: comm.all_reduce(f, compress="int4")),
        ("compress", ValueError, lambda: comm.all_reduce(i, compress="bf16")),
        ("compress", ValueError, lambda: comm.all_reduce(torch.zeros(4, dtype=torch.float16), compress="fp16")),
        ("src", TypeError, lambda: comm.broadcast(f, src=True)),
        ("dst", TypeError, lambda: comm.reduce(f, dst=1.0)),
        ("out", ValueError, lambda: comm.all_gather(nc, f[:4])),
        ("inp", ValueError, lambda: comm.reduce_scatter(torch.zeros(2), nc)),
        ("op", ValueError, lambda: comm.reduce_scatter(torch.zeros(4, dtype=torch.int64),
                                                       torch.zeros(4 * n, dtype=torch.int64), op="avg")),
        ("op", ValueError, lambda: comm.reduce(torch.zeros(4, dtype=torch.int64), op="avg")),
        ("op", ValueError, lambda: comm.all_reduce(f, op=None)),
        ("out", TypeError, lambda: comm.all_to_all(None, f)),
        ("t", TypeError, lambda: comm.isend("tensor", dst=0)),
        ("src", ValueError, lambda: comm.irecv(f, src=n + 1)),
        ("dst", ValueError, lambda: comm.isend(f, dst=comm.rank)),
        ("nbytes", ValueError, lambda: comm.plan("all_reduce", 1.5)),
        ("nbytes", ValueError, lambda: comm.plan("all_reduce", True)),
        ("algorithm", ValueError, lambda: comm.broadcast(f, algorithm="halving_doubling")),
        ("algorithm", ValueError, lambda: comm.all_gather(torch.zeros(4 * n), f[:4].clone(), algorithm="tree")),
        ("algorithm", ValueError, lambda: comm.all_to_all(torch.zeros(4 * n), f.clone(), algorithm="ring")),
        ("t", ValueError, lambda: comm.all_reduce(torch.zeros(4).to_sparse())),
        ("inp", ValueError, lambda: comm.all_gather(f, f[1:5])),
        ("op", ValueError, lambda: comm.plan("allreduce", 1024)),
    ]
    if n > 1:
        bad.append(("inp", ValueError, lambda: comm.all_to_all(torch.zeros(n + 1), torch.zeros(n + 1))))
        bad.append(("out", ValueError, lambda: comm.reduce_scatter(f[1:5], f)))  # out overlaps inp, not its block
    problems = [p for name, exc, call in bad if (p := wrong_error(name, exc, call)) is not None]
    x = torch.ones(5)
    comm.all_reduce(x)
    if not torch.equal(x, torch.full((5,), float(n))):
        problems.append("communicator unusable after bad inputs")
    return problems


def async_and_p2p(comm) -> list[str]:
    """Queued async collectives finish in order; send/recv around a ring."""
    n, r = comm.size, comm.rank
    problems = []
    xs = [torch.full((1000 + k,), float(r + k)) for k in range(4)]
    hs = [comm.all_reduce(x, algorithm=("ring", "native")[k % 2], async_op=True) for k, x in enumerate(xs)]
    y = torch.full((3,), float(r))
    comm.broadcast(y, src=n - 1)  # a blocking call after queued async ones
    for k, (x, h) in enumerate(zip(xs, hs)):
        got = h.wait()
        want = float(sum(range(n)) + n * k)
        if got is not x or not torch.all(x == want):
            problems.append(f"async all_reduce {k}: got {x[:3].tolist()}, want {want}")
    if not torch.all(y == n - 1):
        problems.append(f"broadcast after async: {y.tolist()}")
    if n > 1:
        out = torch.arange(10, dtype=torch.float64) + 100 * r
        got = torch.empty(10, dtype=torch.float64)
        rh = comm.irecv(got, (r - 1) % n)
        sh = comm.isend(out, (r + 1) % n)
        rh.wait()
        sh.wait()
        if not torch.equal(got, torch.arange(10, dtype=torch.float64) + 100 * ((r - 1) % n)):
            problems.append(f"isend/irecv ring: {got.tolist()}")
        if r == 0:
            comm.send(torch.tensor([7, 8], dtype=torch.int64), dst=n - 1)
        if r == n - 1:
            t = comm.recv(torch.zeros(2, dtype=torch.int64), src=0)
            if t.tolist() != [7, 8]:
                problems.append(f"send/recv: {t.tolist()}")
    comm.barrier()
    return problems


def async_errors(comm) -> list[str]:
    """A failed asynchronous call raises once: from its Handle if waited, else from the next blocking call."""
    problems = []

    def boom() -> None:
        raise RuntimeError("injected failure")

    x = torch.ones(8)
    h = comm._dispatch(boom, x, (x,), async_op=True)
    try:
        h.wait()
        problems.append("Handle.wait() of a failed call returned")
    except RuntimeError as e:
        if "injected" not in str(e):
            problems.append(f"Handle.wait() raised something else: {e}")
    try:
        comm.all_reduce(x)  # the failure was reported already: this call must just work
    except RuntimeError as e:
        problems.append(f"a blocking call after a waited failure raised it again: {e}")
    comm._dispatch(boom, x, (x,), async_op=True)  # never waited: must not be lost
    try:
        comm.all_reduce(x)
        problems.append("a failure nobody waited for was lost")
    except RuntimeError as e:
        if "injected" not in str(e):
            problems.append(f"the unwaited failure surfaced as something else: {e}")
    comm.all_reduce(x)  # and only once
    if not torch.all(x == comm.size ** 2):
        problems.append(f"all_reduce after the failures: {x.tolist()}")
    return problems


def closed_communicator(comm) -> list[str]:
    """A closed Communicator lets go of its group and refuses further calls with a clear error."""
    from collectives import Communicator

    problems = []
    other = Communicator(comm.group, topology=comm.topology)
    x = torch.ones(4)
    other.all_reduce(x, algorithm="ring")
    other.close()
    other.close()  # twice is harmless
    if other.group is not None:
        problems.append("close() kept a reference to the process group")
    for name, call in (("all_reduce", lambda: other.all_reduce(x)), ("barrier", other.barrier),
                       ("exchange_json", lambda: other.exchange_json(1))):
        try:
            call()
            problems.append(f"{name} on a closed Communicator returned")
        except RuntimeError as e:
            if "closed" not in str(e):
                problems.append(f"{name} on a closed Communicator: unclear error {e}")
    comm.all_reduce(x)  # the group itself is still fine for everyone else
    if not torch.all(x == comm.size * comm.size):
        problems.append(f"all_reduce on the open communicator afterwards: {x.tolist()}")
    return problems


def mismatch(comm) -> str:
    """Under TOPOCOMM_DEBUG=1, ranks calling different collectives all raise a clear error."""
    from collectives import CollectiveMismatchError

    x = torch.zeros(10 + comm.rank if comm.rank % 2 else 10)
    try:
        comm.all_reduce(x)
    except CollectiveMismatchError as e:
        return str(e)
    return "no error"


def compressed(comm, algorithm: str, numel: int, wire: str) -> tuple[str, str]:
    """Compressed all-reduce and reduce-scatter of float32 data against a float64 reference.

    Bound checked per element: |got - exact| <= (hops + 1) * u * sum_i |x_i|, with u the
    wire format's unit roundoff (2^-8 bf16, 2^-11 fp16) and hops the world size (the
    most roundings a partial sum sees on any of our schedules); and the normwise
    relative error <= 1e-2. Returns (problem or "", digest of the all-reduce result).
    """
    n, r = comm.size, comm.rank
    u = {"bf16": 2.0**-8, "fp16": 2.0**-11}[wire]
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64) for k in range(n)]
    exact = torch.stack(xs).sum(0)
    bound = (n + 1) * u * torch.stack(xs).abs().sum(0)
    t = xs[r].float().to(comm.device)
    comm.all_reduce(t, algorithm=algorithm, compress=wire)
    got = t.cpu().double()
    problems = []
    err = (got - exact).abs()
    if not torch.all(err <= bound):
        problems.append(f"all_reduce: error {err.max().item():.3g} above the bound")
    rel = (err.norm() / exact.norm()).item()
    if rel > 1e-2:
        problems.append(f"all_reduce: relative error {rel:.3g} > 1e-2")
    if algorithm in ("ring", "direct", "halving_doubling", "native") and numel % n == 0:
        out = torch.empty(numel // n, device=comm.device)
        comm.reduce_scatter(out, xs[r].float().to(comm.device), algorithm=algorithm, compress=wire)
        m = numel // n
        e2 = (out.cpu().double() - exact[r * m:(r + 1) * m]).abs()
        if not torch.all(e2 <= bound[r * m:(r + 1) * m]):
            problems.append(f"reduce_scatter: error {e2.max().item():.3g} above the bound")
    return "; ".join(problems), _digest(t.cpu())


def dead_peer(comm, timeout_s: float) -> str:
    """The last rank stops answering; the others must raise within the timeout, naming it."""
    import time

    from collectives import Communicator

    sub = Communicator(timeout=timeout_s)
    if comm.rank == comm.size - 1:
        time.sleep(timeout_s * 2 + 1)  # alive but silent: from the others' view, a dead peer
        return "silent"
    t0 = time.monotonic()
    try:
        sub.all_reduce(torch.ones(100), algorithm="ring")
    except TimeoutError as e:
        return f"{time.monotonic() - t0:.2f}|{e}"
    return "no error"


def forced_pipeline(comm, value: str) -> dict:
    """A fresh Communicator made with TOPOCOMM_PIPELINE=value: the depth it picks for a pipelined and a
    plain schedule, and whether a chain broadcast and a tree all-reduce in that many parts are right;
    or the error the construction raised."""
    from collectives import Communicator
    from collectives.schedule import Collective

    with environ("TOPOCOMM_PIPELINE", value):
        try:
            c = Communicator(comm.group, timeout=30)
        except ValueError as e:
            return {"error": str(e)}
    try:
        depths = {"broadcast/ring": c._select(Collective.BROADCAST, 1 << 20, torch.float32, "ring")[1],
                  "all_gather/ring": c._select(Collective.ALL_GATHER, 1 << 20, torch.float32, "ring")[1]}
        b = torch.arange(1001, dtype=torch.float64) * (comm.rank + 1)
        c.broadcast(b, src=comm.size - 1, algorithm="ring")
        t = torch.arange(1001, dtype=torch.float64) * (comm.rank + 1)
        c.all_reduce(t, algorithm="tree")
        want = torch.arange(1001, dtype=torch.float64)
        return {"depths": depths, "broadcast": bool(torch.equal(b, want * comm.size)),
                "all_reduce": bool(torch.equal(t, want * sum(range(1, comm.size + 1))))}
    finally:
        c.close()
