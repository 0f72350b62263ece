"""One transfer on a pipeline's critical path: how long a tensor takes to reach the next GPU when the
receiver is already waiting for it.

    torchrun --nproc-per-node 2 -m benchmarks.p2p_latency [--sizes 1M,4M,16M,64M] [--blocks 8,16,32,64]

Ranks 0 and 1 play ping-pong (rank 0 sends, rank 1 receives and sends the
same bytes back) and the round trip is halved, for three transports:

- NCCL send/recv;
- the copy engine: a copy into the peer's symmetric-memory buffer, then a
  flag raised in the peer's memory; the receiver waits for the flag and
  copies the bytes out (torch's symmetric memory, as collectives/nvlink.py);
- SM stores: a Triton kernel of ``--blocks`` blocks stores the bytes into the
  peer's buffer, each block raising its own flag.

Needs CUDA GPUs that map each other's memory (one NVLink node) and Triton.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from benchmarks.busbw import parse_size

try:
    import triton
    import triton.language as tl

    from collectives.nvlink import _post, _wait
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

if triton is not None:
    @triton.jit
    def _wide(epoch):
        return epoch + tl.zeros((), dtype=tl.int64)  # the flags are int64; an int argument arrives as int32

    # an epoch's value must not choose a compiled variant (Triton specialises ints equal to 1 or divisible
    # by 16): a new compilation inside the timed loop would be timed
    @triton.jit(do_not_specialize=["epoch"])
    def _wait_all(flags_ptr, epoch):
        _wait(flags_ptr + tl.program_id(0), _wide(epoch))

    @triton.jit(do_not_specialize=["epoch"])
    def _raise(flag_ptr, epoch):
        _post(flag_ptr, _wide(epoch))

    @triton.jit(do_not_specialize=["epoch"])
    def _store(src_ptr, dst_addr_ptr, flags_addr_ptr, n, epoch, BLOCK: tl.constexpr):
        """Block b stores tiles b, b + G, ... of ``src`` into the peer's buffer, then raises flag b there."""
        pid = tl.program_id(0)
        dst = tl.multiple_of(tl.load(dst_addr_ptr).to(tl.pointer_type(tl.int32)), 16)
        lanes = tl.arange(0, BLOCK)
        for t in range(pid, tl.cdiv(n, BLOCK), tl.num_programs(0)):
            offs = t * BLOCK + lanes
            mask = offs < n
            tl.store(dst + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)
        _post(tl.load(flags_addr_ptr).to(tl.pointer_type(tl.int64)) + pid, _wide(epoch))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.p2p_latency", allow_abbrev=False,
                                description="One transfer on the critical path: NCCL, copy engine, SM stores.")
    p.add_argument("--sizes", default="1M,4M,16M,64M", help="bytes per transfer, comma-separated")
    p.add_argument("--blocks", default="8,16,32,64", help="SM-store kernel grid sizes, comma-separated")
    p.add_argument("--iters", type=int, default=30)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if triton is None or not torch.cuda.is_available():
        raise SystemExit("benchmarks.p2p_latency needs CUDA GPUs and Triton")
    import torch.distributed._symmetric_memory as symm_mem

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise SystemExit("benchmarks.p2p_latency: run it on exactly 2 ranks (--nproc-per-node 2)")
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    grids = [int(g) for g in args.blocks.split(",")]
    cap = -(-max(sizes) // 256) * 256
    nflags = max(grids) + 1
    raw = symm_mem.empty(cap + 8 * nflags, dtype=torch.uint8, device=dev)
    raw.zero_()
    handle = symm_mem.rendezvous(raw, dist.group.WORLD)
    peer = 1 - rank
    flags = raw[cap:].view(torch.int64)
    peer_buf = handle.get_buffer(peer, (cap // 4,), torch.int32)
    peer_flags = handle.get_buffer(peer, (nflags,), torch.int64, cap // 8)
    peer_addr = torch.tensor([handle.buffer_ptrs[peer]], dtype=torch.int64, device=dev)
    peer_flags_addr = torch.tensor([handle.buffer_ptrs[peer] + cap + 8], dtype=torch.int64, device=dev)
    epoch = [0]
    torch.cuda.synchronize()
    handle.barrier(channel=0)

    def ping_pong(send, recv, src, dst) -> None:
        """Rank 0 sends ``src`` and receives the reply into ``dst``; rank 1 receives into ``dst`` and sends it
        back."""
        if rank == 0:
            send(src)
            recv(dst)
        else:
            recv(dst)
            send(dst)

    def nccl(src, dst, n):
        ping_pong(lambda t: dist.send(t, peer), lambda t: dist.recv(t, peer), src, dst)

    def through_flags(grid: int, send_into_peer):
        """A transport that writes into the peer's buffer and raises ``grid`` flags there (flags 0 for the
        copy engine, 1.. for the SM stores); the receiver waits for them and copies the bytes out."""
        first = 0 if grid == 0 else 1

        def run(src, dst, n):
            epoch[0] += 1

            def recv(t):
                _wait_all[(max(grid, 1),)](flags[first:], epoch[0])
                t.copy_(raw[:4 * n].view(torch.int32))
            ping_pong(lambda t: send_into_peer(t, n, epoch[0]), recv, src, dst)
        return run

    def copy_engine_send(t, n, e):
        peer_buf[:n].copy_(t)
        _raise[(1,)](peer_flags, e)

    def sm_send(grid):
        return lambda t, n, e: _store[(grid,)](t, peer_addr, peer_flags_addr, n, e, BLOCK=4096, num_warps=8)

    def one_way_us(fn, nbytes: int) -> float:
        n = nbytes // 4
        src = torch.ones(n, dtype=torch.int32, device=dev)
        dst = torch.empty(n, dtype=torch.int32, device=dev)
        for _ in range(3):
            fn(src, dst, n)
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            fn(src, dst, n)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / args.iters / 2

    variants = [("nccl send/recv", nccl), ("copy engine", through_flags(0, copy_engine_send))]
    variants += [(f"SM stores x{g}", through_flags(g, sm_send(g))) for g in grids]
    for nbytes in sizes:
        for name, fn in variants:
            us = one_way_us(fn, nbytes)
            if rank == 0:
                print(f"{nbytes >> 10:>8} KiB  {name:>16}  one way {us:8.1f} us  {nbytes / us / 1e3:7.1f} GB/s",
                      flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
