"""ZeRO per-rank memory against the paper's formula, and stage-3 throughput against torch FSDP2.

    python -m benchmarks.zero_memory --nproc 4 --json benchmarks/results/zero-cpu-gloo-4rank.json
    torchrun --nproc-per-node 4 -m benchmarks.zero_memory --json zero.json        # GPUs, NCCL

Memory. For each stage, a fresh model (a stack of MLP blocks: LayerNorm,
d -> 4d, GELU, 4d -> d, residual; Psi parameters) is wrapped with
``parallel.zero(..., mixed_precision=torch.bfloat16)`` and AdamW, trained for
a few steps on a tiny batch (so activations are negligible), and measured
after a step with the gradients of one more backward held, against the ZeRO
paper's model-state formula for mixed-precision Adam (K = 12):

    stage 1: 4 Psi + K Psi / N     stage 2: 2 Psi + (2 + K) Psi / N     stage 3: (4 + K) Psi / N

Measured: ``parallel.memory_report`` (the library's own count: params, grads,
optimizer state); on CPU, every tensor storage reachable from Python (found
by a garbage-collector scan, each storage once, ``.grad`` included) minus
what was there before the model was built; on GPU,
``torch.cuda.memory_allocated`` at that point and ``max_memory_allocated``
over the timed steps (both minus the baseline), the latter including the
transient gathered units, buckets and activations.

Throughput. Stage 3 and FSDP2 (``fully_shard`` on every block and on the
root, bf16 parameters and reductions, AdamW) train the same model from the
same weights on the same per-rank batch; rounds of ``--steps`` steps
alternate which goes first; a round's time is the slowest rank's; steps/s is
the median over rounds and the ratio is ours / FSDP2's.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import socket
import statistics
import sys
import warnings
from pathlib import Path

import torch
from benchmarks._models import Block, MLPStack, width_for
from benchmarks._launch import launched, spawn, spawned, write_json
from benchmarks._timing import slowest, sync, timed
import torch.nn.functional as F
from torch import nn

K = 12  # bytes of optimizer state per parameter for mixed-precision Adam: fp32 master, momentum, variance


def formula(stage: int, psi: int, n: int) -> dict[str, float]:
    """The ZeRO paper's model-state bytes per rank (mixed-precision Adam), by category."""
    params = 2 * psi if stage < 3 else 2 * psi / n
    grads = 2 * psi if stage == 1 else 2 * psi / n
    optim = K * psi / n
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def parse_count(text: str) -> float:
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 4M, 500M, 1.5e6") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zero_memory", allow_abbrev=False,
                                description="ZeRO per-rank memory vs the paper's formula; stage-3 steps/s vs FSDP2.")
    p.add_argument("--model-size", type=parse_count, default=None,
                   help="parameters Psi, e.g. 4M, 500M (default: 500M on GPUs, 4M on CPU)")
    p.add_argument("--layers", type=int, default=None, help="MLP blocks (default: 24 on GPUs, 8 on CPU)")
    p.add_argument("--stages", default="1,2,3", help="stages to measure memory for (default 1,2,3)")
    p.add_argument("--batch", type=int, default=None, help="throughput: sequences per rank (default: 8 GPU, 2 CPU)")
    p.add_argument("--seq", type=int, default=None, help="throughput: tokens per sequence (default: 2048 GPU, 16 CPU)")
    p.add_argument("--rounds", type=int, default=5, help="throughput: timed rounds per implementation (default 5)")
    p.add_argument("--steps", type=int, default=None, help="throughput: steps per round (default: 10 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=2, help="throughput: untimed steps first (default 2)")
    p.add_argument("--no-throughput", action="store_true", help="measure memory only")
    p.add_argument("--nproc", type=int, default=4, help="local gloo ranks to start without a launcher (default 4)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a stuck rank fails")
    p.add_argument("--json", type=Path, help="write the results to this JSON file")
    return p


# -- launching -----------------------------------------------------------------------------------

# -- memory ----------------------------------------------------------------------------------------

def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of every tensor storage on ``device`` reachable from Python objects (``.grad`` included), once each."""
    gc.collect()
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        for t in (obj, obj.grad if obj.is_leaf else None):
            if t is None or t.device.type != device.type or t.is_meta:
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                continue
            if st.nbytes() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                zero_grad: bool = True) -> None:
    F.mse_loss(model(x).float(), y).backward()
    opt.step()
    if zero_grad:
        opt.zero_grad()


def measure_stage(comm, stage: int, d: int, layers: int) -> dict:
    import parallel

    dev = comm.device
    cuda = dev.type == "cuda"
    x = torch.randn(1, 8, d, device=dev)
    y = torch.randn(1, 8, d, device=dev)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        base_alloc = torch.cuda.memory_allocated(dev)
    base_live = live_tensor_bytes(dev)
    torch.manual_seed(0)
    model, opt = parallel.zero(MLPStack(d, layers), torch.optim.AdamW, stage=stage, comm=comm,
                               mixed_precision=torch.bfloat16, wrap=(Block,) if stage == 3 else None, lr=1e-4)
    psi = sum(s.numel for u in model._zero.units for s in u.layout.slots)
    _train_step(model, opt, x, y)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(2):
        _train_step(model, opt, x, y)
    F.mse_loss(model(x).float(), y).backward()  # gradients held, as the formula counts them
    opt.step()
    sync(comm)
    row = {"stage": stage, "psi": psi, "world_size": comm.size,
           "formula": formula(stage, psi, comm.size),
           "report": parallel.memory_report(model, opt).as_dict(),
           "live_bytes": live_tensor_bytes(dev) - base_live}
    if cuda:
        row["cuda_allocated"] = torch.cuda.memory_allocated(dev) - base_alloc
        row["cuda_peak"] = torch.cuda.max_memory_allocated(dev) - base_alloc
    del model, opt
    gc.collect()
    return row


def gather_rows(comm, row: dict) -> list[dict]:
    return comm.exchange_json(row)


# -- throughput ------------------------------------------------------------------------------------

def make_fsdp2(module: nn.Module, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # our Linear outputs are views of the matmul result; we do no in-place ops on them
    warnings.filterwarnings("ignore", message=".*returned a view tensor", category=UserWarning)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for b in module.blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module, torch.optim.AdamW(module.parameters(), lr=1e-4)




def throughput(comm, d: int, layers: int, a: argparse.Namespace) -> dict:
    import parallel

    dev = comm.device
    g = torch.Generator().manual_seed(1 + comm.rank)
    x = torch.randn(a.batch, a.seq, d, generator=g).to(dev)
    y = torch.randn(a.batch, a.seq, d, generator=g).to(dev)
    runners: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    torch.manual_seed(0)
    runners["zero3"] = parallel.zero(MLPStack(d, layers), torch.optim.AdamW, stage=3, comm=comm,
                                     mixed_precision=torch.bfloat16, wrap=(Block,), lr=1e-4)
    errors = {}
    try:
        torch.manual_seed(0)
        runners["fsdp2"] = make_fsdp2(MLPStack(d, layers).to(dev), dev)
    except Exception as e:  # noqa: BLE001 - recorded in the results
        errors["fsdp2"] = f"{type(e).__name__}: {e}"
    for model, opt in runners.values():
        for _ in range(a.warmup):
            _train_step(model, opt, x, y)
    order = list(runners)
    secs: dict[str, list[float]] = {n: [] for n in order}
    for k in range(a.rounds):
        for name in (order if k % 2 == 0 else order[::-1]):
            model, opt = runners[name]
            secs[name].append(timed(comm, lambda: _train_step(model, opt, x, y), a.steps) * a.steps)
    out: dict = {"batch_per_rank": a.batch, "seq": a.seq, "rounds": a.rounds, "steps_per_round": a.steps,
                 "errors": errors, "rows": {}}
    for name, s in secs.items():
        sps = [a.steps / t for t in slowest(comm, s)]
        out["rows"][name] = {"steps_per_s": statistics.median(sps), "rounds_steps_per_s": sps}
    if "fsdp2" in out["rows"]:
        z, f = out["rows"]["zero3"], out["rows"]["fsdp2"]
        out["ratio"] = z["steps_per_s"] / f["steps_per_s"]
        out["ratio_per_round"] = [p / q for p, q in zip(z["rounds_steps_per_s"], f["rounds_steps_per_s"])]
    return out


# -- the run ------------------------------------------------------------------------------------

def header(comm, a: argparse.Namespace, d: int, layers: int, psi: int) -> dict:
    dev = comm.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else (
        f"local spawn (--nproc {comm.size})" if spawned() else "launcher")
    prefix = "torchrun ... -m benchmarks.zero_memory" if launcher == "torchrun" else "python -m benchmarks.zero_memory"
    return {"command": " ".join([prefix, shlex.join(sys.argv[1:])]), "launcher": launcher,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "torch": torch.__version__, "backend": comm.backend,
            "world_size": comm.size, "device": name, "cpu_count": os.cpu_count(),
            "model": {"psi": psi, "d": d, "layers": layers}, "precision": "bf16 params/grads, fp32 master + AdamW",
            "K": K}


def _mib(b: float) -> str:
    return f"{b / 2**20:10.2f}"


def print_report(doc: dict) -> None:
    h = doc["header"]
    print(f"# topocomm ZeRO memory  torch {h['torch']}  backend {h['backend']}  ranks {h['world_size']}  "
          f"device {h['device']}")
    print(f"# model Psi = {h['model']['psi'] / 1e6:.2f}M params (d={h['model']['d']}, {h['model']['layers']} blocks), "
          f"{h['precision']}, K = {h['K']}; MiB per rank (rank 0; max over ranks for ratios)")
    cols = ["stage", "formula", "report", "ratio", "params", "grads", "optim", "live", "ratio"]
    if "cuda_allocated" in doc["memory"][0]["ranks"][0]:
        cols += ["cuda_alloc", "ratio", "cuda_peak", "ratio"]
    print("# " + " ".join(f"{c:>10s}" for c in cols))
    for m in doc["memory"]:
        r0 = m["ranks"][0]
        f = r0["formula"]["total"]
        line = [f"{m['stage']:10d}", _mib(f), _mib(r0["report"]["total"]), f"{m['ratio_report']:10.3f}",
                _mib(r0["report"]["params"]), _mib(r0["report"]["grads"]), _mib(r0["report"]["optimizer"]),
                _mib(r0["live_bytes"]), f"{m['ratio_live']:10.3f}"]
        if "cuda_allocated" in r0:
            line += [_mib(r0["cuda_allocated"]), f"{m['ratio_cuda_allocated']:10.3f}",
                     _mib(r0["cuda_peak"]), f"{m['ratio_cuda_peak']:10.3f}"]
        print("  " + " ".join(line))
    t = doc.get("throughput")
    if t:
        print(f"# stage-3 throughput, batch {t['batch_per_rank']} x seq {t['seq']} per rank, {t['rounds']} rounds x "
              f"{t['steps_per_round']} steps")
        for name, r in t["rows"].items():
            print(f"  {name:8s} {r['steps_per_s']:9.3f} steps/s")
        if "ratio" in t:
            print(f"# zero3 / fsdp2: {t['ratio']:.3f} (median of rounds); per round: "
                  + " ".join(f"{x:.3f}" for x in t["ratio_per_round"]))
        for name, e in t["errors"].items():
            print(f"# {name}: {e}")


def run(comm, a: argparse.Namespace) -> int:
    cuda = comm.device.type == "cuda"
    a.model_size = a.model_size or (500e6 if cuda else 4e6)
    layers = a.layers or (24 if cuda else 8)
    a.batch = a.batch or (8 if cuda else 2)
    a.seq = a.seq or (2048 if cuda else 16)
    a.steps = a.steps or (10 if cuda else 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    d = width_for(a.model_size, layers)
    memory = []
    for stage in (int(s) for s in a.stages.split(",")):
        ranks = gather_rows(comm, measure_stage(comm, stage, d, layers))
        entry = {"stage": stage, "ranks": ranks}
        for key, name in (("report", "ratio_report"), ("live_bytes", "ratio_live"),
                          ("cuda_allocated", "ratio_cuda_allocated"), ("cuda_peak", "ratio_cuda_peak")):
            if key in ranks[0]:
                worst = max((r[key]["total"] if key == "report" else r[key]) for r in ranks)
                entry[name] = worst / ranks[0]["formula"]["total"]
        memory.append(entry)
    doc = {"header": header(comm, a, d, layers, memory[0]["ranks"][0]["psi"] if memory else 0), "memory": memory}
    if not a.no_throughput:
        doc["throughput"] = throughput(comm, d, layers, a)
    if comm.rank == 0:
        print_report(doc)
        if a.json:
            write_json(a.json, doc)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if a.rounds < 1 or a.warmup < 0 or a.nproc < 1 or (a.steps is not None and a.steps < 1):
        build_parser().error("--rounds, --steps and --nproc must be >= 1, --warmup >= 0")
    if not launched() and a.nproc > 1:
        return spawn("benchmarks.zero_memory", argv, a.nproc)
    import collectives

    comm = collectives.init(timeout=a.timeout)
    code = run(comm, a)
    exit_process(comm, code)
    return code


def exit_process(comm, code: int) -> None:
    """Tear down once every rank is done (``collectives.shutdown`` releases the CUDA graphs first)."""
    import collectives

    comm.barrier()
    collectives.shutdown()


if __name__ == "__main__":
    sys.exit(main())
