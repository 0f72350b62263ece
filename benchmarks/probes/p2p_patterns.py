"""One-way transfers by message size, and the patterns a rooted collective makes of them.

busbw's chain and tree broadcasts move whole messages one way, one or two at a time. This probe
times the bare patterns through NCCL's own send and receive, next to our broadcasts and NCCL's,
back to back like busbw (``iters`` calls, one synchronisation; the slowest rank's median of
``--trials`` loops):

    torchrun --nproc-per-node 4 -m benchmarks.probes.p2p_patterns [--json FILE]

A pattern is a list of rounds, each a set of (source, destination) transfers posted as one group;
"0>1,0>2" is the tree's root sending twice, one send after the other. Needs 4 ranks.
"""
import json, statistics
import torch
import torch.distributed as dist
import collectives as C
from benchmarks._timing import slowest, timed
from benchmarks.probes import options

PATTERNS = {
    "0>1": [[(0, 1)]], "0>2": [[(0, 2)]], "0>3": [[(0, 3)]],
    "0>1 with 2>3": [[(0, 1), (2, 3)]], "0>2 with 1>3": [[(0, 2), (1, 3)]], "0>3 with 1>2": [[(0, 3), (1, 2)]],
    "0>1,0>2": [[(0, 1)], [(0, 2)]],
    "tree": [[(0, 1)], [(0, 2), (1, 3)]],
    "chain": [[(0, 1)], [(1, 2)], [(2, 3)]],
}

a = options(5, (16 << 20, 64 << 20, 256 << 20))
comm = C.init(timeout=120)
if comm.size != 4:
    raise SystemExit(f"p2p_patterns: needs 4 ranks, got {comm.size}")
rank = comm.rank


def pattern(rounds, x: torch.Tensor, y: torch.Tensor):
    def run() -> None:
        for pairs in rounds:
            ops = [dist.P2POp(dist.isend, x, d) for s, d in pairs if s == rank]
            ops += [dist.P2POp(dist.irecv, y, s) for s, d in pairs if d == rank]
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
    return run


rows = []
for nbytes in a.sizes:
    x = torch.ones(nbytes // 4, device=comm.device)
    y = torch.empty_like(x)
    calls = {"our tree broadcast": lambda: comm.broadcast(x, src=0, algorithm="tree"),
             "our chain broadcast": lambda: comm.broadcast(x, src=0, algorithm="ring"),
             "NCCL's broadcast": lambda: comm.broadcast(x, src=0, algorithm="native")}
    calls.update({name: pattern(rounds, x, y) for name, rounds in PATTERNS.items()})
    for name, call in calls.items():
        for _ in range(3):
            call()
        t = slowest(comm, [statistics.median(timed(comm, call, a.iters) for _ in range(a.trials))])[0]
        rows.append({"pattern": name, "bytes": nbytes, "back_to_back_us": round(t * 1e6, 1)})
    if rank == 0:
        print(f"{nbytes >> 20} MiB: " + ", ".join(f"{r['pattern']} {r['back_to_back_us']:.0f}"
                                               for r in rows if r["bytes"] == nbytes), flush=True)
if rank == 0 and a.json:
    with open(a.json, "w") as f:
        json.dump({"world_size": comm.size, "device": torch.cuda.get_device_name(comm.device)
                   if comm.device.type == "cuda" else "cpu", "iters": a.iters, "trials": a.trials,
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
C.shutdown()
