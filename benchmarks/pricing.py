"""How fast the cost model prices a cluster it cannot run on.

    python -m benchmarks.pricing [--preset dgx-h100] [--nodes 128] [--sizes 14]

Prices every (collective, algorithm) pair at ``--sizes`` message sizes from 1 KiB to 64 GiB on
``--nodes`` copies of a preset (128 x dgx-h100 = 1,024 ranks), from a cold structure cache,
and prints the wall time. The target is under 5 s for 1,024 ranks and 14 sizes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dgx-h100")
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--sizes", type=int, default=14)
    args = ap.parse_args(argv)

    from collectives import algorithms
    from collectives import model as M
    from collectives.schedule import Collective
    from collectives.topology import Topology

    t0 = time.perf_counter()
    topo = Topology.preset(args.preset, args.nodes)
    M._STRUCTS.clear()
    model = M.CostModel(topo, "nccl", profile=M.default_params(topo, "nccl"))
    sizes = 2.0 ** np.linspace(10, 36, args.sizes)
    pairs = [(c, a) for c in Collective for a in algorithms.supported(c)]
    for c, a in pairs:
        model.sweep(c, sizes, a)
    elapsed = time.perf_counter() - t0
    print(f"priced {len(pairs)} (collective, algorithm) pairs x {args.sizes} sizes on {args.nodes} x "
          f"{args.preset} ({topo.world_size} ranks) in {elapsed:.2f} s (target < 5 s at 1,024 ranks)")


if __name__ == "__main__":
    main()
