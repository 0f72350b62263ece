"""DataParallel: bucketed gradient averaging overlapped with backward, a drop-in for torch DDP.

    model = parallel.DataParallel(module)              # comm: collectives.default_communicator()
    loss_fn(model(x), y).backward()                    # gradients averaged over ranks when backward returns
    with model.no_sync():                              # accumulate without communication
        loss_fn(model(x0), y0).backward()

At wrap time rank 0's parameters and buffers are copied to every rank, and the
ranks check that they wrap the same parameters (names, shapes, dtypes).
Gradients live in flat buckets (``_buckets.py``): reverse parameter order, a
first bucket of at least 1 MiB, then of at least ``bucket_mb`` (closed, as in DDP,
by the parameter that reaches the cap); after the first synchronised backward
the buckets are rebuilt once in the order gradients actually became ready
(rank 0's order, broadcast, so every rank builds the same buckets). Each
bucket's asynchronous all-reduce starts from the gradient hooks as soon as
the bucket is full; the communicator's cost model picks each one's algorithm.

[Note: buffers] Like DDP's default (broadcast_buffers=True), rank 0's buffers
(BatchNorm running statistics, ...) are broadcast at the start of every
forward that will be synchronised: grad mode on and not inside ``no_sync()``.
Between such forwards every rank updates its own buffers; evaluation forwards
(no grad) use the local ones. All buffers travel as one byte buffer.

[Note: unused parameters] No flag needed (DDP's find_unused_parameters is
automatic): a parameter without a gradient on a rank contributes zeros there
([Note: missing gradients] in _buckets.py), so the average is the gradient of
the global batch even when ranks take different branches. Afterwards
``.grad`` is the averaged view on every rank if any rank had a gradient, and
stays None on every rank if none had (so optimizers skip it, as in one
process). That needs to know which ranks had one: one element per parameter
rides at the end of the last bucket (1 where ``.grad`` is defined), so it
costs no extra collective; only a rank that had missing gradients reads it
(on CUDA that read synchronises with the device, as DDP's does).

[Note: compression] compress="bf16"/"fp16": each bucket is scaled by 1/world
in float32, cast to the 16-bit type, summed, and cast back (pre-scaling keeps
fp16 sums from overflowing). Each element of the result is within a few
roundings of the 16-bit type (relative 2^-8 for bf16, 2^-11 for fp16) of the
float32 average. With ``error_feedback=True`` each rank keeps what its cast
lost and adds it to the next step's gradient, so the rounding errors do not
accumulate over steps (the sum of reduced gradients stays within one rounding
of the true sum).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ._buckets import Bucket, GradBuckets, assign_buckets, relayout, streamed_algorithm

FIRST_BUCKET_BYTES = 1 << 20  # DDP's first bucket: communication starts early in backward
_BROADCAST_CHUNK_BYTES = 256 << 20
_COMPRESS = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class DataParallel(nn.Module):
    """Data parallelism over ``comm``'s ranks; gradients are averaged during backward.

    ``bucket_mb``: bucket size cap in MiB. ``algorithm``: the all-reduce algorithm ("auto": the cost model's
    choice per bucket). ``compress``: None, "bf16" or "fp16" ([Note: compression]). ``error_feedback``: carry
    each step's compression error to the next. ``broadcast_buffers``: [Note: buffers].
    """

    def __init__(self, module: nn.Module, comm=None, bucket_mb: float = 25.0, algorithm: str = "auto",
                 compress: str | None = None, *, error_feedback: bool = False, broadcast_buffers: bool = True) -> None:
        super().__init__()
        import collectives

        self.module = module
        self.comm = comm if comm is not None else collectives.default_communicator()
        if not isinstance(bucket_mb, (int, float)) or isinstance(bucket_mb, bool) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb: expected a positive number, got {bucket_mb!r}")
        _check_algorithm(algorithm)
        self.algorithm = algorithm
        self.bucket_bytes = max(1, int(bucket_mb * (1 << 20)))
        self.first_bucket_bytes = min(FIRST_BUCKET_BYTES, self.bucket_bytes)
        self.broadcast_buffers = broadcast_buffers
        self._reduce = _make_reduction(compress, error_feedback, self.comm.size)

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        params = [p for _, p in named]
        self._check_devices(module)
        self._check_same_model(module)
        with torch.no_grad():
            self._broadcast([t.data for t in module.parameters()] + list(module.buffers()))
        self._grads = GradBuckets(params, assign_buckets(params, self.bucket_bytes, self.first_bucket_bytes),
                                  on_ready=self._launch, on_finish=self._finish, tail=len(params),
                                  names=self._names)
        self._waits: list[Callable[[], None]] = []
        self._picks: dict[tuple[int, torch.dtype], str] = {}
        self._require_sync = True
        self._rebuilt = False

    # -- the public surface ------------------------------------------------------

    def forward(self, *args, **kwargs):
        self._grads.check_idle()
        sync = self._require_sync
        self._grads.sync = sync
        if self.broadcast_buffers and sync and torch.is_grad_enabled():
            with torch.no_grad():
                self._broadcast(list(self.module.buffers()))
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes of forwards run inside accumulate into ``.grad`` without communicating."""
        old, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = old

    def set_requires_gradient_sync(self, requires: bool) -> None:
        """Whether the next backward all-reduces (FSDP2's name). ``no_sync()`` decides this per forward;
        callers that run several forwards before their backwards, such as a pipeline schedule, decide
        it per backward with this instead."""
        self._grads.sync = bool(requires)

    def one_backward(self) -> contextlib.AbstractContextManager[None]:
        """The backward passes run inside count as one: buckets still go as they fill, and what is left
        is reduced when the block exits, not at the end of the first autograd run. For callers that
        compute one backward in several autograd runs (a pipeline stage's input gradient, then its weight
        gradients)."""
        return self._grads.spanning()

    def bucket_plans(self) -> list[dict]:
        """Per bucket: parameters (names), bytes on the wire, dtype, and the algorithm the cost model picks."""
        out = []
        for b in self._grads.buckets:
            dtype = self._reduce.wire_dtype(b.flat.dtype)
            out.append({"bucket": b.index, "params": [self._names[i] for i in b.params],
                        "bytes": b.flat.numel() * dtype.itemsize, "dtype": str(dtype).replace("torch.", ""),
                        "algorithm": self._algorithm(b)})
        return out

    def _algorithm(self, bucket: Bucket) -> str:
        """The bucket's all-reduce algorithm: the cost model's pick for a stream of asynchronous
        bucket reductions ([Note: streamed calls] in collectives/model.py), the same on every rank."""
        if self.algorithm != "auto":
            return self.algorithm
        key = (bucket.flat.numel(), bucket.flat.dtype)
        algo = self._picks.get(key)
        if algo is None:  # depends only on the bucket's size and dtype: ask the communicator once, not per step
            algo = self._picks[key] = streamed_algorithm(self.comm, "all_reduce", bucket.flat,
                                                         self._reduce.wire_dtype(bucket.flat.dtype))
        return algo

    # -- backward: launch per bucket, finish at the end ---------------------------

    def _launch(self, bucket: Bucket) -> None:
        if bucket is self._grads.buckets[-1]:
            self._write_defined_flags(bucket.tail)
        self._waits.append(self._reduce.launch(self.comm, bucket, self._algorithm(bucket)))

    def _write_defined_flags(self, tail: torch.Tensor) -> None:
        """1 per parameter whose ``.grad`` is defined here ([Note: unused parameters])."""
        missing = self._grads.missing
        if not missing:
            tail.fill_(1)
            return
        flags = torch.ones(tail.numel(), dtype=tail.dtype)
        flags[missing] = 0
        if tail.is_cuda:
            tail.copy_(flags.pin_memory(), non_blocking=True)
        else:
            tail.copy_(flags)

    def _finish(self) -> None:
        waits, self._waits = self._waits, []
        for wait in waits:
            wait()
        if not self.comm.device.type == "cuda":
            self.comm.synchronize()  # everything is done; lets the communicator drop its finished futures
        missing = self._grads.missing
        if missing:
            anyone = self._grads.buckets[-1].tail[missing].tolist()
            for i, flag in zip(missing, anyone):
                if flag > 0:
                    self._grads.params[i].grad = self._grads.view(i)
        if not self._rebuilt:
            self._rebuilt = True
            self._rebuild_in_ready_order()

    def _rebuild_in_ready_order(self) -> None:
        """Rebuild buckets once, in rank 0's gradient-ready order of the first synchronised backward."""
        n = len(self._grads.params)
        seen = dict.fromkeys(self._grads.ready_order)
        order = list(seen) + [i for i in range(n - 1, -1, -1) if i not in seen]
        t = torch.tensor(order, dtype=torch.int64, device=self.comm.device)
        self.comm.broadcast(t, src=0)
        order = t.tolist()
        layout = assign_buckets(self._grads.params, self.bucket_bytes, self.first_bucket_bytes, order)
        if layout != self._grads.layout():
            old = self._grads.rebuild(layout)
            self._reduce.relayout(old, self._grads.buckets)

    # -- wrap time ------------------------------------------------------------------

    def _check_devices(self, module: nn.Module) -> None:
        want = self.comm.device
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.device != want:
                raise ValueError(f"module: {name} is on {t.device}, but the communicator's {self.comm.backend} "
                                 f"backend needs {self.comm.device} (move the module first)")

    def _check_same_model(self, module: nn.Module) -> None:
        """Every rank must wrap the same parameters and buffers; names the first differences otherwise."""
        desc = [[kind, n, list(t.shape), str(t.dtype).replace("torch.", ""), bool(t.requires_grad)]
                for kind, items in (("parameter", module.named_parameters()), ("buffer", module.named_buffers()))
                for n, t in items]
        digest = hashlib.sha1(json.dumps(desc).encode()).hexdigest()
        if len(set(self.comm.exchange_json(digest))) == 1:
            return
        every = self.comm.exchange_json(desc)
        lines = []
        for r, d in enumerate(every[1:], start=1):
            if d == every[0]:
                continue
            diffs = [(a, b) for a, b in zip(every[0], d) if a != b][:3]
            if len(d) != len(every[0]):
                lines.append(f"  rank {r} has {len(d)} parameters and buffers, rank 0 has {len(every[0])}")
            lines += [f"  rank 0: {a[0]} {a[1]} {a[2]} {a[3]}{'' if a[4] else ' (frozen)'}; "
                      f"rank {r}: {b[0]} {b[1]} {b[2]} {b[3]}{'' if b[4] else ' (frozen)'}" for a, b in diffs]
        raise ValueError("module: ranks wrap different models:\n" + "\n".join(lines))

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of ``tensors`` onto every rank, as bytes, in chunks of at most 256 MiB."""
        tensors = [t for t in tensors if t.numel() > 0]
        if not tensors or self.comm.size == 1:
            return
        chunk: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if chunk and size + nbytes > _BROADCAST_CHUNK_BYTES:
                self._broadcast_chunk(chunk)
                chunk, size = [], 0
            chunk.append(t)
            size += nbytes
        self._broadcast_chunk(chunk)

    def _broadcast_chunk(self, tensors: list[torch.Tensor]) -> None:
        as_bytes = [t.detach().reshape(-1).view(torch.uint8) if t.is_contiguous() else
                    t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        flat = _flatten_dense_tensors(as_bytes)
        self.comm.broadcast(flat, src=0)
        if self.comm.rank != 0:
            for t, b in zip(tensors, _unflatten_dense_tensors(flat, as_bytes)):
                # copy as bytes: b's offset in flat need not be aligned for t's dtype
                dst = t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
                dst.view(-1).view(torch.uint8).copy_(b)
                if dst is not t:
                    t.copy_(dst)


# -- bucket reductions: plain average, or through a 16-bit cast ----------------------


class _Average:
    """Average the bucket in place."""

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def launch(self, comm, bucket: Bucket, algorithm: str) -> Callable[[], None]:
        return comm.all_reduce(bucket.flat, "avg", algorithm, async_op=True).wait

    def relayout(self, old: list[Bucket], new: list[Bucket]) -> None:
        pass


class _CastAverage:
    """Scale by 1/world, cast to ``dtype``, sum, cast back; optionally with error feedback ([Note: compression])."""

    def __init__(self, dtype: torch.dtype, error_feedback: bool, world: int) -> None:
        self.dtype, self.error_feedback, self.world = dtype, error_feedback, world
        self.residuals: dict[int, torch.Tensor] = {}  # bucket index -> what its last cast lost (float32)

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype

    def launch(self, comm, bucket: Bucket, algorithm: str) -> Callable[[], None]:
        grads = bucket.grads
        if self.error_feedback:
            res = self.residuals.get(bucket.index)
            if res is not None:
                grads.add_(res.to(grads.dtype))
        low = (bucket.flat.float() * (1.0 / self.world)).to(self.dtype)
        if self.error_feedback:
            self.residuals[bucket.index] = grads.float() - low[:bucket.numel].float() * self.world
        handle = comm.all_reduce(low, "sum", algorithm, async_op=True)

        def finish() -> None:
            handle.wait()
            bucket.flat.copy_(low)
        return finish

    def relayout(self, old: list[Bucket], new: list[Bucket]) -> None:
        if self.residuals:
            values = [self.residuals.get(b.index, torch.zeros(b.numel, device=b.flat.device)) for b in old]
            self.residuals = dict(enumerate(relayout(values, old, new)))


def _make_reduction(compress: str | None, error_feedback: bool, world: int) -> _Average | _CastAverage:
    if compress is None:
        if error_feedback:
            raise ValueError("error_feedback: only applies with compress='bf16' or 'fp16'")
        return _Average()
    dtype = _COMPRESS.get(compress) if isinstance(compress, str) else None
    if dtype is None:
        raise ValueError(f"compress: expected None, 'bf16' or 'fp16', got {compress!r}")
    return _CastAverage(dtype, bool(error_feedback), world)


def _check_algorithm(algorithm: object) -> None:
    from collectives import algorithms
    from collectives.schedule import Collective

    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm: expected a name, got {type(algorithm).__name__}")
    supported = algorithms.supported(Collective.ALL_REDUCE)
    if algorithm != "auto" and algorithm not in supported:
        raise ValueError(f"algorithm: {algorithm!r} is not an all-reduce algorithm; use 'auto' or one of "
                         f"{', '.join(supported)}")
