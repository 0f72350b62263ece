"""``native``: the backend's own collectives (NCCL's tuned ring/tree, gloo's, MPI's).

The one algorithm without a Schedule. Ops a backend lacks are completed here:
gloo has no AVG (sum, then one division), and a reduce leaves non-root inputs
untouched, as our own algorithms do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

from .execute import finish_average
from .ops import Reduction
from .schedule import Collective

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_DIRECT = (Collective.ALL_REDUCE, Collective.REDUCE_SCATTER, Collective.ALL_GATHER, Collective.BROADCAST)


def _launch(coll: Collective, group: dist.ProcessGroup, op: dist.ReduceOp | None, out: torch.Tensor,
            inp: torch.Tensor | None, root: int | None, blocking: bool) -> dist.Work | None:
    """Start the backend's collective (one of _DIRECT) through the ProcessGroup itself ([Note: straight
    to the group]). Its Work, or None from a blocking call the backend already completed in order."""
    def options(opts):
        opts.asyncOp = not blocking  # blocking: NCCL may run it on the caller's stream
        return opts

    if coll is Collective.ALL_REDUCE:
        opts = options(dist.AllreduceOptions())
        opts.reduceOp = op
        return group.allreduce([out], opts)
    if coll is Collective.REDUCE_SCATTER:
        opts = options(dist.ReduceScatterOptions())
        opts.reduceOp = op
        return group._reduce_scatter_base(out, inp, opts)
    if coll is Collective.ALL_GATHER:
        return group._allgather_base(out, inp, options(AllgatherOptions()))
    if coll is Collective.BROADCAST:
        opts = options(dist.BroadcastOptions())
        opts.rootRank, opts.rootTensor = root, 0
        return group.broadcast([out], opts)
    raise AssertionError(coll)

# [Note: straight to the group]
# torch.distributed's module functions (dist.all_reduce and the rest) check their arguments, look
# the group up and log around the call in Python: measured about 80 us a call on H200 through NCCL,
# three times NCCL's own small-message latency. Our arguments are validated before any call
# (validate.py) and the group is known, so all-reduce, reduce-scatter, all-gather and broadcast go
# to the ProcessGroup's own methods, as DDP's C++ reducer does. The Work they return behaves as
# the module functions' does: wait() blocks the host on gloo and the caller's stream on NCCL.


def start_native(coll: Collective, group: dist.ProcessGroup, red: Reduction | None, out: torch.Tensor,
                 inp: torch.Tensor | None) -> dist.Work | None:
    """Launch NCCL's own in-place all-reduce asynchronously on its stream and return its Work (``wait()``
    makes the caller's stream wait for it), or None where the Communicator's side stream must run it.

    This is how DDP issues its bucket all-reduces, and it skips the side stream: for back-to-back
    bucket calls that stream's two cross-stream waits per call cost more than they order (NCCL's
    stream already waits for the caller's stream at launch). Only in place: the Work holds its
    tensors until it is waited for, which for a persistent bucket costs nothing, but would keep
    ZeRO's transient reduce-scatter inputs and gathered units alive for a whole backward (measured:
    peak memory 1.4-1.6x the model states on 4 GPUs, against 1.04-1.10x through the side stream,
    whose record_stream frees them as soon as the stream is done).
    """
    if coll is not Collective.ALL_REDUCE or inp is not None:
        return None
    return _launch(coll, group, red.torch_op if red is not None else None, out, inp, None, blocking=False)


def _torch_op(red: Reduction, backend: str) -> tuple[dist.ReduceOp, bool]:
    """The ReduceOp to pass, and whether we must divide by the world size afterwards."""
    if red is Reduction.AVG and backend != "nccl":
        return dist.ReduceOp.SUM, True
    return red.torch_op, False


def run_native(coll: Collective, group: dist.ProcessGroup, backend: str, red: Reduction | None,
               out: torch.Tensor, inp: torch.Tensor | None, root: int | None,
               wire: torch.dtype | None = None) -> None:
    if wire is not None:  # compressed: the backend reduces in the 16-bit wire dtype
        low_out = out.to(wire)
        run_native(coll, group, backend, red, low_out, inp.to(wire) if inp is not None else None, root)
        out.copy_(low_out)
        return
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    op, divide = _torch_op(red, backend) if red is not None else (None, False)
    if coll in _DIRECT:
        work = _launch(coll, group, op, out, inp, root, blocking=True)
        if work is not None:  # None: a blocking NCCL call that ran on the caller's stream
            work.wait()
        if divide and (coll is Collective.ALL_REDUCE or coll is Collective.REDUCE_SCATTER):
            finish_average(out, red, size)
        return
    if coll is Collective.REDUCE:
        buf = out if rank == root else out.clone()
        dist.reduce(buf, dst=dist.get_global_rank(group, root), op=op, group=group)
        if divide and rank == root:
            finish_average(out, red, size)
    elif coll is Collective.ALL_TO_ALL:
        dist.all_to_all_single(out, inp, group=group)
    else:  # pragma: no cover
        raise AssertionError(coll)
