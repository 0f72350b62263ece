"""ZeRO: sharded optimizer state (stage 1), gradients (stage 2) and parameters (stage 3).

    model, opt = parallel.zero(module, torch.optim.AdamW, stage=2, lr=1e-3)
    for x, y in data:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

A stage is a composition of two strategies (one per concern):

    stage  parameters          gradients
    1      ReplicatedParams    AllReducedGrads        (_params.py, _grads.py)
    2      ReplicatedParams    ReduceScatteredGrads
    3      ShardedParams       ReduceScatteredGrads

Parameters are grouped into units (_units.py), each laid out flat and cut
into one shard per rank (_flat.py); the optimizer (_optim.py) is the user's
class stepping this rank's master shards. Checkpoints: parallel/checkpoint.py.

Limits: every parameter must require grad and be floating point; one
parameter group; element-wise optimizers only (not LBFGS, SparseAdam,
Adafactor, Muon); gradient clipping through ``opt.clip_grad_norm_``. In stage
3 a parameter holds data only inside the forward and backward of its unit's
module, so use it there (a parameter registered in several modules is placed
where all of them can see it, see _units.py). Buffers are broadcast from rank
0 once and are not sharded. A step without a backward since ``zero_grad`` does
nothing; in a step after some backward, parameters that got no gradient are
stepped with a zero gradient (they share flat shards with the others).
"""

from __future__ import annotations


import torch
from torch import nn

from ._api import MixedPrecision, Precision
from ._grads import AllReducedGrads, ReduceScatteredGrads
from ._model import ZeroModel, ZeroState
from ._optim import sharded_optimizer
from ._params import ReplicatedParams, ShardedParams
from ._report import MemoryReport, full_state_dict, memory_report
from ._units import WrapPolicy, bucket_units, make_units, module_units, trainable_named_parameters

STAGES = {
    1: (ReplicatedParams, AllReducedGrads),
    2: (ReplicatedParams, ReduceScatteredGrads),
    3: (ShardedParams, ReduceScatteredGrads),
}


def zero(module: nn.Module, optimizer_class: type[torch.optim.Optimizer], stage: int = 1, comm=None, *,
         mixed_precision: MixedPrecision | torch.dtype | None = None, bucket_mb: float = 25.0,
         wrap: WrapPolicy | None = None, **optimizer_kwargs) -> tuple[ZeroModel, torch.optim.Optimizer]:
    """Shard ``module``'s training state over the ranks of ``comm`` (default: ``collectives.init()``).

    Every rank must call it with the same module architecture; all start from
    rank 0's parameters and buffers. ``optimizer_kwargs`` go to
    ``optimizer_class`` (element-wise optimizers only, see ``_optim.py``).

    mixed_precision: a dtype (``torch.bfloat16``) or MixedPrecision: compute
        parameters and gradients in that dtype, master shards in float32.
    bucket_mb: stages 1 and 2: the size of a unit, the granule of communication.
    wrap: stage 3: which modules get a unit of their own (a tuple of module
        classes, or ``f(path, module) -> bool``); default: the root's children,
        looking through ModuleList, ModuleDict and Sequential to theirs. The
        root keeps the remaining parameters.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: expected 1, 2 or 3, got {stage!r}")
    if stage != 3 and wrap is not None:
        raise ValueError("wrap: only stage 3 groups parameters by module")
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb: expected a positive size, got {bucket_mb!r}")
    if comm is None:
        import collectives

        comm = collectives.init()
    module.to(comm.device)
    named = trainable_named_parameters(module)
    if not named:
        raise ValueError("module: has no parameters to shard")
    precision = Precision.resolve(mixed_precision, named[0][1].dtype)
    if stage == 3:
        groups = module_units(module, named, wrap)
    else:
        groups = [(None, g) for g in bucket_units(named, comm.size, int(bucket_mb * 2**20))]
    units = make_units(groups, comm.size)

    params_cls, grads_cls = STAGES[stage]
    params = params_cls(units, comm, precision)
    grads = grads_cls(units, comm, precision)
    if stage == 3:
        params.on_order = lambda order: setattr(grads, "order", order)
        grads.on_launched = params.reshard
        params.on_pre_backward = grads.prepare
    params.install(module)
    grads.install()
    with torch.no_grad():
        for b in module.buffers():
            comm.broadcast(b, src=0)

    state = ZeroState(comm, stage, precision, units, params, grads, module, {id(p): n for n, p in named})
    opt = sharded_optimizer(optimizer_class, units, params, grads, comm, optimizer_kwargs)
    return ZeroModel(module, state), opt


__all__ = ["MemoryReport", "MixedPrecision", "ZeroModel", "full_state_dict", "memory_report", "zero"]
