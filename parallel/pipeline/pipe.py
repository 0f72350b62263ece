"""``Pipeline``: an ``nn.Sequential`` cut into stages over the ranks of a communicator.

    pipe = Pipeline(model, chunks=8, schedule="1f1b", loss_fn=F.mse_loss, comm=mesh["pp"])
    opt = torch.optim.SGD(pipe.module.parameters(), lr=0.1)
    loss = pipe.step(x, y)          # every rank passes the same-shaped x and y
    opt.step(); opt.zero_grad()

Construction, on every rank of ``comm`` alike: build the schedule (checks the
name and the micro-batch count), cut the model (balance), keep this rank's
layers (moved to ``comm.device``) and a meta-device twin of every layer, lower
the schedule and dry-run it, and compare every rank's configuration (one
small all-gather), so ranks that disagree fail at once with a table instead
of hanging later.

[Note: agreed shapes] Before the first step, and whenever the micro-batch
shape or dtype changes, every rank propagates one micro-batch through the
meta twins of all stages (no data, no communication), then the ranks compare
their results in one all-gather: each boundary's shape and dtype is known on
both sides before any activation moves, and a rank fed differently shaped
data raises on every rank instead of hanging.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .lowering import lower
from .runtime import Runtime, Spec, StepStats
from .schedule import PipelineSchedule, build
from .simulate import Simulation, simulate
from .stage import StageModule, check_sequential, measure_times, meta_twin, param_counts, partition, resolve_balance, split


class Pipeline:
    """Pipeline-parallel training of an ``nn.Sequential`` with GPipe, 1F1B or interleaved 1F1B.

    ``chunks``: micro-batches per step (the batch must split evenly). ``schedule``: "gpipe", "1f1b" or
    "interleaved" (``stages_per_rank`` stages on each rank, default 2; ``chunks`` a multiple of the
    ranks). ``loss_fn(output, target)``: a mean-reduced scalar loss. ``balance``: layers per stage
    (a list, one count per stage), "params" (default: even parameter counts) or "time" (even measured
    forward + backward time on ``example``, one micro-batch of input). ``comm``: the pipeline's
    Communicator (default: ``collectives.init()``); pipeline rank r holds stages r, r + p, ...
    """

    def __init__(self, module: nn.Module, chunks: int = 4, schedule: str = "1f1b",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, comm=None,
                 balance: list[int] | str | None = None, *, stages_per_rank: int | None = None,
                 example: torch.Tensor | None = None) -> None:
        if comm is None:
            import collectives

            comm = collectives.init()
        self.comm, self.chunks, self.loss_fn = comm, chunks, loss_fn
        layers = check_sequential(module)
        self._check_same_config(layers, schedule, chunks, stages_per_rank, balance)
        if loss_fn is None or not callable(loss_fn):
            raise ValueError("loss_fn: Pipeline needs a loss function loss_fn(output, target) -> scalar")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks: expected a positive number of micro-batches, got {chunks!r}")
        program = build(schedule, comm.size, chunks, stages_per_rank)
        self.balance = self._balance([m for _, m in layers], program.nstages, balance, example)
        parts = split(layers, self.balance)
        self.stage_ids = program.stages_of(comm.rank)
        self.module = StageModule({s: parts[s] for s in self.stage_ids}).to(comm.device)
        self._twins = [nn.Sequential(OrderedDict((n, meta_twin(m)) for n, m in part)) for part in parts]
        self.schedule: PipelineSchedule = lower(program)
        self.simulation: Simulation = simulate(self.schedule)  # proves it deadlock-free before any byte moves
        self._runtime = Runtime(comm, self.schedule, {s: self.module.stage(s) for s in self.stage_ids}, loss_fn)
        self._specs: list[Spec] | None = None
        self._specs_key: tuple | None = None
        self.profile = False  # record per-action times into ``stats.timeline``
        self.stats = StepStats()
        self.data_parallel: nn.Module | None = None

    @property
    def nstages(self) -> int:
        return self.schedule.nstages

    def _balance(self, layers: list[nn.Module], nstages: int, balance: object,
                 example: torch.Tensor | None) -> list[int]:
        if balance != "time":
            return resolve_balance(layers, nstages, balance)
        if nstages > len(layers):
            resolve_balance(layers, nstages, None)  # raises the clear error
        if example is None:
            raise ValueError("balance='time' needs example=<one micro-batch of input> to time the layers")
        mine = measure_times(layers, example.to(self.comm.device))
        every = self.comm.exchange_json(mine)  # ranks time differently: partition their mean, identically
        return partition([sum(ts) / len(ts) for ts in zip(*every)], nstages)

    def _check_same_config(self, layers: list[tuple[str, nn.Module]], schedule, chunks, stages_per_rank,
                           balance) -> None:
        """Compare the arguments across ranks first, so that no rank fails alone and leaves the rest hanging."""
        mine = {"schedule": repr(schedule), "chunks": repr(chunks), "stages_per_rank": repr(stages_per_rank),
                "balance": balance if isinstance(balance, list) else repr(balance),
                "layers": [n for n, _ in layers], "params": param_counts([m for _, m in layers])}
        self._agree("configuration", mine)

    def _agree(self, what: str, mine: dict) -> None:
        every = self.comm.exchange_json(mine)
        if any(e != every[0] for e in every):
            keys = [k for k in mine if any(e.get(k) != every[0].get(k) for e in every)]
            rows = "\n".join(f"  rank {r}: " + ", ".join(f"{k}={e.get(k)}" for k in keys) for r, e in enumerate(every))
            raise ValueError(f"Pipeline: ranks disagree on the {what}:\n{rows}")

    # -- shapes ----------------------------------------------------------------------

    def _infer_specs(self, x: torch.Tensor, y: torch.Tensor) -> list[Spec]:
        """Each stage's output spec from the meta twins, then the loss's ([Note: agreed shapes])."""
        specs = []
        t = torch.empty(x.shape, dtype=x.dtype, device="meta")
        for s, twin in enumerate(self._twins):
            try:
                with torch.no_grad():
                    t = twin(t)
            except Exception as e:  # noqa: BLE001 - every rank fails alike, with the stage named
                raise RuntimeError(f"Pipeline: cannot infer stage {s}'s output shape on the meta device "
                                   f"({type(e).__name__}: {e})") from e
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Pipeline: stage {s} returns {type(t).__name__}; stages must return one tensor")
            if s < self.nstages - 1 and not t.is_floating_point():
                raise TypeError(f"Pipeline: stage {s} outputs {t.dtype}; activations between stages must be "
                                "floating point (they carry gradients back)")
            specs.append(Spec.of(t))
        specs.append(self._loss_spec(t, y))
        return specs

    def _loss_spec(self, out: torch.Tensor, y: torch.Tensor) -> Spec:
        try:
            loss = self.loss_fn(out, torch.empty(y.shape, dtype=y.dtype, device="meta"))
        except Exception:  # noqa: BLE001 - a loss without meta support: assume the output's dtype
            return Spec((), out.dtype if out.is_floating_point() else torch.float32)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn: expected a scalar tensor (a mean-reduced loss), got "
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        return Spec((), loss.dtype)

    def _ensure_specs(self, x: torch.Tensor, y: torch.Tensor) -> list[Spec]:
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        if key != self._specs_key:
            specs = self._infer_specs(x, y)
            self._agree("micro-batch shapes", {"x": Spec.of(x).to_json(), "y": Spec.of(y).to_json(),
                                              "boundaries": [sp.to_json() for sp in specs]})
            self._specs, self._specs_key = specs, key
        assert self._specs is not None
        return self._specs

    def set_data_parallel(self, wrapper: nn.Module) -> None:
        """Have ``wrapper`` (data parallelism over ``pipe.module``) reduce gradients once per step.

        Before each backward the pipeline calls ``wrapper.set_requires_gradient_sync(flag)`` with True only
        for this rank's last backward of the step (accumulated gradients of every local stage are then
        reduced together). A wrapper with ``one_backward()`` (DataParallel) lets that backward run in two
        passes as well ([Note: split backward] in backward.py); with others it runs in one. Without this,
        a DataParallel around ``pipe.module`` still trains correctly (averaging is linear, so reducing
        after every micro-batch gives the same mean) but moves the gradients once per micro-batch.
        """
        if not callable(getattr(wrapper, "set_requires_gradient_sync", None)):
            raise TypeError(f"wrapper: {type(wrapper).__name__} has no set_requires_gradient_sync(bool)")
        self.data_parallel = wrapper

    # -- the step ----------------------------------------------------------------------

    def _micro_batches(self, name: str, t: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise TypeError(f"{name}: expected a batched tensor, got {type(t).__name__}")
        n = t.shape[0]
        if n % self.chunks:
            raise ValueError(f"{name}: a batch of {n} does not split into {self.chunks} equal micro-batches "
                             f"(chunks={self.chunks})")
        return list(t.to(self.comm.device).split(n // self.chunks))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch; returns the mean micro-batch loss on every rank.

        Gradients accumulate into this rank's parameters as the mean over micro-batches (call
        ``zero_grad`` between steps as usual). Every rank passes ``x`` and ``y`` of the same shapes;
        the first stage reads ``x``, the last ``y``.
        """
        xs, ys = self._micro_batches("x", x), self._micro_batches("y", y)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"y: batch of {y.shape[0]} does not match x's {x.shape[0]}")
        specs = self._ensure_specs(xs[0], ys[0])
        sync = self.data_parallel.set_requires_gradient_sync if self.data_parallel is not None else None
        span = getattr(self.data_parallel, "one_backward", None)
        try:
            loss, self.stats = self._runtime.run(xs, ys, specs, self.profile, sync, span)
        finally:
            if sync is not None:
                sync(True)
        loss /= self.chunks
        if self.comm.size > 1:
            self.comm.broadcast(loss.reshape(1), src=self.schedule.rank_of(self.nstages - 1))
        return loss

    def __repr__(self) -> str:
        return (f"Pipeline(schedule={self.schedule.name!r}, ranks={self.comm.size}, stages={self.nstages}, "
                f"chunks={self.chunks}, balance={self.balance}, rank {self.comm.rank} holds {self.stage_ids})")
