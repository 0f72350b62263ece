"""python -m collectives {topology, explain, simulate}

    topology [--save FILE]                      detect this machine (or print a preset) as JSON
    explain  --topology PRESET|FILE --nodes N --op OP --bytes SIZE
                                                every algorithm's predicted time, algbw, busbw; the pick and why
    simulate --topology PRESET|FILE --nodes N [--op OP] [--plot FILE]
                                                sweep sizes 1K..4G: predicted busbw per algorithm, and the pick
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from . import algorithms
from .model import OPS, CostModel
from .schedule import Collective
from .sizes import format_size, parse_size
from .topology import PRESETS, Topology

# nccl-tests' bus bandwidth factors (DESIGN.md, "Command lines").
BUSBW = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
         "all_gather": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
         "broadcast": lambda n: 1.0, "reduce": lambda n: 1.0}


def load_topology(spec: str, nodes: int | None) -> Topology:
    """A preset name or a JSON file (from ``topology --save``), with ``nodes`` copies of its node."""
    if spec in PRESETS:
        return Topology.preset(spec, nodes=nodes or 1)
    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"--topology {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a file")
    topo = Topology.load(path)
    if nodes is None or nodes == topo.num_nodes:
        return topo
    per = len(topo.nodes[0])
    if topo.nic is None:
        raise SystemExit(f"--nodes {nodes}: {spec} describes no NIC to join nodes with")
    return replace(topo, nodes=[list(range(i * per, (i + 1) * per)) for i in range(nodes)],
                   devices=[topo.devices[0]] * (per * nodes), hosts=[f"node{i}" for i in range(nodes)])


def _backend(args: argparse.Namespace, topo: Topology) -> str:
    return args.backend or ("gloo" if topo.devices[0] == "cpu" else "nccl")


def cmd_topology(args: argparse.Namespace) -> None:
    topo = load_topology(args.preset, args.nodes) if args.preset else Topology.detect()
    print(topo.describe(), file=sys.stderr)
    if args.save:
        topo.save(args.save)
        print(f"saved to {args.save}", file=sys.stderr)
    else:
        print(json.dumps(topo.to_json(), indent=2))


def cmd_explain(args: argparse.Namespace) -> None:
    topo = load_topology(args.topology, args.nodes)
    model = CostModel(topo, _backend(args, topo))
    n, coll = topo.world_size, Collective(args.op)
    plan = model.plan(coll.value, args.bytes)
    print(topo.describe())
    print(f"{coll.value} of {format_size(args.bytes)} on {n} ranks, backend {model.backend} "
          f"(parameters: {model.params.source})\n")
    print(f"{'algorithm':18s} {'time':>12s} {'algbw GB/s':>11s} {'busbw GB/s':>11s} {'pipeline':>8s}  decided by")
    for name, t in sorted(plan.alternatives.items(), key=lambda kv: kv[1]):
        k = model.best_pipeline(coll, args.bytes, name)
        algbw = args.bytes / t / 1e9 if t > 0 else float("inf")
        mark = " <- pick" if name == plan.algorithm else ""
        print(f"{name:18s} {_fmt_time(t):>12s} {algbw:11.2f} {algbw * BUSBW[coll.value](n):11.2f} {k:8d}  "
              f"{model.reason(coll, args.bytes, name, pipeline=k)}{mark}")
    print(f"\npick: {plan.algorithm} ({plan.reason})")


def _fmt_time(t: float) -> str:
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.3f} s"


def cmd_simulate(args: argparse.Namespace) -> None:
    import numpy as np
    topo = load_topology(args.topology, args.nodes)
    model = CostModel(topo, _backend(args, topo))
    n = topo.world_size
    sizes = np.array([args.min_bytes * 4 ** i for i in range(64) if args.min_bytes * 4 ** i <= args.max_bytes])
    ops = [args.op] if args.op else list(OPS)
    print(topo.describe())
    curves: dict[str, dict[str, np.ndarray]] = {}
    for op in ops:
        coll = Collective(op)
        names = algorithms.supported(coll)
        times = {a: model.sweep(coll, sizes, a) for a in names}
        curves[op] = {a: sizes / t * BUSBW[op](n) / 1e9 for a, t in times.items()}
        print(f"\n{op}: predicted busbw GB/s ({model.backend}, {n} ranks)")
        print(f"{'size':>8s} " + " ".join(f"{a:>16s}" for a in names) + "  pick")
        for i, s in enumerate(sizes):
            pick = model.choose(coll, int(s))
            print(f"{format_size(s):>8s} " + " ".join(f"{curves[op][a][i]:16.2f}" for a in names) + f"  {pick}")
    if args.plot:
        _plot(args.plot, sizes, curves, f"{topo.name} x{topo.num_nodes} ({n} ranks, {model.backend})")
        print(f"\nplot: {args.plot}")


def _plot(path: str, sizes, curves: dict, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (op, by_algo) in zip(axes[0], curves.items()):
        for name, busbw in by_algo.items():
            ax.plot(sizes, busbw, marker=".", label=name)
        ax.set(xscale="log", xlabel="bytes", ylabel="predicted busbw (GB/s)", title=op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m collectives", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("topology", help="detect this machine's topology (or print a preset) as JSON")
    t.add_argument("--save", metavar="FILE")
    t.add_argument("--preset", choices=sorted(PRESETS))
    t.add_argument("--nodes", type=int, default=None)
    for name, helptext in (("explain", "every algorithm's prediction for one op and size"),
                           ("simulate", "sweep sizes; print (and plot) predicted busbw")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--topology", required=True, help=f"a preset ({', '.join(PRESETS)}) or a JSON file")
        p.add_argument("--nodes", type=int, default=None)
        p.add_argument("--backend", choices=("nccl", "gloo", "mpi"), default=None)
        p.add_argument("--op", choices=OPS, required=name == "explain", default=None if name == "simulate"
                       else "all_reduce")
        if name == "explain":
            p.add_argument("--bytes", type=parse_size, required=True)
        else:
            p.add_argument("--min-bytes", type=parse_size, default=1 << 10)
            p.add_argument("--max-bytes", type=parse_size, default=4 << 30)
            p.add_argument("--plot", metavar="FILE")
    args = ap.parse_args(argv)
    {"topology": cmd_topology, "explain": cmd_explain, "simulate": cmd_simulate}[args.cmd](args)


if __name__ == "__main__":
    main()
