"""Whether a graph that replays slowly on a rank replays fast once captured again: each case is captured
K times (default 6) in one process, and each capture's replays timed as graph_replay.py does.

    for i in 1 2 3; do TAG=l$i OUT=dir torchrun --nproc-per-node 4 -m benchmarks.probes.recapture; done
"""
import json, os
import torch
import collectives as C
from benchmarks._timing import issued_and_done

comm = C.init(timeout=60)
dev, rank, n = comm.device, comm.rank, comm.size

def timed(fn, iters=50, trials=3):
    return issued_and_done(comm, fn, iters, trials)

E = 16384
x = torch.ones(E, device=dev); big = torch.ones(E * n, device=dev)
cases = {
    "all_gather ring": lambda: comm.all_gather(big, x, algorithm="ring"),
    "all_gather direct": lambda: comm.all_gather(big, x, algorithm="direct"),
    "broadcast tree": lambda: comm.broadcast(x, src=0, algorithm="tree"),
}
out = {"rank": rank}
for name, fn in cases.items():
    res = []
    for k in range(int(os.environ.get("K", "6"))):
        comm._graphs.clear()
        torch.cuda.synchronize(); comm.barrier()
        for _ in range(4):
            fn()
        res.append(timed(fn))
    out[name] = res
with open(os.path.join(os.environ["OUT"], f"re-{os.environ['TAG']}-r{rank}.json"), "w") as f:
    json.dump(out, f)
C.shutdown()
