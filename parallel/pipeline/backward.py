"""A stage's backward in two passes: the input's gradient first, the weights' after it is sent.

[Note: split backward] In 1F1B's steady state, stage i runs B(k-1) and
F(k+1) between its F(k) and its B(k), while the activation of micro-batch k
travels to stage i+1, which runs F(k) and B(k), and B(k)'s input gradient
travels back. With transfers of c seconds that loop is F + B + 2c against
stage i's F + B: every slot of the schedule stretches by 2c, and with it the
bubble (on 4 x H200, 16 MiB activations took c = 70 us one way: 0.2 ms
of every 8.6 ms slot, 2% of the step at m = 16; torch's Schedule1F1B pays
the same).

Only the input gradient travels, though, and for layers such as Linear it is
half of the backward's work: dX = dY W; the weight gradient dW = dY^T X is
needed by no one until the optimiser step. So a stage's backward runs in two
passes (as the zero-bubble schedules of Qi et al. 2023 split B and W):

1. ``torch.autograd.backward`` of the stage's output into the stage's input
   and into the outputs (a tensor, or the tensors of a tuple) of every call
   of a module that holds parameters, recorded by forward hooks while the
   stage ran forward; their weight gradients are not computed (nothing
   asked for depends on them);
2. after the runtime has posted the input gradient's send, for each such
   call, last first, ``torch.autograd.backward`` of its outputs with the
   gradients from pass 1, restricted to its parameters: dW alone, from the
   same dY and X, with the same kernels. A parameter belongs to the nearest
   recorded module among the one holding it and that one's ancestors
   (MultiheadAttention uses its out_proj's weight without calling out_proj:
   the attention's call takes it).

A call waits for pass 2 only if its weight gradients follow from its
outputs' gradients directly: between them lie views, additions and the
operations that take the weights (Linear's addmm, or matmul and bias add on
3-D input; LayerNorm; convolutions). MultiheadAttention's in_proj weight is
reached from its output only back through the whole attention, which pass 2
would run again: measured on 2 x H200 (8 TransformerEncoderLayers of 1024
over 256 tokens), deferring it made 1F1B up to 6% slower than the one-pass
backward (0.96x torch's Schedule1F1B against 1.01-1.02x); taking it in pass 1,
1.03x. Such a call's parameters get their gradients in pass 1 (they are
asked for there too), so its backward runs once, as before.

The loop above becomes F + B_input + 2c against F + B_input + B_weight: the
transfers hide behind the weight gradients. The drain of every schedule
shortens the same way. The stages' programs, the simulator's grids and the
peak activations are unchanged. Memory: the recorded outputs live from the
forward to the backward, which costs only where autograd would not keep
them anyway (a Linear's output that feeds a residual addition); pass 1 keeps
the graph's saved tensors until pass 2 (which follows at once) instead of
freeing them node by node; and each deferred output gradient dY waits for
pass 2, released one by one as it goes: about one micro-batch's module
outputs, once, per stage. Stages that cannot split record nothing.

Pass 2 is exact only if every deferred parameter reaches the stage's output
through the recorded outputs of the call it belongs to. Before a stage's
first split backward its autograd graph is walked to check that (a parameter
used outside the module that holds it, a module run under reentrant
checkpointing, an output that is not a tensor or a tuple of them...); a
stage that fails the check, and the first stage (no input gradient to send),
runs the one-pass backward.
The verdict is kept per stage: the graph is assumed to keep its structure
from step to step, as the agreed shapes assume ([Note: agreed shapes] in
pipe.py).

It is on for CUDA devices: there the transfers run beside the kernels that
compute dW. On CPU ranks the same cores do both, and pass 2's extra autograd
runs (one per recorded call) cost host time: on this project's 2-core
machine, 2 gloo ranks, the split left the step time where it was for
Linear stacks and slowed a small transformer by 10-20%. So CPU ranks keep
the one-pass backward unless ``TOPOCOMM_PIPELINE_SPLIT_BACKWARD=1``
(``=0`` turns it off everywhere).

Pass 2 is several autograd runs, one per call, and a data-parallel wrapper
takes the end of a run for the end of a backward (DataParallel reduces its
buckets there, as DDP does). The rank's last backward of the step, which the
wrapper given to ``Pipeline.set_data_parallel`` reduces, runs inside the
wrapper's ``one_backward()`` (DataParallel's: the buckets left are reduced
when both passes are done); without one it runs in one pass, as does
every backward of a stage whose parameters carry gradient hooks that the
pipeline was not told about.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn


def enabled(device: torch.device | None = None) -> bool:
    """``TOPOCOMM_PIPELINE_SPLIT_BACKWARD``: 1 on, 0 off; unset (or "auto"): on for CUDA devices only."""
    value = os.environ.get("TOPOCOMM_PIPELINE_SPLIT_BACKWARD", "auto").strip().lower()
    if value in ("", "auto"):
        return device is not None and device.type == "cuda"
    if value not in ("0", "1"):
        raise ValueError(f"TOPOCOMM_PIPELINE_SPLIT_BACKWARD: expected 0, 1 or auto, got {value!r}")
    return value == "1"


class SplitBackward:
    """Forward hooks that record parameter-holding modules' outputs, and the two backward passes."""

    def __init__(self, stages: dict[int, nn.Module]) -> None:
        self.recording: list[tuple[nn.Module, object]] | None = None
        self.verdict: dict[int, tuple[bool, ...] | None] = {}  # stage -> _deferrable()'s answer
        self.params = {s: list(m.parameters()) for s, m in stages.items()}
        # id(parameter) -> the module holding it, then that module's ancestors within the stage
        self.holders: dict[int, list[nn.Module]] = {}
        for module in stages.values():
            parent = {child: mod for mod in module.modules() for child in mod.children()}
            for mod in module.modules():
                direct = list(mod.parameters(recurse=False))
                if not direct:
                    continue
                mod.register_forward_hook(self._record)
                chain, m = [], mod
                while m is not None:
                    chain.append(m)
                    m = parent.get(m)
                for p in direct:
                    self.holders.setdefault(id(p), chain)

    def hooked(self, stage: int) -> bool:
        """Whether a parameter of ``stage`` has gradient hooks (a data-parallel wrapper's, say)."""
        return any(getattr(p, "_post_accumulate_grad_hooks", None) for p in self.params.get(stage, ()))

    def _record(self, mod: nn.Module, args, output) -> None:
        if self.recording is not None:
            self.recording.append((mod, output))

    def forward(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list]:
        """Run ``fn`` (one stage's forward) and return its result with the recorded (module, output)s."""
        self.recording = []
        try:
            return fn(), self.recording
        finally:
            self.recording = None

    def _plan(self, stage: int, records: list) -> list[tuple[list[torch.Tensor], list]] | None:
        """Per recorded call: its output tensors that have a graph, and the parameters whose weight gradient
        it gives (each parameter goes to the nearest recorded module among its holder and the holder's
        ancestors: MultiheadAttention's out_proj, whose forward never runs, goes to the attention). None
        when an output is neither a tensor nor a tuple or list of them."""
        called = {id(mod) for mod, _ in records}
        mine: dict[int, list] = {}
        for p in self.params.get(stage, ()):
            owner = next((m for m in self.holders.get(id(p), ()) if id(m) in called), None)
            if owner is not None:
                mine.setdefault(id(owner), []).append(p)
        plan = []
        for mod, output in records:
            outs = [output] if isinstance(output, torch.Tensor) else (
                list(output) if isinstance(output, (tuple, list)) else None)
            if outs is None:
                return None
            plan.append(([t for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None],
                         mine.get(id(mod), [])))
        return plan

    def input_grad(self, stage: int, out: torch.Tensor, grad: torch.Tensor, inp: torch.Tensor,
                   records: list | None) -> tuple[torch.Tensor | None, Callable[[], None] | None]:
        """Pass 1 when the stage may split: (the input's gradient, pass 2 to call later). Else (``records``
        None: the caller rules the split out) the one-pass backward: (the input's gradient, None)."""
        plan = self._plan(stage, records) if records is not None and enabled(out.device) else None
        if plan is not None and stage not in self.verdict:
            self.verdict[stage] = _deferrable(out, inp, plan, self.params.get(stage, ()))
        later = self.verdict.get(stage) if plan is not None else None
        if later is None or len(later) != len(plan) or not any(later):
            torch.autograd.backward(out, grad)
            return inp.grad, None
        deferred = [(outs, ps) for (outs, ps), lat in zip(plan, later) if lat]
        now = [p for (_, ps), lat in zip(plan, later) if not lat for p in ps if p.requires_grad]
        ys = list({id(y): y for outs, _ in deferred for y in outs}.values())
        # the deferred calls' output gradients land in their .grad; the other calls' weights get theirs now
        torch.autograd.backward(out, grad, inputs=[inp, *ys, *list({id(p): p for p in now}.values())],
                                retain_graph=True)
        dys = {id(y): y.grad for y in ys}
        for y in ys:
            y.grad = None
        pending = [(outs, [dys[id(y)] for y in outs], ps) for outs, ps in deferred]
        del dys

        def weights() -> None:
            while pending:  # last module first, as one backward would; each dY is dropped once used
                outs, grads, params = pending.pop()
                params = [p for p in params if p.requires_grad]
                pairs = [(y, dy) for y, dy in zip(outs, grads) if dy is not None]
                if pairs and params:
                    torch.autograd.backward([y for y, _ in pairs], [dy for _, dy in pairs], inputs=params,
                                            retain_graph=True)
                    for y, _ in pairs:
                        y.grad = None

        return inp.grad, weights


