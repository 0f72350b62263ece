"""Rank 0's output: the nccl-tests table, the per-op summary, the JSON document.

The table copies nccl-tests' layout (column widths, time precision, the
"Out of bounds values" and "Avg bus bandwidth" footer), one block per
(op, algorithm), with a predicted-time column from the cost model after the
in-place columns and, in the ``auto`` block, the algorithm the plan picked.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import socket
import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch

from collectives.topology import cpu_name

from ._ops import BenchOp, Layout
from ._sweep import AGGREGATES, AUTO, Measurement, Result, Settings

TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "half", torch.bfloat16: "bfloat16",
              torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16", torch.int32: "int32",
              torch.int64: "int64"}
# nccl-tests' three header lines, up to the in-place #wrong column (rows end where they end).
_HEAD = ("#" + " " * 62 + "out-of-place" + " " * 23 + "in-place",
         "#       size         count      type   redop    root     time   algbw   busbw  #wrong"
         "     time   algbw   busbw  #wrong",
         "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)        "
         "     (us)  (GB/s)  (GB/s)        ")


def fmt_time(us: float) -> str:
    """nccl-tests' time column: fewer decimals as the time grows."""
    if us >= 10000.0:
        return f"{us:7.0f}"
    return f"{us:7.1f}" if us >= 100.0 else f"{us:7.2f}"


def bandwidths(nbytes: int, time_us: float, factor: float) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes/s), as nccl-tests computes them."""
    if time_us <= 0:
        return 0.0, 0.0
    algbw = nbytes / (time_us * 1e-6) / 1e9
    return algbw, algbw * factor


class Table:
    """nccl-tests blocks, one per (op, algorithm), and a summary per op comparing the algorithms."""

    def __init__(self, settings: Settings, n: int, stream: TextIO = sys.stdout) -> None:
        self.s, self.n, self.out = settings, n, stream
        self.op: BenchOp | None = None
        self.algorithm = ""
        self.busbw: list[float] = []
        self.wrong = 0

    def print(self, line: str = "") -> None:
        print(line, file=self.out, flush=True)

    def preamble(self, header: dict[str, Any], devices: list[dict[str, Any]]) -> None:
        s = self.s
        self.print(f"# topocomm busbw (nccl-tests layout)  torch {header['torch']}  backend {header['backend']}"
                   + (f"  nccl {header['nccl']}" if header.get("nccl") else ""))
        load = header["load_average"]["start"]
        self.print(f"# host {header['hostname']}: {header['cpu_count']} CPUs, load average {load}")
        self.print(f"# nRanks {self.n} minBytes {min(s.sizes)} maxBytes {max(s.sizes)} sizes {len(s.sizes)} "
                   f"warmup iters: {s.warmup} iters: {s.iters}" + (f" x {s.trials} trials (median"
                   + (", one per pass over the sweep)" if s.spread else ")") if s.trials > 1 else "")
                   + f" validation: {int(s.check)} "
                   f"time: {AGGREGATES[s.aggregate]}" + (" (algorithms interleaved)" if s.interleave else ""))
        self.print("#")
        self.print("# Using devices")
        for r, d in enumerate(devices):
            self.print(f"#  Rank {r:2d} Pid {d['pid']:7d} on {d['host']:>12s} device {d['device']} [{d['name']}]")
        self.print("#")

    def begin(self, op: BenchOp, algorithm: str) -> None:
        self.op, self.algorithm, self.busbw, self.wrong = op, algorithm, [], 0
        pick = "  auto pick" if algorithm == AUTO else ""
        self.print(f"# Collective test starting: {op.name}  algorithm: {algorithm}")
        self.print(_HEAD[0])
        self.print(_HEAD[1] + "  predict" + pick)
        self.print(_HEAD[2] + "     (us)")

    def _mode(self, m: Measurement | None, nbytes: int) -> str:
        if m is None:
            return f"  {'N/A':>7s}  {'N/A':>6s}  {'N/A':>6s}  {'N/A':>6s}"
        algbw, busbw = bandwidths(nbytes, m.time_us, self.op.factor(self.n))  # type: ignore[union-attr]
        self.busbw.append(busbw)
        self.wrong += m.wrong or 0
        wrong = "N/A" if m.wrong is None else str(m.wrong)
        return f"  {fmt_time(m.time_us)}  {algbw:6.2f}  {busbw:6.2f}  {wrong:>6s}"

    def row(self, r: Result) -> None:
        op = self.op
        assert op is not None
        redop = self.s.red.value if op.reduces else "none"
        root = self.s.root if op.rooted else -1
        pred = "-" if r.predicted_us is None else fmt_time(r.predicted_us).strip()
        line = (f"{r.layout.size:12d}  {r.layout.count:12d}  {TYPE_NAMES[self.s.dtype]:>8s}  {redop:>6s}  {root:6d}"
                + self._mode(r.out_of_place, r.layout.size) + self._mode(r.in_place, r.layout.size)
                + f"  {pred:>7s}" + (f"  {r.chosen}" if r.chosen else ""))
        self.print(line)

    def block(self, op: BenchOp, algorithm: str, results: list[Result]) -> int:
        """Print one (op, algorithm) block; returns its #wrong total."""
        self.begin(op, algorithm)
        for r in results:
            self.row(r)
        self.end()
        return self.wrong

    def end(self) -> None:
        avg = sum(self.busbw) / len(self.busbw) if self.busbw else 0.0
        ok = "OK" if self.wrong == 0 else "FAILED"
        checked = "" if self.s.check else " (not checked: -c 0)"
        self.print(f"# Out of bounds values : {self.wrong} {ok}{checked}")
        self.print(f"# Avg bus bandwidth    : {avg:.3f} ")
        self.print("#")

    def summary(self, op: BenchOp, blocks: dict[str, list[Result]]) -> None:
        """Time per size and algorithm in the mode a topocomm user calls; the fastest, auto's pick and auto/best."""
        if len(blocks) < 2:
            return
        names = list(blocks)
        mode = "in-place" if op.natural_in_place and op.has_in_place else "out-of-place"
        self.print(f"# Summary {op.name}: time (us), {mode}, {AGGREGATES[self.s.aggregate]}; "
                   "speed = best time / auto time; pick = best time / the picked algorithm's own column")
        w = max(10, *(len(a) + 1 for a in names))
        v = max(9, *(len(a) for a in names))
        self.print("#       size" + "".join(f"{a:>{w}s}" for a in names) + f"  {'fastest':>{v}s}  {'auto pick':>{v}s}  speed   pick")
        for i, size in enumerate(r.layout.size for r in blocks[names[0]]):
            times = {a: natural_time(op, res[i]) for a, res in blocks.items()}
            measured = {a: t for a, t in times.items() if a != AUTO}
            best = min(measured, key=measured.get) if measured else "-"
            auto = blocks.get(AUTO)
            pick = (auto[i].chosen or "-") if auto else "-"
            speed = f"{measured[best] / times[AUTO]:.2f}" if auto and measured and times[AUTO] > 0 else "-"
            own = f"{measured[best] / measured[pick]:.2f}" if measured.get(pick, 0) > 0 else "-"
            self.print(f"{size:12d}" + "".join(f"{fmt_time(t):>{w}s}" for t in times.values())
                       + f"  {best:>{v}s}  {pick:>{v}s}  {speed:>5s}  {own:>5s}")
        self.print("#")


