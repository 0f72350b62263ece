"""The NVLink all-reduce kernel (collectives.nvlink) run by Triton's interpreter on CPU.

    TRITON_INTERPRET=1 python -m tests.nvlink_kernel

Each simulated rank is a forked process; buffers, flags and data live in
shared memory at the same addresses in every process, so the kernel's stores
into a "peer's" buffer and its flag polls work as they do across GPUs. A
multiprocessing barrier stands in for the device barrier that opens each pass.
The interpreter runs a grid's blocks one after another, so each rank runs one
block (blocks of one rank would wait on each other's later work); the tile
loop, flags, pieces and remainder pass are the ones the GPUs run.
Prints one line per case and exits non-zero on the first failure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import torch

from collectives import nvlink as NV
from collectives.ops import Reduction

_REF = {Reduction.SUM: lambda s: s.sum(0), Reduction.AVG: lambda s: s.mean(0),
        Reduction.MAX: lambda s: s.max(0).values, Reduction.MIN: lambda s: s.min(0).values,
        Reduction.PROD: lambda s: s.prod(0)}
# One unit in the last place: the interpreter narrows to 16 bits by truncation, GPUs round to nearest
# (half of this), so the bound below holds for both.
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}


def run_case(coll: str, world: int, n: int, dtype: torch.dtype, wire: torch.dtype | None, red: Reduction,
             capacity: int, seed: int = 0) -> str:
    """all_reduce of n elements, or reduce_scatter of world * n elements (blocks of n) on every rank."""
    g = torch.Generator().manual_seed(seed)
    size = n * (world if coll == "reduce_scatter" else 1)
    xs = [torch.randn(size, generator=g, dtype=torch.float64).to(dtype).share_memory_() for _ in range(world)]
    outs = [torch.full((n,), float("nan"), dtype=dtype).share_memory_() for _ in range(world)]
    stack = torch.stack([x.double() for x in xs])
    want = _REF[red](stack)
    wdt = wire or dtype
    bufs = [torch.zeros(capacity // wdt.itemsize, dtype=wdt).share_memory_() for _ in range(world)]
    flags = [torch.zeros(NV.flag_words(capacity, world), dtype=torch.int64).share_memory_() for _ in range(world)]
    peers = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    peer_flags = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(world)
    rs = coll == "reduce_scatter"
    passes = NV.block_pieces(n, capacity, world, wdt.itemsize) if rs else NV.pieces(n, capacity, world, wdt.itemsize)

    def rank(r: int) -> None:
        epoch = torch.zeros(1, dtype=torch.int64)
        for a, b in passes:
            epoch += 1
            barrier.wait(60)
            if rs:
                NV.launch_reduce_scatter(xs[r][a:], n, outs[r][a:b], bufs[r], flags[r], peers, peer_flags, epoch,
                                         r, world, red, 1)
            else:
                NV.launch(xs[r][a:b], xs[r][a:b], bufs[r], flags[r], peers, peer_flags, epoch, r, world, red, 1)
        os._exit(0)

    procs = [ctx.Process(target=rank, args=(r,)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.exitcode != 0:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank failed or hung (exit code {p.exitcode})")
    case = f"{coll} world={world} n={n} {str(dtype)[6:]} wire={str(wire)[6:] if wire else '-'} {red.value}: "
    if rs:  # rank r holds block r of the reduction
        got = torch.cat([o.double() for o in outs])
    else:
        for r in range(1, world):
            assert torch.equal(xs[r], xs[0]), case + f"rank {r} differs from rank 0"
        got = xs[0].double()
    if red in (Reduction.MAX, Reduction.MIN) and wdt == dtype:
        assert torch.equal(got, want), case + "max/min must be exact"
        return case + f"{len(passes)} passes, exact"
    # README, Numerics, with h = 1: each peer's value and the result are narrowed once to the wire dtype;
    # accumulating (float32, float64 for float64 data) adds one rounding per combine and the division
    acc = ULP[torch.float64 if dtype == torch.float64 else torch.float32]
    scale = stack.abs().prod(0) if red is Reduction.PROD else stack.abs().sum(0)
    if red is Reduction.AVG:
        scale = scale / world
    bound = (2 * ULP[wdt] + (world + 1) * acc) * scale
    err = (got - want).abs()
    assert bool((err <= bound + 1e-300).all()), case + f"error {float((err - bound).max()):.3g} over the bound"
    return case + f"{len(passes)} passes, max error / bound {float((err / (bound + 1e-300)).max()):.3f}"


AR, RS = "all_reduce", "reduce_scatter"
CASES = [  # (collective, world, n, dtype, wire, op, capacity bytes)
    (AR, 2, 1, torch.float32, None, Reduction.SUM, 1 << 14),
    (AR, 2, 5000, torch.float32, None, Reduction.SUM, 1 << 14),  # two full passes and a remainder pass
    (AR, 2, 5000, torch.float32, torch.bfloat16, Reduction.SUM, 1 << 14),
    (AR, 2, 4099, torch.bfloat16, None, Reduction.AVG, 1 << 14),
    (AR, 3, 9001, torch.float32, None, Reduction.AVG, 1 << 14),
    (AR, 3, 9001, torch.float32, torch.bfloat16, Reduction.MAX, 1 << 14),
    (AR, 3, 700, torch.float64, None, Reduction.PROD, 1 << 12),
    (AR, 4, 3000, torch.float16, None, Reduction.MIN, 1 << 13),
    (AR, 4, 20000, torch.float32, torch.bfloat16, Reduction.SUM, 1 << 16),  # tiles of several blocks per chunk
    (RS, 2, 1, torch.float32, None, Reduction.SUM, 1 << 14),
    (RS, 2, 1, torch.float32, torch.bfloat16, Reduction.AVG, 1 << 14),
    (RS, 2, 3001, torch.float32, None, Reduction.AVG, 1 << 14),  # blocks of an odd size, three passes
    (RS, 3, 2500, torch.float32, torch.bfloat16, Reduction.SUM, 1 << 14),
    (RS, 4, 1000, torch.bfloat16, None, Reduction.MAX, 1 << 13),
]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the kernels are compiled for GPUs otherwise)")
    for case in CASES:
        print(run_case(*case), flush=True)
    print(f"{len(CASES)} cases passed")


if __name__ == "__main__":
    main()
