"""Bus-bandwidth sweeps in the manner of nccl-tests, for every op and algorithm, with the model's prediction.

    python -m benchmarks.busbw --op all_reduce,reduce_scatter --algo all -b 1K -e 16M -f 4 --nproc 4 \\
        --json out.json --plot out.png
    torchrun --nproc-per-node 4 -m benchmarks.busbw --op all_reduce --algo ring,native -b 1K -e 1G -f 4
    mpirun -n 4 python -m benchmarks.busbw ...

Under torchrun, mpirun or srun the launcher's ranks run the sweep (NCCL on
GPUs, gloo otherwise). Without a launcher, ``--nproc N`` starts N local gloo
ranks as subprocesses of this one (with torchrun's environment variables).

Flags follow nccl-tests where they apply: -b/-e sizes (suffixes K, M, G:
powers of 1024), -f step factor (or -i step bytes with -f 1), -n iterations,
-w warm-up iterations, -c check, -o reduction, -d data type, -r root, -a how
ranks' times combine. Differences from nccl-tests: ``--op`` names the
collective (the reduction is ``-o``/``--redop``), the default of ``-a`` is 3
(the slowest rank's time, not the mean over ranks), and ``-f`` defaults to 2.
busbw = algbw x 2(n-1)/n for all_reduce, x (n-1)/n for all_gather,
reduce_scatter and all_to_all, x 1 for broadcast, reduce and sendrecv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from benchmarks._launch import LAUNCHER_ENV, launched, spawn, spawned

from collectives import algorithms
from collectives.sizes import format_size, parse_size
from collectives.schedule import Collective

from . import _report
from ._ops import OPS, BenchOp
from ._sweep import AGGREGATES, AUTO, Result, Settings, run_size, run_sizes, run_spread

DTYPES = {"float": torch.float32, "float32": torch.float32, "fp32": torch.float32,
          "double": torch.float64, "float64": torch.float64, "fp64": torch.float64,
          "half": torch.float16, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
          "int32": torch.int32, "int": torch.int32, "int64": torch.int64, "long": torch.int64}


def size_range(minbytes: int, maxbytes: int, factor: float, step: int) -> tuple[int, ...]:
    """nccl-tests' sizes: multiply by ``factor`` when it is above 1, else add ``step``."""
    if minbytes < 0 or maxbytes < minbytes:
        raise ValueError(f"-b/-e: need 0 <= minbytes <= maxbytes, got {minbytes}, {maxbytes}")
    if factor <= 1 and step <= 0:
        raise ValueError("-f/-i: with a step factor of 1 the step bytes (-i) must be positive")
    if factor > 1 and minbytes == 0:
        raise ValueError("-b: a multiplicative sweep (-f > 1) needs minbytes > 0")
    sizes, size = [], minbytes
    while size <= maxbytes:
        sizes.append(size)
        size = int(size * factor) if factor > 1 else size + step
    return tuple(sizes)


