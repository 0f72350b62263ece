"""The correctness sweep on real GPUs over NCCL, one process per GPU.

    torchrun --nproc-per-node 4 -m tests.gpu_sweep [-v]

Runs the same cases as the gloo sweep (tests/test_collectives.py) with CUDA
tensors, checks every rank's result against the local reference, and exits
non-zero on any failure. tests/test_cuda.py drives it on 2 and all GPUs.
``-v`` prints each case on rank 0 before it runs (the last line names a case
that hangs), with the time so far. CUDA graphs capture every case at its
first call (TOPOCOMM_GRAPH_WARMUP=0); TOPOCOMM_CUDA_GRAPHS=0 runs eagerly.
"""

from __future__ import annotations

import os
import sys
import time

import collectives as C
from tests.cases import sweep
from tests.test_collectives import _check, cases_for


def main() -> int:
    # Each case runs once on fresh buffers: capture at first sight, or the graph path would go untested.
    os.environ.setdefault("TOPOCOMM_GRAPH_WARMUP", "0")
    comm = C.init(timeout=60)
    cases = cases_for(comm.size)
    t0 = time.perf_counter()
    verbose = "-v" in sys.argv[1:] and comm.rank == 0
    mine = []
    for i, case in enumerate(cases):
        if verbose:
            print(f"[{i + 1}/{len(cases)} {time.perf_counter() - t0:7.2f} s] {case}", flush=True)
        mine += sweep(comm, [case])
    comm.synchronize()
    results = comm.exchange_json(mine)
    took = time.perf_counter() - t0
    if comm.rank != 0:
        return 0
    try:
        _check(results, cases)
    except AssertionError as e:
        print(f"gpu sweep on {comm.size} ranks ({comm.backend}): FAILED\n{e}", flush=True)
        return 1
    print(f"gpu sweep on {comm.size} ranks ({comm.backend}): {len(cases)} cases passed in {took:.1f} s", flush=True)
    return 0


def run() -> int:
    code = main()
    C.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(run())
