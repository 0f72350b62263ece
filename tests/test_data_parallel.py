"""parallel.DataParallel on gloo: training equals one process on the global batch.

The worker cases are in dp_cases.py. Bucket caps of a few hundred bytes (or 4
bytes: one parameter per bucket) make many buckets out of a tiny model, so the
ordering, rebuilding and finishing of buckets is exercised on every step.
Tests are ordered so world sizes 1..4 each start once (the pool keeps three).
"""

from __future__ import annotations


import pytest
import torch

import collectives
from parallel._buckets import GradBuckets, assign_buckets
from tests.harness import run_torchrun


# -- the bucket machinery, in one process ------------------------------------------


def _params(*shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]


def test_assign_buckets_caps_dtypes_and_order():
    ps = _params((10,), (30,), (5,), (100,), (7,)) + _params((4,), dtype=torch.float64)
    # reverse order 5, 4, 3, 2, 1, 0 (bytes 32 (float64), 28, 400, 20, 120, 40); the first float32 bucket
    # closes at 40 bytes or more, later ones at 160 or more (so a bucket can pass its cap, as in DDP)
    assert assign_buckets(ps, 160, 40) == [[5], [4, 3], [2, 1, 0]]
    assert assign_buckets(ps, 1 << 20, 1 << 20) == [[5], [4, 3, 2, 1, 0]]
    assert assign_buckets(ps, 160, 40, order=[0, 1, 2, 3, 4, 5]) == [[0], [1, 2, 3], [4], [5]]
    assert assign_buckets(ps, 1, 1) == [[5], [4], [3], [2], [1], [0]]  # every parameter fills a bucket
    with pytest.raises(ValueError, match="order"):
        assign_buckets(ps, 160, 40, order=[0, 0, 1, 2, 3, 4])


def test_grad_buckets_hand_over_in_order_and_settle_missing_gradients():
    a, b, c, unused = _params((3,), (4,), (5,), (2,))
    ready: list[tuple[int, list[float]]] = []
    finished = []
    grads = GradBuckets([a, b, c, unused], [[2], [1, 3], [0]], tail=1, align=4,
                        on_ready=lambda bk: ready.append((bk.index, bk.flat.tolist())),
                        on_finish=lambda: finished.append(list(grads.missing)))
    assert [bk.flat.numel() for bk in grads.buckets] == [8, 8, 4]  # 5, 4+2, 3+1 tail, padded to 4
    (a.sum() + 2 * b.sum() + 3 * c.sum()).backward()
    assert [i for i, _ in ready] == [0, 1, 2] and finished == [[3]]
    assert grads.copied == 3 and grads.copy_calls == 3  # one batched copy per bucket with a new gradient
    assert ready[1][1][:6] == [2.0] * 4 + [0.0, 0.0]  # unused's slot zero-filled
    assert unused.grad is None
    for i, p in enumerate((a, b, c)):
        assert p.grad.data_ptr() == grads.view(i).data_ptr()
    grads.sync = False
    ready.clear()
    (a.sum()).backward()
    assert ready == [] and a.grad.tolist() == [2.0] * 3  # accumulated in the bucket, nothing handed over
    grads.sync = True
    old = grads.rebuild([[0, 1, 2, 3]])
    assert len(old) == 3 and a.grad.tolist() == [2.0] * 3 and a.grad.data_ptr() == grads.buckets[0].flat.data_ptr()
    grads.remove()


def test_grad_buckets_keep_accumulated_views_when_a_bucket_mate_was_reset():
    # a and b share a bucket; b's .grad is dropped between backwards while a's view keeps accumulating
    a, b = _params((3,), (2,))
    a.data.fill_(1.0)
    b.data.fill_(1.0)
    sent = []
    grads = GradBuckets([a, b], [[0, 1]], on_ready=lambda bk: sent.append(bk.flat.tolist()), on_finish=lambda: None)
    (2 * a.sum() + b.sum()).backward()
    b.grad = None
    (5 * a.sum()).backward()
    assert a.grad.tolist() == [7.0] * 3 and b.grad is None
    assert sent[-1] == [7.0] * 3 + [0.0] * 2
    grads.sync = False  # no_sync with only a used, then a synchronised backward with only a
    a.grad, b.grad = None, None
    a.sum().backward()
    grads.sync = True
    a.sum().backward()
    assert a.grad.tolist() == [2.0] * 3 and sent[-1] == [2.0] * 3 + [0.0] * 2
    grads.remove()