def expand_algorithms(spec: str, ops: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """{op: algorithms to run} for ``--algo`` ('all' or a list), and notes on names an op lacks."""
    from collectives import algorithms

    known = set(algorithms.names()) | {AUTO}
    wanted = [a.strip() for a in spec.split(",") if a.strip()]
    if not wanted:
        raise ValueError("--algo: empty list")
    unknown = [a for a in wanted if a != "all" and a not in known]
    if unknown:
        raise ValueError(f"--algo: unknown {', '.join(unknown)}; use 'all' or some of {', '.join(sorted(known))}")
    plan: dict[str, list[str]] = {}
    notes = []
    for op in ops:
        supported = list(OPS[op].algorithms())
        if op != "sendrecv":
            supported.append(AUTO)
        names = supported if "all" in wanted else [a for a in dict.fromkeys(wanted) if a in supported]
        skipped = [a for a in wanted if a != "all" and a not in supported]
        if skipped:
            notes.append(f"{op} has no {', '.join(skipped)} (it has {', '.join(supported)})")
        if names:
            plan[op] = names
    if not plan:
        raise ValueError("--algo: no requested algorithm implements any requested --op; " + "; ".join(notes))
    return plan, notes


@dataclasses.dataclass(frozen=True)
class Options:
    plan: dict[str, list[str]]
    notes: list[str]
    settings: Settings
    nproc: int
    timeout: float
    json: Path | None
    plot: Path | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.busbw", allow_abbrev=False,
                                description="nccl-tests style bus-bandwidth sweeps of topocomm's collectives.")
    p.add_argument("--op", default="all_reduce",
                   help=f"collectives, comma-separated, or 'all' ({', '.join(OPS)}); default all_reduce")
    p.add_argument("--algo", default="all", help="algorithms, comma-separated (auto included), or 'all' (default)")
    p.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("1K"), help="smallest size (default 1K)")
    p.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("64M"), help="largest size (default 64M)")
    p.add_argument("-f", "--stepfactor", type=float, default=2.0, help="size multiplier (default 2)")
    p.add_argument("-i", "--stepbytes", type=parse_size, default=parse_size("1M"),
                   help="size increment when -f is 1 (default 1M)")
    p.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size (default 20)")
    p.add_argument("-w", "--warmup_iters", type=int, default=5, help="warm-up iterations per size (default 5)")
    p.add_argument("--trials", type=int, default=1,
                   help="timed loops of -n calls per cell; the median of their means is reported (default 1)")
    p.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, help="check results (default 1)")
    p.add_argument("-o", "--redop", default="sum", choices=("sum", "avg", "max", "min", "prod"),
                   help="reduction (default sum)")
    p.add_argument("-d", "--datatype", default="float", choices=sorted(DTYPES), help="data type (default float)")
    p.add_argument("-r", "--root", type=int, default=0, help="root of broadcast and reduce (default 0)")
    p.add_argument("-a", "--average", type=int, choices=sorted(AGGREGATES), default=3,
                   help="time reported: " + ", ".join(f"{k}={v}" for k, v in AGGREGATES.items()) + " (default 3)")
    p.add_argument("--interleave", type=int, choices=(0, 1), default=None,
                   help="time the algorithms' calls in turn, each call on its own (default: 1 on CPU, 0 on GPUs)")
    p.add_argument("--settle-us", type=int, default=2000,
                   help="interleaved: each rank's pause after each timed call, off the clock (default 2000)")
    p.add_argument("--spread", type=int, choices=(0, 1), default=None,
                   help="take the --trials in passes over the whole sweep, one loop of every cell per pass "
                        "(default 1 where interleaved with --trials above 1)")
    p.add_argument("--nproc", type=int, default=4, help="local gloo ranks to start without a launcher (default 4)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck rank fails (default 300)")
    p.add_argument("--json", type=Path, help="write the rows and a header to this JSON file")
    p.add_argument("--plot", type=Path, help="write busbw against size to this image (matplotlib)")
    return p


