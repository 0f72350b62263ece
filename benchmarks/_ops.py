"""What each benchmarked operation is: its buffers, its call, its expected result, its busbw factor.

Sizes follow nccl-tests: the size of a row is the larger of the two buffers
(the output of all_gather, the input of reduce_scatter) rounded down to whole
elements and, for the blocked ops, to a multiple of the world size; the count
column is the per-rank block for blocked ops and the whole buffer otherwise.

[Note: in place] topocomm's all_reduce, broadcast and reduce work in place.
Their out-of-place columns time ``out.copy_(inp)`` followed by the in-place
call, which is what a caller who must keep its input does. The in-place
layouts of reduce_scatter and all_gather are nccl-tests' (this rank's block of
the larger buffer is the smaller one). all_to_all and sendrecv have no
in-place form.

[Note: check values] The check input of rank r at index i is a small
non-negative integer depending on both, chosen so that every partial result
is exactly representable in the dtype (sums stay below 2^mantissa, products
are powers of two): any reduction order gives the same bits, so results are
compared exactly. Only "avg" on floating types is compared with a tolerance
(a backend may scale before summing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from collectives import algorithms
from collectives.ops import FLOAT_DTYPES, Reduction
from collectives.schedule import Collective

# Largest n such that every integer in [0, n] is exact in the dtype.
_EXACT_INT = {torch.float32: 1 << 24, torch.float64: 1 << 53, torch.float16: 1 << 11, torch.bfloat16: 1 << 8}
_VALUE_RANGE = 100  # fits int8 and uint8, exact in bfloat16


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    size: int   # bytes, the nccl-tests size column
    count: int  # elements, the nccl-tests count column
    inp: int    # input elements per rank
    out: int    # output elements per rank


class BenchOp:
    """One operation of the sweep. Subclasses set the class attributes and override what differs."""

    name: str = ""
    reduces = False          # has a reduction op (the redop column)
    rooted = False           # has a root (the root column)
    blocked = False          # buffers are one block per rank
    has_in_place = True
    natural_in_place = True  # the mode a user of topocomm calls: what summaries and plots compare

    def factor(self, n: int) -> float:
        """busbw / algbw."""
        return 1.0

    def layout(self, nbytes: int, esize: int, n: int) -> Layout:
        c = nbytes // esize
        return Layout(c * esize, c, c, c)

    def algorithms(self) -> tuple[str, ...]:
        return algorithms.supported(Collective(self.name))

    def buffers(self, lay: Layout, in_place: bool, rank: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) of this rank; views of one buffer in place."""
        if not in_place:
            return (torch.zeros(lay.inp, dtype=dtype, device=device),
                    torch.zeros(lay.out, dtype=dtype, device=device))
        buf = torch.zeros(max(lay.inp, lay.out), dtype=dtype, device=device)
        return buf, buf

    def bind(self, comm, inp: torch.Tensor, out: torch.Tensor, algorithm: str,
             red: Reduction, root: int) -> Callable[[], None]:
        """A closure running one call (what the timed loop repeats)."""
        raise NotImplementedError

    def expected(self, x: Callable[[int], torch.Tensor], rank: int, n: int, red: Reduction,
                 root: int) -> torch.Tensor:
        """This rank's correct output, given ``x(r)``: rank r's check input."""
        raise NotImplementedError


def _copy_then(call: Callable[[torch.Tensor], None], inp: torch.Tensor, out: torch.Tensor) -> Callable[[], None]:
    """An in-place call made out of place ([Note: in place])."""
    if inp.data_ptr() == out.data_ptr():
        return lambda: call(out)

    def run() -> None:
        out.copy_(inp)
        call(out)
    return run


def reduce_all(x: Callable[[int], torch.Tensor], n: int, red: Reduction) -> torch.Tensor:
    acc = x(0).clone()
    for r in range(1, n):
        red.combine(acc, x(r))
    if red is Reduction.AVG:
        acc.div_(n)
    return acc


class AllReduce(BenchOp):
    name, reduces = "all_reduce", True

    def factor(self, n: int) -> float:
        return 2 * (n - 1) / n

    def bind(self, comm, inp, out, algorithm, red, root):
        return _copy_then(lambda t: comm.all_reduce(t, op=red, algorithm=algorithm), inp, out)

    def expected(self, x, rank, n, red, root):
        return reduce_all(x, n, red)


class _Blocked(BenchOp):
    blocked, natural_in_place = True, False

    def factor(self, n: int) -> float:
        return (n - 1) / n

    def layout(self, nbytes: int, esize: int, n: int) -> Layout:
        m = nbytes // esize // n
        return Layout(m * n * esize, m, m * n, m * n)


