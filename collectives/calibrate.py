"""Calibration: fit the cost model's parameters to measured sweeps, as JSON profiles.

Input is what ``benchmarks.busbw --json`` writes: a header (machine, backend,
world_size, ...) and rows (op, algorithm, bytes, count, dtype, time_us, algbw,
busbw, wrong, predicted_us, in_place). Two fits:

- our algorithms: a prediction is linear in theta = [call, step, alpha_intra,
  alpha_inter, 1/B_intra, 1/B_inter, 1/R, 1/B_pair, sched, msg] once each round's
  slowest line is fixed ([Note: structural lines] in model.py), so
  theta is a non-negative least-squares fit of relative error, re-linearised
  a few times. Columns the rows cannot tell apart keep their defaults
  (alpha_intra is folded into the step overhead; inter-node terms need
  multi-node rows).
- native: the backend is a black box, so each op gets a straight line
  time = alpha + nbytes * beta at each measured world size.

Several sweeps of one kind of machine (say 2 and 4 GPUs of one host) fit one
profile together: each sweep's rows are priced on its own topology, theta is
shared, and native gets a line per world size.

A profile is the fitted Params plus a ``match`` block (backend, device, cpus,
CPU model) that ``find_profile`` (calibrate_profiles.py) compares with the
detected hardware; ``$TOPOCOMM_PROFILE`` names one explicitly.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import algorithms, calibrate_check
from .calibrate_check import PICK_TOLERANCE, copied, row_in_place, row_prediction
# profiles on disk; the tests and the model reach them through this module too
from .calibrate_profiles import PROFILE_DIR, device_kind, find_profile, hardware_key, load_profile, save_profile
from .execute import LEGACY_CUDA_SEGMENT_BYTES
from .model import HOST, SETUP, CostModel, binding, evaluate, native_structs
from .params import _WORLD_FIELDS, THETA, Params, _theta, default_params
from .schedule import Collective
from .topology import Topology, from_reports

_MIN_BYTES = 64 * 1024  # below this, timer noise and Python overhead dominate the fit


# ---------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------

def nnls(A: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """Non-negative least squares (Lawson & Hanson 1974, active set), small dense problems."""
    m, n = A.shape
    x, passive = np.zeros(n), np.zeros(n, bool)
    w = A.T @ (b - A @ x)
    for _ in range(iters):
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12 * max(1.0, np.abs(w).max()):
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            step = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + step * (z - x)
            passive &= x > 1e-15
        w = A.T @ (b - A @ x)
    return x


def features(model: CostModel, coll: Collective, algorithm: str, nbytes: float, theta: np.ndarray,
             pipeline: int | None = None, in_place: bool = False) -> np.ndarray:
    """d prediction / d theta at ``theta`` (the prediction is theta . features; order: model.THETA)."""
    k = pipeline or model.best_pipeline(coll, int(nbytes), algorithm)
    x = np.zeros(len(THETA))
    for w, struct in model.structs(coll, algorithm, k, in_place):  # weights sum to 1 ([Note: back to back])
        x[0] += w
        for count, L in struct:
            j, g = binding(L, theta, nbytes, model.curve)
            tier, m, c = int(L[j, 0]), L[j, 3], w * count
            x[6] += c * m * 3 * L[j, 2] * nbytes
            if tier == SETUP:  # a buffer copy outside the rounds ([Note: set-up copies] in rounds.py)
                continue
            x[1] += c
            if tier == HOST:  # steps no host posts ([Note: posted ahead] in rounds.py): the step alone
                continue
            x[8] += c * (m > 1)
            x[9] += c * L[j, 4]
            if tier != 2:
                x[2 + (tier == 1)] += c
                stretch = 1 if tier == 1 else m  # [Note: CPU stretch]: a wire is not slowed by busy cores
                x[{0: 4, 1: 5, 3: 7, 6: 7}[tier]] += c * stretch * L[j, 1] * nbytes * g
    return x


# [Note: measured rows]
# Like "auto" rows (load_rows), some busbw rows time more than one call of their algorithm at a known
# schedule, and fit nothing. Out of place, all_reduce, broadcast and reduce run ``out.copy_(inp)`` and the
# in-place call (benchmarks/_ops.py): 1.18-1.37x the in-place time at 16 MiB on 2 cores. Pipelined ones run
# at the measuring model's depth, unrecorded unless a row has ``pipeline``: the 2-core fit sweep ran tree
# in 8 parts at 16 MiB (the refit picks 2), and fitted, those rows hid direct's edge at 16 MiB.
def _times_call(row: dict[str, Any]) -> bool:
    """Whether ``row`` timed one call of its algorithm at a schedule the fit knows ([Note: measured rows])."""
    return not copied(row) and ("pipeline" in row or not algorithms.pipelined(row["algorithm"], Collective(row["op"])))


def fit(rows: list[dict[str, Any]], topo: Topology, backend: str, base: Params | None = None,
        min_bytes: int = _MIN_BYTES) -> tuple[Params, dict[str, Any]]:
    """Fits Params to busbw rows; returns them and a summary (per-row predicted / measured)."""
    return fit_sweeps([(topo, rows)], backend, base, min_bytes)


def fit_per_world(sweeps: list[tuple[Topology, list[dict[str, Any]]]], backend: str,
                  min_bytes: int = _MIN_BYTES, curves: dict[int, dict[str, list]] | None = None
                  ) -> tuple[Params, dict[str, Any]]:
    """Fits each world size's sweeps on their own ([Note: per-world profiles] in model.py): the largest
    world's fit is the base, the others go into ``worlds``; native lines are kept per world size.
    ``curves``: world size -> the Params curve fields measured on that many ranks (load_curves)."""
    by_world: dict[int, list[tuple[Topology, list[dict[str, Any]]]]] = {}
    for topo, rows in sweeps:
        by_world.setdefault(topo.world_size, []).append((topo, rows))
    fits = {ws: fit_sweeps(group, backend, base=_base(group, backend, curves), min_bytes=min_bytes)[0]
            for ws, group in by_world.items()}
    top = max(fits)
    native = {k: v for p in fits.values() for k, v in p.native.items()}
    kernels = {k: v for p in fits.values() for k, v in p.kernels.items()}
    worlds = {str(ws): {k: getattr(p, k) for k in _WORLD_FIELDS} for ws, p in fits.items() if ws != top}
    params = replace(fits[top], native=native, kernels=kernels, worlds=worlds)
    return params, _summary(sweeps, backend, params, min_bytes)


def _base(sweeps: list[tuple[Topology, list[dict[str, Any]]]], backend: str,
          curves: dict[int, dict[str, list]] | None) -> Params:
    """The defaults a fit starts from, with the message curves measured at the sweeps' world size."""
    topo = sweeps[0][0]
    return replace(default_params(topo, backend), **(curves or {}).get(topo.world_size, {}))