_VIEWS = {"TBackward", "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "ExpandBackward",
          "UnsqueezeBackward", "SqueezeBackward", "PermuteBackward", "TransposeBackward", "AliasBackward",
          "ToCopyBackward"}


_PASSTHROUGH = {"AddBackward", "SubBackward"}  # their gradient goes on unchanged: nothing to compute


def _kind(node) -> str:
    return type(node).__name__.rstrip("0123456789")


def _view(node) -> bool:
    return _kind(node) in _VIEWS


def _param_edge(node, want: set[int]) -> bool:
    """Whether ``node`` is a parameter of ``want`` (an AccumulateGrad), or views of one."""
    while node is not None and _view(node):
        nxt = [f for f, _ in node.next_functions if f is not None]
        node = nxt[0] if len(nxt) == 1 else None
    return node is not None and id(getattr(node, "variable", None)) in want


def _direct(outs: list, ps: list, stops: set) -> bool:
    """Whether the weight gradients of ``ps`` come straight from ``outs``' gradients: between an output and
    a parameter there are only views, additions, and the operations that take the parameters (Linear's
    addmm, or its matmul and bias add; LayerNorm's; a convolution), and each of those passes a gradient on
    only to a parameter. Otherwise computing them in pass 2 would repeat work of pass 1 (MultiheadAttention:
    from its output back through the attention to in_proj)."""
    if not outs or not ps:
        return False
    want = {id(p) for p in ps}
    starts = {y.grad_fn for y in outs}
    order = list(_walk(starts, stops - starts))  # the graph below the outputs, short of other calls' outputs
    reach = {n for n in order if id(getattr(n, "variable", None)) in want}
    grown = True
    while grown:  # the nodes from which a parameter of ps is reached: what pass 2 runs
        grown = False
        for n in reversed(order):
            if n not in reach and (n not in stops or n in starts) and any(f in reach for f, _ in n.next_functions):
                reach.add(n)
                grown = True
    for n in reach:
        if getattr(n, "variable", None) is not None or _view(n) or _kind(n) in _PASSTHROUGH:
            continue
        if any(f in reach and not _param_edge(f, want) for f, _ in n.next_functions):
            return False  # an operation whose gradient for something other than a parameter pass 2 needs
    return True


