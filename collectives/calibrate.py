"""Calibration: fit the cost model's parameters to measured sweeps, as JSON profiles.

Input is what ``benchmarks.busbw --json`` writes: a header (machine, backend,
world_size, ...) and rows (op, algorithm, bytes, count, dtype, time_us, algbw,
busbw, wrong, predicted_us, in_place). Two fits:

- our algorithms: a prediction is linear in
  theta = [step, alpha_intra, alpha_inter, 1/B_intra, 1/B_inter, 1/R] once each
  round's slowest line is fixed ([Note: structural lines] in model.py), so
  theta is a non-negative least-squares fit of relative error, re-linearised
  a few times. Columns the rows cannot tell apart keep their defaults
  (alpha_intra is folded into the step overhead; inter-node terms need
  multi-node rows).
- native: the backend is a black box, so each op gets a straight line
  time = alpha + nbytes * beta at the measured world size.

A profile is the fitted Params plus a ``match`` block (backend, device, cpus)
that ``find_profile`` compares with the detected hardware; ``$TOPOCOMM_PROFILE``
names one explicitly.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .model import CostModel, Params, _theta, default_params
from .schedule import Collective
from .topology import Topology

PROFILE_DIR = Path(__file__).parent / "profiles"
_MIN_BYTES = 64 * 1024  # below this, timer noise and Python overhead dominate the fit


def load_profile(path: str | os.PathLike) -> Params:
    return Params.from_json(json.loads(Path(path).read_text())["params"])


def save_profile(path: str | os.PathLike, params: Params, match: dict[str, Any], meta: dict[str, Any]) -> None:
    doc = {"match": match, "meta": meta, "params": params.to_json()}
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def hardware_key(topo: Topology, backend: str) -> dict[str, Any]:
    """What a profile must agree on to apply: backend, device kind, fabric and, for CPUs, the core count."""
    key: dict[str, Any] = {"backend": backend, "device": topo.devices[0] if topo.devices else "cpu",
                           "fabric": topo.fabric}
    if key["device"] == "cpu":
        key["cpus"] = os.cpu_count() or 1
    return key


def find_profile(topo: Topology, backend: str) -> Params | None:
    """``$TOPOCOMM_PROFILE`` if set, else the first shipped profile whose match block fits, else None."""
    env = os.environ.get("TOPOCOMM_PROFILE")
    if env:
        return load_profile(env)
    want = hardware_key(topo, backend)
    for path in sorted(PROFILE_DIR.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        match = doc.get("match", {})
        if all(want.get(k) == v for k, v in match.items()):
            return Params.from_json(doc["params"])
    return None


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


def features(model: CostModel, coll: Collective, algorithm: str, nbytes: float, theta: np.ndarray) -> np.ndarray:
    """d prediction / d theta at ``theta`` (the prediction is theta . features)."""
    k = model.best_pipeline(coll, int(nbytes), algorithm)
    x = np.zeros(6)
    for count, L in model.struct(coll, algorithm, k):
        t = L[:, 0].astype(int)
        a = theta[0] + np.array([theta[1], theta[2], 0.0])[t]
        b = L[:, 1] * np.array([theta[3], theta[4], 0.0])[t] + 3 * L[:, 2] * theta[5]
        j = int(np.argmax(a + b * nbytes))
        row = np.zeros(6)
        row[0] = 1
        if t[j] < 2:
            row[1 + t[j]] = 1
            row[3 + t[j]] = L[j, 1] * nbytes
        row[5] = 3 * L[j, 2] * nbytes
        x += count * row
    return x


def fit(rows: list[dict[str, Any]], topo: Topology, backend: str, base: Params | None = None,
        min_bytes: int = _MIN_BYTES) -> tuple[Params, dict[str, Any]]:
    """Fits Params to busbw rows; returns them and a summary (per-row predicted / measured)."""
    base = base or default_params(topo, backend)
    ws = str(topo.world_size)
    native: dict[str, list[float]] = {}
    for op in sorted({r["op"] for r in rows if r["algorithm"] == "native"}):
        pts = [(r["bytes"], r["time_us"] * 1e-6) for r in rows
               if r["algorithm"] == "native" and r["op"] == op and r["bytes"] >= min_bytes]
        if len(pts) >= 2:
            S, t = np.array(pts, float).T
            A = np.column_stack([np.ones_like(S), S]) / t[:, None]
            native[op] = [float(v) for v in nnls(A, np.ones_like(t))]
    params = replace(base, native={**base.native, ws: {**base.native.get(ws, {}), **native}},
                     source="calibrated")
    ours = [r for r in rows if r["algorithm"] != "native" and r["bytes"] >= min_bytes]
    if ours:
        params = _fit_theta(ours, topo, backend, params)
    model = CostModel(topo, backend, profile=params)
    ratios = {f'{r["op"]}/{r["algorithm"]}/{r["bytes"]}':
              model.predict(r["op"], r["bytes"], r["algorithm"]) / (r["time_us"] * 1e-6)
              for r in rows if r["bytes"] >= min_bytes}
    vals = np.array(list(ratios.values())) if ratios else np.ones(1)
    summary = {"rows": len(ratios), "ratio_min": float(vals.min()), "ratio_max": float(vals.max()),
               "within_25pct": float(np.mean(np.abs(vals - 1) <= 0.25)), "ratios": ratios}
    return params, summary


def _fit_theta(rows: list[dict[str, Any]], topo: Topology, backend: str, params: Params) -> Params:
    model = CostModel(topo, backend, profile=params)
    theta = _theta(params)
    t = np.array([r["time_us"] * 1e-6 for r in rows])
    for _ in range(4):
        X = np.array([features(model, Collective(r["op"]), r["algorithm"], float(r["bytes"]), theta) for r in rows])
        # alpha_intra rides with the step overhead (same column); fit only columns the rows exercise.
        free = [j for j in (0, 2, 3, 4, 5) if np.any(X[:, j] > 0)]
        fixed = [j for j in range(6) if j not in free]
        rhs = t - X[:, fixed] @ theta[fixed]
        sol = nnls(X[:, free] / t[:, None], rhs / t)
        new = theta.copy()
        new[free] = np.maximum(sol, 1e-30)
        if np.allclose(new, theta, rtol=1e-4):
            break
        theta = new
        model = CostModel(topo, backend, profile=_params(params, theta))
    return _params(params, theta)


def _params(p: Params, theta: np.ndarray) -> Params:
    return replace(p, step_overhead=float(theta[0]), intra_alpha=float(theta[1]), inter_alpha=float(theta[2]),
                   intra_bandwidth=float(1 / theta[3]), inter_bandwidth=float(1 / theta[4]),
                   reduce_bandwidth=float(1 / theta[5]))


def load_rows(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, rows) of a busbw JSON file: {"header": {...}, "rows": [...]} or a bare list of rows."""
    doc = json.loads(Path(path).read_text())
    if isinstance(doc, list):
        return {}, doc
    return doc.get("header", {}), doc.get("rows", doc.get("results", []))
