"""Hierarchical against flat ring all-reduce across an emulated slow inter-node link, and the cost model's view.

    python -m benchmarks.emulated                        # 2 nodes x 2 ranks, 1 Gbit/s, 16 and 64 MiB
    python -m benchmarks.emulated --rate 1gbit --sizes 16M,64M --iters 5 --algos ring,hierarchical,native

Sets up ``launch.emulate`` (network namespaces as nodes, a tbf-shaped link of ``--rate`` per
direction between them; needs root), runs this module on every rank (gloo, GLOO_SOCKET_IFNAME on the
emulated NIC) and writes ``benchmarks/results/emulated-<nodes>x<ppn>-<rate>.{json,md}``.

Each time is the slowest rank's, from a barrier to the end of the call; the table gives the median
and the minimum of ``--iters`` runs after one warm-up. Every result is checked.

Two cost models price the same calls:

- ``detected``: ``comm.model`` as ``collectives.init()`` builds it: the detected topology (two
  nodes from GROUP_RANK; the veth is not a NIC, so the inter-node link falls back to loopback) and the
  shipped calibrated profile for this machine.
- ``emulated-link``: the same profile with the inter-node tier set to the emulated link
  (``topology.ethernet(rate)``: bandwidth x NCCL's network efficiency, Ethernet latency), and without the
  profile's straight-line fits of ``native``, which were measured on one node.
- ``emulated-link-own-hosts``: as ``emulated-link``, with each node on a host of its own. The model
  stretches a rank's transfers by its host's CPU oversubscription; all emulated nodes share this
  host's cores, which slows CPU work but not the shaped wire.

``--transport recv-first`` also runs our algorithms with each step's receives posted before its
sends (see ``_RecvFirstTransport``).
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
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * _UNITS[text[-1]]) if text[-1:] in _UNITS else int(text)


# -- on every rank -------------------------------------------------------------------

def _models(comm) -> dict[str, Any]:
    from collectives.model import CostModel
    from collectives.topology import ethernet

    gbps = float(os.environ.get("TOPOCOMM_NIC_GBPS", "0") or 0)
    out = {"detected": comm.model}
    if gbps:
        link = ethernet(gbps)
        topo = dataclasses.replace(comm.topology, nic=link, nics_per_node=1, name=f"emulated-{gbps:g}gbit")
        params = dataclasses.replace(comm.model.params, inter_alpha=link.latency, inter_bandwidth=link.effective,
                                     native={}, source=f"{comm.model.params.source} + emulated {link.kind} link")
        out["emulated-link"] = CostModel(topo, backend=comm.backend, profile=params)
        # The same, as if each node were its own host: the model then stops stretching transfers by the
        # host's CPU oversubscription (all emulated nodes share this host's cores).
        own = dataclasses.replace(topo, hosts=[f"{h}-node{i}" for i, h in enumerate(topo.hosts)])
        out["emulated-link-own-hosts"] = CostModel(own, backend=comm.backend, profile=params)
    return out


def _slowest(comm, seconds: float) -> float:
    import torch

    t = torch.tensor([seconds], dtype=torch.float64)
    comm.all_reduce(t, op="max", algorithm="native")
    return float(t.item())


class _RecvFirstTransport:
    """``TorchTransport`` posting each batch's receives before its sends (gloo), for ``--transport recv-first``.

    ProcessGroupGloo serialises the two directions of a pair when a send is posted before the
    matching receive on the other side: an exchange with one peer (hierarchical's inter-node
    steps with two nodes, halving-doubling, direct) then takes twice its wire time. Posting the
    receives first makes it full duplex. This measures that change without making it.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rank, self.size, self.backend = inner.rank, inner.size, inner.backend

    def post(self, sends, recvs):
        if self.inner._batched or not sends:
            return self.inner.post(sends, recvs)
        _, r = self.inner.post([], recvs)
        s, _ = self.inner.post(sends, [])
        return s, r


