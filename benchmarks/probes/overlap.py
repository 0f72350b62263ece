"""Back-to-back against one-at-a-time: how much consecutive rooted calls overlap.

busbw times GPU calls the nccl-tests way, back to back with one synchronisation, so a call may
start on the ranks the previous one has finished with: in a chain broadcast the root is free
after its first round. This probe times the same calls both ways, per call on each rank, the
slowest rank's median (of ``--trials`` loops back to back, of single calls one at a time):

    torchrun --nproc-per-node 4 -m benchmarks.probes.overlap [--json FILE]

- back to back: ``iters`` calls, then one synchronisation (busbw's time);
- one at a time: each call after a device synchronisation and a barrier, timed to its own end.
"""
import json, statistics
import torch
import collectives as C
from benchmarks._timing import slowest, timed
from benchmarks.probes import options

a = options(3, (4 << 20, 64 << 20, 1 << 30))
comm = C.init(timeout=120)
rows = []
for nbytes in a.sizes:
    x = torch.ones(nbytes // 4, device=comm.device)
    for op in ("broadcast", "reduce"):
        for algo in ("ring", "tree"):
            for depth in (1, 4):
                comm._pipeline = depth  # as TOPOCOMM_PIPELINE=depth would set it

                def call():
                    if op == "broadcast":
                        comm.broadcast(x, src=0, algorithm=algo)
                    else:
                        comm.reduce(x, dst=0, algorithm=algo)
                for _ in range(3):
                    call()
                b2b = [timed(comm, call, a.iters) for _ in range(a.trials)]
                one = [timed(comm, call, 1) for _ in range(a.trials * a.iters)]  # each after a sync and a barrier
                b2b, one = slowest(comm, [statistics.median(b2b), statistics.median(one)])
                rows.append({"op": op, "algorithm": algo, "pipeline": depth, "bytes": nbytes,
                             "back_to_back_us": round(b2b * 1e6, 1), "one_at_a_time_us": round(one * 1e6, 1),
                             "predicted_us": round(comm.model.predict(op, nbytes, algo, pipeline=depth) * 1e6, 1)})
                if comm.rank == 0:
                    print(rows[-1], flush=True)
if comm.rank == 0 and a.json:
    with open(a.json, "w") as f:
        json.dump({"world_size": comm.size, "iters": a.iters, "trials": a.trials, "rows": rows}, f, indent=1)
C.shutdown()
