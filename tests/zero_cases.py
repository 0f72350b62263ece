"""ZeRO test cases that run inside the worker ranks (see harness.py).

Every case trains a small model for a few steps on a global batch that every
rank builds deterministically; each rank takes its slice, and the reference is
single-process training on the whole batch, computed locally on each rank, so
it is independent of the code under test. Models have parameter counts that
world sizes 2, 3 and 4 do not divide, so shards end in padding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import parallel as P
from parallel.zero import MixedPrecision

GLOBAL_BATCH = 24  # divisible by every world size 1..4, twice (micro-batches)
IN, OUT = 7, 3


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(self.norm(x)))


class Net(nn.Module):
    """Units under the default stage-3 policy: embed 104, blocks.0 208, blocks.1 208, head 42, root 3."""

    def __init__(self, d: int = 13) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.head = nn.Linear(d, OUT)
        self.scale = nn.Parameter(torch.ones(OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h) * self.scale


class Unembed(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the same Parameter as the embedding's
        self.bias = nn.Parameter(torch.zeros(weight.shape[1]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight + self.bias


class TiedNet(nn.Module):
    """A tied input/output matrix (shared by ``embed`` and ``unembed``, so it lives in the root unit)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, d, bias=False)
        self.block = Block(d)
        self.unembed = Unembed(self.embed.weight)
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.unembed(self.block(self.embed(x)))))


class SharedNet(nn.Module):
    """The same Linear registered twice (``a`` and ``b``): its parameters belong to the root unit."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(IN, IN)
        self.b = self.a
        self.out = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


MODELS = {"net": Net, "tied": TiedNet, "shared": SharedNet}


def make_model(kind: str = "net", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


def local(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = t.shape[0] // size
    return t[rank * n:(rank + 1) * n]


OPTIMIZERS = {"adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
              "sgd": (torch.optim.SGD, {"lr": 5e-2, "momentum": 0.9, "nesterov": True}),
              "adagrad": (torch.optim.Adagrad, {"lr": 5e-2})}


def reference(kind: str, optim: str, steps: int, first_step: int = 0,
              start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Single-process training on the global batch: the expected state after ``steps`` steps."""
    model = make_model(kind)
    cls, kwargs = OPTIMIZERS[optim]
    opt = cls(model.parameters(), **kwargs)
    for s in range(first_step, first_step + steps):
        x, y = batch(s)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(comm, model, opt, steps: int, first_step: int = 0, micro: int = 1, clip: float | None = None) -> list[float]:
    """Train; with ``clip``, clip by the global gradient norm and return the norms before clipping."""
    norms = []
    for s in range(first_step, first_step + steps):
        x, y = batch(s)
        x, y = local(x, comm.rank, comm.size).to(comm.device), local(y, comm.rank, comm.size).to(comm.device)
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            (F.mse_loss(model(xm).float(), ym) / micro).backward()
        if clip is not None:
            norms.append(opt.clip_grad_norm_(clip).item())
        opt.step()
        opt.zero_grad()
    return norms


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for k in want:
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
    return max((got[k].float() - want[k].float()).abs().max().item() for k in want)


# -- equivalence with single-process training ------------------------------------------------------

EQUIVALENCE = [  # (stage, model, optimizer, micro-batches, stage-1/2 bucket_mb)
    (1, "net", "adamw", 1, 4e-4),
    (2, "net", "adamw", 1, 4e-4),
    (3, "net", "adamw", 1, None),
    (2, "net", "adamw", 2, 1e-3),
    (1, "net", "sgd", 1, 25.0),
    (2, "tied", "adagrad", 1, 4e-4),
    (3, "tied", "adamw", 2, None),
    (3, "shared", "sgd", 1, None),
]


def equivalence(comm, steps: int = 3) -> list[tuple[tuple, float, int]]:
    """(config, max |zero - reference|, number of units) for every configuration of EQUIVALENCE."""
    out = []
    for cfg in EQUIVALENCE:
        stage, kind, optim, micro, bucket = cfg
        cls, kwargs = OPTIMIZERS[optim]
        extra = {"bucket_mb": bucket} if bucket is not None else {}
        model, opt = P.zero(make_model(kind), cls, stage=stage, comm=comm, **extra, **kwargs)
        train(comm, model, opt, steps, micro=micro)
        got = P.full_state_dict(model)
        copied = getattr(model._zero.grads, "copied", 0)  # stage 3: units whose gradients were copied
        out.append((cfg, max_error(got, reference(kind, optim, steps)), len(model._zero.units), copied))
    return out


