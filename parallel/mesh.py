"""``Mesh``: the ranks of a communicator arranged as a grid, one sub-communicator per axis.

    mesh = Mesh(pp=2, dp=2)            # 4 ranks
    pipe = Pipeline(model, comm=mesh["pp"], ...)
    model = DataParallel(pipe.module, comm=mesh["dp"])

[Note: mesh layout] Axes are laid out row-major in the order they are given:
the first axis is outermost, the last innermost (consecutive ranks). For
``Mesh(pp=2, dp=2)`` rank = pp_index * 2 + dp_index:

    rank  0 1 2 3
    pp    0 0 1 1      mesh["pp"] groups {0, 2} and {1, 3}
    dp    0 1 0 1      mesh["dp"] groups {0, 1} and {2, 3}

so data-parallel replicas are neighbours (same node, fast links: gradient
all-reduces move the most bytes) and pipeline stages stride across nodes
(point-to-point activations are small), Megatron-LM's order. Name the axes in
another order to lay them out differently: ``Mesh(dp=2, pp=2)`` puts pp
innermost.

Every rank creates every group of every axis (torch.distributed.new_group
must be called by all ranks, in one order) but a Communicator only for the
groups it belongs to; building a Communicator is collective over its group.
"""

from __future__ import annotations

import itertools
import math

import torch.distributed as dist


class Mesh:
    def __init__(self, comm=None, **axes: int) -> None:
        if comm is None:
            import collectives

            comm = collectives.init()
        if not axes:
            raise ValueError("Mesh: name at least one axis, e.g. Mesh(pp=2, dp=2)")
        for name, n in axes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name}: expected a positive axis size, got {n!r}")
        if math.prod(axes.values()) != comm.size:
            shape = " x ".join(f"{k}={v}" for k, v in axes.items())
            raise ValueError(f"Mesh: {shape} = {math.prod(axes.values())} ranks, but the communicator has "
                             f"{comm.size}")
        self.comm = comm
        self.names: tuple[str, ...] = tuple(axes)
        self.shape: tuple[int, ...] = tuple(axes.values())
        self.coords: dict[str, int] = dict(zip(self.names, self._unravel(comm.rank)))
        globals_ = [dist.get_global_rank(comm.group, r) if comm.group is not dist.group.WORLD else r
                    for r in range(comm.size)]
        self._comms = {}
        from collectives import Communicator

        timeout = getattr(comm, "timeout", None)
        for axis in self.names:
            mine = None
            for members in self.groups(axis):
                kwargs = {"timeout": timeout} if timeout is not None else {}
                group = dist.new_group([globals_[r] for r in members], **kwargs)
                if comm.rank in members:
                    mine = group
            self._comms[axis] = Communicator(mine, timeout=timeout)

    def _unravel(self, rank: int) -> tuple[int, ...]:
        out = []
        for n in reversed(self.shape):
            rank, c = divmod(rank, n)
            out.append(c)
        return tuple(reversed(out))

    def rank_of(self, **coords: int) -> int:
        """The communicator rank at ``coords`` (every axis named)."""
        missing = set(self.names) - set(coords)
        if missing or set(coords) - set(self.names):
            raise ValueError(f"rank_of: name every axis of {self.names} once, got {sorted(coords)}")
        r = 0
        for name, n in zip(self.names, self.shape):
            c = coords[name]
            if not 0 <= c < n:
                raise ValueError(f"{name}: coordinate {c} is outside 0..{n - 1}")
            r = r * n + c
        return r

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ``axis`` as ranks of the mesh's communicator, in a fixed order."""
        k = self._axis(axis)
        others = [range(n) for i, n in enumerate(self.shape) if i != k]
        out = []
        for rest in itertools.product(*others):
            coords = list(rest)
            members = []
            for c in range(self.shape[k]):
                full = coords[:k] + [c] + coords[k:]
                members.append(self.rank_of(**dict(zip(self.names, full))))
            out.append(members)
        return out

    def _axis(self, axis: str) -> int:
        if axis not in self.names:
            raise KeyError(f"Mesh has no axis {axis!r}; its axes are {', '.join(self.names)}")
        return self.names.index(axis)

    def __getitem__(self, axis: str):
        self._axis(axis)
        return self._comms[axis]

    def size(self, axis: str) -> int:
        return self.shape[self._axis(axis)]

    def __repr__(self) -> str:
        shape = ", ".join(f"{k}={v}" for k, v in zip(self.names, self.shape))
        where = ", ".join(f"{k}={v}" for k, v in self.coords.items())
        return f"Mesh({shape}; rank {self.comm.rank} at {where})"
