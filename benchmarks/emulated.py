"""Hierarchical against flat ring all-reduce across an emulated slow inter-node link, and the cost model's view.

    python -m benchmarks.emulated                        # 2 nodes x 2 ranks, 1 Gbit/s, 16 and 64 MiB
    python -m benchmarks.emulated --rate 1gbit --sizes 16M,64M --iters 7 --algos ring,hierarchical,native

Sets up ``launch.emulate`` (network namespaces as nodes, a tbf-shaped link of ``--rate`` per
direction between them; needs root), runs this module on every rank (gloo, GLOO_SOCKET_IFNAME on the
emulated NIC) and writes ``benchmarks/results/emulated-<nodes>x<ppn>-<rate>.{json,md}``.

Each time is the slowest rank's, from a barrier to the end of the call; the table gives the median
and the minimum of ``--iters`` runs after one warm-up. Every result is checked.

The prediction is ``comm.model``'s, as ``collectives.init()`` builds it: the detected topology
(nodes from GROUP_RANK, the inter-node link from ``TOPOCOMM_NIC_GBPS``, which launch.emulate exports,
as a veth is not a NIC sysfs can rate) and the calibrated profile shipped for this machine (one node:
its inter-node terms come from the topology, see model.for_topology).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * _UNITS[text[-1]]) if text[-1:] in _UNITS else int(text)


# -- on every rank -------------------------------------------------------------------


def worker(sizes: list[int], algos: list[str], iters: int, out: Path) -> None:
    import torch

    import collectives as C
    from benchmarks._timing import slowest

    torch.set_num_threads(1)
    comm = C.init(timeout=600)
    n, r, model = comm.size, comm.rank, comm.model
    rows = []
    for nbytes in sizes:
        x = torch.empty(nbytes // 4, dtype=torch.float32)
        want = float(n * (n + 1) // 2)
        for algo in algos:
            times, wrong = [], 0
            for it in range(iters + 1):
                x.fill_(r + 1)
                comm.barrier()
                t0 = time.perf_counter()
                comm.all_reduce(x, algorithm=algo)
                t = slowest(comm, [time.perf_counter() - t0])[0]
                wrong += int((x != want).sum().item())
                if it:  # the first run warms up (connections, buffers, schedules)
                    times.append(t)
            row = {"bytes": nbytes, "algorithm": algo, "times_s": times, "median_s": statistics.median(times),
                   "min_s": min(times), "wrong": wrong, "predicted_s": model.predict("all_reduce", nbytes, algo),
                   "terms": {k: v for k, v in model.terms("all_reduce", nbytes, algo).items()}}
            rows.append(row)
            if r == 0:
                print(f"{nbytes >> 20:5d} MiB  {algo:17s} median {row['median_s'] * 1e3:8.1f} ms  "
                      f"min {row['min_s'] * 1e3:8.1f} ms  predicted {row['predicted_s'] * 1e3:8.1f} ms  "
                      f"wrong {wrong}", flush=True)
    if r == 0:
        plans = {str(s): {"algorithm": model.plan("all_reduce", s).algorithm,
                          "alternatives": model.plan("all_reduce", s).alternatives} for s in sizes}
        topo = comm.topology
        out.write_text(json.dumps({
            "rows": rows, "plans": plans, "world_size": n, "nodes": topo.nodes, "backend": comm.backend,
            "topology": topo.describe(), "nic": dataclasses.asdict(topo.nic) if topo.nic else None,
            "cpus_per_host": topo.cpus, "params": model.params.to_json(), "torch": torch.__version__}, indent=1))
    comm.barrier()


# -- the driver ----------------------------------------------------------------------

def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Per size: hierarchical's speed-up over ring; the fastest measured; the model's pick (all algorithms),
    its fastest among those measured, and predicted / measured for every row."""
    out: dict[str, Any] = {}
    for nbytes in sorted({row["bytes"] for row in doc["rows"]}):
        by = {row["algorithm"]: row for row in doc["rows"] if row["bytes"] == nbytes}
        s: dict[str, Any] = {}
        if "ring" in by and "hierarchical" in by:
            ring, hier = by["ring"], by["hierarchical"]
            s["speedup_hierarchical_over_ring"] = ring["median_s"] / hier["median_s"]
            s["predicted_speedup_hierarchical_over_ring"] = ring["predicted_s"] / hier["predicted_s"]
        measured = {a: row["median_s"] for a, row in by.items()}
        predicted = {a: row["predicted_s"] for a, row in by.items()}
        s["measured_fastest"] = min(measured, key=measured.get)
        s["plan"] = doc["plans"][str(nbytes)]["algorithm"]
        s["predicted_fastest_among_measured"] = min(predicted, key=predicted.get)
        s["predicted_over_measured"] = {a: predicted[a] / measured[a] for a in by}
        out[str(nbytes)] = s
    return out


