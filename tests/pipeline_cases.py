"""Pipeline and Mesh cases that run inside the worker ranks (see harness.py).

Every rank builds the same tiny model from a seed and trains a single-process
reference copy on the whole batch itself, so each rank checks its own stage
against an independent reference: the losses, and its parameters by their
full-model names, after a few SGD steps.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import parallel
from parallel.pipeline import Pipeline
from tests.cases import environ

WIDTH = 6


def make_model(nlinear: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(nlinear):
        lin = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5)
            lin.bias.copy_(torch.randn(WIDTH, generator=g) * 0.1)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers).to(dtype)


def make_data(batch: int, step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(batch, WIDTH, generator=g).to(dtype), torch.randn(batch, WIDTH, generator=g).to(dtype))


def reference(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float):
    """Single-process SGD on the whole batch: (losses, trained model)."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        loss = F.mse_loss(ref(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, ref


def _compare(pipe_module: nn.Module, ref: nn.Module, losses: list[float], ref_losses: list[float], tol: float) -> float:
    mine = dict(pipe_module.named_parameters())
    full = dict(ref.named_parameters())
    assert mine, "this rank holds no parameters"
    assert set(mine) <= set(full), f"names not in the full model: {sorted(set(mine) - set(full))}"
    worst = max(abs(a - b) for a, b in zip(losses, ref_losses))
    assert worst <= tol, f"losses {losses} != reference {ref_losses}"
    for name, p in mine.items():
        d = (p.detach().cpu() - full[name].detach()).abs().max().item()
        assert d <= tol, f"{name}: differs from the reference by {d}"
        worst = max(worst, d)
    return worst


def train_equivalence(comm, schedule: str, chunks: int, stages_per_rank: int | None = None,
                      dtype: str = "float64", steps: int = 3, balance=None, nlinear: int = 8,
                      pair_links: bool = False, split: str | None = "1") -> dict:
    """``pair_links``: talk over a group per neighbouring pair, as on NCCL (links.py), instead of gloo's path.
    ``split``: TOPOCOMM_PIPELINE_SPLIT_BACKWARD for the case (on by default here: CPU ranks default to off)."""
    with environ("TOPOCOMM_PIPELINE_SPLIT_BACKWARD", split):
        return _train_equivalence(comm, schedule, chunks, stages_per_rank, dtype, steps, balance, nlinear,
                                  pair_links)


def _train_equivalence(comm, schedule, chunks, stages_per_rank, dtype, steps, balance, nlinear, pair_links):
    from parallel.pipeline import links

    dt = getattr(torch, dtype)
    model = make_model(nlinear, dtype=dt)
    batches = [make_data(4 * chunks, s, dt) for s in range(steps)]
    ref_losses, ref = reference(model, batches, lr=0.1)
    default = links.PAIR_BACKENDS
    links.PAIR_BACKENDS = default + (("gloo",) if pair_links else ())
    try:
        pipe = Pipeline(model, chunks=chunks, schedule=schedule, loss_fn=F.mse_loss, comm=comm, balance=balance,
                        stages_per_rank=stages_per_rank)
    finally:
        links.PAIR_BACKENDS = default
    opt = torch.optim.SGD(pipe.module.parameters(), lr=0.1)
    losses = []
    for x, y in batches:
        loss = pipe.step(x, y)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    tol = 1e-10 if dt == torch.float64 else 1e-5
    worst = _compare(pipe.module, ref, losses, ref_losses, tol)
    return {"worst": worst, "peak": pipe.stats.peak_activations, "stages": pipe.stage_ids,
            "split": pipe.stats.split_backwards,
            "names": sorted(n for n, _ in pipe.module.named_parameters()), "balance": pipe.balance,
            "simulated_peak": list(pipe.simulation.peak_activations),
            "pair_links": sorted(pipe._runtime.links.pairs)}


def time_balance(comm, chunks: int = 2) -> dict:
    model = make_model(4)
    x, y = make_data(4 * chunks, 0)
    pipe = Pipeline(model, chunks=chunks, schedule="1f1b", loss_fn=F.mse_loss, comm=comm, balance="time",
                    example=x[: 4])
    before = {n: p.detach().clone() for n, p in pipe.module.named_parameters()}
    assert all(p.grad is None for p in pipe.module.parameters()), "timing left gradients behind"
    pipe.step(x, y)
    assert all(torch.equal(before[n], p) for n, p in pipe.module.named_parameters())
    return {"balance": pipe.balance}


_MESHES: dict[tuple, object] = {}


def _mesh(comm, **axes: int):
    """One Mesh per layout and world: process groups are costly to create and to destroy at shutdown."""
    key = (id(comm), tuple(axes.items()))
    if key not in _MESHES:
        _MESHES[key] = parallel.Mesh(comm=comm, **axes)
    return _MESHES[key]


def mesh_layout(comm, **axes: int) -> dict:
    mesh = _mesh(comm, **axes)
    out = {"coords": mesh.coords}
    for name in mesh.names:
        sub = mesh[name]
        ranks = torch.tensor([comm.rank], dtype=torch.int64)
        gathered = torch.empty(sub.size, dtype=torch.int64)
        sub.all_gather(gathered, ranks)
        out[name] = gathered.tolist()
        out[name + "_rank"] = sub.rank
    return out


def _data_parallel(module: nn.Module, comm) -> nn.Module:
    return parallel.DataParallel(module, comm=comm)


