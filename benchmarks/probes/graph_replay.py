"""Where a small call's time goes, per rank: host time to issue 50 back-to-back calls against the time
until they finish, for our schedules replayed as CUDA graphs and run eagerly, NCCL's own all-reduce, and
host micro-costs (Python, a kernel launch, a stream wait, one NCCL p2p step, a one-kernel graph).

    for i in 1 2 3 4 5 6 7 8; do TAG=l$i OUT=dir torchrun --nproc-per-node 4 -m benchmarks.probes.graph_replay; done

Each rank writes OUT/probe-TAG-rRANK.json: {case: [host us per call, us per call]} (medians of 5 loops).
"""
import json, os
import torch, torch.distributed as dist
import collectives as C
from benchmarks._timing import issued_and_done

comm = C.init(timeout=60)
dev = comm.device
rank, n = comm.rank, comm.size
out = {"rank": rank, "cpu": len(os.sched_getaffinity(0))}

def cur():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[36])

def timed(fn, iters=50, trials=5):
    return issued_and_done(comm, fn, iters, trials)

E = 16384  # 64 KiB of float32
x = torch.ones(E, device=dev); big = torch.ones(E * n, device=dev)
cases = {
    "all_gather direct": lambda: comm.all_gather(big, x, algorithm="direct"),
    "all_gather ring": lambda: comm.all_gather(big, x, algorithm="ring"),
    "broadcast tree": lambda: comm.broadcast(x, src=0, algorithm="tree"),
    "broadcast ring": lambda: comm.broadcast(x, src=0, algorithm="ring"),
    "all_reduce ring": lambda: comm.all_reduce(x, algorithm="ring"),
    "all_reduce direct": lambda: comm.all_reduce(x, algorithm="direct"),
    "all_reduce native": lambda: comm.all_reduce(x, algorithm="native"),
}
for name, fn in cases.items():
    for _ in range(5):
        fn()
    out[name] = timed(fn)
comm._graphs.enabled = False
for name, fn in cases.items():
    if "native" in name or "all_reduce direct" in name:
        continue
    for _ in range(5):
        fn()
    out["eager " + name] = timed(fn)
# a captured graph of one tiny kernel, and of one NCCL p2p exchange, replayed
g1 = torch.cuda.CUDAGraph()
tt = torch.zeros(1, device=dev)
side = torch.cuda.Stream(device=dev)
with torch.cuda.graph(g1, stream=side):
    tt.add_(1)
for _ in range(5):
    g1.replay()
out["graph: one kernel"] = timed(g1.replay, iters=200, trials=3)
# host micro-costs
t = torch.zeros(1, device=dev)
s2 = torch.cuda.Stream(device=dev)
def pyloop():
    sum(range(2000))
def launch():
    t.add_(1)
def events():
    s2.wait_stream(torch.cuda.current_stream())
def p2p():
    ops = [dist.P2POp(dist.isend, x, (rank + 1) % n), dist.P2POp(dist.irecv, t.new_empty(E), (rank - 1) % n)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
for name, fn in {"py sum(range(2000))": pyloop, "kernel launch": launch, "wait_stream": events, "nccl p2p ring step": p2p}.items():
    for _ in range(5):
        fn()
    out[name] = timed(fn, iters=200, trials=3)
out["cpu_now"] = cur()
with open(os.path.join(os.environ["OUT"], f"probe-{os.environ['TAG']}-r{rank}.json"), "w") as f:
    json.dump(out, f)
C.shutdown()
