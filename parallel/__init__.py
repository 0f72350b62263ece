"""topocomm parallel: training wrappers on top of ``collectives``.

    import parallel as P
    model = P.DataParallel(module)
    model, opt = P.zero(module, torch.optim.AdamW, stage=2, lr=1e-3)
    pipe = P.Pipeline(module, chunks=4, schedule="1f1b", loss_fn=F.mse_loss)
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it; imported on first use so each wrapper loads only what it needs
_EXPORTS = {
    "DataParallel": "data_parallel",
    "zero": "zero",
    "full_state_dict": "zero",
    "memory_report": "zero",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "Pipeline": "pipeline",
    "Mesh": "mesh",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'parallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