def load_curve(path: str | os.PathLike, one_way: bool = False) -> tuple[int, list[list[float]]]:
    """(world size, [[bytes, seconds], ...]) of a benchmarks/p2p_curve.py JSON file: ring steps, or with
    ``one_way`` transfers whose ends only send or only receive ([Note: one way] in pricing.py)."""
    doc = json.loads(Path(path).read_text())
    points = [[float(b), float(t)] for b, t in doc["points"]]
    if len(points) < 2:
        raise ValueError(f"{path}: a message curve needs at least 2 points, got {len(points)}")
    pattern = str(doc["header"].get("pattern", "ring step"))
    if pattern.startswith("one way") != one_way:
        want = "--one-way-curve" if pattern.startswith("one way") else "--pair-curve"
        raise ValueError(f"{path}: measured as '{pattern}', which is a {want} FILE")
    return int(doc["header"]["world_size"]), points


def load_curves(pair: list[str], one_way: list[str]) -> dict[int, dict[str, list]]:
    """world size -> {"pair_curve": points, "one_way_curve": points}, as measured (load_curve)."""
    out: dict[int, dict[str, list]] = {}
    for paths, field_, flag in ((pair, "pair_curve", False), (one_way, "one_way_curve", True)):
        for path in paths:
            world, points = load_curve(path, flag)
            out.setdefault(world, {})[field_] = points
    return out


