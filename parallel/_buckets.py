"""Gradient buckets: flat gradient storage per bucket, and the hooks that hand each bucket over once it is full.

DataParallel all-reduces each bucket; ZeRO stage 2 can reduce-scatter it. The machinery is the same:

    layout = assign_buckets(params, bucket_bytes=25 << 20, first_bucket_bytes=1 << 20)
    grads = GradBuckets(params, layout, on_ready=launch, on_finish=wait_all)
    grads.sync = False        # next backward only accumulates (no_sync)
    ...
    grads.rebuild(assign_buckets(params, 25 << 20, 1 << 20, order=grads.ready_order))

[Note: gradient views] Every parameter's ``.grad`` is a view into its bucket's
flat buffer, so gradients exist once. The post-accumulate-grad hook moves a
gradient that autograd allocated itself (``.grad`` was None, or was replaced)
into the view and sets ``.grad`` to the view; later backward passes accumulate
into the view in place. A synchronised backward therefore leaves the reduced
gradient in ``.grad`` with no copy out of the bucket.

[Note: bucket order] Buckets are handed over (``on_ready``) strictly in index
order, in every synchronised backward, on every rank: bucket k goes once all
parameters of buckets 0..k got their gradient, or at the end of backward. Two
ranks whose gradients arrive in different orders, or whose parameters are
used differently, still issue the same sequence of collectives, so they never
deadlock or pair the wrong buckets.

[Note: batched adoption] After ``zero_grad(set_to_none=True)`` autograd
allocates every gradient anew. In a synchronised backward the hook only
notes such a gradient; once every parameter of its bucket has its gradient
(or when the bucket is handed over at the end of backward), all of the
bucket's noted gradients are copied into their views with one batched copy
(``torch._foreach_copy_``: one launch per bucket instead of one copy and one
Python call per parameter, on the host's path through backward) and
``.grad`` becomes the view. Giving every parameter its zeroed view before
backward instead would save the copy but cost more memory traffic (a fill,
then an accumulation that reads two operands and writes one, against a copy
that reads one and writes one); measured on 4 x H200 it was no faster
(0.984x DDP either way, before the buckets closed as DDP's do). A no_sync
backward copies at once, so it never holds a second copy of more than one
gradient.

[Note: missing gradients] At the end of a synchronised backward, a parameter
whose hook did not fire in it is settled before its bucket goes: ``.grad``
None -> its slot is zero-filled (a zero contribution) and its index is
listed in ``missing``; a ``.grad`` that is not the view -> copied into the
view; the view itself (accumulated under no_sync, or kept by
``zero_grad(set_to_none=False)``) -> sent as it is, as torch DDP does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch


def streamed_algorithm(comm, op: str, t: torch.Tensor, wire: torch.dtype | None = None) -> str:
    """The algorithm for one asynchronous bucket collective of ``op`` over ``t`` (its input), sent as
    ``wire`` (default: its own dtype): the cost model's pick for back-to-back calls ([Note: streamed
    calls] in collectives/model.py), the same on every rank."""
    dtype = wire or t.dtype
    return comm.plan(op, t.numel() * dtype.itemsize, dtype, streamed=True).algorithm


@dataclasses.dataclass(eq=False)
class Bucket:
    """One flat buffer holding the gradients of ``params`` (same dtype and device) at ``offsets``.

    ``flat``: ``numel`` elements of parameter gradients, then ``tail_numel`` for the owner (last bucket only),
    then zeros up to a multiple of GradBuckets' ``align``.
    """

    index: int
    params: tuple[int, ...]   # indices into GradBuckets.params
    offsets: tuple[int, ...]  # element offset of each parameter's gradient in flat
    numel: int                # elements that belong to parameters
    flat: torch.Tensor
    tail_numel: int = 0

    @property
    def grads(self) -> torch.Tensor:
        """The parameter part of ``flat``."""
        return self.flat[:self.numel]

    @property
    def tail(self) -> torch.Tensor:
        """Extra elements after the gradients, reduced along with them (empty except on the last bucket)."""
        return self.flat[self.numel:self.numel + self.tail_numel]


def assign_buckets(params: Sequence[torch.Tensor], bucket_bytes: int, first_bucket_bytes: int,
                   order: Sequence[int] | None = None) -> list[list[int]]:
    """Parameter indices grouped into buckets, walking ``order`` (default: reverse parameter order).

    A bucket holds one dtype on one device. As in torch DDP, a parameter joins the open bucket and the
    bucket closes once it holds at least its cap: ``first_bucket_bytes`` for the first bucket of each
    (dtype, device), so communication starts early, ``bucket_bytes`` after that. So a bucket can pass its
    cap by its last parameter (on 4 GPUs a 25 MiB cap over 24 MiB weight matrices gives 9 buckets of two
    where closing before the cap gave 18 of one: half the launches and waits on the host). Buckets are
    listed in the order they fill up (by the position in ``order`` of their last parameter).
    """
    n = len(params)
    order = list(range(n - 1, -1, -1)) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(n)):
        raise ValueError(f"order: expected a permutation of range({n}), got {order}")
    open_: dict[tuple, tuple[list[int], int]] = {}
    count: dict[tuple, int] = {}
    closed: list[tuple[int, list[int]]] = []
    last: dict[tuple, int] = {}
    for pos, i in enumerate(order):
        p = params[i]
        key = (p.dtype, p.device)
        nbytes = p.numel() * p.element_size()
        members, size = open_.get(key, ([], 0))
        members, size = members + [i], size + nbytes
        cap = first_bucket_bytes if count.get(key, 0) == 0 else bucket_bytes
        if size >= cap:
            closed.append((pos, members))
            count[key] = count.get(key, 0) + 1
            members, size = [], 0
        open_[key] = (members, size)
        last[key] = pos
    closed += [(last[key], members) for key, (members, _) in open_.items() if members]
    return [members for _, members in sorted(closed, key=lambda c: c[0])]


def relayout(values: Sequence[torch.Tensor], old: Sequence[Bucket], new: Sequence[Bucket]) -> list[torch.Tensor]:
    """Per-bucket tensors laid out like ``old[k].grads`` (e.g. error-feedback residuals), moved to ``new``'s layout."""
    src = {}
    for b, v in zip(old, values):
        for i, off in zip(b.params, b.offsets):
            src[i] = (v, off)
    out = []
    for b in new:
        dtype, device = values[0].dtype if values else b.flat.dtype, b.flat.device
        t = torch.zeros(b.numel, dtype=dtype, device=device)
        ends = list(b.offsets[1:]) + [b.numel]
        for i, off, end in zip(b.params, b.offsets, ends):
            v, o = src[i]
            t[off:end].copy_(v[o:o + end - off])
        out.append(t)
    return out


