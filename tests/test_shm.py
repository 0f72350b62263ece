"""The shared-memory transport (collectives.shm) on gloo worlds of one host."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from tests.harness import _free_port

SLOT = 4096  # small slots: every size below crosses slot and ring boundaries


@pytest.mark.parametrize("size", [2, 3, 4])
def test_ring_exchange_every_size_and_dtype(pool, size):
    for problems in pool.run(size, "tests.shm_cases:ring_exchange", SLOT, 4, timeout=60):
        assert problems == []


@pytest.mark.parametrize("size", [2, 3])
def test_many_outstanding_messages_match_in_posting_order(pool, size):
    for problems in pool.run(size, "tests.shm_cases:many_outstanding", 40, SLOT, 3, timeout=60):
        assert problems == []


@pytest.mark.parametrize("size", [2, 4])
def test_waiting_sends_before_receives_does_not_deadlock(pool, size):
    numel = 5 * 4 * SLOT  # bfloat16: ten times the ring
    for problems in pool.run(size, "tests.shm_cases:all_pairs_sends_first", numel, SLOT, 4, timeout=60):
        assert problems == []


@pytest.mark.parametrize("size", [3, 4])
def test_local_and_remote_peers_in_one_transport(pool, size):
    for problems in pool.run(size, "tests.shm_cases:mixed_local", 3000, timeout=60):
        assert problems == []


@pytest.mark.parametrize("size", [2, 3, 4])
def test_collectives_on_shared_memory(pool, size):
    algos = ("ring", "tree", "halving_doubling", "direct")
    # tiny slots and segments (many pieces per transfer), then the default geometry with a large count
    for problems in pool.run(size, "tests.shm_cases:collectives", algos, [1, 1000 * size + 3], 1024, 2, 512,
                             timeout=60):
        assert problems == []
    for problems in pool.run(size, "tests.shm_cases:collectives", ("ring", "direct"), [250_000 * size + 5],
                             1 << 20, 4, timeout=60):
        assert problems == []


def test_waiting_on_gloo_keeps_shared_memory_moving(pool):
    for problems in pool.run(3, "tests.shm_cases:progress_during_gloo_wait", 50_000, timeout=60):
        assert problems == []


def test_size_mismatch_names_peer_and_both_sizes(pool):
    msgs = pool.run(2, "tests.shm_failure_cases:size_mismatch", timeout=60)
    assert msgs[0] == ""
    assert "rank 0" in msgs[1] and "100 bytes" in msgs[1] and "200 bytes" in msgs[1], msgs[1]
    assert "no error" not in msgs[1]


def test_silent_peer_times_out_naming_it(pool):
    timeout = 2.0
    results = pool.run(3, "tests.shm_failure_cases:silent_peer", timeout, timeout=60)
    assert results[1:] == ["silent", "silent"]
    took, peer, msg = results[0].split("|", 2)
    assert timeout <= float(took) < timeout + 2, results[0]
    assert peer == "1" and "rank 1" in msg and "receive" in msg, msg


def test_closed_peer_raises_at_once_even_with_a_forked_child_alive(pool):
    child_s = 2.0
    results = pool.run(2, "tests.shm_failure_cases:closed_peer", child_s, timeout=60)
    assert results[1] == "closed"
    took, msgs = results[0].split("|", 1)
    assert float(took) < child_s / 2, results[0]
    recv_msg, send_msg = msgs.split("\n")
    for m in (recv_msg, send_msg):
        assert "no error" not in m and "rank 1" in m and "closed" in m, m


def test_receive_from_a_sender_that_finished_and_closed(pool):
    for problems in pool.run(2, "tests.shm_failure_cases:early_close", timeout=60):
        assert problems == []


def test_bad_setup_raises_on_every_rank(pool):
    for problems in pool.run(3, "tests.shm_failure_cases:bad_setup", timeout=60):
        assert problems == []


@pytest.mark.parametrize("size", [2, 4])
def test_nothing_left_in_dev_shm_and_close_releases_fds(pool, size):
    for problems in pool.run(size, "tests.shm_failure_cases:leftovers", timeout=60):
        assert problems == []


def test_dead_peer_raises_connection_error():
    from tests.shm_failure_cases import death_worker

    ctx = mp.get_context("spawn")
    port = _free_port()
    parent, child = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=death_worker, args=(r, port, child if r == 0 else None), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    child.close()
    try:
        assert parent.poll(60), "rank 0 reported nothing"
        took, msg = parent.recv()
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert procs[1].exitcode == 3
    assert took < 10, (took, msg)
    assert "rank 1" in msg and "closed" in msg, msg



def test_communicators_use_shared_memory_and_fall_back_to_gloo_when_it_is_unavailable(pool):
    for r in pool.run(3, "tests.shm_cases:communicator_transports", None, timeout=60):
        assert r == {"collectives": "ShmTransport", "p2p": "TorchTransport", "right": True, "warnings": []}, r
    for r in pool.run(3, "tests.shm_cases:communicator_transports", "0", timeout=60):  # slots must be >= 1
        assert r["collectives"] == "TorchTransport" and r["right"], r
        assert len(r["warnings"]) == 1 and "shared memory between local ranks is unavailable" in r["warnings"][0], r