def worker(sizes: list[int], algos: list[str], transports: list[str], iters: int, out: Path) -> None:
    import torch

    import collectives as C

    torch.set_num_threads(1)
    comm = C.init(timeout=600)
    n, r = comm.size, comm.rank
    models = _models(comm)
    as_is = comm._executor.transport
    rows = []
    for nbytes in sizes:
        x = torch.empty(nbytes // 4, dtype=torch.float32)
        want = float(n * (n + 1) // 2)
        for transport in transports:
            comm._executor.transport = as_is if transport == "as-is" else _RecvFirstTransport(as_is)
            for algo in algos:
                if algo == "native" and transport != "as-is":
                    continue  # native does not use our transport
                times, wrong = [], 0
                for it in range(iters + 1):
                    x.fill_(r + 1)
                    comm.barrier()
                    t0 = time.perf_counter()
                    comm.all_reduce(x, algorithm=algo)
                    t = _slowest(comm, time.perf_counter() - t0)
                    wrong += int((x != want).sum().item())
                    if it:  # the first run warms up (connections, buffers, schedules)
                        times.append(t)
                row = {"bytes": nbytes, "algorithm": algo, "transport": transport, "times_s": times,
                       "median_s": statistics.median(times), "min_s": min(times), "wrong": wrong}
                for name, m in models.items():
                    row[f"predicted_s[{name}]"] = m.predict("all_reduce", nbytes, algo)
                    if algo != "native":
                        row[f"terms[{name}]"] = {k: v for k, v in m.terms("all_reduce", nbytes, algo).items()
                                                 if k != "variant"}
                rows.append(row)
                if r == 0:
                    print(f"{nbytes >> 20:5d} MiB  {algo:17s} {transport:10s} median {row['median_s'] * 1e3:8.1f} ms  "
                          f"min {row['min_s'] * 1e3:8.1f} ms  wrong {wrong}", flush=True)
    comm._executor.transport = as_is
    if r == 0:
        plans = {name: {str(s): {"algorithm": m.plan("all_reduce", s).algorithm,
                                 "alternatives": m.plan("all_reduce", s).alternatives} for s in sizes}
                 for name, m in models.items()}
        topo = {name: {"nodes": m.topology.nodes, "nic": dataclasses.asdict(m.topology.nic) if m.topology.nic else None,
                       "params": m.params.to_json()} for name, m in models.items()}
        out.write_text(json.dumps({"rows": rows, "plans": plans, "models": topo, "world_size": n,
                                   "nodes": comm.topology.nodes, "backend": comm.backend,
                                   "torch": torch.__version__}, indent=1))
    comm.barrier()


# -- the driver ----------------------------------------------------------------------

def _label(row: dict[str, Any]) -> str:
    return row["algorithm"] if row["transport"] == "as-is" else f"{row['algorithm']} ({row['transport']})"


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Per size: hierarchical's speed-up over ring (per transport); the fastest measured; each model's pick,
    its fastest among the measured algorithms, and predicted / measured for every row."""
    out: dict[str, Any] = {}
    for nbytes in sorted({row["bytes"] for row in doc["rows"]}):
        here = [row for row in doc["rows"] if row["bytes"] == nbytes]
        s: dict[str, Any] = {}
        for tr in sorted({row["transport"] for row in here}):
            by = {row["algorithm"]: row for row in here if row["transport"] == tr}
            if "ring" in by and "hierarchical" in by:
                s[f"speedup_hierarchical_over_ring[{tr}]"] = by["ring"]["median_s"] / by["hierarchical"]["median_s"]
        measured = {_label(row): row["median_s"] for row in here}
        s["measured_fastest"] = min(measured, key=measured.get)
        for name in doc["plans"]:
            pred = {row["algorithm"]: row[f"predicted_s[{name}]"] for row in here}
            s[name] = {"plan": doc["plans"][name][str(nbytes)]["algorithm"],
                       "predicted_fastest_among_measured": min(pred, key=pred.get),
                       "predicted_over_measured": {_label(row): row[f"predicted_s[{name}]"] / row["median_s"]
                                                   for row in here}}
        out[str(nbytes)] = s
    return out


def markdown(doc: dict[str, Any]) -> str:
    h = doc["header"]
    models = list(doc["plans"])
    lines = [f"# Emulated {h['nodes']} nodes x {h['nproc_per_node']} ranks, {h['rate']} per direction between nodes",
             "", f"{h['date']} on {h['machine']} ({h['cpus']} CPUs, load average {h['load_before']} before, "
             f"{h['load_after']} after); torch {doc['torch']}, gloo; shaper {h['qdisc']}.", "",
             f"Command: `{h['command']}`", "", f"Time: {h['time']}.", "",
             f"Topology: nodes {doc['nodes']}; the inter-node link as each model sees it: " +
             "; ".join(f"{m}: {doc['models'][m]['nic']['kind'] if doc['models'][m]['nic'] else None} "
                       f"{doc['models'][m]['params']['inter_bandwidth'] / 1e6:g} MB/s" for m in models), "",
             "Transport `recv-first`: the library's TorchTransport with each step's receives posted before its "
             "sends (a proposed change; see benchmarks/emulated.py).", "",
             "| size | algorithm | median (ms) | min (ms) | " + " | ".join(f"model {m} (ms)" for m in models) +
             " | " + " | ".join(f"{m} / measured" for m in models) + " | wrong |",
             "|---:|---|---:|---:|" + "---:|" * (2 * len(models)) + "---:|"]
    for row in doc["rows"]:
        preds = [row[f"predicted_s[{m}]"] for m in models]
        lines.append(f"| {row['bytes'] >> 20} MiB | {_label(row)} | {row['median_s'] * 1e3:.1f} | "
                     f"{row['min_s'] * 1e3:.1f} | " + " | ".join(f"{p * 1e3:.1f}" for p in preds) + " | " +
                     " | ".join(f"{p / row['median_s']:.2f}" for p in preds) + f" | {row['wrong']} |")
    lines.append("")
    for size, s in doc["summary"].items():
        speed = "; ".join(f"hierarchical / ring speed-up {v:.2f}x ({k.split('[')[1][:-1]})"
                          for k, v in s.items() if k.startswith("speedup"))
        lines.append(f"- {int(size) >> 20} MiB: {speed}; fastest measured: {s['measured_fastest']}; " + "; ".join(
            f"model {m}: plan picks {s[m]['plan']}, fastest predicted among those measured "
            f"{s[m]['predicted_fastest_among_measured']}" for m in models))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.emulated", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--qdisc", choices=("tbf", "htb"), default="tbf")
    p.add_argument("--sizes", default="16M,64M")
    p.add_argument("--algos", default="ring,hierarchical,halving_doubling,native")
    p.add_argument("--transport", default="as-is,recv-first",
                   help="as-is (the library's TorchTransport) and/or recv-first (receives posted first)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None, help="results path without extension "
                                               "(default benchmarks/results/emulated-<nodes>x<ppn>-<rate>)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes, algos = [parse_size(s) for s in a.sizes.split(",")], a.algos.split(",")
    if a.worker:
        worker(sizes, algos, a.transport.split(","), a.iters, Path(a.worker))
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
    with tempfile.TemporaryDirectory() as tmp, Emulation(spec) as emu:
        raw = Path(tmp) / "rank0.json"
        emu.launch([sys.executable, "-m", "benchmarks.emulated", "--worker", str(raw), "--sizes", a.sizes,
                    "--algos", a.algos, "--transport", a.transport, "--iters", str(a.iters)])
        rc = emu.wait(timeout=1800)
        if rc or not raw.exists():
            print(f"benchmarks.emulated: the ranks failed (exit {rc})", file=sys.stderr)
            return rc or 1
        doc = json.loads(raw.read_text())
    doc["header"] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": platform.node() + " " + platform.platform(), "cpus": os.cpu_count(),
                     "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
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
