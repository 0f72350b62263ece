"""``native``: the backend's own collectives (NCCL's tuned ring/tree, gloo's, MPI's).

The one algorithm without a Schedule. Ops a backend lacks are completed here:
gloo has no AVG (sum, then one division), and a reduce leaves non-root inputs
untouched, as our own algorithms do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .execute import finish_average
from .ops import Reduction
from .schedule import Collective

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def start_native(coll: Collective, group: dist.ProcessGroup, red: Reduction | None, out: torch.Tensor,
                 inp: torch.Tensor | None) -> dist.Work | None:
    """Launch NCCL's own all-reduce, reduce-scatter or all-gather asynchronously on its stream and return
    its Work (``wait()`` makes the caller's stream wait for it), or None where run_native must do it.

    This is how DDP and FSDP issue their bucket collectives, and it skips the Communicator's side
    stream: for back-to-back bucket calls that side stream's two cross-stream waits per call cost
    more than they order (NCCL's stream already waits for the caller's stream at launch).
    """
    if coll is Collective.ALL_REDUCE:
        return dist.all_reduce(out, op=red.torch_op, group=group, async_op=True)
    if coll is Collective.REDUCE_SCATTER:
        return _reduce_scatter(out, inp, op=red.torch_op, group=group, async_op=True)
    if coll is Collective.ALL_GATHER:
        return _all_gather(out, inp, group=group, async_op=True)
    return None


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
    if coll is Collective.ALL_REDUCE:
        dist.all_reduce(out, op=op, group=group)
        if divide:
            finish_average(out, red, size)
    elif coll is Collective.REDUCE_SCATTER:
        _reduce_scatter(out, inp, op=op, group=group)
        if divide:
            finish_average(out, red, size)
    elif coll is Collective.ALL_GATHER:
        _all_gather(out, inp, group=group)
    elif coll is Collective.BROADCAST:
        dist.broadcast(out, src=dist.get_global_rank(group, root), group=group)
    elif coll is Collective.REDUCE:
        work = out if rank == root else out.clone()
        dist.reduce(work, dst=dist.get_global_rank(group, root), op=op, group=group)
        if divide and rank == root:
            finish_average(out, red, size)
    elif coll is Collective.ALL_TO_ALL:
        dist.all_to_all_single(out, inp, group=group)
    else:  # pragma: no cover
        raise AssertionError(coll)