class GradBuckets:
    """Gradients of ``params`` kept in buckets; hooks hand each bucket to ``on_ready`` when it is full.

    ``on_ready(bucket)``: once per bucket in every synchronised backward, in bucket order ([Note: bucket
    order]); the bucket's gradients (and ``tail``) are final. It runs inside backward, on autograd's thread.
    ``on_finish()``: once at the end of every synchronised backward, after the last ``on_ready``, before
    ``backward()`` returns. Neither runs in a backward with ``sync`` False: gradients just accumulate.
    ``tail``: extra elements appended to the last bucket's buffer for the owner's use.
    ``align``: every bucket's ``flat`` is zero-padded to a multiple of it (e.g. the world size, to reduce-scatter).
    ``names``: parameter names for error messages.
    """

    def __init__(self, params: Sequence[torch.Tensor], layout: Sequence[Sequence[int]], *,
                 on_ready: Callable[[Bucket], None], on_finish: Callable[[], None], tail: int = 0,
                 align: int = 1, names: Sequence[str] | None = None) -> None:
        self.params = list(params)
        self.names = list(names) if names is not None else [f"parameter {i}" for i in range(len(self.params))]
        self.on_ready, self.on_finish, self.tail_numel, self.align = on_ready, on_finish, tail, max(1, align)
        self.sync = True          # whether the next backward hands buckets over
        self.ready_order: list[int] = []  # parameter indices, in the order their hooks fired in the last backward
        self.missing: list[int] = []      # parameters zero-filled in the current/last synchronised backward
        self.copied = 0                   # gradients copied into their bucket (autograd allocated them)
        self.copy_calls = 0               # batched copies that did it ([Note: batched adoption])
        self._loose: list[list[int]] = []  # per bucket: parameters whose gradient waits to be copied in
        self.buckets: list[Bucket] = []
        self._views: list[torch.Tensor] = []
        self._bucket_of: list[int] = []
        self._in_backward = False
        self._spanning = False  # inside spanning(): the end of an autograd run is not the end of the backward
        self._syncing = False
        self._fired: list[bool] = []
        self._pending: list[int] = []
        self._next = 0
        self._build(layout)
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook_for(i)) for i, p in enumerate(self.params)]

    # -- layout ----------------------------------------------------------------

    def _build(self, layout: Sequence[Sequence[int]]) -> None:
        flat_layout = sorted(i for members in layout for i in members)
        if flat_layout != list(range(len(self.params))):
            raise ValueError("layout: every parameter index must appear in exactly one bucket")
        buckets, views, bucket_of = [], [None] * len(self.params), [0] * len(self.params)
        for k, members in enumerate(layout):
            if not members:
                raise ValueError(f"layout: bucket {k} is empty")
            first = self.params[members[0]]
            offsets, numel = [], 0
            for i in members:
                p = self.params[i]
                if p.dtype != first.dtype or p.device != first.device:
                    raise ValueError(f"layout: bucket {k} mixes {first.dtype} on {first.device} with "
                                     f"{self.names[i]} ({p.dtype} on {p.device})")
                offsets.append(numel)
                numel += p.numel()
            extra = self.tail_numel if k == len(layout) - 1 else 0
            padded = -(-(numel + extra) // self.align) * self.align
            flat = torch.zeros(padded, dtype=first.dtype, device=first.device)
            for i, off in zip(members, offsets):
                views[i] = flat[off:off + self.params[i].numel()].view(self.params[i].shape)
                bucket_of[i] = k
            buckets.append(Bucket(k, tuple(members), tuple(offsets), numel, flat, extra))
        self.buckets, self._views, self._bucket_of = buckets, views, bucket_of

    def layout(self) -> list[list[int]]:
        return [list(b.params) for b in self.buckets]

    def view(self, i: int) -> torch.Tensor:
        """Parameter ``i``'s gradient view in its bucket."""
        return self._views[i]

    def rebuild(self, layout: Sequence[Sequence[int]]) -> list[Bucket]:
        """New buckets (e.g. in gradient-ready order); current gradients move along. Returns the old buckets."""
        if self._in_backward:
            raise RuntimeError("GradBuckets.rebuild: cannot change buckets during backward")
        old = self.buckets
        self._build(layout)
        for p, v in zip(self.params, self._views):
            if p.grad is not None:
                v.copy_(p.grad)
                p.grad = v
        return old

    def remove(self) -> None:
        """Unregister the hooks; gradients stay where they are."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- backward --------------------------------------------------------------

    def _hook_for(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self._on_grad(i, p)
        return hook

    def _is_view(self, i: int, g: torch.Tensor | None) -> bool:
        v = self._views[i]
        return g is v or (g is not None and g.data_ptr() == v.data_ptr() and g.shape == v.shape
                          and g.dtype == v.dtype and g.device == v.device)

    def _loose_grad(self, i: int, p: torch.Tensor) -> bool:
        """Whether ``p.grad`` is not yet the bucket view (a dense gradient autograd allocated)."""
        g = p.grad
        if self._is_view(i, g):
            return False
        if g.layout is not torch.strided:
            raise RuntimeError(f"{self.names[i]}: sparse gradients are not supported (use a dense embedding)")
        return True

    def _adopt(self, i: int, p: torch.Tensor) -> None:
        """Make ``p.grad`` the bucket view now ([Note: gradient views])."""
        if self._loose_grad(i, p):
            self._views[i].copy_(p.grad)
            p.grad = self._views[i]
            self.copied += 1
            self.copy_calls += 1

    def _note(self, i: int, p: torch.Tensor) -> None:
        """Copy ``p.grad`` into its view when its bucket goes ([Note: batched adoption])."""
        loose = self._loose[self._bucket_of[i]]
        if self._loose_grad(i, p) and i not in loose:
            loose.append(i)

    def _adopt_bucket(self, k: int) -> None:
        # re-checked now: a hook after ours may have replaced or dropped a noted gradient since
        loose = [i for i in self._loose[k] if self.params[i].grad is not None
                 and self._loose_grad(i, self.params[i])]
        self._loose[k] = []
        if loose:
            torch._foreach_copy_([self._views[i] for i in loose], [self.params[i].grad for i in loose])
            for i in loose:
                self.params[i].grad = self._views[i]
            self.copied += len(loose)
            self.copy_calls += 1

    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        if not self._in_backward:
            self._start_backward()
        self.ready_order.append(i)
        if not self._syncing:
            self._adopt(i, p)
            return
        self._note(i, p)
        k = self._bucket_of[i]
        if self._fired[i]:
            if k < self._next:
                raise RuntimeError(f"{self.names[i]} received a gradient after its bucket was reduced in this "
                                   "backward (reentrant checkpointing or a hook calling backward?)")
            return
        self._fired[i] = True
        self._pending[k] -= 1
        if self._pending[k] == 0:  # complete: copy in now, so gradients exist twice only until then
            self._adopt_bucket(k)
        self._advance()

    def _start_backward(self) -> None:
        self._in_backward = True
        self._syncing = self.sync
        self.ready_order = []
        if self._syncing:
            self.missing = []
            self._fired = [False] * len(self.params)
            self._pending = [len(b.params) for b in self.buckets]
            self._loose = [[] for _ in self.buckets]
            self._next = 0
        if not self._spanning:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    @contextlib.contextmanager
    def spanning(self) -> Iterator[None]:
        """The autograd runs inside make one backward: it ends when the block does (without an error), not
        at the end of the first run. A pipeline stage's backward in two passes needs it ([Note: split
        backward] in parallel/pipeline/backward.py)."""
        if self._in_backward or self._spanning:
            raise RuntimeError("spanning(): a backward is already under way")
        self._spanning = True
        try:
            yield
        finally:
            self._spanning = False
        if self._in_backward:
            self._end_backward()

    def _advance(self) -> None:
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            b = self.buckets[self._next]
            self._next += 1
            self._adopt_bucket(b.index)
            self.on_ready(b)

    def _end_backward(self) -> None:
        self._in_backward = False
        if not self._syncing:
            return
        for b in self.buckets[self._next:]:
            for i in b.params:
                if not self._fired[i]:
                    self._settle(i)
        for k in range(self._next, len(self.buckets)):
            self._pending[k] = 0
        self._advance()
        self.on_finish()

    def _settle(self, i: int) -> None:
        """A parameter without a gradient in this backward ([Note: missing gradients])."""
        p = self.params[i]
        if p.grad is None:
            self._views[i].zero_()
            self.missing.append(i)
        else:
            self._note(i, p)

    def check_idle(self) -> None:
        """Raise if a backward started handing buckets over and never finished (an error inside backward)."""
        if self._in_backward:
            self._in_backward = False
            raise RuntimeError("the previous backward did not finish (it raised, or autograd's end-of-backward "
                               "callback never ran); gradients of that step are incomplete")
