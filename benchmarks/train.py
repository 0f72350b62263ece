"""Training throughput of parallel.DataParallel against torch DDP, same model and data, same run.

    python -m benchmarks.train --nproc 4 --json benchmarks/results/train-cpu-gloo-4rank.json
    torchrun --nproc-per-node 4 -m benchmarks.train --json train.json          # NCCL, ~100M parameters

The model is a stack of transformer-style MLP blocks (LayerNorm, d -> 4d,
GELU, 4d -> d, residual) on a (batch, seq, d) input with an MSE loss;
``--model-size`` picks d for ``--layers`` blocks. Both wrappers start from the
same weights, use the same bucket cap and optimizer, and train on the same
per-rank batch. DDP runs with ``gradient_as_bucket_view=True`` (the same
gradient storage as ours) and, with ``--compress bf16``, its bf16 compression
hook.

Throughput: ``--rounds`` rounds; in each, ``--steps`` full steps (zero_grad,
forward, backward, optimizer step) of each wrapper, alternating which goes
first. A round's time is the slowest rank's. steps/s is the median over
rounds; the ratio (ours / DDP's) is the median of the rounds' ratios, each
round pairing two measurements taken moments apart, so slow drifts in the
machine's load (other users of the CPU) cancel.

Overlap: per wrapper, the median time of forward+backward without
communication (inside no_sync), of the bucket all-reduces alone (ours:
DataParallel's bucket reductions, casts included; DDP: torch.distributed
all-reduces of the same bucket sizes in the wire dtype), and of
forward+backward with communication.
hidden = (compute + comm - both) / comm: 1 when the all-reduces cost nothing
on top of backward, 0 when they run after it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import socket
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from benchmarks._models import MLPStack, width_for
from benchmarks._launch import launched, spawn, spawned, write_json
from benchmarks._timing import slowest, timed
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("topocomm", "ddp")


def parse_count(text: str) -> float:
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 2M, 100M, 1.5e6") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", allow_abbrev=False,
                                description="Steps/s of parallel.DataParallel vs torch DDP, and the overlap of "
                                            "communication with backward.")
    p.add_argument("--model-size", type=parse_count, default=None,
                   help="parameters, e.g. 2M, 100M (default: 100M on GPUs, 2M on CPU)")
    p.add_argument("--layers", type=int, default=8, help="MLP blocks (default 8)")
    p.add_argument("--batch", type=int, default=None, help="sequences per rank (default: 8 on GPUs, 4 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 512 on GPUs, 32 on CPU)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="bucket cap of both wrappers (default 25)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    p.add_argument("--compress", choices=("none", "bf16", "fp16"), default="none",
                   help="gradient compression for both wrappers (DDP: its compression hooks)")
    p.add_argument("--algorithm", default="auto", help="DataParallel's all-reduce algorithm (default auto)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 10 on GPUs, 20 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per wrapper and round (default: 10 on GPUs, "
                   "2 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per wrapper first (default 3)")
    p.add_argument("--overlap-iters", type=int, default=None, help="iterations per overlap measurement "
                   "(default: 10 on GPUs, 2 on CPU; 0 skips it)")
    p.add_argument("--overlap-reps", type=int, default=None,
                   help="repetitions of the overlap measurements (default: 3 on GPUs, 7 on CPU)")
    p.add_argument("--nproc", type=int, default=2, help="local gloo ranks to start without a launcher (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a stuck rank fails")
    p.add_argument("--json", type=Path, help="write the results to this JSON file")
    return p


# -- launching -----------------------------------------------------------------


# -- measuring -------------------------------------------------------------------


class Runner:
    """One wrapper: its model copy, optimizer, and the three timed things."""

    def __init__(self, name: str, wrapped: nn.Module, opt: torch.optim.Optimizer,
                 all_reduce_buckets: Callable[[], None]) -> None:
        self.name, self.model, self.opt, self.all_reduce_buckets = name, wrapped, opt, all_reduce_buckets

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        F.mse_loss(self.model(x), y).backward()
        self.opt.step()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> None:
        self.opt.zero_grad(set_to_none=False)
        if sync:
            F.mse_loss(self.model(x), y).backward()
        else:
            with self.model.no_sync():
                F.mse_loss(self.model(x), y).backward()


def make_runners(comm, module: nn.Module, a: argparse.Namespace) -> dict[str, Runner]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import parallel

    compress = None if a.compress == "none" else a.compress
    opt_cls = torch.optim.SGD if a.optimizer == "sgd" else torch.optim.AdamW
    opt_kw = {"lr": 1e-4, "momentum": 0.9} if a.optimizer == "sgd" else {"lr": 1e-4}

    ours = parallel.DataParallel(copy.deepcopy(module), comm, bucket_mb=a.bucket_mb, algorithm=a.algorithm,
                                 compress=compress)

    def ours_buckets() -> None:  # the path backward takes: DataParallel's bucket reduction (cast included)
        finishes = [ours._reduce.launch(comm, b, ours._algorithm(b)) for b in ours._grads.buckets]
        for finish in finishes:
            finish()

    dev = comm.device
    ddp = DDP(copy.deepcopy(module), device_ids=[dev.index] if dev.type == "cuda" else None,
              bucket_cap_mb=a.bucket_mb, gradient_as_bucket_view=True)
    if compress is not None:
        ddp.register_comm_hook(dist.group.WORLD, _ddp_compress_hook(compress, comm.backend))
    wire = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[compress]
    flats = [b.flat.to(wire) for b in ours._grads.buckets]  # DDP's buckets have the same caps: the same sizes

    def ddp_buckets() -> None:
        works = [dist.all_reduce(f, async_op=True) for f in flats]
        for w in works:
            w.wait()

    return {"topocomm": Runner("topocomm", ours, opt_cls(ours.parameters(), **opt_kw), ours_buckets),
            "ddp": Runner("ddp", ddp, opt_cls(ddp.parameters(), **opt_kw), ddp_buckets)}


def _ddp_compress_hook(compress: str, backend: str) -> Callable:
    """DDP's own compression hook; on gloo, whose bf16 DDP refuses, the same steps written out."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if compress == "fp16" or backend == "nccl":
        return default_hooks.bf16_compress_hook if compress == "bf16" else default_hooks.fp16_compress_hook

    def cast_bf16_hook(group, bucket):
        buf = bucket.buffer()
        low = buf.div(dist.get_world_size(group)).to(torch.bfloat16)
        fut = dist.all_reduce(low, group=group, async_op=True).get_future()

        def back(f):
            buf.copy_(f.value()[0])
            return buf
        return fut.then(back)
    return cast_bf16_hook