def fit_sweeps(sweeps: list[tuple[Topology, list[dict[str, Any]]]], backend: str, base: Params | None = None,
               min_bytes: int = _MIN_BYTES) -> tuple[Params, dict[str, Any]]:
    """Fits one Params to several sweeps, each measured on its topology (see the module note)."""
    base = base or default_params(sweeps[0][0], backend)
    native = _tables(sweeps, backend, base.native, min_bytes, lambda r: r["algorithm"] == "native" and _times_call(r))
    kernels = _tables(sweeps, backend, base.kernels, min_bytes, lambda r: _on_kernel(r) and _times_call(r))
    params = replace(base, native=native, kernels=kernels, source="calibrated")
    ours = [(topo, [r for r in rows if r["algorithm"] != "native" and not _on_kernel(r) and r["bytes"] >= min_bytes
                    and _times_call(r)]) for topo, rows in sweeps]
    if any(rows for _, rows in ours):
        params = _fit_theta([(topo, rows) for topo, rows in ours if rows], backend, params)
    if backend != "nccl":
        params = _fit_native_step(sweeps[0][1], sweeps[0][0], backend, params, min_bytes)
    return params, _summary(sweeps, backend, params, min_bytes)


def _on_kernel(row: dict[str, Any]) -> bool:
    """A row measured on our NVLink kernel (busbw marks them), priced from its own table."""
    return row.get("path") == "nvlink"


def _tables(sweeps: list[tuple[Topology, list[dict[str, Any]]]], backend: str, base: dict, min_bytes: int,
            wanted) -> dict[str, dict[str, list]]:
    """world -> op -> [alpha, s/byte] (+ on NCCL the measured points) of the ``wanted`` rows, over base."""
    out = {k: dict(v) for k, v in base.items()}
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (world, op) -> (bytes, s), every sweep
    for topo, rows in sweeps:
        for r in rows:
            if wanted(r) and r["bytes"] >= min_bytes:
                points.setdefault((str(topo.world_size), r["op"]), []).append((r["bytes"], r["time_us"] * 1e-6))
    for (world, op), pts in sorted(points.items()):
        if len(pts) >= 2:
            S, t = np.array(pts, float).T
            A = np.column_stack([np.ones_like(S), S]) / t[:, None]
            line = [float(v) for v in nnls(A, np.ones_like(t))]
            # pricing._measured: the median time at each size among its rows (every sweep of this world size).
            # Not the lowest: NCCL's own small and mid-size calls differ up to 2x between launches of the
            # same job (all_to_all at 4 MiB on 4 x H200: 47-52 us in two launches, 97-104 us in two
            # others), where our schedules repeat to a few percent; the lowest priced native as its best
            # launch and auto picked it where it ran 1.4-2.2x slower than our tree or pairwise.
            table = [[s, float(np.median(t[S == s]))] for s in sorted(set(S.tolist()))]
            # A time-shared CPU's table would keep one run's noise: gloo keeps the line alone.
            out.setdefault(world, {})[op] = line + [table] if backend == "nccl" else line
    return out


def _summary(sweeps: list[tuple[Topology, list[dict[str, Any]]]], backend: str, params: Params,
             min_bytes: int) -> dict[str, Any]:
    """Per-row predicted / measured of ``params`` on the sweeps, and how often the pick was right."""
    ratios: dict[str, float] = {}
    picks: list[float] = []
    for topo, rows in sweeps:
        model = sweep_model(topo, backend, params, rows)
        tag = f"{topo.world_size}r/" if len(sweeps) > 1 else ""
        ratios.update({f'{tag}{r["op"]}/{r["algorithm"]}/{r["bytes"]}': 1e6 * row_prediction(model, r) / r["time_us"]
                       for r in rows if r["bytes"] >= min_bytes})
        picks += pick_results(model, rows, min_bytes)
    vals = np.array(list(ratios.values())) if ratios else np.ones(1)
    return {"rows": len(ratios), "ratio_min": float(vals.min()), "ratio_max": float(vals.max()),
            "within_25pct": float(np.mean([calibrate_check.row_within(v) for v in vals])),
            "pick_within_5pct": float(np.mean(picks)) if picks else 1.0, "ratios": ratios}


