"""Soak: many mixed collectives over every algorithm, checking results and memory.

    python -m benchmarks.soak --nproc 8 --calls 10000 [--minutes 5] [--json out.json]

Each rank runs a deterministic stream of calls (collective, algorithm, dtype,
op, size drawn from one seeded generator, so all ranks agree), checks every
result against a local reference, and samples its resident set size. It
reports calls made, wrong results, hangs (a call exceeding the timeout raises
on its own), and RSS at the start (after warm-up) and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time

import torch
import torch.multiprocessing as mp

from collectives.schedule import Collective


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _plan(seed: int, calls: int, size: int) -> list[tuple]:
    import collectives.algorithms as algorithms

    rng = random.Random(seed)
    dtypes = ["float32", "float64", "bfloat16", "float16", "int32", "int64"]
    out = []
    for k in range(calls):
        coll = rng.choice(list(Collective))
        algo = rng.choice(algorithms.supported(coll) + ("auto",))
        dt = rng.choice(dtypes)
        ops = ["sum", "max", "min", "prod"] + (["avg"] if dt.startswith(("float", "bfloat")) else [])
        op = rng.choice(ops) if coll.reduces else "sum"
        count = rng.choice([0, 1, 7, 100, 1000, 4096, 65536 + 3])
        out.append((coll.value, algo, dt, op, count, rng.randrange(size), k, False))
    return out


def _worker(rank: int, size: int, port: int, args: argparse.Namespace, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    import collectives as C
    from tests.cases import sweep

    comm = C.init(timeout=args.timeout)
    cases = _plan(args.seed, args.calls, size)
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    done, wrong, batch = 0, 0, 200
    t0 = time.monotonic()
    rss_start = None
    rounds = 0
    rss_rounds: list[float] = []  # after each round: growth that stops is caches filling, not a leak
    while True:
        for i in range(0, len(cases), batch):
            res = sweep(comm, cases[i:i + batch])
            wrong += sum(1 for err, _ in res if err)
            done += len(res)
            if rss_start is None:
                rss_start = _rss_mib()  # after the first batch: caches and pools are warm
        rounds += 1
        rss_rounds.append(round(_rss_mib(), 1))
        # every rank takes the same decision: ranks agree on the elapsed time via a max-reduce
        flag = torch.tensor([1.0 if deadline is not None and time.monotonic() < deadline else 0.0])
        comm.all_reduce(flag, op="min", algorithm="native")
        if flag.item() == 0:
            break
    took = time.monotonic() - t0
    q.put({"rank": rank, "calls": done, "wrong": wrong, "seconds": took, "rounds": rounds,
           "rss_start_mib": rss_start, "rss_end_mib": _rss_mib(), "rss_after_round_mib": rss_rounds,
           "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=8)
    p.add_argument("--calls", type=int, default=10000, help="calls per round")
    p.add_argument("--minutes", type=float, default=0.0, help="repeat rounds until this much time has passed")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.nproc, port, args, q)) for r in range(args.nproc)]
    for pr in procs:
        pr.start()
    import queue

    results = []
    for _ in procs:
        try:
            results.append(q.get(timeout=args.timeout + args.minutes * 60 + 3600))
        except queue.Empty:
            break
    for pr in procs:
        pr.join(10)
        if pr.is_alive():
            pr.kill()
    hung = args.nproc - len(results)
    if hung:
        print(f"soak: {hung} of {args.nproc} ranks did not finish (hang or crash)")
        return 1
    results.sort(key=lambda d: d["rank"])
    calls = sum(d["calls"] for d in results) // args.nproc
    wrong = sum(d["wrong"] for d in results)
    growth = max(d["rss_end_mib"] - d["rss_start_mib"] for d in results)
    secs = max(d["seconds"] for d in results)
    print(f"soak: {args.nproc} ranks, {calls} calls per rank in {secs:.0f} s, wrong results {wrong}, hangs {hung}, "
          f"max RSS growth after warm-up {growth:.1f} MiB "
          f"(start {results[0]['rss_start_mib']:.0f} MiB, end {results[0]['rss_end_mib']:.0f} MiB on rank 0; "
          f"after each round {results[0]['rss_after_round_mib']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ranks": results, "calls": calls, "wrong": wrong,
                       "rss_growth_mib": growth, "seconds": secs}, f, indent=1)
    return 0 if wrong == 0 and all(pr.exitcode == 0 for pr in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
