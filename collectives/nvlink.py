"""Direct's all-reduce and reduce-scatter on one NVLink node: stores and loads in peers' memory, in one
Triton kernel.

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
loads in one Triton kernel. For each tile (BLOCK elements) of each chunk:

1. push: rank r reads tile t of chunk q of its input and stores it, rounded to
   the wire dtype, into slot r of rank q's buffer (q != r), then raises flag
   (r, t) in rank q's flags. Nothing is staged: the input is read once, and
   the bytes cross NVLink once.
2. reduce: once flag (q, t) is up for every peer q, rank r adds tile t of its
   own chunk r (read from its input, exact) and of slots q != r, in rank
   order, accumulating in float32 (float64 for float64 data); it rounds the
   sum to the wire dtype once, stores it in its own slot r and, widened again,
   in its output, and raises its result flag t. Every rank ends with the same
   rounded values.
3. pull: once rank q's result flag t is up, rank r loads tile t of slot q of
   rank q's buffer into its output's chunk q.

A bf16 wire for float32 data costs no extra pass: the casts happen in the
loads and stores that move the bytes, so half the bytes cross NVLink.
Reduce-scatter is the same kernel without step 3: chunk r's result goes
straight to rank r's output.

[Note: one kernel, tile flags] Block b of the grid handles tiles b, b + G,
b + 2G, ... (G blocks): at step s it pushes tile s, reduces tile s - G and
pulls tile s - 2G, so one block's NVLink transfers overlap another's local
reduction, with no barrier between the phases. Tile t of every chunk is
pushed, reduced and pulled by the block of index t mod G on every rank, so a
block waits only on blocks of its own index on other ranks, which wait only on
earlier steps of theirs: the grid need not fit on the GPU at once. Flags hold
the number of the pass that raised them (the epoch, 64 bits: it never comes
round again), so they are never reset; polls are acquire loads at system
scope, raises release stores after a block barrier. A barrier of all ranks (torch's device barrier over the same memory)
opens each pass: the previous pass is over everywhere, so its slots and
results may be overwritten. Buffers hold ``capacity`` bytes; a larger tensor
goes in passes that fill them. Passes run on the communicator's stream, one
after another.

[Note: graphs] The epoch lives in device memory and is incremented by a kernel
before each pass, so a CUDA graph that captured a call (collectives.graphs)
raises fresh flags at every replay.

Measured on 2 x H200 (CUDA-event means, NCCL in the same run): fp32 231 / 837
/ 3308 us at 64 MiB / 256 MiB / 1 GiB against NCCL's 254 / 902 / 3273 (1.10x,
1.08x, 0.99x); bf16 wire 140 / 480 / 1854 us (1.81x, 1.88x, 1.77x NCCL's
fp32). With each block's push, reduce and pull in sequence (no overlap between
them) the same kernel ran 0.87-0.88x at 1 GiB. Of the settings tried (tiles
of 1024 to 8192 elements, 4 to 16 warps, 1 to 8 blocks per SM) these were the
fastest, tied with 4096 x 8 x 4: benchmarks/results/gpu-h200x2-2026-11-27-nvlink.md.

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
import torch.distributed as dist

from . import algorithms
from .ops import Reduction
from .schedule import Collective, Schedule

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

BLOCK = 2048  # elements per tile; with WARPS and BLOCKS_PER_SM the fastest of 8 settings tried on 2 x H200
WARPS = 4
BLOCKS_PER_SM = 8  # blocks wait only on blocks of the same index elsewhere ([Note: one kernel, tile flags])
VECTOR = 16  # elements: a pass whose length is a multiple vectorises its loads and stores
ALIGN = 64  # elements: every chunk starts 16-byte aligned for 16-, 32- and 64-bit dtypes alike
DEFAULT_CAPACITY = 256 << 20
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_OPS = {Reduction.SUM: 0, Reduction.AVG: 0, Reduction.MAX: 1, Reduction.MIN: 2, Reduction.PROD: 3}

if triton is not None:
    @triton.jit
    def _wait(flag_ptr, epoch):
        while tl.atomic_cas(flag_ptr, epoch, epoch, sem="acquire", scope="sys") != epoch:  # writes back only epoch
            pass
        tl.debug_barrier()  # the whole block reads after the one thread that saw the flag

    @triton.jit
    def _post(flag_ptr, epoch):
        tl.debug_barrier()  # every thread's stores are issued before the flag is released
        tl.atomic_xchg(flag_ptr, epoch, sem="release", scope="sys")

    @triton.jit
    def _direct(x_ptr, out_ptr, buf_ptr, flags_ptr, peers_ptr, peer_flags_ptr, epoch_ptr, n, chunk, stride, slot,
                rank, WORLD: tl.constexpr, OP: tl.constexpr, AVG: tl.constexpr, WIDE: tl.constexpr,
                GATHER: tl.constexpr, BLOCK: tl.constexpr):
        """Chunk q of the input is x[q * stride:][:chunk] (only indices below n exist); slot q of each buffer
        starts at q * slot. GATHER: all-reduce (the result lands in out at the input's place, and every
        rank pulls every chunk); else reduce-scatter (chunk `rank`'s result lands in out[:chunk])."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        epoch = tl.load(epoch_ptr)
        tiles = tl.cdiv(chunk, BLOCK)
        lanes = tl.arange(0, BLOCK)
        # [Note: one kernel, tile flags] step s pushes tile s, reduces tile s - nprog, pulls tile s - 2 nprog
        last = tiles + 2 * nprog if GATHER else tiles + nprog
        for s in range(pid, last, nprog):
            if s < tiles:  # push: tile s of chunk q into slot `rank` of rank q's buffer; raise q's flag
                offs = s * BLOCK + lanes
                for q in tl.static_range(WORLD):
                    if q != rank:
                        src = q * stride + offs
                        mask = (offs < chunk) & (src < n)
                        v = tl.load(x_ptr + src, mask=mask)
                        dst = tl.multiple_of(tl.load(peers_ptr + q).to(buf_ptr.dtype), 16)  # [Note: vector width]
                        tl.store(dst + rank * slot + offs, v.to(buf_ptr.dtype.element_ty), mask=mask)
                        _post(tl.load(peer_flags_ptr + q).to(flags_ptr.dtype) + rank * tiles + s, epoch)
            u = s - nprog
            if (u >= 0) & (u < tiles):  # reduce tile u of chunk `rank` once every peer's piece is in
                offs = u * BLOCK + lanes
                idx = rank * stride + offs
                mask = (offs < chunk) & (idx < n)
                acc = tl.load(x_ptr + idx, mask=mask)
                if WIDE:
                    acc = acc.to(tl.float64)
                else:
                    acc = acc.to(tl.float32)
                for q in tl.static_range(WORLD):
                    if q != rank:
                        _wait(flags_ptr + q * tiles + u, epoch)
                        v = tl.load(buf_ptr + q * slot + offs, mask=mask).to(acc.dtype)
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
                if GATHER:
                    tl.store(buf_ptr + rank * slot + offs, res, mask=mask)
                    tl.store(out_ptr + idx, res.to(out_ptr.dtype.element_ty), mask=mask)
                    _post(flags_ptr + WORLD * tiles + u, epoch)
                else:
                    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)
            w = s - 2 * nprog
            if GATHER & (w >= 0):  # pull: tile w of chunk q from slot q of rank q's buffer, once q reduced it
                offs = w * BLOCK + lanes
                for q in tl.static_range(WORLD):
                    if q != rank:
                        idx = q * stride + offs
                        mask = (offs < chunk) & (idx < n)
                        _wait(tl.load(peer_flags_ptr + q).to(flags_ptr.dtype) + WORLD * tiles + w, epoch)
                        src = tl.multiple_of(tl.load(peers_ptr + q).to(buf_ptr.dtype), 16)
                        v = tl.load(src + q * slot + offs, mask=mask)
                        tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=mask)