def pick_results(model: CostModel, rows: list[dict[str, Any]], min_bytes: int = _MIN_BYTES) -> list[bool]:
    """Per measured (op, size) cell: whether the model's pick ran within 5% of the fastest measured."""
    return [slow <= 1 + PICK_TOLERANCE for *_, slow in calibrate_check.pick_cells(model, rows, min_bytes)]


def _fit_theta(sweeps: list[tuple[Topology, list[dict[str, Any]]]], backend: str, params: Params) -> Params:
    """Re-linearised NNLS from a few starts (which lines bind depends on theta: a pair that starts no
    slower than its port never binds, so also start with slower pairs); keeps the best relative fit."""
    t = np.array([r["time_us"] * 1e-6 for _, rows in sweeps for r in rows])
    best: tuple[float, np.ndarray, dict[str, float]] | None = None
    # [Note: messages] prices a host's work per message. On NCCL a step's messages go out as one grouped
    # launch, but each peer in the group is one more p2p operation to set up. Fitted before the message
    # curve, msg took the whole per-step cost (step 0, msg 3.8 us on 4 x H200) and priced
    # halving-doubling's two 2-message rounds below direct's one 6-message round, the reverse of every
    # sweep; it was held at 0. Now it fits at 1.7 us beside a step of 8 us: direct all-gather at 64 KiB-1
    # MiB went from 0.61-0.72x of the median of eight held-out 4-GPU launches to 0.70-0.81x, 98% of
    # rows within 25% of those medians (96% with msg 0), and the picks did not change.
    hosted = backend != "nccl"
    # [Note: per-op calls]: one call column per collective (their least is call_overhead, the rest op_overhead)
    ops = sorted({r["op"] for _, rows in sweeps for r in rows})
    onehot = np.array([[r["op"] == o for o in ops] for _, rows in sweeps for r in rows], dtype=float)
    for slower in (1.0, 2.0, 4.0):
        theta = _theta(params)
        theta[7] = max(theta[7], slower * theta[4])
        calls = np.full(len(ops), theta[0])
        for _ in range(8):
            X = np.array([features(model, Collective(r["op"]), r["algorithm"], r["bytes"], theta, r.get("pipeline"),
                                   row_in_place(r))
                          for topo, rows in sweeps
                          for model in (sweep_model(topo, backend, _params(params, theta), rows),)
                          for r in rows])
            # On CPU alpha_intra rides with the step overhead (the same column on one node); on a device the
            # host pays a step per step it posts and the device alpha per round ([Note: posted ahead] in
            # rounds.py), which rooted schedules tell apart. Fit what the rows exercise.
            cols = (1, 3, 4, 5, 6, 7, 8, 9) if hosted else (1, 2, 3, 4, 5, 6, 7, 8, 9)
            free = [j for j in cols if np.any(X[:, j] > 0)]
            fixed = [j for j in range(1, len(THETA)) if j not in free]
            sol = nnls(np.hstack([onehot, X[:, free]]) / t[:, None], (t - X[:, fixed] @ theta[fixed]) / t)
            new, new_calls = theta.copy(), sol[:len(ops)]
            new[free] = np.maximum(sol[len(ops):], 1e-30)
            new[0] = new_calls.min()
            done = np.allclose(new, theta, rtol=1e-6) and np.allclose(new_calls, calls, rtol=1e-6)
            theta, calls = new, new_calls
            if done:
                break
        per_op = {o: float(c - theta[0]) for o, c in zip(ops, calls)}
        pred = [row_prediction(model, r)
                for topo, rows in sweeps
                for model in (sweep_model(topo, backend, _params(params, theta, per_op), rows),)
                for r in rows]
        err = float(np.sqrt(np.mean((np.array(pred) / t - 1) ** 2)))
        if best is None or err < best[0]:
            best = (err, theta, per_op)
    return _params(params, best[1], best[2])