class ReduceScatter(_Blocked):
    name, reduces = "reduce_scatter", True

    def layout(self, nbytes, esize, n):
        lay = super().layout(nbytes, esize, n)
        return dataclasses.replace(lay, out=lay.count)

    def buffers(self, lay, in_place, rank, dtype, device):
        inp, out = super().buffers(lay, in_place, rank, dtype, device)
        return (inp, inp[rank * lay.count:(rank + 1) * lay.count]) if in_place else (inp, out)

    def bind(self, comm, inp, out, algorithm, red, root):
        return lambda: comm.reduce_scatter(out, inp, op=red, algorithm=algorithm)

    def expected(self, x, rank, n, red, root):
        m = x(0).numel() // n
        return reduce_all(x, n, red)[rank * m:(rank + 1) * m]


class AllGather(_Blocked):
    name = "all_gather"

    def layout(self, nbytes, esize, n):
        lay = super().layout(nbytes, esize, n)
        return dataclasses.replace(lay, inp=lay.count)

    def buffers(self, lay, in_place, rank, dtype, device):
        inp, out = super().buffers(lay, in_place, rank, dtype, device)
        return (out[rank * lay.count:(rank + 1) * lay.count], out) if in_place else (inp, out)

    def bind(self, comm, inp, out, algorithm, red, root):
        return lambda: comm.all_gather(out, inp, algorithm=algorithm)

    def expected(self, x, rank, n, red, root):
        return torch.cat([x(r) for r in range(n)])


class AllToAll(_Blocked):
    name, has_in_place = "all_to_all", False

    def bind(self, comm, inp, out, algorithm, red, root):
        return lambda: comm.all_to_all(out, inp, algorithm=algorithm)

    def expected(self, x, rank, n, red, root):
        m = x(0).numel() // n
        return torch.cat([x(r)[rank * m:(rank + 1) * m] for r in range(n)])


class Broadcast(BenchOp):
    name, rooted = "broadcast", True

    def bind(self, comm, inp, out, algorithm, red, root):
        return _copy_then(lambda t: comm.broadcast(t, src=root, algorithm=algorithm), inp, out)

    def expected(self, x, rank, n, red, root):
        return x(root)


class Reduce(BenchOp):
    name, reduces, rooted = "reduce", True, True

    def bind(self, comm, inp, out, algorithm, red, root):
        return _copy_then(lambda t: comm.reduce(t, dst=root, op=red, algorithm=algorithm), inp, out)

    def expected(self, x, rank, n, red, root):
        return reduce_all(x, n, red) if rank == root else x(rank)  # non-roots keep their input


class SendRecv(BenchOp):
    """Every rank sends to the next and receives from the previous (nccl-tests' sendrecv).

    The send and the receive go out as one grouped call (torch's batch_isend_irecv, ncclGroupStart/End on
    NCCL), as nccl-tests does: two separate calls can deadlock NCCL when both peers send first.
    """

    name, has_in_place = "sendrecv", False

    def algorithms(self) -> tuple[str, ...]:
        return (algorithms.NATIVE,)

    def bind(self, comm, inp, out, algorithm, red, root):
        n, r, g = comm.size, comm.rank, comm.group
        if n == 1:
            return lambda: out.copy_(inp)
        nxt, prv = dist.get_global_rank(g, (r + 1) % n), dist.get_global_rank(g, (r - 1) % n)

        def run() -> None:
            ops = [dist.P2POp(dist.isend, inp, nxt, g), dist.P2POp(dist.irecv, out, prv, g)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        return run

    def expected(self, x, rank, n, red, root):
        return x((rank - 1) % n)


OPS: dict[str, BenchOp] = {op.name: op for op in (AllReduce(), AllGather(), ReduceScatter(), Broadcast(),
                                                   Reduce(), AllToAll(), SendRecv())}


def check_input(numel: int, rank: int, n: int, dtype: torch.dtype, red: Reduction | None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Rank ``rank``'s check input ([Note: check values])."""
    i = torch.arange(numel, dtype=torch.int64, device=device)
    if red is Reduction.PROD:
        v = 1 + ((i + rank) % 3 == 0).to(torch.int64)  # 1 or 2: products are powers of two
    else:
        m = _VALUE_RANGE
        if red in (Reduction.SUM, Reduction.AVG) and dtype in _EXACT_INT:
            m = max(2, min(m, _EXACT_INT[dtype] // max(1, n)))
        v = (i * 7 + rank * 13 + 1) % m
    return v.to(dtype)


def count_wrong(result: torch.Tensor, expected: torch.Tensor, red: Reduction | None) -> int:
    """Elements of ``result`` that differ from ``expected`` (exact, but for "avg" on floats)."""
    if result.shape != expected.shape:
        raise ValueError(f"result has {result.numel()} elements, expected {expected.numel()}")
    if red is Reduction.AVG and result.dtype in FLOAT_DTYPES:
        eps = torch.finfo(result.dtype).eps
        bad = ~torch.isclose(result.double(), expected.double(), rtol=4 * eps, atol=0.0)
    else:
        bad = result != expected
    return int(bad.sum())
