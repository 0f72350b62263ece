"""The executor: runs any Schedule on a Transport. The only code that moves bytes.

For each step of this rank it cuts every transfer into segments of at most
``max_segment_bytes`` and posts them as groups (segment k of every transfer;
one grouped NCCL call per group on GPU, issued from a side stream).
Overwriting receives land directly in the work buffer; reducing receives land
in a scratch buffer and are combined segment by segment as each arrives, so
the reduction of segment k overlaps the transfer of the later ones.

Zero-size transfers are skipped; both sides of a transfer compute the same
chunk bounds (the count is the same on every rank), so they skip together.

Precision: reductions run in the tensor's own dtype, one rounding per hop
(float16 and bfloat16 included), as NCCL does; "avg" is a sum followed by one
division by the world size of the finished result. A chunk's reduction order
is fixed by the schedule and the verifier proves it is the same on every
rank, so all-reduce results are bitwise identical everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops import Reduction
from .schedule import Buffer, Collective, Schedule, Send
from .transport import Transport

DEFAULT_MAX_SEGMENT_BYTES = 4 << 20
CUDA_MAX_SEGMENT_BYTES = 1 << 40  # whole transfers ([Note: whole transfers on CUDA])
LEGACY_CUDA_SEGMENT_BYTES = 32 << 20  # the CUDA default before 2026-11-27, which older sweeps ran with

# [Note: whole transfers on CUDA]
# Cutting a reducing transfer into segments lets the reduction of segment k overlap the transfer
# of the later ones. Through NCCL that costs more than it saves: a point-to-point message moves at
# a rate that grows with its size (one ring step on 4 x H200: 151 GB/s per 64 MiB message, 358 GB/s
# per 1 GiB one; [Note: message size] in pricing.py), so 32 MiB segments moved every large transfer
# at the 32 MiB rate. On 4 x H200 at 1 GiB (benchmarks/results/gpu-h200x4-2026-11-27-costmodel.md),
# whole transfers against 32 MiB segments: ring all-reduce 5.90 against 8.66 ms, halving-doubling
# 5.35 against 7.19, ring reduce-scatter 4.15 against 6.94, chain reduce 5.68 against 8.78; at
# 256 MiB 3-23% faster; at 64 MiB and below no change. 8 MiB segments were slower still. So on
# CUDA a transfer goes whole, and its reduction follows it. The scratch buffer is the same either
# way (one per reducing step, as large as the step's receives). $TOPOCOMM_MAX_SEGMENT_BYTES still
# cuts them (on CPU, 4 MiB by default: there whole transfers made no difference beyond noise).


def default_segment_bytes(backend: str) -> int:
    """A Communicator's segment size without an explicit one: $TOPOCOMM_MAX_SEGMENT_BYTES, else by backend."""
    default = CUDA_MAX_SEGMENT_BYTES if backend == "nccl" else DEFAULT_MAX_SEGMENT_BYTES
    return int(os.environ.get("TOPOCOMM_MAX_SEGMENT_BYTES", default))


def _segments(lo: int, hi: int, seg: int) -> list[tuple[int, int]]:
    return [(a, min(a + seg, hi)) for a in range(lo, hi, seg)]


def reducing_transfers(schedule: Schedule, rank: int) -> tuple[tuple[bool, ...], ...]:
    """Per step of ``rank``, per op: whether the transfer ends in a reducing receive.

    A send looks up the receive it matches (rule 2 of [Note: step semantics]), so both ends of a
    transfer agree, which matters wherever the executor cuts only some transfers into segments:
    the two ends must cut a transfer alike or their segments would not pair up.
    """
    key = ("reducing", rank)
    if key not in schedule._cache:
        lands: dict[tuple[int, int], list[bool]] = {}  # (src, dst) -> reduce flag of each receive, in order
        for dst in range(schedule.world_size):
            for step in schedule.steps(dst):
                for o in step.recvs:
                    lands.setdefault((o.peer, dst), []).append(o.reduce)
        sent: dict[int, int] = {}
        out = []
        for step in schedule.steps(rank):
            flags = []
            for o in step.ops:
                if isinstance(o, Send):
                    k = sent.get(o.peer, 0)
                    sent[o.peer] = k + 1
                    flags.append(lands[(rank, o.peer)][k])
                else:
                    flags.append(o.reduce)
            out.append(tuple(flags))
        schedule._cache[key] = tuple(out)
    return schedule._cache[key]