# [Note: per-op calls]
# A call of our schedules costs host work that depends on the collective, not only on its rounds:
# argument checks, the schedule lookup, scratch and set-up buffers. On 4 x H200 at 64 KiB a chain
# broadcast of three rounds took 17-20 us and a ring all-gather of three rounds 42-45 us; one call
# overhead for every collective priced the first 1.7-2x slow and the all-reduces 0.6-0.75x. The fit
# gives each collective its own call column (a collective no row measured keeps call_overhead).


def _fit_native_step(rows: list[dict[str, Any]], topo: Topology, backend: str, params: Params,
                     min_bytes: int) -> Params:
    """The backend's own per-step cost, with the link parameters fixed: prices native at other world sizes."""
    model = sweep_model(topo, backend, replace(params, native={}), rows)
    theta, num, den = model._native_theta("float32"), 0.0, 0.0
    for r in rows:
        if r["algorithm"] != "native" or r["bytes"] < min_bytes or not _times_call(r):
            continue
        t, S = r["time_us"] * 1e-6, np.array([float(r["bytes"])])
        struct = native_structs(backend, model._lay, Collective(r["op"]))[0][1]()
        base = evaluate(struct, theta, S, step=0.0)[0]
        steps = evaluate(struct, theta, S, step=1.0)[0] - base
        num += steps * (t - base) / t ** 2
        den += steps ** 2 / t ** 2
    return replace(params, native_step=max(num / den, 0.0)) if den else params


def _params(p: Params, theta: np.ndarray, op_overhead: dict[str, float] | None = None) -> Params:
    t = [float(v) for v in theta]
    return replace(p, op_overhead=p.op_overhead if op_overhead is None else op_overhead, call_overhead=t[0],
                   step_overhead=t[1], intra_alpha=t[2], inter_alpha=t[3], intra_bandwidth=1 / t[4],
                   inter_bandwidth=1 / t[5], reduce_bandwidth=1 / t[6], pair_bandwidth=1 / t[7],
                   oversubscribed_step=t[8], message_overhead=t[9])


_ROW_FIELDS = ("op", "algorithm", "bytes", "time_us")