def _deferrable(out: torch.Tensor, inp: torch.Tensor, plan: list, params) -> tuple[bool, ...] | None:
    """Which recorded calls can take their weight gradients in pass 2 (``_direct``), or None when the stage
    cannot split at all ([Note: split backward]). The parameters of the others are computed in pass 1.
    A stage splits only if every trainable parameter (``params``) is in ``out``'s graph: one that is not
    reached at all may be used behind a custom autograd Function (reentrant checkpointing computes its
    parameters' gradients inside its own backward). A deferred call's parameters must be reached only
    through its outputs, and no deferred output may lie in the graph of another that takes gradients for
    the same weights (a module applied twice in a row): pass 2 from the later one would flow on into the
    earlier and count it twice."""
    if out.grad_fn is None or not plan:
        return None
    stops = {y.grad_fn for outs, _ in plan for y in outs}
    later = tuple(_direct(outs, ps, stops) for outs, ps in plan)
    owners: dict = {}  # the grad_fn of a deferred output -> ids of the parameters it takes gradients for
    now = {id(inp)}  # leaves pass 1 may reach anywhere: the input, the parameters it computes
    for (outs, ps), lat in zip(plan, later):
        if lat:
            for y in outs:
                owners.setdefault(y.grad_fn, set()).update(id(p) for p in ps)
        else:
            now.update(id(p) for p in ps)
    reached = _leaves([out.grad_fn], owners)
    if not reached <= now:
        return None  # a parameter reached without passing through a recorded call that takes it
    for node, allowed in owners.items():
        found = _leaves([f for f, _ in node.next_functions], owners)
        if not found <= allowed | now:
            return None
        reached |= found
    for node, mine in owners.items():  # pass 2 from node would flow on into another output of the same weights
        shared = {other for other, theirs in owners.items() if other is not node and theirs & mine}
        if shared and _reaches(node, shared):
            return None
    if not {id(p) for p in params if p.requires_grad} <= reached:
        return None
    return later


def _walk(start, stop=frozenset()):
    """Every autograd node reachable from the nodes ``start``, once each; a node in ``stop`` is yielded but
    not gone through."""
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        if node not in stop:
            todo.extend(f for f, _ in node.next_functions)


def _reaches(start, targets) -> bool:
    return any(node in targets for node in _walk(f for f, _ in start.next_functions))


def _leaves(start, stop) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad nodes) reachable from ``start`` without entering ``stop``."""
    found = set()
    for node in _walk(start, stop):
        var = getattr(node, "variable", None)
        if var is not None:
            found.add(id(var))
    return found