def mesh_pp_dp(comm, schedule: str = "1f1b", chunks: int = 2, steps: int = 3, dp_mode: str = "once") -> dict:
    with environ("TOPOCOMM_PIPELINE_SPLIT_BACKWARD", "1"):
        return _mesh_pp_dp(comm, schedule, chunks, steps, dp_mode)


def _mesh_pp_dp(comm, schedule: str, chunks: int, steps: int, dp_mode: str) -> dict:
    """pp=2 x dp=2: each dp replica trains on its half of the global batch; equals single-process training.

    dp_mode: "once" (DataParallel told to reduce in the last backward only), "every" (plain DataParallel:
    reduces after every micro-batch's backward), "manual" (an explicit all-reduce after the step).
    """
    mesh = _mesh(comm, pp=2, dp=2)
    dp = mesh["dp"]
    model = make_model(4)
    global_batches = [make_data(8 * chunks, s) for s in range(steps)]
    ref_losses, ref = reference(model, global_batches, lr=0.1)
    pipe = Pipeline(model, chunks=chunks, schedule=schedule, loss_fn=F.mse_loss, comm=mesh["pp"])
    if dp_mode == "once":
        pipe.set_data_parallel(_data_parallel(pipe.module, dp))
    elif dp_mode == "every":
        parallel.DataParallel(pipe.module, comm=dp)
    calls = []
    real = dp.all_reduce
    dp.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]  # count reductions
    opt = torch.optim.SGD(pipe.module.parameters(), lr=0.1)
    losses = []
    try:
        for x, y in global_batches:
            half = x.shape[0] // dp.size
            sl = slice(dp.rank * half, (dp.rank + 1) * half)
            loss = pipe.step(x[sl], y[sl])
            if dp_mode == "manual":
                for p in pipe.module.parameters():
                    dp.all_reduce(p.grad, op="avg")
            opt.step()
            opt.zero_grad()
            real(loss.reshape(1), op="avg")  # the global batch's loss, for the comparison
            losses.append(loss.item())
    finally:
        del dp.all_reduce
    worst = _compare(pipe.module, ref, losses, ref_losses, 1e-10)
    return {"worst": worst, "coords": mesh.coords, "reductions_per_step": len(calls) / steps,
            "split": pipe.stats.split_backwards, "later": chunks * sum(1 for s in pipe.stage_ids if s > 0),
            "first_stage": min(pipe.stage_ids)}


def expect_error(comm, case: str) -> str:
    """Build a bad set-up; return the error message (every rank must raise the same way)."""
    model = make_model(2)  # 4 layers
    try:
        if case == "chunks_not_dividing":
            pipe = Pipeline(model, chunks=3, loss_fn=F.mse_loss, comm=comm)
            x, y = make_data(8, 0)
            pipe.step(x, y)
        elif case == "too_many_stages":
            Pipeline(nn.Sequential(nn.Linear(2, 2)), chunks=2, schedule="1f1b", loss_fn=F.mse_loss, comm=comm)
        elif case == "too_many_virtual_stages":
            Pipeline(model, chunks=comm.size * 2, schedule="interleaved", stages_per_rank=3,
                     loss_fn=F.mse_loss, comm=comm)
        elif case == "bad_schedule":
            Pipeline(model, chunks=2, schedule="zigzag", loss_fn=F.mse_loss, comm=comm)
        elif case == "interleaved_chunks":
            Pipeline(model, chunks=comm.size + 1, schedule="interleaved", loss_fn=F.mse_loss, comm=comm)
        elif case == "bad_balance":
            Pipeline(model, chunks=2, loss_fn=F.mse_loss, comm=comm, balance=[1] * (comm.size + 1))
        elif case == "not_sequential":
            Pipeline(nn.Linear(2, 2), chunks=2, loss_fn=F.mse_loss, comm=comm)
        elif case == "ranks_disagree":
            Pipeline(model, chunks=2 + comm.rank % 2 * 2, loss_fn=F.mse_loss, comm=comm)
        elif case == "shapes_disagree":
            pipe = Pipeline(model, chunks=2, loss_fn=F.mse_loss, comm=comm)
            x, y = make_data(4 + 2 * (comm.rank % 2), 0)
            pipe.step(x, y)
        elif case == "mesh_size":
            parallel.Mesh(pp=comm.size, dp=2, comm=comm)
        else:
            raise KeyError(case)
    except (ValueError, TypeError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{case}: no error raised")


def run_all(comm) -> list[str]:
    """Every schedule against single-process training, for a world started by a launcher (the CUDA/NCCL
    test: ``torchrun -m tests.pipeline_cases``); on NCCL neighbours talk over their pair groups."""
    from parallel.pipeline import links

    problems = []
    p = comm.size
    for schedule, chunks, v in (("gpipe", 2 * p, None), ("1f1b", 2 * p, None), ("interleaved", 2 * p, 2)):
        try:
            res = train_equivalence(comm, schedule, chunks, v)
        except AssertionError as e:
            problems.append(f"{schedule}: {e}")
            continue
        if p > 1 and comm.backend in links.PAIR_BACKENDS and not res["pair_links"]:
            problems.append(f"{schedule}: no pair groups on {comm.backend}")
    return problems


if __name__ == "__main__":
    from tests.cases import launched_main

    launched_main(run_all)
