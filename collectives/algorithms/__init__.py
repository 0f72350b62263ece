"""Algorithms as pure functions returning Schedules, and the registry that finds them.

``build(name, collective, world_size, root=..., nodes=..., pipeline=...)`` returns
the (cached, immutable) Schedule. ``native`` has no schedule: the executor calls
the backend's own collective for it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from ..schedule import Collective, Schedule
from . import direct, halving_doubling, hierarchical, pairwise, ring, tree

NATIVE = "native"

# (algorithm, collective) -> builder(world_size, root, nodes, pipeline)
_Builder = Callable[[int, int, tuple[tuple[int, ...], ...] | None, int], Schedule]
_REGISTRY: dict[tuple[str, Collective], _Builder] = {
    ("ring", Collective.ALL_REDUCE): lambda n, root, nodes, k: ring.ring_all_reduce(n),
    ("ring", Collective.REDUCE_SCATTER): lambda n, root, nodes, k: ring.ring_reduce_scatter(n),
    ("ring", Collective.ALL_GATHER): lambda n, root, nodes, k: ring.ring_all_gather(n),
    ("ring", Collective.BROADCAST): lambda n, root, nodes, k: ring.ring_broadcast(n, root, k),
    ("ring", Collective.REDUCE): lambda n, root, nodes, k: ring.ring_reduce(n, root, k),
    ("tree", Collective.ALL_REDUCE): lambda n, root, nodes, k: tree.tree_all_reduce(n, k),
    ("tree", Collective.BROADCAST): lambda n, root, nodes, k: tree.tree_broadcast(n, root, k),
    ("tree", Collective.REDUCE): lambda n, root, nodes, k: tree.tree_reduce(n, root, k),
    ("halving_doubling", Collective.ALL_REDUCE):
        lambda n, root, nodes, k: halving_doubling.halving_doubling_all_reduce(n),
    ("halving_doubling", Collective.REDUCE_SCATTER):
        lambda n, root, nodes, k: halving_doubling.halving_doubling_reduce_scatter(n),
    ("halving_doubling", Collective.ALL_GATHER):
        lambda n, root, nodes, k: halving_doubling.halving_doubling_all_gather(n),
    ("hierarchical", Collective.ALL_REDUCE):
        lambda n, root, nodes, k: hierarchical.hierarchical_all_reduce(n, nodes, k),
    ("pairwise", Collective.ALL_TO_ALL): lambda n, root, nodes, k: pairwise.pairwise_all_to_all(n),
    ("direct", Collective.ALL_REDUCE): lambda n, root, nodes, k: direct.direct_all_reduce(n),
    ("direct", Collective.REDUCE_SCATTER): lambda n, root, nodes, k: direct.direct_reduce_scatter(n),
    ("direct", Collective.ALL_GATHER): lambda n, root, nodes, k: direct.direct_all_gather(n),
}


def register(name: str, collective: Collective, builder: _Builder) -> None:
    _REGISTRY[(name, collective)] = builder
    names.cache_clear()
    supported.cache_clear()
    build.cache_clear()


@lru_cache(maxsize=None)
def names() -> tuple[str, ...]:
    """Every algorithm name, ``native`` last."""
    seen = dict.fromkeys(name for name, _ in _REGISTRY)
    return tuple(seen) + (NATIVE,)


@lru_cache(maxsize=None)
def supported(collective: Collective) -> tuple[str, ...]:
    return tuple(name for (name, c) in _REGISTRY if c is collective) + (NATIVE,)


def pipelined(name: str, collective: Collective) -> bool:
    """True where the builder's ``pipeline`` argument changes the schedule."""
    return (name, collective) in _PIPELINED


_PIPELINED: set[tuple[str, Collective]] = {
    ("ring", Collective.BROADCAST), ("ring", Collective.REDUCE),
    ("tree", Collective.ALL_REDUCE), ("tree", Collective.BROADCAST), ("tree", Collective.REDUCE),
    ("hierarchical", Collective.ALL_REDUCE),
}


def nvlink_kernel(name: str, collective: Collective) -> bool:
    """True where ``name`` runs as the NVLink kernel on one NVLink node ([Note: NVLink direct] in nvlink.py)."""
    return (name, collective) in _NVLINK


_NVLINK = {("direct", Collective.ALL_REDUCE), ("direct", Collective.REDUCE_SCATTER)}


@lru_cache(maxsize=1024)
def build(name: str, collective: Collective, world_size: int, root: int | None = None,
          nodes: tuple[tuple[int, ...], ...] | None = None, pipeline: int = 1) -> Schedule:
    builder = _REGISTRY.get((name, collective))
    if builder is None:
        raise ValueError(f"algorithm {name!r} does not implement {collective.value}; "
                         f"use one of {', '.join(supported(collective))}")
    return builder(world_size, 0 if root is None else root, nodes, pipeline)