def markdown(doc: dict[str, Any]) -> str:
    h = doc["header"]
    nic = doc["nic"]
    lines = [f"# Emulated {h['nodes']} nodes x {h['nproc_per_node']} ranks, {h['rate']} per direction between nodes",
             "", f"{h['date']} on {h['machine']} ({h['cpus']} CPUs shared by all emulated nodes and by other "
             f"processes; load average {h['load_before']} before, {h['load_after']} after, 1-minute load during the "
             f"run {h['load_during_1min']['min']}-{h['load_during_1min']['max']}, mean "
             f"{h['load_during_1min']['mean']}); torch {doc['torch']}, "
             f"gloo (receives posted before sends); shaper {h['qdisc']}.", "",
             f"Command: `{h['command']}`", "", f"Time: {h['time']}.", "",
             f"Model: `comm.model` on the detected topology: nodes {doc['nodes']}, inter-node link "
             f"{nic['kind'] if nic else None} ({doc['params']['inter_bandwidth'] / 1e6:g} MB/s per direction "
             f"after efficiency), {doc['cpus_per_host']} cores per host; profile: {doc['params']['source']}.", "",
             "| size | algorithm | median (ms) | min (ms) | predicted (ms) | predicted / measured | wrong |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in doc["rows"]:
        lines.append(f"| {row['bytes'] >> 20} MiB | {row['algorithm']} | {row['median_s'] * 1e3:.1f} | "
                     f"{row['min_s'] * 1e3:.1f} | {row['predicted_s'] * 1e3:.1f} | "
                     f"{row['predicted_s'] / row['median_s']:.2f} | {row['wrong']} |")
    lines.append("")
    for size, s in doc["summary"].items():
        speed = (f"hierarchical / ring speed-up {s['speedup_hierarchical_over_ring']:.2f}x measured, "
                 f"{s['predicted_speedup_hierarchical_over_ring']:.2f}x predicted; "
                 if "speedup_hierarchical_over_ring" in s else "")
        alts = doc["plans"][size]["alternatives"]
        lines.append(f"- {int(size) >> 20} MiB: {speed}fastest measured: {s['measured_fastest']}; model's plan: "
                     f"{s['plan']} (all algorithms: " + ", ".join(f"{a} {t * 1e3:.0f} ms" for a, t in alts.items()) +
                     f"); fastest predicted among those measured: {s['predicted_fastest_among_measured']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.emulated", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--qdisc", choices=("tbf", "htb"), default="tbf")
    p.add_argument("--sizes", default="16M,64M")
    p.add_argument("--algos", default="ring,hierarchical,halving_doubling,native")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--out", default=None, help="results path without extension "
                                               "(default benchmarks/results/emulated-<nodes>x<ppn>-<rate>)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes, algos = [parse_size(s) for s in a.sizes.split(",")], a.algos.split(",")
    if a.worker:
        worker(sizes, algos, a.iters, Path(a.worker))
        return 0

    from launch.emulate import Emulation, EmulationSpec, cannot_emulate, teardown_on_signals

    why = cannot_emulate()
    if why:
        print(f"benchmarks.emulated: cannot emulate nodes here: {why}", file=sys.stderr)
        return 2
    teardown_on_signals()
    spec = EmulationSpec(nodes=a.nodes, nproc_per_node=a.nproc_per_node, rate=a.rate, qdisc=a.qdisc)
    base = Path(a.out) if a.out else RESULTS / f"emulated-{a.nodes}x{a.nproc_per_node}-{a.rate}"
    load_before = [round(x, 2) for x in os.getloadavg()]
    samples: list[float] = []  # the 1-minute load average every 5 s while the ranks run
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            samples.append(round(os.getloadavg()[0], 2))

    with tempfile.TemporaryDirectory() as tmp, Emulation(spec) as emu:
        raw = Path(tmp) / "rank0.json"
        emu.launch([sys.executable, "-m", "benchmarks.emulated", "--worker", str(raw), "--sizes", a.sizes,
                    "--algos", a.algos, "--iters", str(a.iters)])
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = emu.wait(timeout=1800)
        finally:
            done.set()
        if rc or not raw.exists():
            print(f"benchmarks.emulated: the ranks failed (exit {rc})", file=sys.stderr)
            return rc or 1
        doc = json.loads(raw.read_text())
    doc["header"] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": platform.node() + " " + platform.platform(), "cpus": os.cpu_count(),
                     "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
                     "load_during_1min": {"min": min(samples, default=None), "max": max(samples, default=None),
                                          "mean": round(statistics.fmean(samples), 2) if samples else None},
                     "nodes": a.nodes, "nproc_per_node": a.nproc_per_node, "rate": a.rate, "qdisc": a.qdisc,
                     "iters": a.iters, "time": "slowest rank, barrier to return; median of iters after 1 warm-up",
                     "command": "python -m benchmarks.emulated " + " ".join(argv if argv is not None else sys.argv[1:])}
    doc["summary"] = summarize(doc)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    base.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
