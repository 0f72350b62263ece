"""Executing one rank's lowered pipeline program.

The runtime walks the program once per step. A batch of communication
actions is posted together (links.py: a group per neighbouring pair of
ranks where it can); a compute action first waits for
the receive it consumes; sends are waited for at the end of the step
([Note: communication semantics] in schedule.py). Receive buffers come from
the boundary specs agreed before the first step, so no shape ever travels at
run time, and are pooled (``_BufferPool``): a warm step allocates none.

[Note: gradient scaling] The last stage back-propagates ``loss_i / m`` for
each of the m micro-batches, so the gradients accumulated in ``.grad`` are
the mean over micro-batches: with a mean-reduced loss and equal micro-batches
that is the gradient of the loss on the whole batch, as in single-process
training.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .backward import SplitBackward
from .backward import enabled as split_enabled
from .links import Links
from .schedule import B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, PipelineSchedule, batches


@dataclass(frozen=True, slots=True)
class Spec:
    """Shape and dtype of a tensor crossing a stage boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> Spec:
        return cls(tuple(t.shape), t.dtype)

    def to_json(self) -> list:
        return [list(self.shape), str(self.dtype).removeprefix("torch.")]

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)


@dataclass
class StepStats:
    """What the last step did on this rank."""

    peak_activations: dict[int, int] = field(default_factory=dict)  # stage -> most micro-batches held
    # with profiling on: (action, start, end) in seconds from the step's start, compute actions only
    timeline: list[tuple[Action, float, float]] = field(default_factory=list)
    wall_s: float = 0.0
    split_backwards: int = 0  # backwards run in two passes ([Note: split backward] in backward.py)
    # with profiling on: split backward -> when its first pass (the input gradient) ended, as in timeline
    first_pass: dict[Action, float] = field(default_factory=dict)

    @property
    def compute_s(self) -> float:
        return sum(end - start for _, start, end in self.timeline)


