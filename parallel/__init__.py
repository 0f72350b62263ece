"""topocomm parallel: training wrappers on top of ``collectives``.

    import parallel as P
    model = P.DataParallel(module)
    model, opt = P.zero(module, torch.optim.AdamW, stage=2, lr=1e-3)
    pipe = P.Pipeline(module, chunks=4, schedule="1f1b", loss_fn=F.mse_loss)
"""

from __future__ import annotations

from .checkpoint import load_checkpoint, save_checkpoint
from .data_parallel import DataParallel
from .mesh import Mesh
from .pipeline import Pipeline

# Bound after the package import on purpose: ``parallel.zero`` names the function, not
# the package ``parallel/zero/`` (Python sets the attribute only when it first loads
# the package, which the line below has already done).
from .zero import MixedPrecision, full_state_dict, memory_report, zero

__all__ = [
    "DataParallel", "Mesh", "MixedPrecision", "Pipeline", "full_state_dict", "load_checkpoint",
    "memory_report", "save_checkpoint", "zero",
]
