"""The NVLink kernel's settings against NCCL's all-reduce, in one run.

    torchrun --nproc-per-node 4 -m benchmarks.nvlink_settings [--sizes 16M,64M,256M,1G]
        [--settings 2048:4:8:256,2048:4:8:1024,...]

Each setting is ``BLOCK:WARPS:BLOCKS_PER_SM:buffer MiB`` ([Note: one kernel,
tile flags] and [Note: vector width] in collectives/nvlink.py). For every
setting and size it prints the kernel's all-reduce time (CUDA events, float32,
in place, every pass and barrier included) and NCCL's all-reduce time on the
same buffer, measured once at the start, as a ratio (above 1: the kernel is
faster). Needs one node of NVLink-connected GPUs and Triton.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

DEFAULT_SETTINGS = ("2048:4:8:256,2048:4:8:1024,2048:8:4:256,4096:8:4:256,4096:4:4:256,1024:4:8:256,"
                    "2048:4:4:256,2048:4:16:256,1024:2:16:256,8192:8:2:256")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nvlink_settings", allow_abbrev=False,
                                description="NVLink kernel settings against NCCL's all-reduce.")
    p.add_argument("--sizes", default="16M,64M,256M,1G", help="bytes, comma-separated")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="BLOCK:WARPS:BLOCKS_PER_SM:buffer MiB, ...")
    p.add_argument("--iters", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import collectives
    from benchmarks.busbw import parse_size
    from collectives import nvlink
    from collectives.ops import Reduction
    from collectives.schedule import Collective

    comm = collectives.init(timeout=120)
    if comm.device.type != "cuda" or nvlink.triton is None:
        raise SystemExit("benchmarks.nvlink_settings needs CUDA GPUs and Triton")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    if any(len(s) != 4 for s in settings):
        raise SystemExit("--settings: each is BLOCK:WARPS:BLOCKS_PER_SM:buffer MiB")
    y = torch.zeros(max(sizes) // 4, device=comm.device)  # zeros: repeated sums stay finite

    def time_us(fn) -> float:
        fn()
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters * 1e3

    base = {s: time_us(lambda: dist.all_reduce(y[:s // 4])) for s in sizes}
    if comm.rank == 0:
        print("NCCL all-reduce: " + "  ".join(f"{s >> 20} MiB {t:.0f} us" for s, t in base.items()), flush=True)
    saved = nvlink.BLOCK, nvlink.WARPS, nvlink.BLOCKS_PER_SM
    try:
        for block, warps, per_sm, mib in settings:
            nvlink.BLOCK, nvlink.WARPS, nvlink.BLOCKS_PER_SM = block, warps, per_sm
            peers = nvlink.NvlinkPeers(dist.group.WORLD, comm.device, mib << 20)
            row = []
            for s in sizes:
                t = time_us(lambda: peers.run(Collective.ALL_REDUCE, y[:s // 4], None, Reduction.SUM, None))
                row.append(f"{s >> 20} MiB {t:.0f} us ({base[s] / t:.2f}x)")
            if comm.rank == 0:
                print(f"{block}:{warps}:{per_sm}:{mib}  " + "  ".join(row), flush=True)
            peers = None  # the buffer goes before the next setting maps its own
            torch.cuda.synchronize()
            dist.barrier()
    finally:
        nvlink.BLOCK, nvlink.WARPS, nvlink.BLOCKS_PER_SM = saved
        collectives.shutdown()


if __name__ == "__main__":
    main()
