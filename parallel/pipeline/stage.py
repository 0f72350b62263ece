"""Cutting an ``nn.Sequential`` into pipeline stages.

A balance is the number of consecutive layers in each stage, in stage order.
It comes from the caller, or from a cost per layer (its parameter count, or
its measured forward + backward time) by the contiguous partition that
minimises the costliest stage, then the longest stage (so parameter-free
layers such as activations spread evenly instead of piling up in one stage).

[Note: parameter names] A stage keeps the layers' names from the full
Sequential (``"3"``, ``"4"``, ...), so ``named_parameters()`` of a rank's
module reads ``"3.weight"`` exactly as in the full model: state dicts,
optimiser groups and checkpoints line up with single-process training.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


def check_sequential(module: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"module: Pipeline splits an nn.Sequential, got {type(module).__name__}")
    return list(module.named_children())


def _min_max_partition(costs: Sequence[float], nparts: int,
                       allowed=lambda i, j: True) -> tuple[float, list[int]] | None:
    """Contiguous split of ``costs`` into ``nparts`` non-empty runs minimising the largest run's sum,
    among splits whose every run [i, j) satisfies ``allowed(i, j)``; None when no split is allowed."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: min over splits of the first j layers into k runs of the largest run sum
    best = [[inf] * (n + 1) for _ in range(nparts + 1)]
    cut = [[0] * (n + 1) for _ in range(nparts + 1)]
    best[0][0] = 0.0
    for k in range(1, nparts + 1):
        for j in range(k, n - (nparts - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf or not allowed(i, j):
                    continue
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    if best[nparts][n] == inf:
        return None
    counts, j = [], n
    for k in range(nparts, 0, -1):
        i = cut[k][j]
        counts.append(j - i)
        j = i
    return best[nparts][n], counts[::-1]


def partition(costs: Sequence[float], nparts: int) -> list[int]:
    """Layers per part: minimise the costliest part, then (within 0.1 % of it) the part with most layers."""
    if nparts > len(costs):
        raise ValueError(f"the pipeline needs {nparts} stages but the model has only {len(costs)} layers")
    found = _min_max_partition(costs, nparts)
    assert found is not None
    bound = found[0] * 1.001 + 1e-12
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    second = _min_max_partition([1.0] * len(costs), nparts, lambda i, j: prefix[j] - prefix[i] <= bound)
    return (second or found)[1]


def param_counts(layers: Sequence[nn.Module]) -> list[float]:
    return [float(sum(p.numel() for p in m.parameters())) for m in layers]


def measure_times(layers: Sequence[nn.Module], example: torch.Tensor, repeats: int = 3) -> list[float]:
    """Median forward + backward seconds of each layer on ``example`` (a micro-batch), side-effect free.

    Runs on deep copies, so parameters, gradients, buffers (batch-norm statistics) and the RNG stream
    of the real layers stay untouched.
    """
    times = []
    x = example
    with torch.random.fork_rng(devices=[example.device] if example.device.type == "cuda" else []):
        for layer in layers:
            twin = copy.deepcopy(layer)
            samples = []
            for _ in range(repeats + 1):  # the first run warms up
                inp = x.detach().requires_grad_(x.is_floating_point())
                _sync(x.device)
                t0 = time.perf_counter()
                out = twin(inp)
                if out.requires_grad:
                    out.backward(torch.ones_like(out))
                _sync(x.device)
                samples.append(time.perf_counter() - t0)
            times.append(statistics.median(samples[1:]))
            x = out.detach()
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_balance(layers: Sequence[nn.Module], nstages: int, balance: object,
                    example: torch.Tensor | None = None) -> list[int]:
    """Layers per stage from ``balance``: a list of counts, None or "params", or "time" (needs ``example``)."""
    n = len(layers)
    if nstages > n:
        raise ValueError(f"the pipeline needs {nstages} stages but the model has only {n} layer{'s' * (n != 1)}; "
                         "use fewer ranks or stages per rank")
    if balance is None or balance == "params":
        return partition(param_counts(layers), nstages)
    if balance == "time":
        if example is None:
            raise ValueError("balance='time' needs example=<one micro-batch of input> to time the layers")
        return partition(measure_times(layers, example), nstages)
    if isinstance(balance, str):
        raise ValueError(f"balance: unknown {balance!r}; use a list of layer counts, 'params' or 'time'")
    counts = list(balance)  # type: ignore[call-overload]
    if len(counts) != nstages or any(not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != n:
        raise ValueError(f"balance: expected {nstages} positive layer counts summing to {n} layers, got {counts}")
    return counts


class StageModule(nn.Module):
    """This rank's layers under their full-model names ([Note: parameter names]).

    ``stage(s)`` is stage ``s`` as an ``nn.Sequential`` sharing those layers. Calling the module itself
    runs its stages in order, which is the model's own forward when the rank holds one stage.
    """

    def __init__(self, stages: dict[int, list[tuple[str, nn.Module]]]) -> None:
        super().__init__()
        self._stage_names: dict[int, list[str]] = {}
        for s in sorted(stages):
            for name, layer in stages[s]:
                self.add_module(name, layer)
            self._stage_names[s] = [name for name, _ in stages[s]]

    @property
    def stage_ids(self) -> list[int]:
        return list(self._stage_names)

    def stage(self, s: int) -> nn.Sequential:
        return nn.Sequential(OrderedDict((name, self._modules[name]) for name in self._stage_names[s]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self._stage_names:
            for name in self._stage_names[s]:
                x = self._modules[name](x)
        return x


def split(named_layers: Sequence[tuple[str, nn.Module]], counts: Sequence[int]) -> list[list[tuple[str, nn.Module]]]:
    """Consecutive runs of layers, ``counts[s]`` in stage s."""
    out, start = [], 0
    for c in counts:
        out.append(list(named_layers[start:start + c]))
        start += c
    return out


def meta_twin(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` whose parameters and buffers live on the meta device (no data copied)."""
    memo: dict[int, object] = {}
    for p in layer.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in layer.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(layer, memo)
