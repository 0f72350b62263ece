"""Compressed all-reduce against the backend's float32 all-reduce, same run, same buffers.

    torchrun --nproc-per-node 4 -m benchmarks.compressed [--json out.json]

"Effective busbw" counts the float32 payload: busbw = (4 bytes x count / time)
x 2(n-1)/n, so a 16-bit wire format that halves the bytes moved can exceed
the float32 figure. Also prints the relative error against a float64 sum.

``native_bf16_payload`` is the backend's bf16 all-reduce of an already-cast
buffer: what the 16-bit wire alone gives, without the two casts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

import collectives as C
from benchmarks._launch import write_json
from benchmarks._timing import slowest, timed
from benchmarks.busbw import parse_size


def _time(comm, fn, iters: int) -> float:
    """The slowest rank's seconds per call, after three untimed calls."""
    for _ in range(3):
        fn()
    return slowest(comm, [timed(comm, fn, iters)])[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16M,64M,256M,1G")
    p.add_argument("--algos", default="direct,ring")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args()
    comm = C.init()
    n, dev = comm.size, comm.device
    rows = []
    for text in args.sizes.split(","):
        nbytes = parse_size(text)
        count = nbytes // 4
        x = torch.randn(count, device=dev)  # never modified: each timed call reduces a scratch copy
        ref = x.double()
        dist.all_reduce(ref)
        z = x.clone()
        t_native = _time(comm, lambda: comm.all_reduce(z, algorithm="native"), args.iters)
        bw = lambda s: nbytes / s * 2 * (n - 1) / n / 1e9  # noqa: E731
        row = {"bytes": nbytes, "native_fp32_us": t_native * 1e6, "native_fp32_busbw": bw(t_native)}
        for algo in args.algos.split(",") + ["native"]:
            y = torch.empty_like(x)
            t = _time(comm, lambda: comm.all_reduce(y.copy_(x), algorithm=algo, compress="bf16"), args.iters)
            t_copy = _time(comm, lambda: y.copy_(x), args.iters)
            y.copy_(x)
            comm.all_reduce(y, algorithm=algo, compress="bf16")
            err = ((y.double() - ref).norm() / ref.norm()).item()
            s = max(t - t_copy, 1e-9)
            row[f"{algo}_bf16_us"] = s * 1e6
            row[f"{algo}_bf16_busbw"] = bw(s)
            row[f"{algo}_bf16_vs_native_fp32"] = t_native / s
            row[f"{algo}_bf16_rel_error"] = err
        low = x.to(torch.bfloat16)
        s = _time(comm, lambda: comm.all_reduce(low, algorithm="native"), args.iters)
        row["native_bf16_payload_us"] = s * 1e6
        row["native_bf16_payload_vs_native_fp32"] = t_native / s
        rows.append(row)
        if comm.rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if comm.rank == 0 and args.json:
        write_json(Path(args.json), {"world_size": n, "rows": rows,
                                     "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"})
    C.shutdown()


if __name__ == "__main__":
    main()
