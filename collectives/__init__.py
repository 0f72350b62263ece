"""topocomm collectives: topology-aware collective communication for PyTorch.

    import collectives as C
    comm = C.init()
    comm.all_reduce(t)            # in place; the cost model picks the algorithm
"""

from . import algorithms as _algorithms
from .bootstrap import default_communicator, init, shutdown
from .communicator import AUTO, CollectiveMismatchError, Communicator, Handle
from .model import CostModel, Plan
from .ops import Reduction
from .schedule import Collective, Schedule, format_schedule, parse_schedule
from .topology import Topology
from .verify import ScheduleError, verify

ALGORITHMS: tuple[str, ...] = _algorithms.names()


def all_reduce(t, op="sum", algorithm=AUTO, async_op=False):
    return default_communicator().all_reduce(t, op=op, algorithm=algorithm, async_op=async_op)


def reduce_scatter(out, inp, op="sum", algorithm=AUTO, async_op=False):
    return default_communicator().reduce_scatter(out, inp, op=op, algorithm=algorithm, async_op=async_op)


def all_gather(out, inp, algorithm=AUTO, async_op=False):
    return default_communicator().all_gather(out, inp, algorithm=algorithm, async_op=async_op)


def broadcast(t, src=0, algorithm=AUTO, async_op=False):
    return default_communicator().broadcast(t, src=src, algorithm=algorithm, async_op=async_op)


def reduce(t, dst=0, op="sum", algorithm=AUTO, async_op=False):
    return default_communicator().reduce(t, dst=dst, op=op, algorithm=algorithm, async_op=async_op)


def all_to_all(out, inp, algorithm=AUTO, async_op=False):
    return default_communicator().all_to_all(out, inp, algorithm=algorithm, async_op=async_op)


def send(t, dst):
    return default_communicator().send(t, dst)


def recv(t, src):
    return default_communicator().recv(t, src)


def isend(t, dst):
    return default_communicator().isend(t, dst)


def irecv(t, src):
    return default_communicator().irecv(t, src)


def barrier():
    return default_communicator().barrier()


def plan(op, nbytes, dtype=None):
    import torch

    return default_communicator().plan(op, nbytes, dtype or torch.float32)


__all__ = [
    "ALGORITHMS", "AUTO", "Collective", "CollectiveMismatchError", "Communicator", "CostModel", "Handle",
    "Plan", "Reduction", "Schedule", "ScheduleError", "Topology", "all_gather", "all_reduce", "all_to_all",
    "barrier", "broadcast", "default_communicator", "format_schedule", "init", "irecv", "isend", "parse_schedule",
    "plan", "recv", "reduce", "reduce_scatter", "send", "shutdown", "verify",
]
