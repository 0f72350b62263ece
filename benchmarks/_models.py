"""The model the training benchmarks share: a stack of pre-norm MLP blocks (transformer-like FLOPs per parameter)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class MLPStack(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d) for _ in range(layers)))
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(x))


def width_for(params: float, layers: int) -> int:
    """d (a multiple of 64) whose model has about ``params`` parameters: 8 d^2 per block, d^2 at the end."""
    return max(64, int(round(math.sqrt(params / (8 * layers + 1)) / 64)) * 64)