def clipping(comm, steps: int = 3, max_norm: float = 0.05) -> list[tuple[int, float, float]]:
    """Per stage: (stage, max parameter error, max norm error) against torch.nn.utils.clip_grad_norm_."""
    ref = make_model()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    want_norms = []
    for s in range(steps):
        x, y = batch(s)
        F.mse_loss(ref(x), y).backward()
        want_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())
        ropt.step()
        ropt.zero_grad()
    assert min(want_norms) > max_norm  # clipping happens
    out = []
    for stage in (1, 2, 3):
        model, opt = P.zero(make_model(), torch.optim.AdamW, stage=stage, comm=comm, lr=1e-2, bucket_mb=4e-4)
        norms = train(comm, model, opt, steps, clip=max_norm)
        err = max_error(P.full_state_dict(model), dict(ref.state_dict()))
        out.append((stage, err, max(abs(a - b) for a, b in zip(norms, want_norms))))
    return out


def mixed_precision(comm, steps: int = 3) -> list[dict]:
    """Per stage: bf16 compute, fp32 masters; distance to the fp32 reference and the memory report."""
    want = reference("net", "adamw", steps)
    out = []
    for stage in (1, 2, 3):
        mp = MixedPrecision(output_dtype=torch.float32) if stage == 2 else torch.bfloat16
        model, opt = P.zero(make_model(), torch.optim.AdamW, stage=stage, comm=comm, lr=1e-2, weight_decay=0.1,
                            mixed_precision=mp)
        dtypes = {p.dtype for p in model.module.parameters()}
        train(comm, model, opt, steps)
        # a backward without zero_grad, so gradients are held when memory is counted
        x, y = (local(t, comm.rank, comm.size).to(comm.device) for t in batch(99))
        F.mse_loss(model(x).float(), y).backward()
        report = P.memory_report(model, opt).as_dict()
        got = P.full_state_dict(model)
        out.append({"stage": stage, "error": max_error(got, want), "compute_dtypes": sorted(map(str, dtypes)),
                    "master_dtype": str(got["head.weight"].dtype), "report": report,
                    "units": [(u.layout.numel, u.layout.shard) for u in model._zero.units],
                    "out_dtype": str(model(x[:2]).dtype)})
        opt.zero_grad()
    return out


# -- checkpoints -----------------------------------------------------------------------------------

def save_after(comm, directory: str, stage: int, kind: str, steps: int) -> float:
    model, opt = P.zero(make_model(kind), torch.optim.AdamW, stage=stage, comm=comm, lr=1e-2, weight_decay=0.1,
                        bucket_mb=4e-4)
    train(comm, model, opt, steps)
    P.save_checkpoint(directory, model, opt)
    return max_error(P.full_state_dict(model), reference(kind, "adamw", steps))


def load_and_continue(comm, directory: str, stage: int, kind: str, done: int, more: int) -> float:
    """Load at this world size and stage (from a fresh, differently initialised model), train on, compare."""
    model, opt = P.zero(make_model(kind, seed=123), torch.optim.AdamW, stage=stage, comm=comm, lr=5.0,
                        bucket_mb=1e-3)
    P.load_checkpoint(directory, model, opt)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.1
    train(comm, model, opt, more, first_step=done)
    return max_error(P.full_state_dict(model), reference("net" if kind == "net" else kind, "adamw", done + more))