def throughput(comm, runners: dict[str, Runner], x, y, a) -> dict[str, list[float]]:
    """Per wrapper, seconds per step of each round (the slowest rank's)."""
    for r in runners.values():
        for _ in range(a.warmup):
            r.step(x, y)
    order = list(runners)
    per_round: dict[str, list[float]] = {n: [] for n in order}
    for k in range(a.rounds):
        for name in (order if k % 2 == 0 else order[::-1]):
            per_round[name].append(timed(comm, lambda r=runners[name]: r.step(x, y), a.steps))
    return {n: slowest(comm, v) for n, v in per_round.items()}


def overlap(comm, runners: dict[str, Runner], x, y, iters: int, reps: int) -> dict[str, dict[str, float]]:
    """Per wrapper, medians over ``reps`` (wrappers and measurements interleaved) of compute alone, comm alone,
    both; and the hidden fraction."""
    samples = {n: {"compute": [], "comm": [], "both": []} for n in runners}
    for r in runners.values():
        r.forward_backward(x, y, sync=True)
    order = list(runners)
    for k in range(reps):
        for name in (order if k % 2 == 0 else order[::-1]):
            r, s = runners[name], samples[name]
            s["compute"].append(timed(comm, lambda: r.forward_backward(x, y, sync=False), iters))
            s["comm"].append(timed(comm, r.all_reduce_buckets, iters))
            s["both"].append(timed(comm, lambda: r.forward_backward(x, y, sync=True), iters))
    out = {}
    for name, s in samples.items():
        med = {k: statistics.median(slowest(comm, v)) for k, v in s.items()}
        hidden = (med["compute"] + med["comm"] - med["both"]) / med["comm"] if med["comm"] > 0 else 0.0
        out[name] = {"compute_ms": med["compute"] * 1e3, "comm_ms": med["comm"] * 1e3, "both_ms": med["both"] * 1e3,
                     "exposed_comm_ms": max(0.0, med["both"] - med["compute"]) * 1e3,
                     "hidden_fraction": min(1.0, max(0.0, hidden))}
    return out


# -- the run ------------------------------------------------------------------------


def header(comm, a, nparams: int, d: int) -> dict:
    dev = comm.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else (
        f"local spawn (--nproc {comm.size})" if spawned() else "launcher")
    prefix = "python -m benchmarks.train" if spawned() or launcher != "torchrun" else \
        "torchrun ... -m benchmarks.train"
    return {"command": " ".join([prefix, shlex.join(sys.argv[1:])]), "launcher": launcher,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "torch": torch.__version__, "backend": comm.backend,
            "world_size": comm.size, "device": name, "cpu_count": os.cpu_count(),
            "nccl": str(torch.cuda.nccl.version()) if dev.type == "cuda" else None,
            "model": {"params": nparams, "d": d, "layers": a.layers, "batch_per_rank": a.batch, "seq": a.seq},
            "bucket_mb": a.bucket_mb, "optimizer": a.optimizer, "compress": a.compress,
            "algorithm": a.algorithm, "rounds": a.rounds, "steps_per_round": a.steps, "warmup": a.warmup}