def load_rows(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, rows) of a busbw JSON file: {"header": {...}, "rows": [...]} or a bare list of rows."""
    doc = json.loads(Path(path).read_text())
    header, rows = ({}, doc) if isinstance(doc, list) else (doc.get("header", {}), doc.get("rows", doc.get("results", [])))
    for i, r in enumerate(rows):
        missing = [k for k in _ROW_FIELDS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{path}: row {i} has no {', '.join(missing)}: not a busbw sweep "
                             f"(python -m benchmarks.busbw --json)")
    # The segment size the sweep's transfers were cut at, which prices them ([Note: whole transfers on
    # CUDA] in execute.py): the header's; NCCL sweeps from before the header said ran with 32 MiB.
    seg = header.get("segment_bytes") or (LEGACY_CUDA_SEGMENT_BYTES if header.get("backend") == "nccl" else None)
    # Whether own-block copies ran beside the schedule ([Note: own block aside] in execute.py): not before
    # the header said so. "auto" rows time the model's own pick: they measure no algorithm, so they can't
    # calibrate one.
    # How many calls busbw timed back to back per loop, which a device's calls overlap ([Note: back to back]).
    extra = {**({"segment_bytes": seg} if seg else {}), "own_block_aside": bool(header.get("own_block_aside")),
             **({"iters": int(header["iters"])} if header.get("iters") else {})}
    return header, [{**r, **extra} for r in rows if r.get("algorithm") != "auto"]


def sweep_model(topo: Topology, backend: str, params: Params | str | None, rows: list[dict[str, Any]]) -> CostModel:
    """A CostModel of ``params`` pricing transfers cut, own blocks copied, and calls timed back to back as the
    sweep of ``rows`` did ([Note: back to back] in rounds.py)."""
    return CostModel(topo, backend, profile=params, segment_bytes=rows[0].get("segment_bytes") if rows else None,
                     aside=bool(rows and rows[0].get("own_block_aside")),
                     back_to_back=int(rows[0].get("iters", 0)) if rows else 0)


def _sweep_topology(header: dict[str, Any], path: str | None) -> Topology:
    """The topology a sweep ran on: ``path`` (cut to the sweep's first ranks), the header's, or a local one."""
    n = int(header.get("world_size") or 0)
    if path:
        topo = Topology.load(path)
        reports = topo.details.get("reports") if isinstance(topo.details, dict) else None
        if n and n < topo.world_size:
            if not reports:
                raise ValueError(f"--topology: {path} has {topo.world_size} ranks and no per-rank reports to "
                                 f"cut to the sweep's {n}")
            return from_reports(reports[:n])
        return topo
    if "topology" in header:  # re-derive from the raw reports, so detection fixes apply to old sweeps
        reports = header["topology"].get("details", {}).get("reports")
        return from_reports(reports) if reports else Topology.from_json(header["topology"])
    if header.get("gpu") or header.get("backend") == "nccl":  # a local CPU topology would price it as CPU ranks
        raise ValueError("the sweep ran on GPUs and its header records no topology: pass --topology FILE "
                         "(python -m collectives topology --save FILE, on that machine)")
    machine = str(header.get("machine", ""))
    return Topology.local(n or 4, cpus=int(machine.split("(")[-1].split()[0]) if "CPUs" in machine else None)


def _load_sweeps(paths: list[str], topology: str | None) -> list[tuple[dict[str, Any], Topology, list[dict[str, Any]]]]:
    """(header, topology, rows) of each busbw file (load_rows, _sweep_topology); a ValueError names the file."""
    out = []
    for path in paths:
        header, rows = load_rows(path)
        try:
            out.append((header, _sweep_topology(header, topology), rows))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m collectives.calibrate",
                                 description="measure local gloo sweeps and fit a cost-model profile")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time every op and algorithm with local gloo ranks")
    m.add_argument("--nproc", type=int, default=4)
    m.add_argument("--json", required=True, help="write {header, rows} here")
    f = sub.add_parser("fit", help="fit a profile to busbw JSON rows")
    f.add_argument("rows", nargs="+", help="busbw JSON files ({header, rows} or a list of rows), one machine kind")
    f.add_argument("--save", required=True, help="profile to write")
    f.add_argument("--backend", default=None)
    f.add_argument("--topology", default=None,
                   help="topology JSON of the measured machine (python -m collectives topology --save), "
                        "for sweeps whose header does not carry one; a sweep over fewer ranks gets its first ranks")
    f.add_argument("--min-bytes", type=int, default=_MIN_BYTES,
                   help=f"fit rows of at least this many bytes (default {_MIN_BYTES}); host backends' small "
                        "rows pin the per-call and per-message costs ([Note: messages] in rounds.py)")
    f.add_argument("--pair-curve", action="append", default=[], metavar="FILE",
                   help="message curve of one world size (python -m benchmarks.p2p_curve --json); repeatable")
    f.add_argument("--one-way-curve", action="append", default=[], metavar="FILE",
                   help="one-way message curve of one world size (python -m benchmarks.p2p_curve --one-way "
                        "--json); repeatable")
    f.add_argument("--per-world", action="store_true",
                   help="fit each world size's sweeps on their own (one profile; see [Note: per-world profiles])")
    c = sub.add_parser("check", help="score a profile on busbw sweeps it was not fitted on, and the sweeps on "
                                     "one another")
    c.add_argument("profile", help="profile JSON (python -m collectives.calibrate fit --save)")
    c.add_argument("rows", nargs="+", help="busbw JSON files of one machine kind")
    c.add_argument("--topology", default=None, help="as for fit")
    c.add_argument("--min-bytes", type=int, default=_MIN_BYTES, help=f"score rows of at least this many bytes "
                   f"(default {_MIN_BYTES})")
    c.add_argument("-v", "--verbose", action="store_true", help="list every row and pick that missed")
    a = ap.parse_args(argv)
    if a.cmd == "check":
        try:
            _check(a)
        except (OSError, ValueError, KeyError) as e:  # unreadable profile or sweep: say which, no traceback
            ap.error(f"check: {e}")
        return
    if a.cmd == "measure":
        from .calibrate_measure import measure_launched, measure_local

        if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
            got = measure_launched()
            if got is None:
                return
            header, rows, topo = got
            header["topology"] = topo.to_json()
        else:
            header, rows = measure_local(a.nproc)
        Path(a.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
        print(f"{len(rows)} rows -> {a.json}")
        return
    try:
        loaded = _load_sweeps(a.rows, a.topology)
    except (OSError, ValueError) as e:
        ap.error(f"fit: {e}")
    sweeps = [(topo, rows) for _, topo, rows in loaded]
    backend = a.backend or loaded[0][0].get("backend", "gloo")
    on_cpu = device_kind(sweeps[-1][0]) == "cpu"
    cpus = sorted({header["cpu"] for header, _, _ in loaded if header.get("cpu")}) if on_cpu else []
    if len(cpus) > 1:
        ap.error(f"fit: the sweeps ran on different CPUs ({', '.join(cpus)}); fit one machine kind at a time "
                 "([Note: CPU model])")
    try:
        curves = load_curves(a.pair_curve, a.one_way_curve)
    except (OSError, ValueError, KeyError) as e:
        ap.error(f"fit: {e}")
    if a.per_world:
        params, summary = fit_per_world(sweeps, backend, min_bytes=a.min_bytes, curves=curves)
    else:
        params, summary = fit_sweeps(sweeps, backend, base=_base(sweeps, backend, curves), min_bytes=a.min_bytes)
    meta = {k: v for k, v in summary.items() if k != "ratios"}
    headers = [{k: v for k, v in header.items() if k != "topology"} for header, _, _ in loaded]
    meta.update(header=headers[0] if len(headers) == 1 else headers, topology=sweeps[-1][0].to_json(),
                note="fitted by python -m collectives.calibrate fit; 'rows' are the measurements",
                pair_curves=[str(path) for path in a.pair_curve],
                one_way_curves=[str(path) for path in a.one_way_curve],
                rows=[{**{k: r[k] for k in ("op", "algorithm", "bytes", "time_us") if k in r},
                       **({"world_size": topo.world_size} if len(sweeps) > 1 else {})}
                      for topo, rows in sweeps for r in rows])
    save_profile(a.save, params, hardware_key(sweeps[-1][0], backend, cpus[0] if cpus else None), meta)
    for key, r in sorted(summary["ratios"].items()):
        print(f"{key:45s} predicted/measured {r:6.2f}")
    print(f"within 25%: {100 * summary['within_25pct']:.0f}% of {summary['rows']} rows; pick within 5% of the "
          f"measured best in {100 * summary['pick_within_5pct']:.0f}% of (op, size) cells -> {a.save}")


def _check(a) -> None:
    try:
        params = load_profile(a.profile)
    except KeyError as e:
        raise ValueError(f"profile {a.profile}: no {e} field, not a profile (calibrate fit --save writes one)") from e
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"profile {a.profile}: {e}") from e
    loaded = _load_sweeps(a.rows, a.topology)
    scores = [calibrate_check.score(sweep_model(topo, header.get("backend", "gloo"), params, rows), rows, a.min_bytes)
              for header, topo, rows in loaded]
    agreed = calibrate_check.agreement([rows for *_, rows in loaded], a.min_bytes) if len(loaded) > 1 else None
    names = [Path(p).name for p in a.rows]
    pooled = calibrate_check.pools(loaded, a.min_bytes)
    for name, backend, topo, rows in pooled:
        names.append(name)
        scores.append(calibrate_check.score(sweep_model(topo, backend, params, rows), rows, a.min_bytes))
    print(calibrate_check.report(names, scores, agreed, a.verbose, pooled=len(pooled)))


if __name__ == "__main__":
    main()
