"""One rank of a launcher test: ``python -m tests.launch_worker MODE OUT_DIR`` under torchrun, mpiexec,
a SLURM-like environment or launch.emulate.

Each rank runs its checks and writes ``OUT_DIR/rank<r>.json``: rank, size, source, nodes, problems
(descriptions of what went wrong; empty when all is well), per-case sweep errors and all-reduce digests
(so the test can check that every rank holds a bitwise-identical result), and mode-specific figures.

Modes:
- ``allreduce``: ``collectives.init()``; every all-reduce algorithm against a local reference.
- ``multinode``: as ``allreduce``, and the topology's nodes (hierarchical runs on them).
- ``mpi``: ``MpiCommunicator``; the gloo correctness sweep (tests/cases.py) at this world size, and every
  all-reduce algorithm cross-checked against MPI's own ``Allreduce`` on the same input.
- ``emulated``: as ``multinode``, and the time of a transfer across nodes against one inside a node.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()

import torch  # noqa: E402

from tests.cases import expected, make_input, sweep

ALLREDUCE_COUNTS = (1, 7, 1000, 65536 + 3)


def _all_reduce_cases(algorithms: tuple[str, ...]) -> list[tuple]:
    cases, seed = [], 0
    for algo in algorithms:
        for dt, op in (("float32", "sum"), ("float64", "avg"), ("bfloat16", "max"), ("int64", "prod")):
            for count in ALLREDUCE_COUNTS:
                seed += 1
                cases.append(("all_reduce", algo, dt, op, count, 0, seed, False))
    return cases


def _sweep(comm, cases: list[tuple]) -> dict:
    res = sweep(comm, cases)
    return {"cases": [list(c) for c in cases], "errors": [e for e, _ in res], "digests": [d for _, d in res]}


def _algorithms() -> tuple[str, ...]:
    import collectives.algorithms as algorithms
    from collectives.schedule import Collective

    return algorithms.supported(Collective.ALL_REDUCE)


def run_allreduce(out: dict) -> None:
    import collectives as C
    from collectives.bootstrap import launch_env

    env = launch_env()
    comm = C.init(timeout=60)
    out.update(rank=comm.rank, size=comm.size, source=env["source"], backend=comm.backend,
               local_rank=env["local_rank"], local_world_size=env["local_world_size"],
               nodes=comm.topology.nodes, nic=comm.topology.nic.kind if comm.topology.nic else None,
               plan=comm.plan("all_reduce", 16 << 20).algorithm)
    out.update(_sweep(comm, _all_reduce_cases(_algorithms())))
    if env["source"] != "torchrun" and os.environ.get("LOCAL_RANK") != str(env["local_rank"]):
        out["problems"].append(f"init did not export LOCAL_RANK={env['local_rank']}")
    comm.barrier()


def run_emulated(out: dict) -> None:
    run_allreduce(out)
    import collectives as C

    comm = C.default_communicator()
    nbytes = 4 << 20
    buf = torch.zeros(nbytes // 4)
    timings = {}
    node_of = {r: i for i, n in enumerate(comm.topology.nodes) for r in n}
    # Rank 0 sends to a peer on its node, then to one on the other node; the rest wait at the barrier.
    for label, peer in (("intra", comm.topology.nodes[0][-1]), ("inter", comm.topology.nodes[-1][0])):
        comm.barrier()
        t0 = time.perf_counter()
        if comm.rank == 0:
            comm.send(buf, peer)
            comm.recv(buf[:1], peer)  # the peer's acknowledgement: the data has arrived
        elif comm.rank == peer:
            comm.recv(buf, 0)
            comm.send(buf[:1], 0)
        timings[label] = time.perf_counter() - t0
        out.setdefault("peers", {})[label] = [peer, node_of[peer]]
    out["p2p_seconds"] = timings
    out["p2p_bytes"] = nbytes
    comm.barrier()


def run_mpi(out: dict) -> None:
    """Under mpiexec with TOPOCOMM_BACKEND=mpi: init() gives the MPI communicator."""
    from mpi4py import MPI

    import collectives as C
    from collectives import bootstrap
    from collectives.mpi import MpiCommunicator
    from tests.test_collectives import cases_for

    comm = C.init(timeout=60)
    if not isinstance(comm, MpiCommunicator):
        out["problems"].append(f"init() under TOPOCOMM_BACKEND=mpi gave {comm!r}")
        return
    out.update(rank=comm.rank, size=comm.size, source="mpi", backend=comm.backend, nodes=comm.topology.nodes)
    n, r = comm.size, comm.rank
    out.update(_sweep(comm, mpi_cases(cases_for(n))))
    # Cross-check: each algorithm's all-reduce equals MPI's own Allreduce of the same input, bitwise.
    for algo in _algorithms():
        for dt, op, mop in ((torch.float64, "sum", MPI.SUM), (torch.int32, "max", MPI.MAX),
                            (torch.float32, "prod", MPI.PROD)):
            x = make_input(dt, op, 100003, r, n, seed=77)
            ref = x.clone()
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, ref.numpy(), mop)
            comm.all_reduce(x, op=op, algorithm=algo)
            if not torch.equal(x, ref):
                out["problems"].append(f"{algo} {dt} {op}: differs from MPI Allreduce")
            if not torch.equal(ref, expected("all_reduce", dt, op, 100003, r, n, 0, 77)):
                out["problems"].append(f"MPI Allreduce {dt} {op}: differs from the local reference")
    obj = comm.exchange_json({"rank": r, "text": "x" * r})
    if obj != [{"rank": q, "text": "x" * q} for q in range(n)]:
        out["problems"].append(f"exchange_json: {obj}")
    comm.barrier()
    # A silent peer: rank 0 waits for a message rank n-1 never sends, and must raise naming it.
    from collectives.transport import PeerTimeoutError

    short = MpiCommunicator(timeout=0.5, topology=comm.topology)
    if r == 0:
        t0 = time.perf_counter()
        try:
            short.recv(torch.zeros(4), n - 1)
            out["problems"].append("recv from a silent peer returned")
        except PeerTimeoutError as e:
            if e.peer != n - 1 or time.perf_counter() - t0 > 5:
                out["problems"].append(f"timeout: peer {e.peer}, after {time.perf_counter() - t0:.1f} s: {e}")
    comm.barrier()
    # The same launch with gloo: rank 0 picks the address and shares it over MPI.
    bootstrap._default = None
    g = C.init(timeout=60, backend="gloo")
    x = torch.full((1001,), float(r + 1))
    g.all_reduce(x, algorithm="ring")
    if g.backend != "gloo" or not torch.all(x == n * (n + 1) / 2):
        out["problems"].append(f"gloo over the MPI launch: {g!r}, {x[:3].tolist()}")
    out["gloo_nodes"] = g.topology.nodes


def mpi_cases(cases: list[tuple]) -> list[tuple]:
    """The sweep's cases, thinned to fit the CI budget: every native case (MPI's datatypes and ops
    are what is new here) except the large ones beyond float32/bfloat16, a sixth of the small cases
    of our algorithms (the transport only moves bytes), and large all-reduces through ring."""
    keep = []
    for i, c in enumerate(cases):
        coll, algo, count = c[0], c[1], c[4]
        if count > 1000:
            if (algo == "native" and coll in ("all_reduce", "reduce_scatter")) or (coll, algo) == ("all_reduce", "ring"):
                keep.append(c)
        elif algo == "native" or i % 6 == 0:
            keep.append(c)
    return keep


MODES = {"allreduce": run_allreduce, "multinode": run_allreduce, "slurm": run_allreduce,
         "emulated": run_emulated, "mpi": run_mpi}


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    started = time.perf_counter()
    torch.set_num_threads(1)
    out: dict = {"mode": mode, "problems": []}
    try:
        MODES[mode](out)
    except BaseException as e:  # noqa: BLE001 - the test reads the report
        import traceback

        out["problems"].append(f"raised {type(e).__name__}: {e}\n{traceback.format_exc()}")
    out["seconds"] = {"imports": started - _T0, "run": time.perf_counter() - started}
    rank = out.get("rank", os.environ.get("RANK", os.environ.get("PMI_RANK", os.getpid())))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    if out["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
