"""Flat layouts: a unit's parameters laid end to end in one buffer, cut into equal shards.

[Note: flat layout] A unit's parameters are flattened in a fixed order and
concatenated: parameter ``i`` occupies ``[offset_i, offset_i + numel_i)`` of a
flat buffer of ``numel`` elements. The buffer is padded with zeros to
``padded = shard * world`` elements, ``shard = ceil(numel / world)``, so every
collective moves equal blocks; rank ``r`` owns ``[r * shard, (r + 1) * shard)``.
Only the last ranks' shards reach into the padding (some may be all padding
when ``numel < world``). Padding elements get zero gradients and stay zero
under every element-wise optimizer we accept (weight decay of 0 is 0), so they
never hold information and are never saved.

A layout is pure bookkeeping; it holds no tensors. ``pieces(start, end)``
maps a flat range back to (parameter name, element range), which is how
checkpoints reshard between world sizes and unit layouts.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True, slots=True)
class Slot:
    """One parameter's place in a flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """Elements ``[start, end)`` of parameter ``name`` sit at ``flat_start`` of a flat range."""

    name: str
    start: int
    end: int
    flat_start: int


@dataclasses.dataclass(frozen=True, slots=True)
class FlatLayout:
    slots: tuple[Slot, ...]
    world: int

    @classmethod
    def build(cls, named_shapes: list[tuple[str, tuple[int, ...]]], world: int) -> FlatLayout:
        slots, offset = [], 0
        for name, shape in named_shapes:
            n = math.prod(shape)
            slots.append(Slot(name, tuple(shape), offset, n))
            offset += n
        return cls(tuple(slots), world)

    @property
    def numel(self) -> int:
        return self.slots[-1].end if self.slots else 0

    @property
    def shard(self) -> int:
        """Elements per rank (the last ranks' shards may end in padding)."""
        return -(-self.numel // self.world)

    @property
    def padded(self) -> int:
        return self.shard * self.world

    def bounds(self, rank: int) -> tuple[int, int]:
        """The real (unpadded) flat range rank ``rank`` owns; empty when its shard is all padding."""
        start = min(rank * self.shard, self.numel)
        return start, min(start + self.shard, self.numel)

    def pieces(self, start: int, end: int) -> list[Piece]:
        """The parameter element ranges that make up flat range ``[start, end)``, in order."""
        out = []
        for s in self.slots:
            lo, hi = max(start, s.offset), min(end, s.end)
            if lo < hi:
                out.append(Piece(s.name, lo - s.offset, hi - s.offset, lo))
        return out

    def to_json(self) -> dict:
        return {"world": self.world, "slots": [[s.name, list(s.shape), s.offset] for s in self.slots]}

    @classmethod
    def from_json(cls, obj: dict) -> FlatLayout:
        return cls.build([(name, tuple(shape)) for name, shape, _ in obj["slots"]], int(obj["world"]))


def flatten_into(flat: torch.Tensor, layout: FlatLayout, tensors: list[torch.Tensor | None]) -> None:
    """Copy ``tensors`` (one per slot, None for zeros) into ``flat`` (padded length) and zero the padding."""
    for slot, t in zip(layout.slots, tensors):
        dst = flat[slot.offset:slot.end]
        if t is None:
            dst.zero_()
        else:
            dst.copy_(t.reshape(-1))
    flat[layout.numel:].zero_()


def slot_views(flat: torch.Tensor, layout: FlatLayout) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each slot's parameter."""
    return [flat[s.offset:s.end].view(s.shape) for s in layout.slots]
