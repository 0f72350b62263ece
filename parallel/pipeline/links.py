"""Point-to-point links between a rank and its pipeline neighbours.

[Note: one stream per neighbour] NCCL runs every point-to-point transfer of
one communicator on one stream, in posting order. A stage that sends micro-
batch k's activation downstream and then receives micro-batch k+1's from
upstream cannot start that receive until the downstream stage has taken the
send, and the downstream stage is itself waiting on its own neighbours: the
whole pipeline tends to advance in lock step, paying transfers on the
critical path. So each pair of neighbouring ranks gets a process group of its
own (its own NCCL communicator and stream): a send downstream and a receive
from upstream travel independently. The transfers between one pair keep
their order on both sides, which is all point-to-point matching needs.
Measured on 4 x H200 (16 layers of 4096, 16 MiB activations, GPipe at m = 4 /
8 / 16): step time against torch.distributed.pipelining went from 1.00x to
1.01-1.02x, and the bubble from 0.453 / 0.303 / 0.194 to 0.449 / 0.297 /
0.186. 1F1B gains nothing: there a stage's next backward needs the gradient
its neighbour has just computed, so one exchange per slot stays on the
critical path whatever the streams.

A pipeline over the whole world builds them: torch.distributed.new_group is
called by every rank for every pair, in one order (the pairs come from the
schedule, the same on every rank), and they are kept for later pipelines of
the same world. A pipeline on a sub-communicator (a Mesh axis) keeps its
communicator's transport: its replicas may be built at different times, and
groups made by only some ranks would not get consistent names. Other
backends keep the communicator's transport too: gloo's point-to-point calls
are independent already, and on one host the communicator's shared-memory
transport is faster than a pair group's sockets. So does a process with
CUDA_DEVICE_MAX_CONNECTIONS=1: the GPU then runs kernels of all streams in
launch order, and a ring of ranks that each send before they receive would
wait on each other's queued transfers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from collectives.transport import TorchTransport

PAIR_BACKENDS = ("nccl",)  # backends whose world-wide pipelines get a group per pair (tests add gloo)
_PAIRS: dict = {}  # "world": the default group they belong to; (backend, global rank, global rank) -> group


def pair_groups(pairs: Sequence[tuple[int, int]], backend: str,
                timeout) -> dict[tuple[int, int], dist.ProcessGroup | None]:
    """A process group per pair of global ranks (None where this rank is not in it). Every rank of the world
    must call this with the same pairs, in the same order."""
    world = dist.distributed_c10d._get_default_group()
    if _PAIRS.get("world") is not world:  # a new world (shutdown, then init): the old groups are gone
        _PAIRS.clear()
        _PAIRS["world"] = world
    me = dist.get_rank()
    out = {}
    for pair in pairs:
        key = (backend, *pair)
        if key not in _PAIRS:
            kwargs = {"timeout": timeout} if timeout is not None else {}
            group = dist.new_group(list(pair), backend=backend, group_desc=f"pipeline_pair_{pair[0]}_{pair[1]}",
                                   **kwargs)
            _PAIRS[key] = group if me in pair else None
        out[pair] = _PAIRS[key]
    return out


class Links:
    """Transfers between this rank and ``peers`` (ranks of ``comm``): over a group per pair where it can
    ([Note: one stream per neighbour]), else over ``comm``'s own transport. ``all_pairs``: every pair of
    neighbouring ranks of the pipeline, the same on every rank."""

    def __init__(self, comm, peers: Sequence[int], all_pairs: Sequence[tuple[int, int]]) -> None:
        self.comm = comm
        self.peers = sorted(set(peers) - {comm.rank})
        self.pairs: dict[int, tuple[TorchTransport, int]] = {}  # peer -> (its pair's transport, its rank there)
        if (comm.backend in PAIR_BACKENDS and 1 < comm.size == dist.get_world_size()
                and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1"):
            me = comm.rank  # the whole world: the communicator's ranks are the global ranks
            if dist.get_global_rank(comm.group, me) != dist.get_rank():
                raise AssertionError("a world-wide communicator whose ranks are not the global ranks")
            timeout = getattr(comm, "timeout", None)
            groups = pair_groups(sorted({(min(a, b), max(a, b)) for a, b in all_pairs if a != b}), comm.backend,
                                 timeout)
            for p in sorted(self.peers, key=lambda p: (min(me, p), max(me, p))):
                group = groups[(min(me, p), max(me, p))]
                self.pairs[p] = (TorchTransport(group, timeout), 1 - dist.get_rank(group))
        self._connect()

    def post(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]]):
        """Post transfers (peer, tensor) together; returns (send waitables, receive waitables) in order."""
        if not self.pairs:
            transport = getattr(getattr(self.comm, "_executor", None), "transport", None)
            if transport is not None:
                return transport.post(list(sends), list(recvs))
            return [self.comm.isend(t, p) for p, t in sends], [self.comm.irecv(t, p) for p, t in recvs]
        s_out: list = [None] * len(sends)
        r_out: list = [None] * len(recvs)
        for p in {p for p, _ in (*sends, *recvs)}:
            transport, there = self.pairs[p]
            si = [k for k, (q, _) in enumerate(sends) if q == p]
            ri = [k for k, (q, _) in enumerate(recvs) if q == p]
            sw, rw = transport.post([(there, sends[k][1]) for k in si], [(there, recvs[k][1]) for k in ri])
            for k, w in zip(si, sw):
                s_out[k] = w
            for k, w in zip(ri, rw):
                r_out[k] = w
        return s_out, r_out

    def _connect(self) -> None:
        """One element each way with every peer, and wait: pair by pair in the global order of pairs, or all
        peers in one batch on a shared group.

        [Note: NCCL connections] NCCL sets up a pair's point-to-point connection the first time the
        pair transfers, inside the grouped call, blocking the host until the peer's side joins. A
        schedule batch that pairs a first send to one neighbour with a first receive from another can
        then wait on the host for a peer that is itself waiting for this batch's data: the pipeline
        deadlocked that way on 4 GPUs. Connecting every neighbour up front leaves no first transfer
        inside a schedule. Every listed peer must list this rank too.
        """
        dev = self.comm.device
        batches = [[p] for p in self.pairs] if self.pairs else ([self.peers] if self.peers else [])
        for peers in batches:
            out = [torch.zeros(1, device=dev) for _ in peers]
            into = [torch.empty(1, device=dev) for _ in peers]
            s_waits, r_waits = self.post(list(zip(peers, out)), list(zip(peers, into)))
            for w in [*s_waits, *r_waits]:
                w.wait()
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
