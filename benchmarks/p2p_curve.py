"""One point-to-point step by message size: the curve the cost model's pair tier follows.

    torchrun --nproc-per-node 4 -m benchmarks.p2p_curve [--json FILE] [-b 1M] [-e 1G] [--one-way]

Every rank sends one message of each size to rank + 1 and receives one from
rank - 1 in one grouped call, as a ring step of our executor does through the
Communicator's transport (on 2 ranks: an exchange between the pair). With
``--one-way``, rank 0 only sends to rank 1, which only receives, and the other
ranks sit the steps out: a round of a tree or a chain where no rank both sends
and receives. Prints the slowest rank's time per step (median of --trials
loops of -n steps) and the message bandwidth; ``--json`` writes them with a
header for ``python -m collectives.calibrate fit --pair-curve FILE`` (or
``--one-way-curve FILE``; [Note: message size] and [Note: one way] in
collectives/pricing.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

import collectives as C
from benchmarks._timing import slowest, timed
from benchmarks.busbw import parse_size, size_range

RING_STEP = "ring step (send to r+1, receive from r-1)"
ONE_WAY = "one way (rank 0 sends to rank 1, the others sit out)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.p2p_curve", description=__doc__.splitlines()[0])
    p.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("1M"))
    p.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("1G"))
    p.add_argument("-f", "--stepfactor", type=float, default=2.0)
    p.add_argument("-n", "--iters", type=int, default=10, help="steps per timed loop (default 10)")
    p.add_argument("--trials", type=int, default=3, help="timed loops per size; the median is kept (default 3)")
    p.add_argument("--json", type=Path, help="write {header, points: [[bytes, seconds], ...]} here")
    p.add_argument("--one-way", action="store_true", help="rank 0 sends to rank 1, the others sit out")
    a = p.parse_args(argv)
    if a.iters < 1 or a.trials < 1:
        p.error("-n and --trials must be >= 1")
    sizes = size_range(a.minbytes, a.maxbytes, a.stepfactor, parse_size("1M"))
    comm = C.init()
    n, r, dev = comm.size, comm.rank, comm.device
    if n < 2:
        raise SystemExit("p2p_curve needs at least 2 ranks")
    transport = comm._executor.transport
    points = []
    for nbytes in sizes:
        x = torch.ones(nbytes // 4, device=dev)
        y = torch.empty_like(x)

        if a.one_way:
            out, into = ([(1, x)] if r == 0 else []), ([(0, y)] if r == 1 else [])
        else:
            out, into = [((r + 1) % n, x)], [((r - 1) % n, y)]

        def step() -> None:
            sends, recvs = transport.post(out, into)
            for w in sends + recvs:
                w.wait()

        for _ in range(3):
            step()
        s = statistics.median(slowest(comm, [timed(comm, step, a.iters) for _ in range(a.trials)]))
        points.append([nbytes, s])
        if r == 0:
            print(f"{nbytes:>12d} B  {s * 1e6:9.1f} us  {nbytes / s / 1e9:7.1f} GB/s", flush=True)
    if r == 0 and a.json:
        header = {"backend": comm.backend, "world_size": n, "pattern": ONE_WAY if a.one_way else RING_STEP,
                  "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                  "torch": torch.__version__, "iters": a.iters, "trials": a.trials,
                  "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        a.json.write_text(json.dumps({"header": header, "points": points}, indent=1) + "\n")
    C.shutdown()


if __name__ == "__main__":
    main()