def report(head: dict, rounds: dict[str, list[float]], olap: dict[str, dict], plans: list[dict]) -> dict:
    rows = []
    for name, secs in rounds.items():
        sps = [1.0 / s for s in secs]
        rows.append({"impl": name, "steps_per_s": statistics.median(sps), "step_ms": 1e3 / statistics.median(sps),
                     "rounds_steps_per_s": sps})
    by = {r["impl"]: r for r in rows}
    per_round = [a / b for a, b in zip(by["topocomm"]["rounds_steps_per_s"], by["ddp"]["rounds_steps_per_s"])]
    ratio = statistics.median(per_round)
    m = head["model"]
    print(f"# topocomm train benchmark  torch {head['torch']}  backend {head['backend']}  ranks {head['world_size']}"
          f"  device {head['device']}")
    print(f"# model {m['params'] / 1e6:.1f}M params (d={m['d']}, {m['layers']} blocks), batch {m['batch_per_rank']}"
          f" x seq {m['seq']} per rank, {head['optimizer']}, bucket {head['bucket_mb']} MiB, "
          f"compress {head['compress']}, {head['rounds']} rounds x {head['steps_per_round']} steps")
    print(f"# buckets: {len(plans)}; algorithms: "
          + ", ".join(f"{k} x{v}" for k, v in _count(p['algorithm'] for p in plans).items()))
    print(f"# {'impl':10s} {'steps/s':>9s} {'ms/step':>9s}  {'compute':>9s} {'comm':>9s} {'both':>9s} "
          f"{'exposed':>9s} {'hidden':>7s}")
    for r in rows:
        o = olap.get(r["impl"])
        tail = (f"  {o['compute_ms']:9.2f} {o['comm_ms']:9.2f} {o['both_ms']:9.2f} {o['exposed_comm_ms']:9.2f} "
                f"{o['hidden_fraction']:7.2f}") if o else ""
        print(f"  {r['impl']:10s} {r['steps_per_s']:9.3f} {r['step_ms']:9.2f}" + tail)
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [ratio, ratio, ratio]
    print(f"# topocomm / ddp steps/s: {ratio:.3f} (median of {len(per_round)} paired rounds; quartiles "
          f"{q[0]:.3f} .. {q[2]:.3f})")
    print("# compute: forward+backward inside no_sync; comm: the buckets' all-reduces alone; both: forward+backward"
          " synchronised; hidden = (compute + comm - both) / comm")
    return {"header": head, "rows": rows, "ratio": ratio, "ratio_quartiles": [q[0], q[2]],
            "ratio_per_round": per_round, "overlap": olap,
            "buckets": plans}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def run(comm, a: argparse.Namespace) -> int:
    cuda = comm.device.type == "cuda"
    a.model_size = a.model_size or (100e6 if cuda else 2e6)
    a.batch = a.batch or (8 if cuda else 4)
    a.seq = a.seq or (512 if cuda else 32)
    a.steps = a.steps or (10 if cuda else 2)
    a.rounds = a.rounds or (10 if cuda else 20)
    a.overlap_reps = a.overlap_reps or (3 if cuda else 7)
    olap_iters = a.overlap_iters if a.overlap_iters is not None else (10 if cuda else 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    d = width_for(a.model_size, a.layers)
    torch.manual_seed(0)
    module = MLPStack(d, a.layers).to(comm.device)
    nparams = sum(p.numel() for p in module.parameters())
    g = torch.Generator().manual_seed(1 + comm.rank)
    x = torch.randn(a.batch, a.seq, d, generator=g).to(comm.device)
    y = torch.randn(a.batch, a.seq, d, generator=g).to(comm.device)
    runners = make_runners(comm, module, a)
    del module
    head = header(comm, a, nparams, d)
    rounds = throughput(comm, runners, x, y, a)
    olap = overlap(comm, runners, x, y, olap_iters, a.overlap_reps) if olap_iters > 0 else {}
    plans = runners["topocomm"].model.bucket_plans()
    if comm.rank == 0:
        doc = report(head, rounds, olap, [{k: v for k, v in p.items() if k != "params"} for p in plans])
        if a.json:
            write_json(a.json, doc)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if any(v is not None and v < 1 for v in (a.rounds, a.steps, a.overlap_reps)) or a.warmup < 0 or a.nproc < 1:
        build_parser().error("--rounds, --steps and --nproc must be >= 1, --warmup >= 0")
    if not launched() and a.nproc > 1:
        return spawn("benchmarks.train", argv, a.nproc)
    import collectives

    comm = collectives.init(timeout=a.timeout)
    try:
        return run(comm, a)
    finally:
        collectives.shutdown()


if __name__ == "__main__":
    sys.exit(main())
