"""Calibration profiles on disk: saving and loading them, the hardware a profile was fitted on, and finding
the shipped profile (or ``$TOPOCOMM_PROFILE``) for the detected hardware.

A profile is the fitted Params plus a ``match`` block (backend, device, fabric; for CPU ranks the core
count and the CPU model) that ``find_profile`` compares with the detected hardware.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .params import Params
from .topology import Topology, cpu_name, usable_cpus

PROFILE_DIR = Path(__file__).parent / "profiles"


def load_profile(path: str | os.PathLike) -> Params:
    return Params.from_json(json.loads(Path(path).read_text())["params"])


def save_profile(path: str | os.PathLike, params: Params, match: dict[str, Any], meta: dict[str, Any]) -> None:
    doc = {"match": match, "meta": meta, "params": params.to_json()}
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def device_kind(topo: Topology) -> str:
    """The kind of device ``topo``'s ranks run on: a GPU model name, or "cpu"."""
    return topo.devices[0] if topo.devices else "cpu"


def hardware_key(topo: Topology, backend: str, cpu: str | None = None) -> dict[str, Any]:
    """What a profile must agree on to apply: backend, device kind, fabric and, for CPUs, the core count and
    the CPU model (``cpu``, default this host's: [Note: CPU model])."""
    key: dict[str, Any] = {"backend": backend, "device": device_kind(topo), "fabric": topo.fabric}
    if key["device"] == "cpu":
        key["cpus"] = topo.cpus or usable_cpus()
        key["cpu"] = cpu or cpu_name()
    return key


# [Note: CPU model]
# Two 2-core machines are not one machine kind. The same sweep took 5.1-5.7 minutes on a 2-core AMD EPYC
# guest and 8-10 on a 2-core Intel Xeon guest, whose fitted copy and reduction rates are half the EPYC's;
# the EPYC profile put 12% of the Xeon's rows within 25% (benchmarks/results/cpu-gloo-4rank.md,
# "another 2-core machine"). CPU profiles therefore match the CPU model too. Where none was fitted on this
# model, one that agrees on everything else still applies: it prices the structure of every algorithm,
# and its picks held on the Xeon (93%), so it is nearer than the defaults.
def find_profile(topo: Topology, backend: str) -> Params | None:
    """``$TOPOCOMM_PROFILE`` if set, else the first shipped profile whose match block fits, else the first
    that fits all but the CPU model ([Note: CPU model]), else None."""
    env = os.environ.get("TOPOCOMM_PROFILE")
    if env:
        return load_profile(env)
    want, near = hardware_key(topo, backend), None
    for path in sorted(PROFILE_DIR.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        differ = {k for k, v in doc.get("match", {}).items() if want.get(k) != v}
        if not differ:
            return Params.from_json(doc["params"])
        if differ == {"cpu"} and near is None:
            near = Params.from_json(doc["params"])
    return near