def interrupted_saves(comm, directory: str) -> dict:
    """A good save, then two failing ones (a rank dies mid-write; publishing fails); the good one survives."""
    import parallel.checkpoint as ckpt

    model, opt = P.zero(make_model(), torch.optim.AdamW, stage=2, comm=comm, lr=1e-2)
    train(comm, model, opt, 1)
    first = ckpt.save_checkpoint(directory, model, opt)
    good = P.full_state_dict(model)
    train(comm, model, opt, 1, first_step=1)
    errors = []

    real_write, real_publish = ckpt._write_file, ckpt._publish

    def torn_write(path, obj):  # half a file on disk, then the process "crashes"
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("simulated crash while writing")

    def failing_publish(directory, tmp, name):  # the new checkpoint is in place, but ``latest`` not yet moved
        os.rename(tmp, Path(directory) / name)
        raise OSError("simulated crash before the new checkpoint became current")

    for name, patch in (("_write_file", torn_write), ("_publish", failing_publish)):
        if comm.rank == comm.size - 1 or name == "_publish":
            setattr(ckpt, name, patch)
        try:
            ckpt.save_checkpoint(directory, model, opt)
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            ckpt._write_file, ckpt._publish = real_write, real_publish
    comm.barrier()
    entries = sorted(os.listdir(directory))
    fresh, fopt = P.zero(make_model(seed=5), torch.optim.AdamW, stage=3, comm=comm, lr=1e-2)
    P.load_checkpoint(directory, fresh, fopt)
    restored = max_error(P.full_state_dict(fresh), good)
    # a later save succeeds and becomes current
    second = ckpt.save_checkpoint(directory, model, opt)
    comm.barrier()
    return {"errors": errors, "entries": entries, "restored_error": restored, "first": Path(first).name,
            "second": Path(second).name, "after": sorted(os.listdir(directory))}


# -- API behaviour ---------------------------------------------------------------------------------

def api_checks(comm) -> dict:
    out: dict = {}
    model, opt = P.zero(make_model(), torch.optim.AdamW, stage=2, comm=comm, lr=1e-2)
    out["isinstance"] = isinstance(opt, torch.optim.AdamW)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    train(comm, model, opt, 2)
    sched.step()
    out["lr"] = opt.param_groups[0]["lr"]
    out["hook_calls"] = len(calls)
    out["step_without_backward"] = opt.step() is None
    for bad, kwargs in (("stage", {"stage": 4}), ("wrap", {"stage": 1, "wrap": (nn.Linear,)}),
                        ("lbfgs", {"stage": 1, "optimizer_class": torch.optim.LBFGS}),
                        ("frozen", {"stage": 1, "frozen": True})):
        m = make_model()
        if kwargs.pop("frozen", False):
            m.head.bias.requires_grad_(False)
        cls = kwargs.pop("optimizer_class", torch.optim.AdamW)
        try:
            P.zero(m, cls, comm=comm, **kwargs)
            out[bad] = "no error"
        except (ValueError, TypeError) as e:
            out[bad] = str(e)
    return out


def run_all(comm, tol: float) -> list[str]:
    """Every case once, for a world started by a launcher (the CUDA/NCCL test: ``torchrun -m tests.zero_cases``)."""
    import tempfile

    problems = [f"equivalence {cfg}: error {err:.3g}" for cfg, err, _ in equivalence(comm) if err > tol]
    problems += [f"clipping stage {st}: error {e:.3g}, norm error {ne:.3g}"
                 for st, e, ne in clipping(comm) if max(e, ne) > tol]
    problems += [f"mixed precision stage {r['stage']}: error {r['error']:.3g}"
                 for r in mixed_precision(comm) if r["error"] > 5e-2]
    directory = comm.exchange_json(tempfile.mkdtemp(prefix="zero-ckpt-") if comm.rank == 0 else None)[0]
    for stage in (1, 2, 3):
        err = save_after(comm, f"{directory}/s{stage}", stage, "net", 2)
        err = max(err, load_and_continue(comm, f"{directory}/s{stage}", stage % 3 + 1, "net", 2, 2))
        if err > tol:
            problems.append(f"checkpoint saved at stage {stage}, loaded at stage {stage % 3 + 1}: error {err:.3g}")
    return problems


if __name__ == "__main__":
    import sys

    import collectives

    comm = collectives.init(timeout=120)
    found = run_all(comm, tol=1e-4 if comm.device.type == "cuda" else 2e-6)
    print(f"rank {comm.rank} on {comm.device} ({comm.backend}): " + ("ok" if not found else "; ".join(found)),
          flush=True)
    comm.barrier()
    collectives.shutdown()
    sys.exit(1 if found else 0)