def natural_time(op: BenchOp, r: Result) -> float:
    m = r.in_place if op.natural_in_place and r.in_place is not None else r.out_of_place
    return m.time_us if m is not None else math.nan


def json_rows(op: BenchOp, algorithm: str, results: list[Result], s: Settings, n: int,
              depth: Callable[[Layout], int | None] = lambda lay: None) -> list[dict[str, Any]]:
    """One row per measurement; ``depth(layout)``: the pipeline depth the call ran at, where it has one."""
    rows = []
    dtype = str(s.dtype).removeprefix("torch.")
    for r in results:
        k = depth(r.layout)
        for in_place, m in ((False, r.out_of_place), (True, r.in_place)):
            if m is None:
                continue
            algbw, busbw = bandwidths(r.layout.size, m.time_us, op.factor(n))
            rows.append({"op": op.name, "algorithm": algorithm, "bytes": r.layout.size, "count": r.layout.count,
                         "dtype": dtype, "time_us": m.time_us, "algbw": algbw, "busbw": busbw, "wrong": m.wrong,
                         "predicted_us": r.predicted_us, "in_place": in_place, **({"pipeline": k} if k else {})})
    return rows


def header(comm, s: Settings, command: str, launcher: str) -> dict[str, Any]:
    cuda = comm.device.type == "cuda"
    nccl = None
    if cuda:
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return {
        "hostname": socket.gethostname(), "machine": platform.platform(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(comm.device) if cuda else None,
        "backend": comm.backend, "world_size": comm.size, "nodes": len(comm.topology.nodes),
        "launcher": launcher, "torch": torch.__version__, "nccl": nccl, "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
        "load_average": {"start": load_average()},
        "dtype": str(s.dtype).removeprefix("torch."), "redop": s.red.value, "root": s.root, "iters": s.iters,
        "trials": s.trials, "warmup": s.warmup, "check": s.check, "time": AGGREGATES[s.aggregate], "interleave": bool(s.interleave),
        "settle_us": s.settle_us if s.interleave else 0,
        "spread": bool(s.spread),  # trials taken in passes over the sweep ([Note: spread trials] in _sweep.py)
        "segment_bytes": comm.segment_bytes,  # what the model prices a sweep's transfers in
        "own_block_aside": True,  # own-block copies ran beside the schedule ([Note: own block aside] in execute.py)
        "topology": comm.topology.to_json(),  # what the communicator detected, and priced with
        "factors": {"all_reduce": "2(n-1)/n", "all_gather": "(n-1)/n", "reduce_scatter": "(n-1)/n",
                    "all_to_all": "(n-1)/n", "broadcast": "1", "reduce": "1", "sendrecv": "1"},
    }


def load_average() -> list[float] | None:
    """The host's 1, 5 and 15-minute load averages: on a shared machine, what the timings competed with."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_info(comm) -> dict[str, Any]:
    name = torch.cuda.get_device_name(comm.device) if comm.device.type == "cuda" else cpu_name()
    return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(comm.device), "name": name}
