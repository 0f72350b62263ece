"""Point-to-point ceiling: a direct exchange over send/recv against the backend's all_to_all and all-reduce.

    torchrun --nproc-per-node 4 -m benchmarks.p2p [--sizes 16M,64M,256M,1G] [--groups 1,2,4,8]

Each rank sends the p-th quarter (1/n) of its buffer to rank p and receives
rank p's into the same slot, for every p: the exchange a ``direct`` all-reduce
makes twice (reduce-scatter, then all-gather). The transfers can be split
over several communicators (``--groups``: NCCL runs each on its own stream
and channels). Prints each variant's time and the bytes each rank sends per
second, next to the backend's all_to_all_single and all_reduce on the same
buffer.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import collectives as C
from benchmarks._timing import slowest, timed
from benchmarks.busbw import parse_size


def exchange(comm, x: torch.Tensor, y: torch.Tensor, groups: list) -> None:
    n, r = comm.size, comm.rank
    m = x.numel() // n
    works = []
    for j, g in enumerate(groups):
        ops = []
        for p in range(n):
            if p == r:
                continue
            step = -(-m // len(groups))
            lo, hi = p * m + j * step, min((p + 1) * m, p * m + (j + 1) * step)
            ops += [dist.P2POp(dist.isend, x[lo:hi], p, g), dist.P2POp(dist.irecv, y[lo:hi], p, g)]
        works += dist.batch_isend_irecv(ops)
    for w in works:
        w.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16M,64M,256M,1G")
    p.add_argument("--groups", default="1,2,4,8", help="communicator counts to split the exchange over")
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    comm = C.init()
    n, dev = comm.size, comm.device
    counts = [int(k) for k in a.groups.split(",")]
    groups = {k: [dist.new_group(list(range(n))) for _ in range(k)] for k in counts}
    for k in counts:  # connect every pair of every communicator before timing
        exchange(comm, torch.ones(n * 256, device=dev), torch.empty(n * 256, device=dev), groups[k])
    for text in a.sizes.split(","):
        nbytes = parse_size(text)
        x = torch.ones(nbytes // 4, device=dev)
        y = torch.empty_like(x)
        calls = {"all_reduce": lambda: dist.all_reduce(x), "all_to_all": lambda: dist.all_to_all_single(y, x)}
        calls.update({f"p2p x{k}": (lambda k=k: exchange(comm, x, y, groups[k])) for k in counts})
        row = []
        for name, fn in calls.items():
            for _ in range(3):
                fn()
            s = slowest(comm, [timed(comm, fn, a.iters)])[0]
            row.append(f"{name}={s * 1e6:.0f}us ({nbytes * (n - 1) / n / s / 1e9:.0f} GB/s out)")
        if comm.rank == 0:
            print(f"{nbytes >> 20} MiB  " + "  ".join(row), flush=True)
    C.shutdown()


if __name__ == "__main__":
    main()
