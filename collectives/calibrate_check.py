"""``python -m collectives.calibrate check PROFILE SWEEP...``: how well a profile predicts busbw sweeps
it was not fitted on, and how well the sweeps predict one another.

Per sweep it reports the two figures a profile is judged by:

- rows: the share of rows of at least ``--min-bytes`` whose predicted time is within 25% of the
  measured one. Only rows that time one call of their algorithm count: busbw's out-of-place
  all-reduce, broadcast and reduce also time a copy of the input into the output, which no
  prediction of the collective includes (``copied``);
- picks: the share of (op, size) cells where the algorithm the model picks among the measured ones
  ran within 5% of the fastest of them (``pick_cells``; the fit's summary counts them the same way).

With three or more sweeps of one world size and executor it also scores the profile against each row's
median over them ([Note: pooled sweeps]).

[Note: sweep agreement] A measured time is itself a sample: the same cell measured in another
launch, or another minute, differs by more than any model error on a time-shared CPU, and on GPUs
NCCL's own small calls differ up to 2x between launches. With two or more sweeps the command also
scores each sweep against the others, the mean of the other sweeps standing in for the model: their
mean row as the prediction of each row, their fastest algorithm by mean time as the pick of each
cell. That is the best any prediction made before the sweep ran could do on average, and a profile
scoring near it has no error left that the measurements can show.

[Note: pooled sweeps] For the same reason one sweep's row is a poor stand-in for what a call of that
algorithm costs: on the 2-core reference machine a cell's quartiles over ten sweeps lie 10-15% either
side of its median, so a model that is right about every cell still misses some rows of any one sweep
by more than 25%, and where two algorithms are within a few percent the faster one changes from sweep
to sweep. With three or more sweeps of one world size and executor (segment size, own-block copies
aside or not) the command therefore also scores the profile against one pooled sweep, each row's
median time over the sweeps that measured it. That is the figure that says whether the model is
right about a cell; the per-sweep lines say how far one launch strays.
Sweeps the profile was fitted on pull the median toward it: pool held-out sweeps only.

[Note: sweep level] Each line also gives the sweep's level, its median row's predicted / measured.
A machine's speed can drift as a whole between sweeps: on the 2-core reference machine, over
twenty-four sweeps taken in three hours, the level ranged 0.89-1.13 under one profile. Where a
sweep's misses all lie on one side and its level is far from 1, the machine ran at another speed
throughout than in the sweeps the profile was fitted on; misses on both sides, at a level near 1,
are the model's (benchmarks/results/cpu-gloo-4rank.md, "Trials spread over the sweep").
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from .model import CostModel
from .schedule import Collective
from .sizes import format_size

ROW_TOLERANCE = 0.25   # a row is right when predicted / measured is within 1 +- this
PICK_TOLERANCE = 0.05  # a pick is right when it ran within 1 + this of the measured best

Key = tuple[str, str, int, bool]  # (op, algorithm, bytes, in place)


def row_in_place(row: dict[str, Any]) -> bool:
    """Whether ``row`` timed the in-place call (busbw's rows say; a row that does not was)."""
    return bool(row.get("in_place", True))


def copied(row: dict[str, Any]) -> bool:
    """Whether ``row`` also timed a copy ([Note: measured rows] in calibrate.py): busbw's out-of-place
    all-reduce, broadcast and reduce copy the input into the output and run in place there."""
    return not row_in_place(row) and row["op"] in ("all_reduce", "broadcast", "reduce")


def row_prediction(model: CostModel, row: dict[str, Any]) -> float:
    """``model``'s seconds for what ``row`` timed: its call at the depth it ran at, in its mode."""
    return model.predict(row["op"], row["bytes"], row["algorithm"], pipeline=row.get("pipeline"),
                         in_place=row_in_place(row))


def one_call_rows(rows: list[dict[str, Any]], min_bytes: int) -> dict[Key, dict[str, Any]]:
    """The rows that time one call of their algorithm, at least ``min_bytes``, by (op, algorithm, bytes, in place)."""
    return {(r["op"], r["algorithm"], int(r["bytes"]), row_in_place(r)): r
            for r in rows if r["bytes"] >= min_bytes and not copied(r)}


def _cells(times: dict[Key, float]) -> dict[tuple[str, int], dict[str, float]]:
    """(op, bytes) -> algorithm -> time; the in-place row where a cell has both (what a user calls)."""
    cells: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for (op, algo, nbytes, in_place), t in sorted(times.items(), key=lambda kv: kv[0][3]):
        cells[(op, nbytes)][algo] = t
    return cells


def row_within(ratio: float) -> bool:
    """Whether predicted / measured ``ratio`` counts as right."""
    return abs(ratio - 1) <= ROW_TOLERANCE


def pick_cells(model: CostModel, rows: list[dict[str, Any]], min_bytes: int) -> list[tuple[str, int, str, float]]:
    """Per (op, size) cell of the one-call rows: (op, bytes, the model's pick among the measured algorithms,
    its measured time / the fastest's)."""
    out = []
    for (op, nbytes), times in _cells({k: r["time_us"] for k, r in one_call_rows(rows, min_bytes).items()}).items():
        pick = model.plan(Collective(op), nbytes, candidates=tuple(times)).algorithm
        out.append((op, nbytes, pick, times[pick] / min(times.values())))
    return out


def score(model: CostModel, rows: list[dict[str, Any]], min_bytes: int) -> dict[str, Any]:
    """The model's rows and picks on one sweep, and the rows and cells it got wrong."""
    ratios = {k: row_prediction(model, r) * 1e6 / r["time_us"] for k, r in one_call_rows(rows, min_bytes).items()}
    cells = pick_cells(model, rows, min_bytes)
    missed = [c for c in cells if c[3] > 1 + PICK_TOLERANCE]
    return {"rows": len(ratios), "rows_within": _share([row_within(q) for q in ratios.values()]),
            "level": float(np.median(list(ratios.values()))) if ratios else float("nan"),  # [Note: sweep level]
            "cells": len(cells), "picks_within": 1 - len(missed) / len(cells) if cells else float("nan"),
            "row_misses": {k: q for k, q in ratios.items() if not row_within(q)}, "pick_misses": missed}


def pooled_rows(sweeps: list[list[dict[str, Any]]], min_bytes: int) -> list[dict[str, Any]]:
    """One sweep whose rows are each one-call row's median time over ``sweeps`` ([Note: pooled sweeps]);
    the other fields (the depth it ran at among them) come from the first sweep that has the row."""
    times: dict[Key, list[float]] = defaultdict(list)
    first: dict[Key, dict[str, Any]] = {}
    for rows in sweeps:
        for k, r in one_call_rows(rows, min_bytes).items():
            times[k].append(float(r["time_us"]))
            first.setdefault(k, r)
    return [{**first[k], "time_us": float(np.median(v))} for k, v in times.items()]


def pools(loaded: list[tuple[dict[str, Any], Any, list[dict[str, Any]]]], min_bytes: int) -> list[tuple]:
    """Per group of three or more of the (header, topology, rows) sweeps that ran one backend, world size and
    executor (segment size, own-block copies aside or not): (the line's name, the backend, the group's last
    topology, pooled_rows of the group) ([Note: pooled sweeps])."""
    groups: dict[tuple, list[tuple[Any, list[dict[str, Any]]]]] = defaultdict(list)
    for header, topo, rows in loaded:
        first = rows[0] if rows else {}
        key = (header.get("backend", "gloo"), topo.world_size, first.get("segment_bytes"),
               bool(first.get("own_block_aside")))
        groups[key].append((topo, rows))
    return [(f"median of {len(group)} sweeps, {world} ranks" + (f", {format_size(seg)} segments" if seg else "")
             + (", copies aside" if aside else ""), backend, group[-1][0],
             pooled_rows([rows for _, rows in group], min_bytes))
            for (backend, world, seg, aside), group in groups.items() if len(group) >= 3]


def agreement(sweeps: list[list[dict[str, Any]]], min_bytes: int) -> list[dict[str, float]]:
    """Per sweep, the other sweeps' mean as its prediction ([Note: sweep agreement]): rows and picks."""
    times = [{k: r["time_us"] for k, r in one_call_rows(rows, min_bytes).items()} for rows in sweeps]
    out = []
    for j, mine in enumerate(times):
        others = [t for i, t in enumerate(times) if i != j]
        rows = [row_within(float(np.mean([t[k] for t in others if k in t])) / v)
                for k, v in mine.items() if any(k in t for t in others)]
        their_cells = [_cells(t) for t in others]
        picks = []
        for cell, measured in _cells(mine).items():
            seen = [c[cell] for c in their_cells if cell in c]
            shared = [a for a in measured if seen and all(a in c for c in seen)]
            if shared:
                pick = min(shared, key=lambda a: np.mean([c[a] for c in seen]))
                picks.append(measured[pick] <= (1 + PICK_TOLERANCE) * min(measured.values()))
        out.append({"rows": len(rows), "rows_within": _share(rows), "cells": len(picks), "picks_within": _share(picks)})
    return out


def _share(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def _pct(share: float) -> str:
    return f"{'-':>6s}" if np.isnan(share) else f"{share:6.0%}"


def report(names: list[str], scores: list[dict[str, Any]], agreed: list[dict[str, float]] | None,
           verbose: bool = False, pooled: int = 0) -> str:
    """The check's table (and, verbose, each sweep's misses); the last ``pooled`` entries score pooled sweeps
    ([Note: pooled sweeps]), which have no agreement figures."""
    width = max(len(n) for n in names + ["sweep"])
    head = f"{'sweep':{width}s}  {'rows':>6s} {'picks':>6s}  {'of rows':>7s} {'cells':>5s} {'level':>5s}"
    if agreed:
        head += f"  | {'rows':>6s} {'picks':>6s}"
    lines = [f"rows: predicted within {ROW_TOLERANCE:.0%} of measured; picks: the pick ran within "
             f"{PICK_TOLERANCE:.0%} of the best measured", head]
    for i, (name, s) in enumerate(zip(names, scores)):
        line = (f"{name:{width}s}  {_pct(s['rows_within'])} {_pct(s['picks_within'])}  {s['rows']:7d} {s['cells']:5d}"
                f" {s['level']:5.2f}")
        if agreed and i < len(agreed):
            line += f"  | {_pct(agreed[i]['rows_within'])} {_pct(agreed[i]['picks_within'])}"
        lines.append(line)
        if verbose:
            lines += [f"    row  {op} {algo} {nbytes} {'in-place' if ip else 'out-of-place'}: "
                      f"predicted/measured {q:.2f}" for (op, algo, nbytes, ip), q in sorted(s["row_misses"].items())]
            lines += [f"    pick {op} {nbytes}: {pick} ran {slow:.2f}x the best"
                      for op, nbytes, pick, slow in s["pick_misses"]]
    lines.append("level: the median row's predicted / measured ([Note: sweep level])")
    if agreed:
        lines.append("left of |: the profile; right of |: the mean of the other sweeps as the prediction "
                     "([Note: sweep agreement])")
    if pooled:
        lines.append("median lines: the profile against each row's median over the sweeps of one world size "
                     "and executor ([Note: pooled sweeps])")
    return "\n".join(lines)
