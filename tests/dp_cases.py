"""DataParallel cases that run inside the worker ranks (see harness.py).

Each case trains the wrapped model on this rank's slice of a global batch and,
in the same process, a plain copy of rank 0's initial model on the whole
global batch (the single-process reference), and returns a list of problems
(empty when all is well). Ranks start from different weights and buffers, so
the wrap-time broadcast is part of every case.
"""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel import DataParallel
from tests.cases import wrong_error

TOL = 1e-5  # float32 training, reordered sums
PER_RANK = 3


class Net(nn.Module):
    """``head`` is registered first and used last, so reverse registration order is not the gradient order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(10, 3)
        self.body = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Branchy(nn.Module):
    """``extra`` is used when asked; ``never`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.extra = nn.Linear(8, 8)
        self.never = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.head(h)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.bn(self.fc(x))))


def _init(cls: type[nn.Module], seed: int, device: torch.device | str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    m = cls()
    if cls is BNNet:  # distinct buffers per seed, so the wrap-time broadcast shows
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.num_batches_tracked.fill_(seed % 7)
    return m.to(device)


def _batch(step: int, size: int, per_rank: int = PER_RANK, device: torch.device | str = "cpu"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return (torch.randn(size * per_rank, 6, generator=g).to(device),
            torch.randn(size * per_rank, 3, generator=g).to(device))


def _slice(t: torch.Tensor, rank: int, per_rank: int = PER_RANK) -> torch.Tensor:
    return t[rank * per_rank:(rank + 1) * per_rank]


def _optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def _reference_step(ref: nn.Module, ref_opt, loss_fn, dp, step: int, problems: list[str]) -> None:
    """One single-process step on the global batch, then compare the wrapped model with it."""
    ref_opt.zero_grad()
    loss_fn().backward()
    ref_opt.step()
    d = _max_diff(dp.module, ref)
    if d > TOL:
        problems.append(f"step {step}: parameters differ from the reference by {d:.3g}")


def _digest(m: nn.Module) -> str:
    h = hashlib.sha1()
    for t in list(m.parameters()) + list(m.buffers()):
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _wrap(comm, module: nn.Module, **kw) -> DataParallel:
    return DataParallel(module, comm=None if kw.pop("default_comm", False) else comm, **kw)


def train(comm, opt_name: str, bucket_bytes: int, steps: int = 4, default_comm: bool = False) -> dict:
    """DataParallel on slices == one process on the global batch, step by step."""
    size, rank, dev = comm.size, comm.rank, comm.device
    ref = _init(Net, 1000, dev)
    dp = _wrap(comm, _init(Net, 1000 + rank, dev), bucket_mb=bucket_bytes / 2**20, default_comm=default_comm)
    opt, ref_opt = _optimizer(opt_name, dp.parameters()), _optimizer(opt_name, ref.parameters())
    problems = []
    if _max_diff(dp.module, ref) != 0:
        problems.append("parameters differ from rank 0's after wrapping")
    layouts = [dp._grads.layout()]
    copies = []
    for step in range(steps):
        x, y = _batch(step, size, device=dev)
        opt.zero_grad()
        before = (dp._grads.copied, dp._grads.copy_calls)
        F.mse_loss(dp(_slice(x, rank)), _slice(y, rank)).backward()
        copies.append((dp._grads.copied - before[0], dp._grads.copy_calls - before[1]))
        for p, v in zip(dp._grads.params, dp._grads._views):
            if p.grad is None or p.grad.data_ptr() != v.data_ptr():
                problems.append(f"step {step}: a gradient is not a view into its bucket")
                break
        opt.step()
        _reference_step(ref, ref_opt, lambda: F.mse_loss(ref(x), y), dp, step, problems)
        if step == 0:
            layouts.append(dp._grads.layout())
    names = dp._names
    plans = [p["algorithm"] for p in dp.bucket_plans()]
    return {"problems": problems, "digest": _digest(dp.module), "layouts": layouts, "names": names,
            "plans": plans, "copies": copies, "nparams": len(names), "nbuckets": [len(b) for b in layouts]}


def no_sync(comm, opt_name: str, bucket_bytes: int, steps: int = 3, micro: int = 2) -> list[str]:
    """Micro-batches under no_sync() then one synchronised: the same as the global batch in one process."""
    size, rank, dev = comm.size, comm.rank, comm.device
    per = PER_RANK * micro
    ref = _init(Net, 1000, dev)
    dp = _wrap(comm, _init(Net, 1000 + rank, dev), bucket_mb=bucket_bytes / 2**20)
    opt, ref_opt = _optimizer(opt_name, dp.parameters()), _optimizer(opt_name, ref.parameters())
    problems = []
    for step in range(steps):
        x, y = _batch(step, size, per, device=dev)
        xr, yr = _slice(x, rank, per), _slice(y, rank, per)
        opt.zero_grad()
        for k in range(micro):
            xm, ym = xr[k * PER_RANK:(k + 1) * PER_RANK], yr[k * PER_RANK:(k + 1) * PER_RANK]
            if k < micro - 1:
                with dp.no_sync():
                    (F.mse_loss(dp(xm), ym) / micro).backward()
                if k == 0:  # still this rank's own gradient: nothing was communicated
                    local = copy.deepcopy(dp.module)
                    local.zero_grad()
                    (F.mse_loss(local(xm), ym) / micro).backward()
                    d = max((a.grad - b.grad).abs().max().item()
                            for a, b in zip(dp.module.parameters(), local.parameters()))
                    if d > 1e-6:
                        problems.append(f"step {step}: gradient after a no_sync backward is not local ({d:.3g})")
            else:
                (F.mse_loss(dp(xm), ym) / micro).backward()
        opt.step()
        _reference_step(ref, ref_opt, lambda: F.mse_loss(ref(x), y), dp, step, problems)
    return problems


def one_backward(comm, steps: int = 3) -> dict:
    """One backward in two autograd runs (body's gradients, then head's: a pipeline's split backward) inside
    one_backward(): the same as the global batch in one process, buckets reduced once per step."""
    size, rank, dev = comm.size, comm.rank, comm.device
    ref = _init(Net, 1000, dev)
    dp = _wrap(comm, _init(Net, 1000 + rank, dev), bucket_mb=300 / 2**20)
    opt, ref_opt = _optimizer("sgd", dp.parameters()), _optimizer("sgd", ref.parameters())
    problems, finishes = [], []
    finish = dp._grads.on_finish
    dp._grads.on_finish = lambda: (finishes.append(1), finish())[1]
    for step in range(steps):
        x, y = _batch(step, size, device=dev)
        opt.zero_grad()
        loss = F.mse_loss(dp(_slice(x, rank)), _slice(y, rank))
        before = len(finishes)
        with dp.one_backward():
            loss.backward(inputs=list(dp.module.body.parameters()), retain_graph=True)
            if len(finishes) != before:
                problems.append(f"step {step}: buckets finished after the first of two autograd runs")
            loss.backward(inputs=list(dp.module.head.parameters()))
        if len(finishes) != before + 1:
            problems.append(f"step {step}: {len(finishes) - before} bucket finishes, expected 1")
        opt.step()
        _reference_step(ref, ref_opt, lambda: F.mse_loss(ref(x), y), dp, step, problems)
    try:
        with dp.one_backward():
            with dp.one_backward():
                pass
        problems.append("a nested one_backward() was accepted")
    except RuntimeError as e:
        if "already under way" not in str(e):
            problems.append(f"nested one_backward(): {e}")
    return {"problems": problems}


def _uses_extra(rank: int, step: int) -> bool:
    return (rank + step) % 3 == 0


def unused(comm, set_to_none: bool, steps: int = 5) -> list[str]:
    """Parameters unused on some or all ranks: zero contributions; .grad None where no rank used them."""
    size, rank, dev = comm.size, comm.rank, comm.device
    ref = _init(Branchy, 1000, dev)
    dp = _wrap(comm, _init(Branchy, 1000 + rank, dev), bucket_mb=200 / 2**20)
    opt, ref_opt = _optimizer("adamw", dp.parameters()), _optimizer("adamw", ref.parameters())
    problems = []
    for step in range(steps):
        x, y = _batch(step, size, device=dev)
        opt.zero_grad(set_to_none=set_to_none)
        F.mse_loss(dp(_slice(x, rank), _uses_extra(rank, step)), _slice(y, rank)).backward()
        ref_opt.zero_grad(set_to_none=set_to_none)
        loss = sum(F.mse_loss(ref(_slice(x, r), _uses_extra(r, step)), _slice(y, r)) for r in range(size)) / size
        loss.backward()
        for (name, p), q in zip(dp.module.named_parameters(), ref.parameters()):
            if (p.grad is None) != (q.grad is None):
                problems.append(f"step {step}: {name}.grad is {'None' if p.grad is None else 'set'}, "
                                f"reference {'None' if q.grad is None else 'set'}")
            elif p.grad is not None and (p.grad - q.grad).abs().max().item() > TOL:
                problems.append(f"step {step}: {name}.grad differs from the reference")
        opt.step()
        ref_opt.step()
        d = _max_diff(dp.module, ref)
        if d > TOL:
            problems.append(f"step {step}: parameters differ from the reference by {d:.3g}")
    return problems


def buffers(comm, steps: int = 3) -> list[str]:
    """Rank 0's buffers reach every rank at wrap time and at the start of each synchronised forward."""
    size, rank, dev = comm.size, comm.rank, comm.device
    ref = _init(BNNet, 1000, dev)
    dp = _wrap(comm, _init(BNNet, 1000 + rank, dev), bucket_mb=100 / 2**20)
    problems = []
    rank0 = _init(BNNet, 1000, dev)
    for (name, a), b in zip(dp.module.named_buffers(), rank0.buffers()):
        if not torch.equal(a, b):
            problems.append(f"after wrapping, {name} is not rank 0's")
    opt, ref_opt = _optimizer("sgd", dp.parameters()), _optimizer("sgd", ref.parameters())
    for step in range(steps):
        x, y = _batch(step, size, device=dev)
        opt.zero_grad()
        F.mse_loss(dp(_slice(x, rank)), _slice(y, rank)).backward()
        opt.step()
        # per-rank BatchNorm statistics: the global loss is the mean of the slices' losses
        def global_loss():
            return sum(F.mse_loss(ref(_slice(x, r)), _slice(y, r)) for r in range(size)) / size

        _reference_step(ref, ref_opt, global_loss, dp, step, problems)
    # A synchronised forward starts from rank 0's buffers: the same input then leaves equal buffers everywhere.
    every = comm.exchange_json([b.tolist() for b in dp.module.buffers()])
    rank0_buffers = [torch.tensor(v, device=dev) for v in every[0]]
    local = copy.deepcopy(dp.module)
    x, _ = _batch(99, 1, device=dev)
    with torch.no_grad():
        for b, v in zip(local.buffers(), rank0_buffers):
            b.copy_(v)
        local(x)
    dp(x)
    for (name, a), b in zip(dp.module.named_buffers(), local.buffers()):
        if not torch.allclose(a, b, atol=1e-6):
            problems.append(f"{name}: a synchronised forward did not start from rank 0's buffers")
    # Inside no_sync() forwards do not communicate: each rank updates its own.
    own = copy.deepcopy(dp.module)
    xr = _slice(_batch(100, size, device=dev)[0], rank)
    with torch.no_grad():
        own(xr)
    with dp.no_sync():
        dp(xr)
    for (name, a), b in zip(dp.module.named_buffers(), own.buffers()):
        if not torch.allclose(a, b, atol=1e-6):
            problems.append(f"{name}: a no_sync forward changed buffers other than by this rank's batch")
    return problems


def _local_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def compression(comm, compress: str) -> dict:
    """One step's gradients against the exact float32 average; returns the worst error over the bound."""
    size, rank, dev = comm.size, comm.rank, comm.device
    dp = _wrap(comm, _init(Net, 0, dev), bucket_mb=300 / 2**20, compress=compress)
    x, y = _batch(0, size, device=dev)
    ref = _init(Net, 0, dev)
    per_rank = torch.stack([_local_grads(ref, _slice(x, r), _slice(y, r)) for r in range(size)])
    exact = per_rank.mean(0)
    F.mse_loss(dp(_slice(x, rank)), _slice(y, rank)).backward()
    got = torch.cat([p.grad.reshape(-1) for p in dp.module.parameters()])
    eps = {"bf16": 2.0**-8, "fp16": 2.0**-11}[compress]
    bound = (size + 1) * eps * per_rank.abs().mean(0) + 1e-12
    return {"worst": ((got - exact).abs() / bound).max().item(), "digest": _digest(dp.module),
            "grad_digest": hashlib.sha1(got.cpu().numpy().tobytes()).hexdigest()}


def error_feedback(comm, compress: str, steps: int = 16) -> dict:
    """The same gradient reduced ``steps`` times: the summed error, with and without error feedback."""
    size, rank, dev = comm.size, comm.rank, comm.device
    x, y = _batch(0, size, device=dev)
    ref = _init(Net, 0, dev)
    exact = torch.stack([_local_grads(ref, _slice(x, r), _slice(y, r)) for r in range(size)]).mean(0)
    out = {}
    for ef in (False, True):
        dp = _wrap(comm, _init(Net, 0, dev), bucket_mb=300 / 2**20, compress=compress, error_feedback=ef)
        total = torch.zeros_like(exact, dtype=torch.float64)
        for _ in range(steps):
            dp.zero_grad()
            F.mse_loss(dp(_slice(x, rank)), _slice(y, rank)).backward()
            total += torch.cat([p.grad.reshape(-1) for p in dp.module.parameters()]).double()
        out["ef" if ef else "plain"] = ((total - steps * exact.double()).abs().max() / exact.abs().max()).item()
    return out


def wrong_models(comm) -> str:
    """Ranks wrapping different models: a ValueError on every rank naming the parameter."""
    dev = comm.device
    m = _init(Net, 0, dev)
    if comm.rank == comm.size - 1:
        m.body[2] = nn.Linear(10, 11, device=dev)
        m.head = nn.Linear(11, 3, device=dev)
    try:
        DataParallel(m, comm=comm)
    except ValueError as e:
        return str(e)
    return "no error"


def bad_arguments(comm) -> list[str]:
    """Bad arguments fail before any collective, naming the argument."""
    dev = comm.device
    m = _init(Net, 0, dev)
    bad = [("bucket_mb", ValueError, dict(bucket_mb=0)), ("bucket_mb", ValueError, dict(bucket_mb="big")),
           ("algorithm", ValueError, dict(algorithm="bogus")), ("algorithm", TypeError, dict(algorithm=3)),
           ("compress", ValueError, dict(compress="int8")), ("error_feedback", ValueError, dict(error_feedback=True))]
    return [p for name, exc, kw in bad
            if (p := wrong_error(name, exc, lambda kw=kw: DataParallel(m, comm=comm, **kw))) is not None]


def run_all(comm) -> list[str]:
    """Every case once, for a world started by a launcher (the CUDA/NCCL test: ``torchrun -m tests.dp_cases``)."""
    problems = []
    for opt, bucket_bytes in (("sgd", 4), ("adamw", 300)):
        problems += train(comm, opt, bucket_bytes)["problems"]
    problems += no_sync(comm, "adamw", 100)
    problems += unused(comm, True) + unused(comm, False)
    problems += buffers(comm)
    for compress in ("bf16", "fp16"):
        worst = compression(comm, compress)["worst"]
        if worst > 1.0:
            problems.append(f"compress={compress}: error {worst:.2f} x the stated bound")
    return problems


if __name__ == "__main__":
    from tests.cases import launched_main

    launched_main(run_all)
