"""Reading a ZeRO model back: full state dicts and per-rank memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from ._model import zero_state


@torch.no_grad()
def full_state_dict(model: object) -> dict[str, torch.Tensor]:
    """Every parameter and buffer at full shape under its original name, on CPU, on every rank (collective).

    Parameters come from the master shards (so in mixed precision they have
    the master dtype); tied parameters appear under each of their names, as in
    ``module.state_dict()``.
    """
    z = zero_state(model)
    values: dict[str, torch.Tensor] = {}
    for u in z.units:
        full = torch.empty(u.layout.padded, dtype=u.master.dtype, device=u.master.device)
        z.comm.all_gather(full, u.master)
        for s in u.layout.slots:
            values[s.name] = full[s.offset:s.end].view(s.shape).to("cpu", copy=True)
        del full
    out = {}
    for name, t in z.module.state_dict(keep_vars=True).items():
        if isinstance(t, torch.nn.Parameter):
            out[name] = values[z.names[id(t)]]
        else:
            out[name] = t.detach().to("cpu", copy=True)
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryReport:
    """Bytes this rank holds for model states, counted as the ZeRO paper does.

    ``params``: compute parameters (the replicated flat buffers in stages 1
    and 2, the gathered units and low-precision shards in stage 3; without
    mixed precision also the master shards, which are the parameters).
    ``grads``: gradients (full flat buffers in stage 1, shards in 2 and 3,
    plus any ``.grad`` not yet reduced). ``optimizer``: the optimizer state
    plus, in mixed precision, the full-precision master shards. Each storage
    counts once, in the first of these that holds it.
    """

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer, "total": self.total}


def _storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def memory_report(model: object, opt: torch.optim.Optimizer | None = None) -> MemoryReport:
    """This rank's model-state bytes (local, not collective); ``opt`` adds the optimizer state."""
    z = zero_state(model)
    mixed = z.precision.mixed
    seen: set[int] = set()
    params = [p for u in z.units for p in u.params] + [u.gather_src for u in z.units]
    if not mixed:
        params += [u.master for u in z.units]
    grads = [p.grad for u in z.units for p in u.params]
    grads += [t for u in z.units for t in (u.grad_full, u.grad_shard, u.master.grad)]
    optim = [u.master for u in z.units] if mixed else []
    if opt is not None:
        optim += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return MemoryReport(_storage_bytes(params, seen), _storage_bytes(grads, seen), _storage_bytes(optim, seen))
