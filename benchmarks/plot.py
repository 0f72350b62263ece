"""busbw against size from a busbw JSON document: one panel per op, one colour per algorithm.

Measured points are solid lines with markers, the cost model's prediction for
the same algorithm is dashed in the same colour. Each op is shown in the mode
a topocomm user calls (in place for all_reduce, broadcast and reduce, out of
place for the others; [Note: in place] in _ops.py).

    python -m benchmarks.plot results.json results.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ._ops import OPS


def _label(nbytes: float) -> str:
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):g}{unit}"
    return f"{nbytes:g}"


def series(doc: dict[str, Any], op: str) -> dict[str, tuple[list[int], list[float], list[float | None]]]:
    """{algorithm: (bytes, measured busbw, predicted busbw or None)} in the op's natural mode."""
    n = int(doc["header"]["world_size"])
    bench = OPS[op]
    rows = [r for r in doc["rows"] if r["op"] == op]
    modes = {r["in_place"] for r in rows}
    in_place = bench.natural_in_place and True in modes or modes == {True}
    out: dict[str, tuple[list[int], list[float], list[float | None]]] = {}
    for r in rows:
        if r["in_place"] != in_place:
            continue
        x, y, p = out.setdefault(r["algorithm"], ([], [], []))
        x.append(r["bytes"])
        y.append(r["busbw"])
        pred = r.get("predicted_us")
        p.append(r["bytes"] / (pred * 1e-6) / 1e9 * bench.factor(n) if pred and r["bytes"] else None)
    return out


def plot(doc: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in doc["rows"]))
    if not ops:
        raise ValueError("plot: the document has no rows")
    h = doc["header"]
    cols = min(2, len(ops))
    rows = -(-len(ops) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 5.0 * rows), squeeze=False)
    for ax in axes.flat[len(ops):]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, op in zip(axes.flat, ops):
        for i, (algo, (x, y, p)) in enumerate(series(doc, op).items()):
            c = colors[i % len(colors)]
            keep = [(a, b) for a, b in zip(x, y) if a > 0 and b > 0]
            if keep:
                ax.plot(*zip(*keep), "o-", color=c, label=algo)
            pred = [(a, b) for a, b in zip(x, p) if a > 0 and b]
            if pred:
                ax.plot(*zip(*pred), "--", color=c, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _label(v)))
        ax.set_xlabel("size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"{op}, {h['world_size']} ranks, {h['backend']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
    device = h.get("gpu") or h.get("cpu") or ""
    fig.suptitle(f"{device}  ({h.get('hostname', '')}, torch {h.get('torch', '')}, {h.get('date', '')[:10]}); "
                 "solid: measured, dashed: cost model", fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[0]).read_text()), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
