"""Transports: how the executor moves bytes between ranks.

A Transport posts a batch of sends and receives (one schedule step, possibly
cut into segments) and returns one waitable per transfer, so the executor can
reduce segment k while later segments are still in flight.

- ``TorchTransport``: torch.distributed point-to-point on a ProcessGroup.
  On NCCL a step's transfers go out as one grouped call (batch_isend_irecv),
  which lets NCCL run them concurrently and avoids a deadlock between the
  send and the receive of a ring step. On gloo each transfer is its own
  asynchronous request on the process group (gloo progresses them in its own
  threads), which is cheaper than going through the grouping layer.
- ``MpiTransport``: mpi4py Isend/Irecv on CPU tensors (contiguous buffers are
  handed to MPI without copies).

Peers are ranks of the communicator's group; transports translate them.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist


class Waitable(Protocol):
    def wait(self) -> None: ...


class Transport(Protocol):
    rank: int
    size: int
    backend: str

    def post(self, sends: Sequence[tuple[int, torch.Tensor]],
             recvs: Sequence[tuple[int, torch.Tensor]]) -> tuple[list[Waitable], list[Waitable]]:
        """Post all transfers at once; return waitables for the sends and the receives, in order."""
        ...


class PeerTimeoutError(TimeoutError):
    """A transfer with ``peer`` did not complete within the communicator's timeout."""

    def __init__(self, rank: int, peer: int, what: str, cause: BaseException) -> None:
        super().__init__(f"rank {rank}: {what} with rank {peer} did not complete: rank {peer} stopped answering "
                         f"or is not making the same call ({cause})")
        self.rank, self.peer = rank, peer


class _TorchWork:
    __slots__ = ("work", "timeout", "rank", "peer", "what")

    def __init__(self, work: dist.Work, timeout: datetime.timedelta | None, rank: int = -1, peer: int = -1,
                 what: str = "transfer") -> None:
        self.work, self.timeout = work, timeout
        self.rank, self.peer, self.what = rank, peer, what

    def wait(self) -> None:
        try:
            if self.timeout is None:
                self.work.wait()
            else:
                self.work.wait(self.timeout)
        except RuntimeError as e:
            if self.peer < 0:
                raise
            raise PeerTimeoutError(self.rank, self.peer, self.what, e) from e


class _AllOf:
    __slots__ = ("works", "done")

    def __init__(self, works: list[_TorchWork]) -> None:
        self.works, self.done = works, False

    def wait(self) -> None:
        if not self.done:
            for w in self.works:
                w.wait()
            self.done = True


class TorchTransport:
    """torch.distributed p2p on ``group``; ``timeout`` bounds every blocking wait on CPU backends."""

    def __init__(self, group: dist.ProcessGroup, timeout: datetime.timedelta | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        self.global_ranks = [dist.get_global_rank(group, r) for r in range(self.size)]
        # NCCL waits are stream waits (no host block), so a host timeout is meaningless there.
        self.timeout = None if self.backend == "nccl" else timeout
        self._batched = self.backend == "nccl"

    def post(self, sends: Sequence[tuple[int, torch.Tensor]],
             recvs: Sequence[tuple[int, torch.Tensor]]) -> tuple[list[Waitable], list[Waitable]]:
        if not sends and not recvs:
            return [], []
        if self._batched:
            ops = [dist.P2POp(dist.isend, t, self.global_ranks[p], self.group) for p, t in sends]
            ops += [dist.P2POp(dist.irecv, t, self.global_ranks[p], self.group) for p, t in recvs]
            works = dist.batch_isend_irecv(ops)
            if len(works) == len(ops):
                ws: list[Waitable] = [_TorchWork(w, None) for w in works]
            else:  # coalesced into fewer works (NCCL: one for the whole group)
                ws = [_AllOf([_TorchWork(w, None) for w in works])] * len(ops)
            return ws[:len(sends)], ws[len(sends):]
        g = self.group
        # Receives first: gloo serialises a pair's two directions when a send is posted before
        # the matching receive (an exchange then takes two transfer times instead of one).
        r = [_TorchWork(g.recv([t], p, 0), self.timeout, self.rank, p, "receive") for p, t in recvs]
        s = [_TorchWork(g.send([t], p, 0), self.timeout, self.rank, p, "send") for p, t in sends]
        return s, r


class _MpiRequest:
    __slots__ = ("req",)

    def __init__(self, req) -> None:
        self.req = req

    def wait(self) -> None:
        self.req.Wait()


class MpiTransport:
    """mpi4py point-to-point on CPU tensors of an MPI communicator (``MPI.COMM_WORLD`` by default)."""

    backend = "mpi"

    def __init__(self, mpi_comm=None) -> None:
        from mpi4py import MPI

        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    @staticmethod
    def _buf(t: torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError("the MPI transport moves CPU tensors only")
        # A byte view of the tensor's storage: every dtype, bfloat16 included, without a copy.
        return t.view(torch.uint8).numpy() if t.numel() else bytearray()

    def post(self, sends: Sequence[tuple[int, torch.Tensor]],
             recvs: Sequence[tuple[int, torch.Tensor]]) -> tuple[list[Waitable], list[Waitable]]:
        r = [_MpiRequest(self.comm.Irecv(self._buf(t), source=p, tag=11)) for p, t in recvs]
        s = [_MpiRequest(self.comm.Isend(self._buf(t), dest=p, tag=11)) for p, t in sends]
        return s, r