# [Note: own block aside]
# All-gather and all-to-all copy the rank's own block from the input into the output, and often nothing
# else touches that block: no step receives into it, and the sends that read it read only it. Those
# sends then read the input instead, and the copy runs beside the schedule: on CUDA on a stream of its
# own, joined when the schedule ends; on CPU after the schedule, on the same thread (no gain there).
# The copy is issued only once the first step's transfers are: a copy kernel issued first takes every
# SM, and NCCL's kernel waits for it. On 2 x H200 (NCCL 2.28; out of place, us, median of 5 loops,
# two launches; benchmarks/results/gpu-h200x2-2026-11-27-aside.md):
#
#                                 copy first   aside, issued first   aside, after step 1   in place
#   ring all-gather, 64 MiB       162-166      159-161               152-155               142-154
#   ring all-gather, 256 MiB      536-539      525-526               508-510               468-474
#   ring all-gather, 1 GiB        1917-1918    1902-1935             1532-1533             1520-1525
#   pairwise all-to-all, 1 GiB    1913-1916    1906-1941             1525-1527             (NCCL's: 1628-1634)
#
# On 4 x H200 at 1 GiB the copy hid 102 of direct all-gather's 127 us (one step) but only 20-25 of ring
# all-gather's and pairwise all-to-all's ~130 (three steps), issued after the first step or after the
# last; why was not traced. So the cost model takes the copy off only where each rank has one step
# (rounds.own_block_hidden). A high-priority NCCL stream with the copy issued first got 1621-1631 at
# 1 GiB on 2 GPUs. A schedule that sends the block together with others (recursive doubling after its
# first step) keeps the copy first.
def own_block_aside(schedule: Schedule, rank: int) -> bool:
    """Whether ``rank``'s own-block copy may run beside ``schedule`` ([Note: own block aside])."""
    key = ("aside", rank)
    if key not in schedule._cache:
        n, k = schedule.world_size, schedule.nchunks
        lo, hi = rank * (k // n), (rank + 1) * (k // n)
        ok = k % n == 0
        for step in schedule.steps(rank) if ok else ():
            for o in step.ops:
                if o.stop <= lo or o.start >= hi or o.start == o.stop:
                    continue
                if isinstance(o, Send) and (o.buffer is Buffer.INPUT or lo <= o.start and o.stop <= hi):
                    continue
                ok = False
        schedule._cache[key] = ok
    return schedule._cache[key]


@dataclass(slots=True)
class _Group:
    """Segment k of every transfer of a step: posted together, then its receives are combined."""
    sends: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    recvs: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # (recv index, dst, src, wire copy of dst or None): dst (op)= src once receive i is in
    combines: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    # (recv index, dst, src): dst.copy_(src) once receive i is in (compressed overwrites)
    copies: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def segment_sizes(schedule: Schedule, rank: int, seg: int, count: int, cuda: bool) -> list[list[int]]:
    """Per step of ``rank``, per op: the largest segment (elements) its transfer is cut into.

    On CUDA only reducing transfers are cut (where a reduction could overlap later segments'
    transfers; by default none is: [Note: whole transfers on CUDA]), so a transfer into an
    overwriting receive goes whole; both ends decide alike (reducing_transfers).
    """
    if not cuda:
        return [[seg] * len(step.ops) for step in schedule.steps(rank)]
    return [[seg if r else count + 1 for r in flags] for flags in reducing_transfers(schedule, rank)]


class Executor:
    """Runs schedules for one rank. On CUDA, transfers are issued from a side stream and
    reductions run on the caller's current stream, so segment k+1 travels while segment k
    is reduced; on CPU every segment is its own request and gloo's threads move them."""

    def __init__(self, transport: Transport, max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES) -> None:
        if max_segment_bytes <= 0:
            raise ValueError(f"max_segment_bytes must be positive, got {max_segment_bytes}")
        self.transport = transport
        self.max_segment_bytes = max_segment_bytes
        # side streams by (use, device): "issue" posts transfers, "aside" copies beside them
        self._streams: dict[tuple[str, torch.device], torch.cuda.Stream] = {}
        self.nvlink = None  # collectives.nvlink.NvlinkPeers: direct all-reduce over NVLink ([Note: NVLink direct])

    def run(self, schedule: Schedule, work: torch.Tensor, red: Reduction | None = None,
            inp: torch.Tensor | None = None, wire_dtype: torch.dtype | None = None,
            own: tuple[int, torch.Tensor] | None = None,
            posted: Callable[[], None] | None = None) -> torch.Tensor | None:
        """Run this rank's steps of ``schedule`` on the flat, contiguous ``work`` buffer.

        ``own`` = (offset, tensor): sends that read only ``work[offset:offset + len(tensor)]`` read
        ``tensor`` instead ([Note: own block aside]). ``posted`` (CUDA): called once, as soon as the
        first step's transfers are issued.

        With ``wire_dtype`` (compression), data travels as a rounded copy ``wire``
        of the work buffer: sends read it, receives land in it (or in a scratch of
        that dtype), reductions accumulate in the work buffer's dtype and refresh
        the wire copy. Returns the wire buffer, which holds every chunk's last
        rounded value (the same on every rank), or None without compression.
        """
        rank = self.transport.rank
        bounds = schedule.bounds(work.numel())
        wire = work.to(wire_dtype) if wire_dtype is not None and wire_dtype != work.dtype else None
        seg = max(1, self.max_segment_bytes // max(1, (wire if wire is not None else work).element_size()))
        scratch = self._scratch(schedule, rank, bounds, work if wire is None else wire)
        cuda = work.device.type == "cuda"
        for step, segs in zip(schedule.steps(rank), segment_sizes(schedule, rank, seg, work.numel(), cuda)):
            if step.ops:
                groups, ordered = self._plan_step(step.ops, bounds, segs, work, inp, scratch, wire, own)
                if cuda:
                    self._step_cuda(groups, ordered, red, work.device, posted)
                    posted = None
                else:
                    self._step_host(groups, ordered, red)
        return wire

    @staticmethod
    def _scratch(schedule: Schedule, rank: int, bounds: list[int], like: torch.Tensor) -> torch.Tensor | None:
        need = max((sum(bounds[o.stop] - bounds[o.start] for o in st.recvs if o.reduce)
                    for st in schedule.steps(rank)), default=0)
        return torch.empty(need, dtype=like.dtype, device=like.device) if need else None

    @staticmethod
    def _plan_step(ops, bounds: list[int], segs: list[int], work: torch.Tensor, inp: torch.Tensor | None,
                   scratch: torch.Tensor | None, wire: torch.Tensor | None,
                   own: tuple[int, torch.Tensor] | None = None) -> tuple[list[_Group], bool]:
        """Cut the step's transfers into segment groups (op i into pieces of at most ``segs[i]``
        elements). ``ordered`` is False when a reduction lands in a chunk this step also sends
        (rule 1): then all sends must finish first."""
        groups: list[_Group] = []
        sent: set[int] = set()
        reduced: set[int] = set()
        used = 0

        def group(k: int) -> _Group:
            while len(groups) <= k:
                groups.append(_Group())
            return groups[k]

        for op, seg in zip(ops, segs):
            lo, hi = bounds[op.start], bounds[op.stop]
            if hi == lo:
                continue
            if isinstance(op, Send):
                src = inp if op.buffer is Buffer.INPUT else (work if wire is None else wire)
                shift = 0
                if own is not None and op.buffer is Buffer.WORK and wire is None and \
                        own[0] <= lo and hi <= own[0] + own[1].numel():
                    src, shift = own[1], own[0]  # [Note: own block aside]
                assert src is not None
                for k, (a, b) in enumerate(_segments(lo, hi, seg)):
                    group(k).sends.append((op.peer, src[a - shift:b - shift]))
                if op.buffer is Buffer.WORK:
                    sent.update(range(op.start, op.stop))
            elif op.reduce:
                reduced.update(range(op.start, op.stop))
                for k, (a, b) in enumerate(_segments(lo, hi, seg)):
                    g = group(k)
                    buf = scratch[used + a - lo:used + b - lo]  # type: ignore[index]
                    g.combines.append((len(g.recvs), work[a:b], buf, None if wire is None else wire[a:b]))
                    g.recvs.append((op.peer, buf))
                used += hi - lo
            elif wire is None:
                for k, (a, b) in enumerate(_segments(lo, hi, seg)):
                    group(k).recvs.append((op.peer, work[a:b]))
            else:
                for k, (a, b) in enumerate(_segments(lo, hi, seg)):
                    g = group(k)
                    g.copies.append((len(g.recvs), work[a:b], wire[a:b]))
                    g.recvs.append((op.peer, wire[a:b]))
        if wire is not None:
            # Several receives reducing into one slice (direct's reduce-scatter): refresh its wire copy once,
            # after the last of them. The last combine touching an element is the last with its exact slice.
            for g in groups:
                last = {(dst.data_ptr(), dst.numel()): i for i, (_, dst, _, _) in enumerate(g.combines)}
                g.combines = [(r, dst, src, w if last[(dst.data_ptr(), dst.numel())] == i else None)
                              for i, (r, dst, src, w) in enumerate(g.combines)]
        return groups, not (sent & reduced)

    def _step_host(self, groups: list[_Group], ordered: bool, red: Reduction | None) -> None:
        posted = [self.transport.post(g.sends, g.recvs) for g in groups]
        if not ordered:
            for swaits, _ in posted:
                for w in swaits:
                    w.wait()
        for g, (_, rwaits) in zip(groups, posted):
            pending = dict(enumerate(rwaits))  # a gloo work must be waited exactly once
            _apply(g, red, lambda i: pending.pop(i).wait() if i in pending else None)
        if ordered:
            for swaits, _ in posted:
                for w in swaits:
                    w.wait()

    def stream(self, use: str, device: torch.device) -> torch.cuda.Stream:
        """This executor's side stream for ``use`` on ``device`` ("issue": transfers; "aside": copies beside
        the schedule, [Note: own block aside]), made on first use."""
        key = (use, device)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device)
        return self._streams[key]

    def _step_cuda(self, groups: list[_Group], ordered: bool, red: Reduction | None, device: torch.device,
                   posted_hook: Callable[[], None] | None = None) -> None:
        main = torch.cuda.current_stream(device)
        issue = self.stream("issue", device)
        issue.wait_stream(main)  # this step's sends read what earlier steps reduced
        with torch.cuda.stream(issue):
            posted = [self.transport.post(g.sends, g.recvs) for g in groups]
        if posted_hook is not None:
            posted_hook()
        # Waits below are stream waits: main waits for the transfer, no host blocking.
        if not ordered:
            for swaits, _ in posted:
                for w in swaits:
                    w.wait()
        for g, (_, rwaits) in zip(groups, posted):
            for w in rwaits:
                w.wait()
            _apply(g, red, lambda i: None)
        for swaits, _ in posted:
            for w in swaits:
                w.wait()


def _own_block(ex: Executor, schedule: Schedule, out: torch.Tensor, mine: torch.Tensor, block: torch.Tensor,
               **run: Any) -> None:
    """Copy ``block`` into ``mine`` (the rank's own block of ``out``) and run the schedule on ``out``
    (``ex.run`` with the keywords ``run``): the copy beside the run where the schedule allows it ([Note: own
    block aside]), else first."""
    if not own_block_aside(schedule, ex.transport.rank):
        mine.copy_(block)
        ex.run(schedule, out, **run)
    elif out.is_cuda:
        main = torch.cuda.current_stream(out.device)
        aside = ex.stream("aside", out.device)
        done = []

        def copy() -> None:
            aside.wait_stream(main)  # the caller's writes to the input come first
            with torch.cuda.stream(aside):
                mine.copy_(block)
            done.append(True)

        ex.run(schedule, out, posted=copy, **run)  # the copy is issued once the first step's transfers are
        if not done:  # no step of this rank issued any
            copy()
        main.wait_stream(aside)
    else:
        ex.run(schedule, out, **run)
        mine.copy_(block)


def _apply(g: _Group, red: Reduction | None, ready: Callable[[int], None]) -> None:
    """Apply a group's receives once they are in (``ready(i)``: receive i may be read): reductions in
    listed order, the order the verifier proved, each refreshing its wire copy where it has one; then
    every other receive; then the compressed overwrites."""
    for i, dst, src, wire in g.combines:
        ready(i)
        red.combine(dst, src)  # type: ignore[union-attr]
        if wire is not None:
            wire.copy_(dst)
    for i in range(len(g.recvs)):
        ready(i)
    for _, dst, src in g.copies:
        dst.copy_(src)


def finish_average(t: torch.Tensor, red: Reduction | None, size: int) -> None:
    if red is Reduction.AVG and size > 1:
        t.div_(size)


def run_collective(ex: Executor, schedule: Schedule, red: Reduction | None,
                   out: torch.Tensor, inp: torch.Tensor | None = None,
                   wire_dtype: torch.dtype | None = None) -> None:
    """Set up the work buffer for ``schedule.collective``, run it, and finish (copy-out, avg).

    ``out`` and ``inp`` are flat views of the caller's tensors. all-reduce and
    broadcast work in place on ``out``; reduce-scatter reduces a copy of the
    input; all-gather and all-to-all gather straight into ``out``; reduce
    leaves non-root inputs untouched by reducing into a copy. ``wire_dtype``
    (all-reduce and reduce-scatter) compresses what travels; an all-reduce then
    ends with the rounded values every rank holds alike.
    """
    rank, n = ex.transport.rank, schedule.world_size
    coll = schedule.collective
    if ex.nvlink is not None and ex.nvlink.takes(schedule, out, red, wire_dtype):
        ex.nvlink.run(coll, out, inp, red, wire_dtype)  # [Note: NVLink direct]
        return
    if coll is Collective.ALL_REDUCE:
        wire = ex.run(schedule, out, red, wire_dtype=wire_dtype)
        if wire is not None:
            out.copy_(wire)
        finish_average(out, red, n)
    elif coll is Collective.BROADCAST:
        ex.run(schedule, out)
    elif coll is Collective.REDUCE:
        work = out if rank == schedule.root else out.clone()
        ex.run(schedule, work, red)
        if rank == schedule.root:
            finish_average(out, red, n)
    elif coll is Collective.REDUCE_SCATTER:
        assert inp is not None
        work = inp.clone()
        ex.run(schedule, work, red, wire_dtype=wire_dtype)
        m = out.numel()
        out.copy_(work[rank * m:(rank + 1) * m])
        finish_average(out, red, n)
    elif coll is Collective.ALL_GATHER:
        assert inp is not None
        m = inp.numel()
        mine = out[rank * m:(rank + 1) * m]
        if mine.data_ptr() == inp.data_ptr() and m:
            ex.run(schedule, out)  # in place: the block is already there
        else:
            _own_block(ex, schedule, out, mine, inp, own=(rank * m, inp))
    elif coll is Collective.ALL_TO_ALL:
        assert inp is not None
        m = inp.numel() // n
        block = inp[rank * m:(rank + 1) * m]
        _own_block(ex, schedule, out, out[rank * m:(rank + 1) * m], block, inp=inp)
    else:  # pragma: no cover - the enum is closed
        raise AssertionError(coll)
