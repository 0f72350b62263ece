"""The executor: runs any Schedule on a Transport. The only code that moves bytes.

For each step of this rank it posts every transfer of the step at once (one
grouped call on NCCL), cut into segments of at most ``max_segment_bytes``;
overwriting receives land directly in the work buffer, reducing receives land
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

import torch

from .ops import Reduction
from .schedule import Buffer, Collective, Recv, Schedule, Send
from .transport import Transport

DEFAULT_MAX_SEGMENT_BYTES = 4 << 20


def _segments(lo: int, hi: int, seg: int) -> list[tuple[int, int]]:
    return [(a, min(a + seg, hi)) for a in range(lo, hi, seg)]


class Executor:
    def __init__(self, transport: Transport, max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES) -> None:
        if max_segment_bytes <= 0:
            raise ValueError(f"max_segment_bytes must be positive, got {max_segment_bytes}")
        self.transport = transport
        self.max_segment_bytes = max_segment_bytes

    def run(self, schedule: Schedule, work: torch.Tensor, red: Reduction | None = None,
            inp: torch.Tensor | None = None) -> None:
        """Run this rank's steps of ``schedule`` on the flat, contiguous ``work`` buffer."""
        rank = self.transport.rank
        bounds = schedule.bounds(work.numel())
        seg = max(1, self.max_segment_bytes // max(1, work.element_size()))
        scratch = self._scratch(schedule, rank, bounds, work)
        for step in schedule.steps(rank):
            if step.ops:
                self._step(step.ops, bounds, seg, work, inp, scratch, red)

    @staticmethod
    def _scratch(schedule: Schedule, rank: int, bounds: list[int], work: torch.Tensor) -> torch.Tensor | None:
        need = max((sum(bounds[o.stop] - bounds[o.start] for o in st.recvs if o.reduce)
                    for st in schedule.steps(rank)), default=0)
        return torch.empty(need, dtype=work.dtype, device=work.device) if need else None

    def _step(self, ops, bounds: list[int], seg: int, work: torch.Tensor, inp: torch.Tensor | None,
              scratch: torch.Tensor | None, red: Reduction | None) -> None:
        sends: list[tuple[int, torch.Tensor]] = []
        sent: set[int] = set()
        recvs: list[tuple[int, torch.Tensor]] = []
        combines: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (recv index, dst, src)
        used = 0
        for op in ops:
            lo, hi = bounds[op.start], bounds[op.stop]
            if hi == lo:
                continue
            if isinstance(op, Send):
                src = inp if op.buffer is Buffer.INPUT else work
                assert src is not None
                sends.extend((op.peer, src[a:b]) for a, b in _segments(lo, hi, seg))
                if op.buffer is Buffer.WORK:
                    sent.update(range(op.start, op.stop))
            elif op.reduce:
                for a, b in _segments(lo, hi, seg):
                    buf = scratch[used + a - lo:used + b - lo]  # type: ignore[index]
                    combines.append((len(recvs), work[a:b], buf))
                    recvs.append((op.peer, buf))
                used += hi - lo
            else:
                recvs.extend((op.peer, work[a:b]) for a, b in _segments(lo, hi, seg))
        sends_overlap = any(isinstance(o, Recv) and o.reduce and sent.intersection(range(o.start, o.stop))
                            for o in ops)
        swaits, rwaits = self.transport.post(sends, recvs)
        if combines and sends_overlap:
            for w in swaits:  # rule 1: a send must not see this step's reductions
                w.wait()
            swaits = []
        waited = set()
        for i, dst, src in combines:  # in listed order: the order the verifier proved
            rwaits[i].wait()
            waited.add(i)
            red.combine(dst, src)  # type: ignore[union-attr]
        for i, w in enumerate(rwaits):  # a gloo work must be waited exactly once
            if i not in waited:
                w.wait()
        for w in swaits:
            w.wait()


def finish_average(t: torch.Tensor, red: Reduction | None, size: int) -> None:
    if red is Reduction.AVG and size > 1:
        t.div_(size)


def run_collective(ex: Executor, schedule: Schedule, red: Reduction | None,
                   out: torch.Tensor, inp: torch.Tensor | None = None) -> None:
    """Set up the work buffer for ``schedule.collective``, run it, and finish (copy-out, avg).

    ``out`` and ``inp`` are flat views of the caller's tensors. all-reduce and
    broadcast work in place on ``out``; reduce-scatter reduces a copy of the
    input; all-gather and all-to-all gather straight into ``out``; reduce
    leaves non-root inputs untouched by reducing into a copy.
    """
    rank, n = ex.transport.rank, schedule.world_size
    coll = schedule.collective
    if coll is Collective.ALL_REDUCE:
        ex.run(schedule, out, red)
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
        ex.run(schedule, work, red)
        m = out.numel()
        out.copy_(work[rank * m:(rank + 1) * m])
        finish_average(out, red, n)
    elif coll is Collective.ALL_GATHER:
        assert inp is not None
        m = inp.numel()
        mine = out[rank * m:(rank + 1) * m]
        if mine.data_ptr() != inp.data_ptr() or m == 0:
            mine.copy_(inp)
        ex.run(schedule, out)
    elif coll is Collective.ALL_TO_ALL:
        assert inp is not None
        m = inp.numel() // n
        out[rank * m:(rank + 1) * m].copy_(inp[rank * m:(rank + 1) * m])
        ex.run(schedule, out, inp=inp)
    else:  # pragma: no cover - the enum is closed
        raise AssertionError(coll)
