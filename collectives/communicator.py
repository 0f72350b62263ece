"""Communicator: op -> plan -> schedule -> execute (or native).

A Communicator wraps a torch.distributed ProcessGroup. Each collective call
checks its arguments (before any byte moves), picks the algorithm (the
caller's, ``TOPOCOMM_ALGO``'s, or the cost model's), builds the cached
Schedule and runs it on the executor, or calls the backend's own collective
for ``native``.

[Note: ordering] Collectives on one communicator run in call order on every
rank. On CPU an ``async_op=True`` call runs on the communicator's single
worker thread; a later blocking call first waits for the queued ones. On CUDA
every call is enqueued on the communicator's own stream, which waits for the
caller's current stream; a blocking call makes the caller's stream wait for
it, and ``Handle.wait()`` does the same for an asynchronous one. No host
synchronisation happens inside a collective on CUDA.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from . import algorithms
from .execute import Executor, default_segment_bytes, run_collective
from .graphs import GraphCache
from .native import _all_gather, run_native, start_native
from .ops import Reduction
from .schedule import Collective
from .transport import TorchTransport
from .validate import check_compress, check_no_alias, check_op, check_pair, check_rank, check_tensor

AUTO = "auto"

# Every open Communicator, so shutdown() can release their CUDA graphs before the process group goes:
# destroy_process_group() was seen to hang on NCCL while graphs that captured its kernels were alive.
_OPEN: weakref.WeakSet[Communicator] = weakref.WeakSet()


class CollectiveMismatchError(RuntimeError):
    """Ranks called different collectives (raised on every rank under TOPOCOMM_DEBUG=1)."""


class Handle:
    """The result of an ``async_op=True`` call, ``isend`` or ``irecv``; ``wait()`` returns the tensor."""

    def __init__(self, result: torch.Tensor | None, future: Future | None = None,
                 event: torch.cuda.Event | None = None, waits: list | None = None,
                 on_error: Callable[[Future], None] | None = None) -> None:
        self._result, self._future, self._event, self._waits = result, future, event, waits
        self._on_error = on_error

    def wait(self, timeout: float | None = None) -> torch.Tensor | None:
        if self._future is not None:
            try:
                self._future.result(timeout)
            except Exception:
                if self._future.done() and self._on_error is not None:
                    self._on_error(self._future)  # raised here: later calls need not raise it again
                raise
        if self._waits:
            for w in self._waits:
                w.wait()
            self._waits = None
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        return self._result

    def is_completed(self) -> bool:
        if self._future is not None:
            return self._future.done()
        if self._event is not None:
            return self._event.query()
        return self._waits is None


def _parse_pipeline(text: str) -> int | None:
    """``TOPOCOMM_PIPELINE=K``: every pipelined schedule runs in K parts (unset or empty: the model's depth)."""
    if not text.strip():
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"TOPOCOMM_PIPELINE: expected a whole number of parts >= 1, got {text!r}")
    return k