def parse_args(argv: list[str]) -> Options:
    p = build_parser()
    a = p.parse_args(argv)
    from collectives.ops import Reduction, FLOAT_DTYPES

    ops = list(OPS) if a.op.strip() == "all" else [o.strip() for o in a.op.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        p.error(f"--op: unknown {', '.join(bad) or '(empty)'}; use some of {', '.join(OPS)} or 'all'")
    dtype, red = DTYPES[a.datatype], Reduction(a.redop)
    if red is Reduction.AVG and dtype not in FLOAT_DTYPES:
        p.error(f"-o avg needs a floating-point -d, got {a.datatype}")
    if a.iters < 1 or a.trials < 1 or a.warmup_iters < 0 or a.nproc < 1 or a.root < 0 or a.settle_us < 0:
        p.error("-n, --trials and --nproc must be >= 1, -w, -r and --settle-us >= 0")
    try:
        sizes = size_range(a.minbytes, a.maxbytes, a.stepfactor, a.stepbytes)
        plan, notes = expand_algorithms(a.algo, ops)
    except ValueError as e:
        p.error(str(e))
    s = Settings(sizes, dtype, red, a.root, a.iters, a.warmup_iters, bool(a.check), a.average,
                 None if a.interleave is None else bool(a.interleave), a.trials, a.settle_us,
                 None if a.spread is None else bool(a.spread))
    return Options(plan, notes, s, a.nproc, a.timeout, a.json, a.plot)


# -- launching -----------------------------------------------------------------


# -- the sweep -------------------------------------------------------------------


class _Progress:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.start = total, 0, enabled and sys.stderr.isatty(), time.monotonic()

    def show(self, what: str) -> None:
        if self.enabled:
            secs = time.monotonic() - self.start
            sys.stderr.write(f"\r\033[K[{self.done}/{self.total}] {secs:5.0f} s  {what}")
            sys.stderr.flush()

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def launcher_name() -> str:
    if spawned():
        return f"local spawn (--nproc {spawned()})"
    if "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ:
        return "torchrun"
    if any(k in os.environ for k in LAUNCHER_ENV[1:4]):
        return "mpirun"
    return "srun" if "SLURM_PROCID" in os.environ else "single process"


def sweep(comm, opts: Options) -> int:
    s = opts.settings
    if s.interleave is None:
        s = dataclasses.replace(s, interleave=comm.device.type == "cpu")
    if s.spread is None:
        s = dataclasses.replace(s, spread=bool(s.interleave) and s.trials > 1)  # one pass: print as measured
    lead = comm.rank == 0
    if s.root >= comm.size:
        raise SystemExit(f"-r: root {s.root} is out of range for {comm.size} ranks")
    command = "python -m benchmarks.busbw " + shlex.join(sys.argv[1:])
    head = _report.header(comm, s, command, launcher_name())
    devices = comm.exchange_json(_report.device_info(comm))
    table = _report.Table(s, comm.size)
    if lead:
        table.preamble(head, devices)
        for note in opts.notes:
            table.print(f"# skipped: {note}")
    # steps: a cell per pass where spread, else an (algorithm, size) per op
    steps = len(opts.plan) * max(1, s.trials) if s.spread else sum(len(a) for a in opts.plan.values())
    progress = _Progress(steps * len(s.sizes), lead)
    spread = {}
    if s.spread:  # every cell measured before any is reported ([Note: spread trials] in _sweep.py)
        cells = [(OPS[name], algos, nbytes) for name, algos in opts.plan.items() for nbytes in s.sizes]
        spread = dict(zip(((op.name, nbytes) for op, _, nbytes in cells), run_spread(comm, cells, s, progress)))
        progress.close()
    rows: list[dict] = []
    wrong = 0
    for name, algos in opts.plan.items():
        op: BenchOp = OPS[name]
        blocks: dict[str, list[Result]] = {a: [] for a in algos}
        # Sizes outside, algorithms inside: the algorithms compared at one size are measured moments apart
        # (call by call where interleaved).
        for nbytes in s.sizes:
            if s.spread:
                for algorithm, result in spread[(name, nbytes)].items():
                    blocks[algorithm].append(result)
                continue
            if s.interleave:
                progress.show(f"{name} {format_size(nbytes)} {len(algos)} algorithms interleaved")
                for algorithm, result in run_sizes(comm, op, algos, nbytes, s).items():
                    blocks[algorithm].append(result)
                    progress.step()
                continue
            for algorithm in algos:
                progress.show(f"{name} {format_size(nbytes)} {algorithm}")
                blocks[algorithm].append(run_size(comm, op, algorithm, nbytes, s))
                progress.step()
        progress.close()
        for algorithm, results in blocks.items():
            if lead:
                wrong += table.block(op, algorithm, results)
            coll = _collective(op.name)
            new = _report.json_rows(op, algorithm, results, s, comm.size, _depth(comm, coll, algorithm, s.dtype))
            if coll is not None and algorithms.nvlink_kernel(algorithm, coll) and comm.nvlink_direct:
                for row in new:
                    row["path"] = "nvlink"  # calibrate fits these rows a table of their own
            rows += new
        if lead:
            table.summary(op, blocks)
    if lead:
        head["load_average"]["end"] = _report.load_average()
        table.print(f"# load average at the end: {head['load_average']['end']}")
        doc = {"header": head, "rows": rows}
        if opts.json:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(doc, indent=1) + "\n")
            table.print(f"# wrote {opts.json}")
        if opts.plot:
            from .plot import plot

            plot(doc, opts.plot)
            table.print(f"# wrote {opts.plot}")
    return 1 if wrong else 0


def _collective(op: str) -> Collective | None:
    try:
        return Collective(op)
    except ValueError:  # sendrecv
        return None


def _depth(comm, coll: Collective | None, algorithm: str, dtype: torch.dtype):
    """layout -> the pipeline depth ``algorithm`` runs at for it (as the communicator picks it), for the
    rows calibration fits ([Note: measured rows] in collectives/calibrate.py); None where it has none."""
    if coll is None or algorithm not in algorithms.names() or not algorithms.pipelined(algorithm, coll):
        return lambda lay: None
    blocks_in = coll in (Collective.REDUCE_SCATTER, Collective.ALL_TO_ALL)  # sized by the input, as in _call
    return lambda lay: comm._select(coll, (lay.inp if blocks_in else lay.out) * dtype.itemsize, dtype, algorithm)[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if not launched() and opts.nproc > 1:
        if opts.settings.root >= opts.nproc:
            build_parser().error(f"-r: root {opts.settings.root} is out of range for --nproc {opts.nproc}")
        return spawn("benchmarks.busbw", argv, opts.nproc)
    import collectives

    comm = collectives.init(timeout=opts.timeout)
    try:
        return sweep(comm, opts)
    finally:
        collectives.shutdown()  # releases the communicator's CUDA graphs before the process group


if __name__ == "__main__":
    code = main()
    # The process group is destroyed and every result written. torch's gloo teardown at interpreter
    # exit occasionally aborts ("terminate called without an active exception") after that point, which
    # would turn a finished run into a failed one; leave without the interpreter's teardown instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