def test_grad_buckets_copy_a_complete_bucket_in_before_earlier_ones_go():
    # bucket 0's parameter gets no gradient, so nothing is handed over until the end of backward; the
    # complete bucket 1 is copied in as soon as its last gradient arrives, and a gradient dropped by a
    # later hook before that is treated as missing instead of failing
    a, b, c = _params((3,), (4,), (2,))
    sent = []
    grads = GradBuckets([a, b, c], [[0], [1, 2]], on_ready=lambda bk: sent.append(bk.index),
                        on_finish=lambda: None)
    seen = []
    b.register_post_accumulate_grad_hook(lambda p: seen.append(grads.copy_calls))
    c.register_post_accumulate_grad_hook(lambda p: seen.append(grads.copy_calls))
    (2 * b.sum() + 3 * c.sum()).backward()
    assert sent == [0, 1] and grads.copy_calls == 1 and seen[-1] == 1  # copied in before backward ended
    assert b.grad.tolist() == [2.0] * 4 and b.grad.data_ptr() == grads.view(1).data_ptr()
    assert a.grad is None and grads.missing == [0]
    b.grad = c.grad = None
    h = c.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    (2 * b.sum() + 3 * c.sum()).backward()
    assert b.grad.tolist() == [2.0] * 4 and c.grad is None
    h.remove()
    grads.remove()


def test_bad_arguments_name_the_argument(pool):
    for problems in pool.run(1, "tests.dp_cases:bad_arguments"):
        assert problems == []


@pytest.mark.parametrize("size", [1, 2])
def test_error_feedback_keeps_errors_from_accumulating(pool, size):
    for r in pool.run(size, "tests.dp_cases:error_feedback", "bf16"):
        assert r["ef"] < r["plain"] * (0.25 if size == 1 else 0.75)


@pytest.mark.parametrize("size", [1, 2])
def test_one_backward_in_several_autograd_runs(pool, size):
    for r in pool.run(size, "tests.dp_cases:one_backward"):
        assert r["problems"] == []


@pytest.mark.parametrize("size", [1, 2, 3])
def test_unused_parameters(pool, size):
    # unused on some ranks (zero contributions), on all ranks (.grad stays None), with either zero_grad mode
    for set_to_none in (True, False):
        for problems in pool.run(size, "tests.dp_cases:unused", set_to_none):
            assert problems == [], f"set_to_none={set_to_none}"


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_training_matches_one_process_on_the_global_batch(pool, size):
    for opt, bucket_bytes in (("sgd", 4), ("adamw", 300)):
        results = pool.run(size, "tests.dp_cases:train", opt, bucket_bytes)
        for r in results:
            assert r["problems"] == [], (opt, bucket_bytes)
        assert len({r["digest"] for r in results}) == 1, "ranks' parameters are not bitwise identical"
        assert all(algo in collectives.ALGORITHMS for algo in results[0]["plans"])
        # after zero_grad(set_to_none=True) every gradient is copied into its bucket, one batched copy
        # per bucket ([Note: batched adoption])
        for r in results:
            assert all(c == (r["nparams"], r["nbuckets"][k > 0]) for k, c in enumerate(r["copies"])), r
        # Rebuilt once from rank 0's gradient-ready order, identically everywhere: head (registered
        # first, used last) now fills the first bucket.
        layouts = {repr(r["layouts"]) for r in results}
        assert len(layouts) == 1
        initial, rebuilt = results[0]["layouts"]
        names = results[0]["names"]
        assert names[initial[0][0]].startswith("body.")
        assert names[rebuilt[0][0]].startswith("head.")
        if bucket_bytes == 4:
            assert len(rebuilt) == len(names)  # one parameter per bucket


def test_default_communicator(pool):
    for r in pool.run(2, "tests.dp_cases:train", "sgd", 300, steps=2, default_comm=True):
        assert r["problems"] == []


@pytest.mark.parametrize("size", [2, 3])
def test_no_sync_accumulates_locally_then_averages(pool, size):
    for problems in pool.run(size, "tests.dp_cases:no_sync", "adamw", 100):
        assert problems == []


@pytest.mark.parametrize("size", [2, 3])
def test_buffers_come_from_rank_0(pool, size):
    for problems in pool.run(size, "tests.dp_cases:buffers"):
        assert problems == []


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("compress", ["bf16", "fp16"])
def test_compressed_gradients_within_stated_tolerance(pool, size, compress):
    # Each element within (world + 1) * eps * mean_r |g_r| of the float32 average (eps: 2^-8 bf16, 2^-11 fp16).
    results = pool.run(size, "tests.dp_cases:compression", compress)
    for r in results:
        assert r["worst"] <= 1.0
    assert len({r["grad_digest"] for r in results}) == 1


def test_ranks_wrapping_different_models_fail_with_names(pool):
    for msg in pool.run(3, "tests.dp_cases:wrong_models"):
        assert "ranks wrap different models" in msg
        assert "head.weight [3, 10]" in msg and "rank 2: parameter head.weight [3, 11]" in msg


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_nccl_two_gpus():
    proc = run_torchrun("tests.dp_cases", 2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
