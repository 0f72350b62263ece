"""Direct's all-reduce on one NVLink node: stores and loads in peers' memory, three fused kernels.

[Note: NVLink direct]
``direct`` all-reduce is two exchanges: every rank sends chunk q of its data to
rank q, which reduces what it gets into chunk q, then sends the result to every
rank. Over NCCL send/recv each exchange is a copy into NCCL's buffers, a
transfer, and a copy out, and the reduction is a separate pass over a scratch
buffer: 0.81x NCCL's own all-reduce at 1 GiB on 4 x H200, against a ceiling of
0.95x for any all-reduce built from two such exchanges.

On one node whose GPUs reach each other over NVLink, every rank can map its
peers' memory (torch's symmetric memory: one buffer per rank, each mapped
into every rank's address space), and the exchanges become plain stores and
loads in Triton kernels:

1. push: rank r reads chunk q of its input and stores it, rounded to the wire
   dtype, into slot r of rank q's buffer (q != r). Nothing is staged: the
   input is read once, and the bytes cross NVLink once.
2. (device barrier) reduce: rank r adds its own chunk r (read from its input,
   exact) and slots q != r of its buffer, in rank order, accumulating in
   float32 (float64 for float64 data); it rounds the result to the wire dtype
   once, stores it in its own slot r, and writes it, widened again, into its
   output's chunk r. Every rank ends with the same rounded values.
3. (device barrier) pull: rank r loads chunk q from slot q of rank q's buffer
   and writes it into its output (q != r).

A bf16 wire for float32 data costs no extra pass: the cast happens in the
kernels that move the bytes, so half the bytes cross NVLink. Buffers hold
``capacity`` bytes; a larger tensor goes in pieces that fill them.

Buffer safety without a trailing barrier: a push writes slots r != q of rank
q's buffer, which only q's reduce reads, and every rank has passed the second
barrier of the previous call (so finished its reduce) before any push of the
next; a rank's own slot r, which peers pull, is rewritten only by its next
reduce, after the next call's first barrier, which peers reach only once they
finished pulling. Calls run on the communicator's stream, one after another.

[Note: vector width] Triton emits 16-byte loads and stores only where it can
prove a mask constant over each vector: the length of a pass must be a
multiple of 16 elements (Triton specialises integer arguments on that), chunk
starts are multiples of ``ALIGN``, and the peers' addresses, loaded from
memory, carry a ``multiple_of`` hint. A tensor whose length is not a multiple
of 16 ends with a short pass over the remainder, so the bulk stays vectorised.
"""

from __future__ import annotations

import os

import torch

from .ops import Reduction

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

BLOCK = 4096
VECTOR = 16  # elements: a pass whose length is a multiple vectorises its loads and stores
ALIGN = 64  # elements: every chunk starts 16-byte aligned for 16-, 32- and 64-bit dtypes alike
DEFAULT_CAPACITY = 256 << 20
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_OPS = {Reduction.SUM: 0, Reduction.AVG: 0, Reduction.MAX: 1, Reduction.MIN: 2, Reduction.PROD: 3}