def chunk_of(n: int, world: int) -> int:
    """Elements per rank's chunk for ``n`` elements: rounded up to ``ALIGN``."""
    return -(-(-(-n // world)) // ALIGN) * ALIGN


def pieces(n: int, capacity: int, world: int, itemsize: int) -> list[tuple[int, int]]:
    """[start, stop) of each all-reduce pass over ``n`` elements: ``world`` chunks of the wire dtype fit
    ``capacity`` bytes."""
    return _spans(n, _per_slot(capacity, world, itemsize) * world)


def block_pieces(m: int, capacity: int, world: int, itemsize: int) -> list[tuple[int, int]]:
    """[start, stop) within each block of ``m`` elements of each reduce-scatter pass."""
    return _spans(m, _per_slot(capacity, world, itemsize))


def _per_slot(capacity: int, world: int, itemsize: int) -> int:
    per = capacity // (world * itemsize) // ALIGN * ALIGN
    if per <= 0:
        raise ValueError(f"capacity: {capacity} bytes cannot hold {world} aligned chunks")
    return per


def _spans(n: int, step: int) -> list[tuple[int, int]]:
    out = [(a, min(a + step, n)) for a in range(0, n, step)]
    a, b = out[-1] if out else (0, 0)
    if (b - a) % VECTOR and b - a > VECTOR:  # [Note: vector width]
        out[-1:] = [(a, b - (b - a) % VECTOR), (b - (b - a) % VECTOR, b)]
    return out


def flag_words(capacity: int, world: int) -> int:
    """int64 flags a rank needs for passes that fill ``capacity`` bytes: (world + 1) per tile of the
    smallest dtype's chunk."""
    tiles = -(-(capacity // (world * 2)) // BLOCK)
    return (world + 1) * tiles


def launch(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, flags: torch.Tensor, peers: torch.Tensor,
           peer_flags: torch.Tensor, epoch: torch.Tensor, rank: int, world: int, red: Reduction, grid: int) -> None:
    """One all-reduce pass over flat ``x`` (read) into ``out`` (may be ``x``), after a barrier of all ranks.

    ``buf``: this rank's buffer, of the wire dtype, at least ``world * chunk_of(x.numel(), world)``
    elements; ``flags``: its int64 flags, all below ``epoch`` (a one-element int64 tensor on the device,
    read when the kernel starts, so a captured CUDA graph sees each replay's); ``peers``, ``peer_flags``: int64
    addresses of every rank's buffer and flags. ``grid``: blocks ([Note: one kernel, tile flags])."""
    n = x.numel()
    chunk = chunk_of(n, world)
    _launch(x, out, buf, flags, peers, peer_flags, epoch, n, chunk, chunk, chunk, rank, world, red, grid, True)


def launch_reduce_scatter(x: torch.Tensor, stride: int, out: torch.Tensor, buf: torch.Tensor, flags: torch.Tensor,
                          peers: torch.Tensor, peer_flags: torch.Tensor, epoch: torch.Tensor, rank: int, world: int,
                          red: Reduction, grid: int) -> None:
    """One reduce-scatter pass: block q is ``x[q * stride:][:out.numel()]`` (``x`` a flat view that starts
    at this pass's offset in block 0), and block ``rank``'s reduction lands in ``out``. As launch()."""
    chunk = out.numel()
    slot = -(-chunk // ALIGN) * ALIGN
    _launch(x, out, buf, flags, peers, peer_flags, epoch, (world - 1) * stride + chunk, chunk, stride, slot, rank,
            world, red, grid, False)


def _launch(x, out, buf, flags, peers, peer_flags, epoch, n, chunk, stride, slot, rank, world, red, grid, gather):
    tiles = triton.cdiv(chunk, BLOCK)
    _direct[(max(1, min(grid, tiles)),)](
        x, out, buf, flags, peers, peer_flags, epoch, n, chunk, stride, slot, rank, WORLD=world, OP=_OPS[red],
        AVG=red is Reduction.AVG, WIDE=x.dtype == torch.float64, GATHER=gather, BLOCK=BLOCK, num_warps=WARPS)


def unavailable(topology, backend: str, size: int) -> str | None:
    """Why the NVLink path cannot serve this group (None when it can). The same answer on every rank:
    it depends only on what all ranks share."""
    if os.environ.get("TOPOCOMM_NVLINK", "1") in ("0", ""):
        return "TOPOCOMM_NVLINK=0"
    if backend != "nccl" or size < 2:
        return "needs NCCL and two ranks or more"
    if triton is None:
        return "triton is not installed"
    if not topology.one_nvlink_node:
        return "needs every rank on one node with NVLink between its GPUs"
    return None


def open_peers(comm) -> NvlinkPeers | None:
    """``comm``'s NvlinkPeers where every rank can map its peers' memory, else None. Collective: every rank
    of ``comm`` calls it at the same point (its first call that would run the kernel)."""
    if unavailable(comm.topology, comm.backend, comm.size) is not None:
        return None
    comm._drain()
    try:
        return NvlinkPeers(comm.group, comm.device)
    except Exception as e:
        raise RuntimeError(f"rank {comm.rank}: direct all-reduce / reduce-scatter could not map the peers' memory "
                           f"over NVLink ({e}); set TOPOCOMM_NVLINK=0 to run it over NCCL send/recv instead") from e


class NvlinkPeers:
    """This rank's symmetric buffer and its peers' addresses, for one process group on one NVLink node.

    Construction is collective: every rank of ``group`` must build one at the same point.
    """

    def __init__(self, group, device: torch.device, capacity: int | None = None) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if capacity is None:
            capacity = int(os.environ.get("TOPOCOMM_NVLINK_BUFFER_BYTES", DEFAULT_CAPACITY))
        capacity = capacity // 256 * 256  # every dtype's view, and the flags after it, stay aligned
        self.capacity = capacity
        words = flag_words(capacity, dist.get_world_size(group))
        self.raw = symm_mem.empty(capacity + 8 * words, dtype=torch.uint8, device=device)
        self.flags = self.raw[capacity:].view(torch.int64)
        self.flags.zero_()
        self.handle = symm_mem.rendezvous(self.raw, group)
        self.rank, self.size = self.handle.rank, self.handle.world_size
        bases = list(self.handle.buffer_ptrs)
        self.peers = torch.tensor(bases, dtype=torch.int64, device=device)
        self.peer_flags = torch.tensor([b + capacity for b in bases], dtype=torch.int64, device=device)
        self.grid = torch.cuda.get_device_properties(device).multi_processor_count * BLOCKS_PER_SM
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)  # on the device: [Note: graphs]
        torch.cuda.synchronize(device)
        self.handle.barrier(channel=0)  # every rank's flags are zero before anyone raises one

    def takes(self, schedule: Schedule, out: torch.Tensor, red: Reduction | None, wire: torch.dtype | None) -> bool:
        return (algorithms.nvlink_kernel(schedule.algorithm, schedule.collective) and red in _OPS
                and out.dtype in DTYPES and (wire is None or wire in DTYPES))

    def run(self, coll: Collective, out: torch.Tensor, inp: torch.Tensor | None, red: Reduction,
            wire: torch.dtype | None) -> None:
        """All-reduce of ``out`` in place, or reduce-scatter: ``out`` (m elements) = the reduction of block
        ``rank`` of every rank's ``inp`` (size * m)."""
        buf = self.raw[:self.capacity].view(wire or out.dtype)
        scatter = coll is Collective.REDUCE_SCATTER
        m = out.numel()
        spans = (block_pieces if scatter else pieces)(m, self.capacity, self.size, buf.element_size())
        for a, b in spans:
            self.epoch.add_(1)
            self.handle.barrier(channel=0)  # the previous pass is over everywhere: its buffers are free
            if scatter:
                launch_reduce_scatter(inp[a:], m, out[a:b], buf, self.flags, self.peers, self.peer_flags,
                                      self.epoch, self.rank, self.size, red, self.grid)
            else:
                launch(out[a:b], out[a:b], buf, self.flags, self.peers, self.peer_flags, self.epoch, self.rank,
                       self.size, red, self.grid)
