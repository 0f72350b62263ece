"""Units: the groups of parameters that are flattened, sharded and communicated together.

Stages 1 and 2 cut the parameters into size-bounded buckets, last-registered
first (roughly the order backward produces gradients). Stage 3 cuts them by
module, since a module's parameters are gathered for its forward and
backward: each wrapped module's parameters form its unit, and the root module
keeps whatever no wrapped module owns.

[Note: shared parameters] A parameter registered in several modules (tied
embeddings) belongs to the unit of the innermost wrapped module that contains
every module using it, so it is gathered whenever any of its users runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ._flat import FlatLayout

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
WrapPolicy = Callable[[str, nn.Module], bool] | tuple[type[nn.Module], ...]


@dataclasses.dataclass(eq=False)
class Unit:
    """One unit's tensors on this rank; the strategies fill in the tensors they use."""

    index: int
    layout: FlatLayout
    params: list[nn.Parameter]
    module: nn.Module | None = None       # stage 3: the module whose forward gathers this unit
    master: torch.Tensor | None = None    # the optimizer's parameter: this rank's shard (padded length)
    full: torch.Tensor | None = None      # the whole flat unit in compute dtype (freed between uses in stage 3)
    gather_src: torch.Tensor | None = None  # stage 3: the compute-dtype shard that all-gathers read
    grad_full: torch.Tensor | None = None   # stage 1: whole flat gradient, the parameters' .grad are views
    grad_shard: torch.Tensor | None = None  # stages 2 and 3: this rank's reduced gradient shard

    def shard_slice(self, rank: int) -> slice:
        s = self.layout.shard
        return slice(rank * s, (rank + 1) * s)


def trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = list(module.named_parameters())
    frozen = [n for n, p in named if not p.requires_grad]
    if frozen:
        raise ValueError(f"module: parameters with requires_grad=False are not supported by zero() "
                         f"({', '.join(frozen[:4])}{', ...' if len(frozen) > 4 else ''}); remove them from the "
                         f"module or register them as buffers")
    dtypes = {p.dtype for _, p in named}
    if any(not dt.is_floating_point for dt in dtypes):
        raise ValueError("module: zero() shards floating-point parameters only")
    return named


def bucket_units(named: list[tuple[str, nn.Parameter]], world: int, bucket_bytes: int) -> list[list[tuple[str, nn.Parameter]]]:
    """Stages 1 and 2: consecutive parameters, last registered first, in buckets of at most ``bucket_bytes``."""
    groups: list[list[tuple[str, nn.Parameter]]] = []
    size = 0
    for name, p in reversed(named):
        nbytes = p.numel() * p.element_size()
        if not groups or (size + nbytes > bucket_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append((name, p))
        size += nbytes
    return groups


def _wrapped_modules(root: nn.Module, policy: WrapPolicy | None) -> dict[str, nn.Module]:
    """Module path -> module for every wrapped module, the root ("") included, in registration order.

    The default wraps the root's children, looking through containers
    (ModuleList, ModuleDict, Sequential) to their children: a container holds
    no parameters of its own, and a unit per layer is what frees memory.
    """
    out: dict[str, nn.Module] = {"": root}
    if policy is None:
        def visit(prefix: str, module: nn.Module) -> None:
            for name, child in module.named_children():
                path = f"{prefix}.{name}" if prefix else name
                if isinstance(child, _CONTAINERS):
                    visit(path, child)
                else:
                    out[path] = child

        visit("", root)
        return out
    for path, m in root.named_modules():
        if path and (isinstance(m, policy) if isinstance(policy, tuple) else policy(path, m)):
            out[path] = m
    return out


def _owner_path(name: str) -> str:
    return name.rpartition(".")[0]


def _innermost(paths: list[str], wrapped: dict[str, nn.Module]) -> str:
    """The innermost wrapped module path that is a prefix of every path in ``paths``."""
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for level in zip(*parts):
        if any(x != level[0] for x in level):
            break
        common.append(level[0])
    while common and ".".join(common) not in wrapped:
        common.pop()
    return ".".join(common)


def module_units(root: nn.Module, named: list[tuple[str, nn.Parameter]],
                 policy: WrapPolicy | None) -> list[tuple[nn.Module, list[tuple[str, nn.Parameter]]]]:
    """Stage 3: (module, its parameters) per wrapped module that owns any, root first, registration order."""
    wrapped = _wrapped_modules(root, policy)
    uses: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), []).append(_owner_path(name))
    by_path: dict[str, list[tuple[str, nn.Parameter]]] = {path: [] for path in wrapped}
    for name, p in named:
        by_path[_innermost(uses[id(p)], wrapped)].append((name, p))
    return [(wrapped[path], params) for path, params in by_path.items() if params]


def make_units(groups: list[tuple[nn.Module | None, list[tuple[str, nn.Parameter]]]], world: int) -> list[Unit]:
    units = []
    for i, (module, params) in enumerate(groups):
        if len({p.dtype for _, p in params}) > 1:
            raise ValueError(f"module: parameters of one unit have different dtypes "
                             f"({', '.join(n for n, _ in params[:4])}); use one dtype per model")
        layout = FlatLayout.build([(n, tuple(p.shape)) for n, p in params], world)
        units.append(Unit(i, layout, [p for _, p in params], module))
    return units