class _Timer:
    """Start/end times of compute actions: host clock on CPU, CUDA events on GPU (no synchronisation)."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.marks: list[tuple[Action, object, object]] = []
        self.mids: dict[Action, object] = {}
        self.origin = self._now() if enabled else None

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self):
        return self._now() if self.enabled else None

    def stop(self, a: Action, started) -> None:
        if self.enabled:
            self.marks.append((a, started, self._now()))

    def mid(self, a: Action) -> None:
        if self.enabled:
            self.mids[a] = self._now()

    def first_pass(self) -> dict[Action, float]:
        """After timeline(): the marks of mid()."""
        if self.cuda:
            return {a: self.origin.elapsed_time(m) / 1e3 for a, m in self.mids.items()}
        return {a: m - self.origin for a, m in self.mids.items()}

    def timeline(self) -> list[tuple[Action, float, float]]:
        if self.cuda:
            torch.cuda.current_stream().synchronize()
            return [(a, self.origin.elapsed_time(s) / 1e3, self.origin.elapsed_time(e) / 1e3)
                    for a, s, e in self.marks]
        return [(a, s - self.origin, e - self.origin) for a, s, e in self.marks]


class _BufferPool:
    """Receive buffers by (shape, dtype), reused within and across steps.

    A buffer comes back once its contents are consumed: an activation after its stage's backward (autograd
    has freed what it saved from it), a gradient after the backward it fed. So a step allocates nothing
    once warm, and the pool holds no more than the peak number of tensors in flight.
    """

    def __init__(self) -> None:
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def get(self, spec: Spec, device: torch.device) -> torch.Tensor:
        stack = self.free.get((spec.shape, spec.dtype))
        return stack.pop() if stack else spec.empty(device)

    def put(self, t: torch.Tensor) -> None:
        t.grad = None
        t.requires_grad_(False)
        self.free.setdefault((tuple(t.shape), t.dtype), []).append(t)


class _StepState:
    """The tensors in flight during one step on one rank."""

    def __init__(self, stages: dict[int, nn.Module], loss_dtype: torch.dtype, device: torch.device) -> None:
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}  # stage input, kept for its gradient
        self.records: dict[tuple[int, int], list] = {}  # parameter-holding modules' outputs (backward.py)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # stage output with its graph (the loss, last)
        self.handoff: dict[tuple, torch.Tensor] = {}  # same-rank neighbour stages: activation or gradient
        self.to_send: dict[Action, torch.Tensor] = {}  # input gradients waiting for their SEND_B
        self.received: dict[Action, tuple[torch.Tensor, object]] = {}
        self.sent: list[tuple[torch.Tensor, object]] = []  # send buffers stay alive until waited for
        self.split: set[int] = set()  # stages whose backward may run in two passes ([Note: split backward])
        self.held = {s: 0 for s in stages}
        self.stats = StepStats(peak_activations=dict(self.held))
        self.loss_sum = torch.zeros((), dtype=loss_dtype, device=device)


class Runtime:
    """Runs ``schedule.ranks[rank]`` (lowered) over this rank's ``stages`` with ``comm``'s point-to-point."""

    def __init__(self, comm, schedule: PipelineSchedule, stages: dict[int, nn.Module],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.comm, self.schedule, self.stages, self.loss_fn = comm, schedule, stages, loss_fn
        self.pool = _BufferPool()
        self.split = SplitBackward({s: m for s, m in stages.items() if s > 0})  # [Note: split backward]
        self.items = batches(schedule.ranks[comm.rank])
        self.last = schedule.nstages - 1
        self.last_backward = max((k for k, it in enumerate(self.items) if isinstance(it, Action) and it.kind is B),
                                 default=-1)
        me = comm.rank
        self.links = Links(comm, [schedule.rank_of(t) for s in stages for t in (s - 1, s + 1)
                                  if 0 <= t < schedule.nstages and schedule.rank_of(t) != me],
                           [(schedule.rank_of(s), schedule.rank_of(s + 1)) for s in range(schedule.nstages - 1)])

    def _local(self, a: int, b: int) -> bool:
        return self.schedule.rank_of(a) == self.schedule.rank_of(b)

    def run(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], specs: Sequence[Spec],
            profile: bool = False, grad_sync: Callable[[bool], None] | None = None,
            one_backward: Callable[[], contextlib.AbstractContextManager] | None = None,
            ) -> tuple[torch.Tensor, StepStats]:
        """One step over micro-batches ``xs``/``ys``; ``specs[s]`` is stage s's output (the last: the loss).

        ``grad_sync(flag)`` runs before every backward: True only before this rank's last one, so a
        data-parallel wrapper reduces gradients once per step. The wrapper's ``one_backward()``, if given,
        lets that backward run in two passes too ([Note: split backward]). Returns the sum of the
        micro-batch losses (zero off the last stage) and the step's stats.
        """
        st = _StepState(self.stages, specs[-1].dtype, self.comm.device)
        # [Note: split backward]: the stages that send an input gradient to another rank, where no gradient
        # hook that the pipeline was not told about takes the end of an autograd run for the end of a backward
        st.split = {s for s in self.stages if s > 0 and not self._local(s - 1, s) and split_enabled(self.comm.device)
                    and (grad_sync is not None or not self.split.hooked(s))}
        timer = _Timer(self.comm.device, profile)
        wall = time.perf_counter()
        early = -1  # a batch posted between a backward's two passes
        for k, item in enumerate(self.items):
            if k == early:
                continue
            if not isinstance(item, Action):
                self._post(item, st, specs)
            elif item.kind is F:
                inp = self._forward_input(item, xs, st)  # waits for its receive outside the timed span
                started = timer.start()
                self._forward(item, inp, ys, st)
                timer.stop(item, started)
            else:
                syncing = grad_sync is not None and k == self.last_backward
                if grad_sync is not None:
                    grad_sync(syncing)
                grad = self._output_grad(item, len(xs), st)
                started = timer.start()
                may_split = item.stage in st.split and (not syncing or one_backward is not None)
                with one_backward() if syncing and may_split else contextlib.nullcontext():
                    weights = self._backward(item, grad, st, may_split)
                    if weights is not None:  # [Note: split backward]: send the input gradient, then dW
                        st.stats.split_backwards += 1
                        timer.mid(item)
                        if k + 1 < len(self.items) and not isinstance(self.items[k + 1], Action):
                            self._post(self.items[k + 1], st, specs)
                            early = k + 1
                        weights()
                timer.stop(item, started)
                if item.stage < self.last and not self._local(item.stage, item.stage + 1):
                    self.pool.put(grad)  # stream-ordered on CUDA: a later receive into it waits for this backward
        for _, h in st.sent:
            h.wait()
        st.stats.wall_s = time.perf_counter() - wall
        if profile:
            st.stats.timeline = timer.timeline()
            st.stats.first_pass = timer.first_pass()
        return st.loss_sum, st.stats

    def _forward_input(self, a: Action, xs, st: _StepState) -> torch.Tensor:
        s, i = a.stage, a.microbatch
        if s == 0:
            return xs[i]
        if self._local(s - 1, s):
            t = st.handoff.pop((s, i))
        else:
            t, h = st.received.pop(Action(s, RECV_F, i))
            h.wait()
        return t.requires_grad_(t.is_floating_point() or t.is_complex())

    def _forward(self, a: Action, inp: torch.Tensor, ys, st: _StepState) -> None:
        s, i = a.stage, a.microbatch
        if s in st.split:  # the recorded outputs stay alive until the backward: only where it may split
            out, st.records[(s, i)] = self.split.forward(lambda: self.stages[s](inp))
        else:
            out = self.stages[s](inp)
        if s == self.last:
            out = self.loss_fn(out, ys[i])
            st.loss_sum += out.detach().reshape(())
        elif self._local(s, s + 1):
            st.handoff[(s + 1, i)] = out.detach()
        if s > 0:
            st.inputs[(s, i)] = inp
        st.outputs[(s, i)] = out
        st.held[s] += 1
        st.stats.peak_activations[s] = max(st.stats.peak_activations[s], st.held[s])

    def _output_grad(self, a: Action, m: int, st: _StepState) -> torch.Tensor:
        s, i = a.stage, a.microbatch
        if s == self.last:
            return torch.full_like(st.outputs[(s, i)], 1.0 / m)  # [Note: gradient scaling]
        if self._local(s, s + 1):
            return st.handoff.pop((s, i, "grad"))
        t, h = st.received.pop(Action(s, RECV_B, i))
        h.wait()
        return t

    def _backward(self, a: Action, grad: torch.Tensor, st: _StepState, may_split: bool):
        """B(a): the one-pass backward (None), or its first pass, returning the second ([Note: split
        backward]); either way the input's gradient is ready to send or hand over."""
        s, i = a.stage, a.microbatch
        out = st.outputs.pop((s, i))
        records = st.records.pop((s, i), None)
        st.held[s] -= 1
        weights = g = None
        if s == 0:
            if out.requires_grad:
                torch.autograd.backward(out, grad)
        else:
            inp = st.inputs.pop((s, i))
            if out.requires_grad:
                g, weights = self.split.input_grad(s, out, grad, inp, records if may_split else None)
            g = g if g is not None else torch.zeros_like(inp)
            if self._local(s - 1, s):
                st.handoff[(s - 1, i, "grad")] = g
                return weights
            st.to_send[Action(s, SEND_B, i)] = g
            if weights is None:
                self.pool.put(inp)  # a received activation: its graph is gone
                return None
            second = weights

            def weights() -> None:
                second()
                self.pool.put(inp)  # only now: pass 2 reads it (dW = dY^T X)
        return weights

    def _post(self, batch: tuple[Action, ...], st: _StepState, specs: Sequence[Spec]) -> None:
        sends, recvs, recv_actions = [], [], []
        dev = self.comm.device
        for a in batch:
            r = self.schedule.rank_of(a.stage + (1 if a.kind in (SEND_F, RECV_B) else -1))
            if a.kind is SEND_F:
                sends.append((r, st.outputs[(a.stage, a.microbatch)].detach().contiguous()))
            elif a.kind is SEND_B:
                sends.append((r, st.to_send.pop(a).contiguous()))
            else:
                boundary = a.stage if a.kind is RECV_B else a.stage - 1
                recvs.append((r, self.pool.get(specs[boundary], dev)))
                recv_actions.append(a)
        s_waits, r_waits = self.links.post(sends, recvs)
        st.sent.extend(zip((t for _, t in sends), s_waits))
        for a, (_, t), w in zip(recv_actions, recvs, r_waits):
            st.received[a] = (t, w)