if triton is not None:
    @triton.jit
    def _push(x_ptr, buf_ptr, peers_ptr, n, chunk, rank, BLOCK: tl.constexpr):
        q = tl.program_id(1)
        if q != rank:
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            src = q * chunk + offs
            mask = (offs < chunk) & (src < n)
            v = tl.load(x_ptr + src, mask=mask)
            dst = tl.multiple_of(tl.load(peers_ptr + q).to(buf_ptr.dtype), 16)  # symmetric buffers are aligned
            tl.store(dst + rank * chunk + offs, v.to(buf_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _reduce(x_ptr, out_ptr, buf_ptr, n, chunk, rank, WORLD: tl.constexpr, OP: tl.constexpr, AVG: tl.constexpr,
                WIDE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        idx = rank * chunk + offs
        mask = (offs < chunk) & (idx < n)
        acc = tl.load(x_ptr + idx, mask=mask)
        if WIDE:
            acc = acc.to(tl.float64)
        else:
            acc = acc.to(tl.float32)
        for q in tl.static_range(WORLD):
            if q != rank:
                v = tl.load(buf_ptr + q * chunk + offs, mask=mask).to(acc.dtype)
                if OP == 0:
                    acc = acc + v
                elif OP == 1:
                    acc = tl.maximum(acc, v)
                elif OP == 2:
                    acc = tl.minimum(acc, v)
                else:
                    acc = acc * v
        if AVG:
            acc = acc / WORLD
        res = acc.to(buf_ptr.dtype.element_ty)
        tl.store(buf_ptr + rank * chunk + offs, res, mask=mask)
        tl.store(out_ptr + idx, res.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pull(out_ptr, buf_ptr, peers_ptr, n, chunk, rank, BLOCK: tl.constexpr):
        q = tl.program_id(1)
        if q != rank:
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            idx = q * chunk + offs
            mask = (offs < chunk) & (idx < n)
            src = tl.multiple_of(tl.load(peers_ptr + q).to(buf_ptr.dtype), 16)
            v = tl.load(src + idx, mask=mask)
            tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=mask)


def chunk_of(n: int, world: int) -> int:
    """Elements per rank's chunk for ``n`` elements: rounded up to ``ALIGN``."""
    return -(-(-(-n // world)) // ALIGN) * ALIGN


def pieces(n: int, capacity: int, world: int, itemsize: int) -> list[tuple[int, int]]:
    """[start, stop) of each pass over ``n`` elements: ``world`` chunks of the wire dtype fit ``capacity`` bytes."""
    per = capacity // (world * itemsize) // ALIGN * ALIGN
    if per <= 0:
        raise ValueError(f"capacity: {capacity} bytes cannot hold {world} aligned chunks")
    out = [(a, min(a + per * world, n)) for a in range(0, n, per * world)]
    a, b = out[-1] if out else (0, 0)
    if (b - a) % VECTOR and b - a > VECTOR:  # [Note: vector width]
        out[-1:] = [(a, b - (b - a) % VECTOR), (b - (b - a) % VECTOR, b)]
    return out


def phases(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, peers: torch.Tensor, rank: int, world: int,
           red: Reduction):
    """The push, reduce and pull of one pass over flat ``x`` (read) into ``out`` (may be ``x``), as three
    callables; all ranks must finish each before any starts the next (a device barrier between them).
    ``buf``: this rank's buffer, of the wire dtype, at least ``world * chunk_of(x.numel(), world)``
    elements; ``peers``: the int64 addresses of every rank's buffer."""
    n = x.numel()
    chunk = chunk_of(n, world)
    blocks = triton.cdiv(chunk, BLOCK)
    return (lambda: _push[(blocks, world)](x, buf, peers, n, chunk, rank, BLOCK=BLOCK),
            lambda: _reduce[(blocks,)](x, out, buf, n, chunk, rank, WORLD=world, OP=_OPS[red],
                                       AVG=red is Reduction.AVG, WIDE=x.dtype == torch.float64, BLOCK=BLOCK),
            lambda: _pull[(blocks, world)](out, buf, peers, n, chunk, rank, BLOCK=BLOCK))


def unavailable(topology, backend: str, size: int) -> str | None:
    """Why the NVLink path cannot serve this group (None when it can). The same answer on every rank:
    it depends only on what all ranks share."""
    if os.environ.get("TOPOCOMM_NVLINK", "1") in ("0", ""):
        return "TOPOCOMM_NVLINK=0"
    if backend != "nccl" or size < 2:
        return "needs NCCL and two ranks or more"
    if triton is None:
        return "triton is not installed"
    if topology.num_nodes != 1 or topology.fabric not in ("nvlink", "nvswitch"):
        return "needs every rank on one node with NVLink between its GPUs"
    return None


class NvlinkPeers:
    """This rank's symmetric buffer and its peers' addresses, for one process group on one NVLink node.

    Construction is collective: every rank of ``group`` must build one at the same point.
    """

    def __init__(self, group, device: torch.device, capacity: int | None = None) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if capacity is None:
            capacity = int(os.environ.get("TOPOCOMM_NVLINK_BUFFER_BYTES", DEFAULT_CAPACITY))
        self.capacity = capacity
        self.raw = symm_mem.empty(capacity, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.raw, group)
        self.rank, self.size = self.handle.rank, self.handle.world_size
        self.peers = torch.tensor(list(self.handle.buffer_ptrs), dtype=torch.int64, device=device)

    def takes(self, t: torch.Tensor, red: Reduction | None, wire: torch.dtype | None) -> bool:
        return (red in _OPS and t.dtype in DTYPES and (wire is None or wire in DTYPES)
                and not torch.cuda.is_current_stream_capturing())

    def all_reduce(self, t: torch.Tensor, red: Reduction, wire: torch.dtype | None) -> None:
        buf = self.raw.view(wire or t.dtype)
        for a, b in pieces(t.numel(), self.capacity, self.size, buf.element_size()):
            push, reduce, pull = phases(t[a:b], t[a:b], buf, self.peers, self.rank, self.size, red)
            push()
            self.handle.barrier(channel=0)
            reduce()
            self.handle.barrier(channel=1)
            pull()
