"""The public API on gloo: bad inputs, async handles, point-to-point, debug mismatch checks."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("size", [1, 3])
def test_bad_inputs_fail_fast_and_name_the_argument(pool, size):
    for problems in pool.run(size, "tests.cases:bad_inputs"):
        assert problems == []


@pytest.mark.parametrize("size", [1, 2, 4])
def test_async_and_point_to_point(pool, size):
    for problems in pool.run(size, "tests.cases:async_and_p2p"):
        assert problems == []


@pytest.mark.parametrize("size", [1, 2])
def test_failed_async_call_raises_exactly_once(pool, size):
    for problems in pool.run(size, "tests.cases:async_errors"):
        assert problems == []


@pytest.mark.parametrize("size", [1, 3])
def test_closed_communicator_refuses_calls(pool, size):
    for problems in pool.run(size, "tests.cases:closed_communicator"):
        assert problems == []


def test_debug_mode_reports_mismatched_calls_on_every_rank(pool):
    messages = pool.run(3, "tests.cases:mismatch", env={"TOPOCOMM_DEBUG": "1"}, timeout=60)
    for msg in messages:
        assert "mismatch" in msg
        assert "rank 0" in msg and "rank 1" in msg and '"count": 11' in msg


@pytest.mark.parametrize("size", [2, 3, 4])
def test_compressed_all_reduce_within_bound_and_identical(pool, size):
    for algo in ("ring", "direct", "halving_doubling", "tree", "native"):
        for wire in ("bf16", "fp16"):
            results = pool.run(size, "tests.cases:compressed", algo, 1000 * size + 4 * size, wire)
            assert all(p == "" for p, _ in results), (algo, wire, results)
            if algo != "native":  # ours: every rank ends with the same rounded values
                assert len({d for _, d in results}) == 1, (algo, wire)


def test_silent_peer_raises_within_timeout_naming_it(pool):
    timeout = 2.0
    env = {"TOPOCOMM_TEST_WORLD": "dead-peer"}  # its own world: the unmatched transfers spoil it
    try:
        results = pool.run(3, "tests.cases:dead_peer", timeout, env=env, timeout=60)
    finally:
        pool.discard(3, env)
    assert results[2] == "silent"
    for r in (0, 1):
        took, msg = results[r].split("|", 1)
        assert float(took) < timeout + 3, results[r]
        assert "stopped answering" in msg
    # in the ring rank 0 receives from rank 2, so rank 0 must name it
    assert "rank 2" in results[0].split("|", 1)[1]


def test_pipeline_depth_from_the_environment(pool):
    """TOPOCOMM_PIPELINE=K: pipelined schedules run in K parts (and stay right), others are unchanged;
    a value that is not a whole number >= 1 is refused, naming the variable."""
    for r in pool.run(3, "tests.cases:forced_pipeline", "5", timeout=60):
        assert r == {"depths": {"broadcast/ring": 5, "all_gather/ring": 1}, "broadcast": True, "all_reduce": True}
    for bad in ("0", "two"):
        for r in pool.run(3, "tests.cases:forced_pipeline", bad, timeout=60):
            assert "TOPOCOMM_PIPELINE" in r["error"] and repr(bad) in r["error"]