def _parse_overrides(text: str) -> dict[Collective, str]:
    """``TOPOCOMM_ALGO=all_reduce:ring,all_gather:native`` -> {collective: algorithm}."""
    out: dict[Collective, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        op, sep, name = item.partition(":")
        try:
            coll = Collective(op.strip())
        except ValueError:
            raise ValueError(f"TOPOCOMM_ALGO: unknown collective {op!r} in {text!r}") from None
        if not sep or name.strip() not in algorithms.supported(coll):
            raise ValueError(f"TOPOCOMM_ALGO: {item!r}: {coll.value} supports {', '.join(algorithms.supported(coll))}")
        out[coll] = name.strip()
    return out


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    return datetime.timedelta(seconds=float(timeout))


class Communicator:
    def __init__(self, group: dist.ProcessGroup | None = None, *,
                 timeout: float | datetime.timedelta | None = None,
                 max_segment_bytes: int | None = None, topology=None, profile=None) -> None:
        self.timeout = _as_timedelta(timeout)
        transport = self._connect(group)
        seg = max_segment_bytes or default_segment_bytes(self.backend)
        self._executor = Executor(transport, seg)
        self._overrides = _parse_overrides(os.environ.get("TOPOCOMM_ALGO", ""))
        self._pipeline = _parse_pipeline(os.environ.get("TOPOCOMM_PIPELINE", ""))
        self._debug = os.environ.get("TOPOCOMM_DEBUG", "") not in ("", "0")
        self._seq = 0
        self._closed = False
        self._worker: ThreadPoolExecutor | None = None
        self._pending: collections.deque[Future] = collections.deque()
        from .model import CostModel
        from .topology import Topology

        self.topology = topology if topology is not None else Topology.detect(self)
        self.model = CostModel(self.topology, backend=self.backend, profile=profile, segment_bytes=seg)
        self._nodes = tuple(tuple(n) for n in self.topology.nodes)
        self._p2p = transport  # point-to-point calls: [Note: shared memory between local ranks]
        if self.backend == "gloo" and self.size > 1 and os.environ.get("TOPOCOMM_SHM", "1") not in ("0", ""):
            from .shm import shared_memory  # [Note: shared memory between local ranks] in shm.py

            self._executor.transport = shared_memory(self, transport)
        self._nvlink_tried = False
        _OPEN.add(self)

    @property
    def nvlink_direct(self) -> bool:
        """Whether direct all-reduce and reduce-scatter run as the NVLink kernel ([Note: NVLink direct]);
        known after the first of them (False before)."""
        return self._executor.nvlink is not None

    @property
    def segment_bytes(self) -> int:
        """The most bytes one message of our schedules carries: larger transfers are cut into segments."""
        return self._executor.max_segment_bytes

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    # -- the backend (overridden by collectives.mpi.MpiCommunicator) ----------

    def _connect(self, group: dist.ProcessGroup | None) -> TorchTransport:
        """Bind to ``group``: set group, rank, size, backend, device, stream; return the executor's transport."""
        if not dist.is_initialized():
            raise RuntimeError("Communicator: torch.distributed is not initialised; call collectives.init() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the group")
        self.backend = str(dist.get_backend(self.group)).lower()
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self._stream: torch.cuda.Stream | None = torch.cuda.Stream(self.device)
            self._graphs: GraphCache | None = GraphCache(self._stream)
        else:
            self.device = torch.device("cpu")
            self._stream = None
            self._graphs = None
        return TorchTransport(self.group, self.timeout)

    def _run_native(self, coll: Collective, red: Reduction | None, out: torch.Tensor,
                    inp: torch.Tensor | None, root: int | None, wire: torch.dtype | None) -> None:
        try:
            run_native(coll, self.group, self.backend, red, out, inp, root, wire)
        except RuntimeError as e:
            raise self._native_failure(coll, e) from e

    def _native_failure(self, coll: Collective, e: RuntimeError) -> Exception:
        """The backend's own message names no rank: say what was running."""
        kind = TimeoutError if "timed out" in str(e).lower() else RuntimeError
        return kind(f"rank {self.rank}: native {coll.value} over {self.size} ranks failed: a rank stopped "
                    f"answering, died, or made a different call ({e})")

    # -- planning ----------------------------------------------------------

    def plan(self, op: str, nbytes: int, dtype: torch.dtype = torch.float32, *, streamed: bool = False):
        """The algorithm ``auto`` would run for ``op`` on ``nbytes``, with every alternative's predicted time.

        ``streamed=True``: the pick for a stream of back-to-back asynchronous calls (gradient buckets),
        where each call's fixed host costs overlap the previous call (CostModel.streamed_plan). Pass
        the returned algorithm by name: every rank must make the same choice.
        """
        coll = _collective(op)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes: expected a non-negative int, got {nbytes!r}")
        how = self.model.streamed_plan if streamed else self.model.plan
        p = how(coll.value, nbytes, dtype, candidates=self._candidates(coll))
        forced = self._overrides.get(coll)
        if forced is not None and forced != p.algorithm:
            p = dataclasses.replace(p, algorithm=forced, predicted_s=p.alternatives.get(forced, p.predicted_s),
                                    reason=f"TOPOCOMM_ALGO forces {forced}")
        return p

    def _candidates(self, coll: Collective) -> tuple[str, ...]:
        return algorithms.supported(coll)

    def _select(self, coll: Collective, nbytes: int, dtype: torch.dtype, algorithm: object) -> tuple[str, int]:
        """(algorithm name, pipeline depth) for this call; validates ``algorithm``."""
        if not isinstance(algorithm, str):
            raise TypeError(f"algorithm: expected a name, got {type(algorithm).__name__}")
        if algorithm != AUTO:
            if algorithm not in algorithms.names():
                raise ValueError(f"algorithm: unknown {algorithm!r}; use 'auto' or one of {', '.join(algorithms.names())}")
            if algorithm not in algorithms.supported(coll):
                raise ValueError(f"algorithm: {algorithm!r} does not implement {coll.value}; "
                                 f"use one of {', '.join(algorithms.supported(coll))}")
        name = algorithm if algorithm != AUTO else None
        if name is None:
            name = self._overrides.get(coll)
        if name is not None and not algorithms.pipelined(name, coll):
            return name, 1
        p = self.model.plan(coll.value, nbytes, dtype, candidates=(name,) if name else self._candidates(coll))
        name = name or p.algorithm
        if self._pipeline is not None and algorithms.pipelined(name, coll):
            return name, self._pipeline
        return name, max(1, int(p.pipeline))

    # -- the collectives -----------------------------------------------------

    def all_reduce(self, t: torch.Tensor, op: object = "sum", algorithm: str = AUTO, async_op: bool = False,
                   compress: str | None = None):
        """In-place all-reduce. ``compress="bf16"|"fp16"`` sends a float32/float64 tensor rounded to
        16 bits while reducing in the tensor's dtype (see README, Numerics, for the error bound)."""
        check_tensor("t", t, self.device, self.backend)
        red = check_op(op, t.dtype)
        wire = check_compress(compress, t.dtype)
        return self._call(Collective.ALL_REDUCE, algorithm, red, t, None, None, async_op, wire)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: object = "sum",
                       algorithm: str = AUTO, async_op: bool = False, compress: str | None = None):
        check_tensor("out", out, self.device, self.backend)
        check_tensor("inp", inp, self.device, self.backend)
        check_pair("out", out, "inp", inp, (self.size, 1))
        check_no_alias("inp", inp, "out", out, allowed=_block(inp, self.rank, self.size))
        red = check_op(op, out.dtype)
        wire = check_compress(compress, out.dtype)
        return self._call(Collective.REDUCE_SCATTER, algorithm, red, out, inp, None, async_op, wire)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, algorithm: str = AUTO, async_op: bool = False):
        check_tensor("out", out, self.device, self.backend)
        check_tensor("inp", inp, self.device, self.backend)
        check_pair("out", out, "inp", inp, (1, self.size))
        check_no_alias("out", out, "inp", inp, allowed=_block(out, self.rank, self.size))
        return self._call(Collective.ALL_GATHER, algorithm, None, out, inp, None, async_op)

    def broadcast(self, t: torch.Tensor, src: int = 0, algorithm: str = AUTO, async_op: bool = False):
        check_tensor("t", t, self.device, self.backend)
        check_rank("src", src, self.size)
        return self._call(Collective.BROADCAST, algorithm, None, t, None, src, async_op)

    def reduce(self, t: torch.Tensor, dst: int = 0, op: object = "sum", algorithm: str = AUTO,
               async_op: bool = False):
        check_tensor("t", t, self.device, self.backend)
        check_rank("dst", dst, self.size)
        red = check_op(op, t.dtype)
        return self._call(Collective.REDUCE, algorithm, red, t, None, dst, async_op)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, algorithm: str = AUTO, async_op: bool = False):
        check_tensor("out", out, self.device, self.backend)
        check_tensor("inp", inp, self.device, self.backend)
        check_pair("out", out, "inp", inp, (1, 1))
        if inp.numel() % self.size:
            raise ValueError(f"inp: all_to_all needs numel() divisible by the group size {self.size}, got {inp.numel()}")
        check_no_alias("out", out, "inp", inp)
        return self._call(Collective.ALL_TO_ALL, algorithm, None, out, inp, None, async_op)

    def _call(self, coll: Collective, algorithm: object, red: Reduction | None, out: torch.Tensor,
              inp: torch.Tensor | None, root: int | None, async_op: bool, wire: torch.dtype | None = None):
        self._check_open()
        nbytes = (inp if coll in (Collective.REDUCE_SCATTER, Collective.ALL_TO_ALL) else out)
        nbytes = nbytes.numel() * (nbytes.element_size() if wire is None else wire.itemsize)
        name, pipeline = self._select(coll, nbytes, wire or out.dtype, algorithm)
        if not self._nvlink_tried and algorithms.nvlink_kernel(name, coll):
            from .nvlink import open_peers  # [Note: NVLink direct]

            self._nvlink_tried = True
            self._executor.nvlink = open_peers(self)
        if self._debug:
            self._check_same_call(coll, out, red, algorithm, root)
        self._seq += 1
        if out.numel() == 0:  # nothing moves; every rank has the same count
            return Handle(out) if async_op else out

        if name == algorithms.NATIVE and async_op and self.backend == "nccl" and wire is None:
            try:
                work = start_native(coll, self.group, red, out.detach().view(-1),
                                    inp.detach().view(-1) if inp is not None else None)
            except RuntimeError as e:
                raise self._native_failure(coll, e) from e
            if work is not None:
                return Handle(out, waits=[work])

        def run() -> None:
            o, i = out.detach().view(-1), (inp.detach().view(-1) if inp is not None else None)
            if name == algorithms.NATIVE:
                self._run_native(coll, red, o, i, root, wire)
            else:
                sched = algorithms.build(name, coll, self.size, root, self._nodes, pipeline)
                run_collective(self._executor, sched, red, o, i, wire)

        direct = name == algorithms.NATIVE and wire is None  # [Note: the caller's stream]
        if self._graphs is not None and name != algorithms.NATIVE:
            key = (coll, name, pipeline, red, root, out.dtype, wire, out.data_ptr(), out.numel(),
                   inp.data_ptr() if inp is not None else 0, inp.numel() if inp is not None else 0)
            eager, run = run, self._graphs.wrap(key, nbytes, run)
            direct = run is not eager
        if direct and not async_op and self._stream is not None:
            run()
            return out
        return self._dispatch(run, out, (out, inp), async_op)

    # [Note: the caller's stream]
    # Our schedules run eagerly on the Communicator's side stream (the executor overlaps a step's
    # transfers with the reductions there), which costs two cross-stream waits and a stream switch per
    # call: tens of microseconds from Python, the whole budget of a small message. Two kinds of
    # blocking call need none of it, and go on the caller's stream instead: the replay of a captured
    # graph (cudaGraphLaunch runs the whole instance on whatever stream it is given), and NCCL's own
    # collective (NCCL's internal stream already waits for the caller's stream at launch, and a
    # blocking call makes the caller's stream wait for it). Asynchronous calls keep the side stream,
    # so that the caller's later work does not queue behind the collective.

    # -- point to point ------------------------------------------------------

    def send(self, t: torch.Tensor, dst: int) -> None:
        self.isend(t, dst).wait()

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self.irecv(t, src).wait()
        return t

    def isend(self, t: torch.Tensor, dst: int) -> Handle:
        check_tensor("t", t, self.device, self.backend)
        check_rank("dst", dst, self.size, self.rank)
        self._drain()
        s, _ = self._p2p.post([(dst, t)], [])
        return Handle(t, waits=s)

    def irecv(self, t: torch.Tensor, src: int) -> Handle:
        check_tensor("t", t, self.device, self.backend)
        check_rank("src", src, self.size, self.rank)
        self._drain()
        _, r = self._p2p.post([], [(src, t)])
        return Handle(t, waits=r)

    def barrier(self) -> None:
        self._drain()
        if self.backend == "nccl":
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)

    # -- helpers -------------------------------------------------------------

    def exchange_json(self, obj: object) -> list:
        """Every rank's ``obj`` (JSON-able), in rank order. Metadata travels as JSON bytes, never pickle."""
        self._drain()
        data = json.dumps(obj, sort_keys=True).encode()
        dev = self.device
        size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        sizes = torch.empty(self.size, dtype=torch.int64, device=dev)
        _all_gather(sizes, size, group=self.group)
        lens = sizes.tolist()
        m = max(lens)
        buf = torch.zeros(m, dtype=torch.uint8)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        allb = torch.empty(m * self.size, dtype=torch.uint8, device=dev)
        _all_gather(allb, buf.to(dev), group=self.group)
        raw = allb.cpu().numpy().tobytes()
        return [json.loads(raw[i * m:i * m + n]) for i, n in enumerate(lens)]

    def _check_same_call(self, coll: Collective, out: torch.Tensor, red: Reduction | None,
                         algorithm: object, root: int | None) -> None:
        mine = {"seq": self._seq, "op": coll.value, "dtype": str(out.dtype).replace("torch.", ""),
                "count": out.numel(), "algorithm": algorithm, "reduction": red.value if red else None, "root": root}
        calls = self.exchange_json(mine)
        if any(c != calls[0] for c in calls):
            lines = "\n".join(f"  rank {r}: {json.dumps(c, sort_keys=True)}" for r, c in enumerate(calls))
            raise CollectiveMismatchError(f"collective mismatch at call #{self._seq} between ranks:\n{lines}")

    def _dispatch(self, run: Callable[[], None], result: torch.Tensor,
                  tensors: tuple[torch.Tensor | None, ...], async_op: bool):
        if self._stream is not None:
            cur = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(cur)
            with torch.cuda.stream(self._stream):
                run()
            if not async_op:
                cur.wait_stream(self._stream)
                return result
            for t in tensors:
                if t is not None:
                    t.record_stream(self._stream)
            ev = torch.cuda.Event()
            ev.record(self._stream)
            return Handle(result, event=ev)
        if not async_op:
            self._drain()
            run()
            return result
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="topocomm")
        while self._pending and self._pending[0].done() and self._pending[0].exception() is None:
            self._pending.popleft()  # finished and waited for by their handles: nothing left to order
        fut = self._worker.submit(run)
        self._pending.append(fut)
        return Handle(result, future=fut, on_error=self._forget)

    def _forget(self, fut: Future) -> None:
        """A failed asynchronous call whose error its Handle already raised."""
        try:
            self._pending.remove(fut)
        except ValueError:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"rank {self.rank}: this Communicator is closed (close() or collectives.shutdown())")

    def _drain(self) -> None:
        self._check_open()
        while self._pending:
            self._pending.popleft().result()

    def synchronize(self) -> None:
        """Wait for every queued asynchronous collective (CPU) or for the communicator's stream (CUDA)."""
        self._drain()
        if self._stream is not None:
            self._stream.synchronize()

    def close(self) -> None:
        """Finish queued work and release what the communicator holds (worker thread, captured
        CUDA graphs and their memory pools, its process group). Call before destroying the process
        group; later calls raise. Closing twice is harmless."""
        if self._closed:
            return
        self.synchronize()
        if self._graphs is not None:
            self._graphs.clear()
        self._executor.nvlink = None  # its symmetric buffer goes before the process group does
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        # Let destroy_process_group() free the group now: one still referenced from here would be
        # torn down at interpreter exit instead, where gloo's threads were seen to abort the process.
        self._closed = True
        self.group = None
        for transport in {id(t): t for t in (self._executor.transport, self._p2p)}.values():
            if hasattr(transport, "close"):
                transport.close()
            if hasattr(transport, "group"):
                transport.group = None
        _OPEN.discard(self)


def close_all() -> None:
    """Close every open Communicator (``shutdown()`` does this before destroying the process group)."""
    for c in list(_OPEN):
        c.close()


def _block(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    m = t.numel() // size
    return t.view(-1)[rank * m:(rank + 1) * m]


def _collective(op: object) -> Collective:
    try:
        return Collective(op)
    except ValueError:
        raise ValueError(f"op: unknown collective {op!r}; use one of {', '.join(c.value for c in Collective)}") from None
