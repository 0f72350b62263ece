"""Probes: small measurements behind the notes in benchmarks/results, run under torchrun."""
import argparse


def options(trials: int, sizes: tuple[int, ...]) -> argparse.Namespace:
    """The probes' shared options: --json, --iters, --trials and --sizes (bytes, comma-separated; parsed to a list)."""
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None, help="write the rows to this file (rank 0)")
    p.add_argument("--iters", type=int, default=10, help="calls per timed loop (default 10)")
    p.add_argument("--trials", type=int, default=trials, help=f"timed loops, the median kept (default {trials})")
    p.add_argument("--sizes", default=",".join(map(str, sizes)), help="bytes, comma-separated")
    a = p.parse_args()
    try:
        a.sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: expected bytes, comma-separated, got {a.sizes!r}")
    if a.iters < 1 or a.trials < 1 or any(s < 4 for s in a.sizes):
        p.error("--iters and --trials must be >= 1, and --sizes at least 4 bytes each")
    return a
