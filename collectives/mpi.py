"""MpiCommunicator: the Communicator over MPI (mpi4py), for jobs started by mpirun / mpiexec / srun.

    comm = collectives.mpi.MpiCommunicator()          # MPI.COMM_WORLD (duplicated), CPU tensors
    comm = collectives.init(backend="mpi")            # the same, as the default communicator

It has every public method of ``Communicator``. Our algorithms run on the same
Executor over MPI point-to-point (``Isend``/``Irecv`` on the tensors' memory,
no copies); ``native`` is MPI's own collective (``Allreduce``,
``Reduce_scatter_block``, ``Allgather``, ``Bcast``, ``Reduce``, ``Alltoall``)
on numpy views of the tensors. torch.distributed is not used at all.

The communicator works on a duplicate of the MPI communicator it is given, so
its messages never match the application's own MPI traffic.

[Note: half precision on MPI] MPI has no bfloat16 datatype, and MPI's float16
(MPIX_C_FLOAT16) is an extension not every library has. Tensors of both
travel as 16-bit integers (a view, no copy) and reduce through a user-defined
MPI operation that reinterprets the bytes and combines them with torch, one
rounding per combine, as our executor does: results are those of the same
reduction order in the tensor's dtype. Other dtypes use MPI's built-in types
and operations. "avg" is a sum followed by one division, as on gloo.

[Note: MPI timeouts] MPI calls cannot time out. With a ``timeout``, every
request (our point-to-point transfers, and ``native``, ``barrier`` and
``exchange_json`` through MPI's non-blocking collectives) is completed by
polling ``MPI_Test`` until the deadline, then raises ``TimeoutError``. The
request is cancelled where MPI can (receives); the communicator is unusable
afterwards: abort the job (``MPI.COMM_WORLD.Abort()``), as mpirun does when a
rank dies. A timed-out transfer raises ``PeerTimeoutError`` naming the peer,
as on gloo. Without a timeout, waits block in ``MPI_Wait``.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch

from .communicator import Communicator
from .execute import finish_average
from .ops import Reduction
from .schedule import Collective
from .transport import MpiTransport, PeerTimeoutError, Waitable
from .validate import overlaps

_HALF = (torch.float16, torch.bfloat16)
_SPIN = 200  # MPI_Test calls before polling starts to yield the CPU


def _wait(req, deadline: float | None, what: str, rank: int = -1, peer: int = -1) -> None:
    """Complete one MPI request, polling until ``deadline`` (time.monotonic()) when one is set."""
    if deadline is None:
        req.Wait()
        return
    spins = 0
    while not req.Test():
        spins += 1
        if spins > _SPIN:
            if time.monotonic() > deadline:
                _cancel(req)
                cause = TimeoutError("MPI request not complete at the deadline")
                if peer >= 0:
                    raise PeerTimeoutError(rank, peer, what, cause)
                raise TimeoutError(f"rank {rank}: MPI {what} did not complete within the communicator's timeout: "
                                   f"a rank stopped answering or is not making the same call (abort the job: "
                                   f"MPI.COMM_WORLD.Abort())")
            time.sleep(50e-6)


def _cancel(req) -> None:
    """Withdraw a timed-out request where MPI can (receives), so it does not land in memory later."""
    try:
        req.Cancel()
        req.Test()
    except Exception:  # noqa: BLE001 - best effort; the communicator is unusable either way
        pass


class _TimedRequest:
    __slots__ = ("req", "timeout", "what", "rank", "peer")

    def __init__(self, req, timeout: float | None, what: str, rank: int, peer: int) -> None:
        self.req, self.timeout, self.what, self.rank, self.peer = req, timeout, what, rank, peer

    def wait(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        _wait(self.req, deadline, self.what, self.rank, self.peer)


class TimedMpiTransport(MpiTransport):
    """``MpiTransport`` whose waits honour a timeout (seconds, None: block) and name the silent peer."""

    def __init__(self, mpi_comm, timeout: float | None = None) -> None:
        super().__init__(mpi_comm)
        self.timeout = timeout

    def post(self, sends: Sequence[tuple[int, torch.Tensor]],
             recvs: Sequence[tuple[int, torch.Tensor]]) -> tuple[list[Waitable], list[Waitable]]:
        s, r = super().post(sends, recvs)
        t, me = self.timeout, self.rank
        return ([_TimedRequest(w.req, t, "send", me, p) for w, (p, _) in zip(s, sends)],
                [_TimedRequest(w.req, t, "receive", me, p) for w, (p, _) in zip(r, recvs)])


# -- MPI operations ------------------------------------------------------------

def _mpi():
    from mpi4py import MPI

    return MPI


def _builtin_op(red: Reduction):
    MPI = _mpi()
    return {Reduction.SUM: MPI.SUM, Reduction.AVG: MPI.SUM, Reduction.PROD: MPI.PROD,
            Reduction.MAX: MPI.MAX, Reduction.MIN: MPI.MIN}[red]


@cache
def _half_op(red: Reduction, dtype: torch.dtype):
    """A commutative user-defined MPI op combining 16-bit integers as ``dtype`` (see [Note: half precision on MPI])."""
    def combine(inbuf, inoutbuf, datatype) -> None:
        incoming = torch.from_numpy(np.frombuffer(inbuf, dtype=np.int16).copy()).view(dtype)
        acc = torch.from_numpy(np.frombuffer(inoutbuf, dtype=np.int16)).view(dtype)
        red.combine(acc, incoming)

    return _mpi().Op.Create(combine, commute=True)


def _reduce_args(t: torch.Tensor, red: Reduction):
    """(buffer, MPI op) for reducing ``t``: a numpy view with a built-in op, or int16 + a user op for halves."""
    if t.dtype in _HALF:
        return t.view(torch.int16).numpy(), _half_op(red, t.dtype)
    return t.numpy(), _builtin_op(red)


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


class MpiCommunicator(Communicator):
    """A Communicator over ``mpi_comm`` (default ``MPI.COMM_WORLD``); CPU tensors only."""

    def __init__(self, mpi_comm=None, *, timeout: float | datetime.timedelta | None = None,
                 max_segment_bytes: int | None = None, topology=None, profile=None) -> None:
        super().__init__(mpi_comm, timeout=timeout, max_segment_bytes=max_segment_bytes,
                         topology=topology, profile=profile)

    def __repr__(self) -> str:
        return f"MpiCommunicator(rank={self.rank}, size={self.size})"

    def _connect(self, group) -> TimedMpiTransport:
        MPI = _mpi()
        if not MPI.Is_initialized() or MPI.Is_finalized():
            raise RuntimeError("MpiCommunicator: MPI is not initialised (or already finalised)")
        self.mpi_comm = (group if group is not None else MPI.COMM_WORLD).Dup()
        self.group = self.mpi_comm
        self.rank, self.size = self.mpi_comm.Get_rank(), self.mpi_comm.Get_size()
        self.backend = "mpi"
        self.device = torch.device("cpu")
        self._stream = None
        self._graphs = None
        self._timeout_s = None if self.timeout is None else self.timeout.total_seconds()
        return TimedMpiTransport(self.mpi_comm, self._timeout_s)

    def _complete(self, req, what: str) -> None:
        _wait(req, None if self._timeout_s is None else time.monotonic() + self._timeout_s, what, self.rank)

    # -- native: MPI's own collectives ------------------------------------------

    def _run_native(self, coll: Collective, red: Reduction | None, out: torch.Tensor,
                    inp: torch.Tensor | None, root: int | None, wire: torch.dtype | None) -> None:
        if wire is not None:  # compressed: MPI reduces in the 16-bit wire dtype
            low = out.to(wire)
            self._run_native(coll, red, low, inp.to(wire) if inp is not None else None, root, None)
            out.copy_(low)
            return
        MPI, c = _mpi(), self.mpi_comm
        if coll is Collective.ALL_REDUCE:
            buf, op = _reduce_args(out, red)  # type: ignore[arg-type]
            req = c.Iallreduce(MPI.IN_PLACE, buf, op)
        elif coll is Collective.REDUCE_SCATTER:
            assert inp is not None
            src = inp.clone() if overlaps(out, inp) else inp  # MPI forbids aliased buffers
            sbuf, op = _reduce_args(src, red)  # type: ignore[arg-type]
            req = c.Ireduce_scatter_block(sbuf, _reduce_args(out, red)[0], op)  # type: ignore[arg-type]
        elif coll is Collective.ALL_GATHER:
            assert inp is not None
            m = inp.numel()
            mine = out[self.rank * m:(self.rank + 1) * m]
            in_place = mine.data_ptr() == inp.data_ptr()
            req = c.Iallgather(MPI.IN_PLACE if in_place else _bytes(inp), _bytes(out))
        elif coll is Collective.BROADCAST:
            req = c.Ibcast(_bytes(out), root=root)
        elif coll is Collective.REDUCE:
            buf, op = _reduce_args(out, red)  # type: ignore[arg-type]
            if self.rank == root:
                req = c.Ireduce(MPI.IN_PLACE, buf, op, root=root)
            else:  # MPI leaves a non-root send buffer untouched
                req = c.Ireduce(buf, None, op, root=root)
        elif coll is Collective.ALL_TO_ALL:
            assert inp is not None
            req = c.Ialltoall(_bytes(inp), _bytes(out))
        else:  # pragma: no cover - the enum is closed
            raise AssertionError(coll)
        self._complete(req, f"native {coll.value}")
        if red is Reduction.AVG and (coll is not Collective.REDUCE or self.rank == root):
            finish_average(out, red, self.size)

    # -- helpers -------------------------------------------------------------

    def barrier(self) -> None:
        self._drain()
        self._complete(self.mpi_comm.Ibarrier(), "barrier")

    def exchange_json(self, obj: object) -> list:
        """Every rank's ``obj`` (JSON-able), in rank order: JSON bytes through MPI Allgather(v), never pickle."""
        self._drain()
        data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8)
        lens = np.zeros(self.size, dtype=np.int64)
        self._complete(self.mpi_comm.Iallgather(np.array([data.size], dtype=np.int64), lens), "exchange_json")
        displs = np.concatenate([[0], np.cumsum(lens)[:-1]])
        raw = np.empty(int(lens.sum()), dtype=np.uint8)
        self._complete(self.mpi_comm.Iallgatherv(data, [raw, (lens, displs)]), "exchange_json")
        raw_bytes = raw.tobytes()
        return [json.loads(raw_bytes[d:d + n]) for d, n in zip(displs.tolist(), lens.tolist())]
