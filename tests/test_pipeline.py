"""Pipeline parallelism: the schedule IR (pure, in this process) and training on gloo worker ranks."""

from __future__ import annotations

import pytest

from parallel.pipeline import (Action, Kind, ScheduleError, build, format_schedule, ideal_bubble, lower,
                               parse_schedule, partition, simulate, verify)
from parallel.pipeline.schedule import PipelineSchedule, peer

# -- the IR ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2F0", "0B13", "11SEND_F2", "1RECV_F0", "3SEND_B7", "0RECV_B1"])
def test_action_round_trip(text):
    a = Action.parse(text)
    assert str(a) == text and Action.parse(str(a)) == a


@pytest.mark.parametrize("bad", ["F0", "2X0", "2F", "2SEND0", "a2F0"])
def test_action_parse_rejects(bad):
    with pytest.raises(ValueError, match="cannot parse"):
        Action.parse(bad)


def test_action_fields():
    assert Action.parse("2F0") == Action(2, Kind.F, 0)
    assert Action.parse("3RECV_B1").kind.recv and Action.parse("3SEND_F1").kind.send


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 3, 4, None), ("1f1b", 4, 6, None), ("interleaved", 2, 4, 3)])
@pytest.mark.parametrize("lowered", [False, True])
def test_schedule_text_round_trip(name, p, m, v, lowered):
    s = build(name, p, m, v)
    if lowered:
        s = lower(s)
    assert parse_schedule(format_schedule(s)) == s


GOLDEN_1F1B = """\
# timeline 1f1b ranks=3 stages=3 microbatches=4 steps=12 bubble=0.333
rank | 0   | 1   | 2   | 3   | 4   | 5   | 6   | 7   | 8   | 9   | 10  | 11
0    | 0F0 | 0F1 | 0F2 | -   | -   | 0B0 | 0F3 | 0B1 | -   | 0B2 | -   | 0B3
1    | -   | 1F0 | 1F1 | -   | 1B0 | 1F2 | 1B1 | 1F3 | 1B2 | -   | 1B3 | -
2    | -   | -   | 2F0 | 2B0 | 2F1 | 2B1 | 2F2 | 2B2 | 2F3 | 2B3 | -   | -
"""

GOLDEN_GPIPE = """\
# timeline gpipe ranks=3 stages=3 microbatches=3 steps=10 bubble=0.400
rank | 0   | 1   | 2   | 3   | 4   | 5   | 6   | 7   | 8   | 9
0    | 0F0 | 0F1 | 0F2 | -   | -   | -   | -   | 0B0 | 0B1 | 0B2
1    | -   | 1F0 | 1F1 | 1F2 | -   | -   | 1B0 | 1B1 | 1B2 | -
2    | -   | -   | 2F0 | 2F1 | 2F2 | 2B0 | 2B1 | 2B2 | -   | -
"""

GOLDEN_INTERLEAVED = """\
# timeline interleaved ranks=2 stages=4 microbatches=4 steps=18 bubble=0.111
rank | 0   | 1   | 2   | 3   | 4   | 5   | 6   | 7   | 8   | 9   | 10  | 11  | 12  | 13  | 14  | 15  | 16  | 17
0    | 0F0 | 0F1 | 2F0 | 2F1 | 0F2 | 2B0 | 0F3 | 2B1 | 2F2 | 0B0 | 2F3 | 0B1 | -   | 2B2 | -   | 2B3 | 0B2 | 0B3
1    | -   | 1F0 | 1F1 | 3F0 | 3B0 | 3F1 | 3B1 | 1F2 | 1B0 | 1F3 | 1B1 | 3F2 | 3B2 | 3F3 | 3B3 | 1B2 | 1B3 | -
"""

GOLDEN_LOWERED_1F1B = """\
# pipeline 1f1b ranks=2 stages=2 microbatches=3
rank | 0        | 1        | 2        | 3        | 4        | 5   | 6   | 7        | 8        | 9   | 10       | 11
0    | 0F0      | 0SEND_F0 | 0F1      | 0SEND_F1 | 0RECV_B0 | 0B0 | 0F2 | 0SEND_F2 | 0RECV_B1 | 0B1 | 0RECV_B2 | 0B2
1    | 1RECV_F0 | 1F0      | 1RECV_F1 | 1B0      | 1SEND_B0 | 1F1 | 1B1 | 1RECV_F2 | 1SEND_B1 | 1F2 | 1B2      | 1SEND_B2
"""


@pytest.mark.parametrize("name,p,m,v,golden", [("1f1b", 3, 4, None, GOLDEN_1F1B), ("gpipe", 3, 3, None, GOLDEN_GPIPE),
                                               ("interleaved", 2, 4, 2, GOLDEN_INTERLEAVED)])
def test_golden_timelines(name, p, m, v, golden):
    assert simulate(build(name, p, m, v)).grid() == golden


def test_golden_lowering():
    assert format_schedule(lower(build("1f1b", 2, 3))) == GOLDEN_LOWERED_1F1B


# -- simulator: step counts, bubbles, memory, deadlocks ------------------------------------------


@pytest.mark.parametrize("name,v", [("gpipe", None), ("1f1b", None), ("interleaved", 2), ("interleaved", 3)])
@pytest.mark.parametrize("strict", [True, False])
def test_step_counts_match_theory(name, v, strict):
    """(v m + p - 1) (f + b) steps for every size, under both communication models, for two cost ratios."""
    vv = v or 1
    for p in range(1, 7):
        for m in range(p, 3 * p + 1, p) if name == "interleaved" else range(1, 2 * p + 2):
            for f, b in ((1, 1), (1, 2)):
                sim = simulate(build(name, p, m, v), f, b, strict=strict)
                assert sim.steps == (vv * m + p - 1) * (f + b), (p, m, f, b)
                assert sim.bubble == pytest.approx(ideal_bubble(p, m, vv))


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_peak_activations(p):
    for m in (1, p, 2 * p + 1):
        assert simulate(build("gpipe", p, m)).peak_activations == (m,) * p
        assert simulate(build("1f1b", p, m)).peak_activations == tuple(min(p - i, m) for i in range(p))


def test_interleaved_holds_less_than_gpipe_per_rank():
    p, m, v = 4, 16, 2
    peak = simulate(build("interleaved", p, m, v)).peak_activations
    per_rank = [sum(peak[s] for s in range(r, p * v, p)) for r in range(p)]
    assert max(per_rank) < m * v  # GPipe over the same 8 stages would hold m per stage


def test_naive_lowering_deadlocks_interleaved():
    """Receives placed right before their consumer deadlock interleaved 1F1B on an in-order queue (NCCL)."""
    s = build("interleaved", 2, 4, 2)
    progs = []
    for r, prog in enumerate(s.ranks):
        out = []
        for a in prog:
            st, i = a.stage, a.microbatch
            if a.kind is Kind.F:
                out += [Action(st, Kind.RECV_F, i)] if st > 0 else []
                out += [a] + ([Action(st, Kind.SEND_F, i)] if st < 3 else [])
            else:
                out += [Action(st, Kind.RECV_B, i)] if st < 3 else []
                out += [a] + ([Action(st, Kind.SEND_B, i)] if st > 0 else [])
        progs.append(tuple(out))
    naive = PipelineSchedule("interleaved", 2, 4, 4, tuple(progs))
    verify(naive)
    simulate(naive, strict=False)  # fine where sends are buffered
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(naive, strict=True)


def test_deadlock_is_reported():
    bad = parse_schedule("""# pipeline custom ranks=2 stages=2 microbatches=1
        rank | 0 | 1 | 2 | 3
        0 | 0F0 | 0RECV_B0 | 0B0 | 0SEND_F0
        1 | 1RECV_F0 | 1F0 | 1B0 | 1SEND_B0""")
    with pytest.raises(ScheduleError, match=r"deadlock[\s\S]*rank 0: 0B0 waits for 0RECV_B0"):
        simulate(bad)


def test_fifo_mismatch_is_reported():
    bad = parse_schedule("""# pipeline custom ranks=2 stages=2 microbatches=2
        rank | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9
        0 | 0F0 | 0F1 | 0SEND_F1 | 0SEND_F0 | 0RECV_B0 | 0RECV_B1 | 0B0 | 0B1
        1 | 1RECV_F0 | 1RECV_F1 | 1F0 | 1F1 | 1B0 | 1B1 | 1SEND_B0 | 1SEND_B1""")
    with pytest.raises(ScheduleError, match="sent as 0SEND_F1 but received as 1RECV_F0"):
        verify(bad)


def test_verify_catches_missing_and_misplaced():
    s = build("1f1b", 2, 2)
    missing = PipelineSchedule("x", 2, 2, 2, (s.ranks[0][:-1], s.ranks[1]))
    with pytest.raises(ScheduleError, match="missing"):
        verify(missing)
    swapped = PipelineSchedule("x", 2, 2, 2, (tuple(reversed(s.ranks[0])), s.ranks[1]))
    with pytest.raises(ScheduleError, match="backward after forward"):
        verify(swapped)
    wrong_rank = PipelineSchedule("x", 2, 2, 2, (s.ranks[1], s.ranks[0]))
    with pytest.raises(ScheduleError, match="belongs to rank"):
        verify(wrong_rank)


def test_peer_pairs_match():
    s = lower(build("interleaved", 3, 6, 2))
    for r, prog in enumerate(s.ranks):
        for a in prog:
            if not a.kind.compute:
                pr, other = peer(s, a)
                assert pr != r and other in s.ranks[pr] and peer(s, other) == (r, a)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown 'zigzag'"):
        build("zigzag", 2, 4)
    with pytest.raises(ValueError, match="multiple of the 4 pipeline ranks"):
        build("interleaved", 4, 6)
    with pytest.raises(ValueError, match="stages_per_rank"):
        build("1f1b", 2, 4, 2)
    with pytest.raises(ValueError, match="micro-batches"):
        build("gpipe", 2, 0)


def test_partition():
    assert partition([5, 0] * 4, 4) == [2, 2, 2, 2]  # parameter-free layers spread evenly
    assert partition([10, 1, 1, 1, 1, 10], 3) == [1, 4, 1]
    assert sum(partition([3, 1, 4, 1, 5, 9, 2, 6], 3)) == 8
    with pytest.raises(ValueError, match="only 2 layers"):
        partition([1, 1], 3)


# -- training on worker ranks ------------------------------------------------------------------

EQUIVALENCE = [
    ("1f1b", 1, 2, None), ("interleaved", 1, 3, 4),  # one rank: neighbouring stages hand over in memory
    ("gpipe", 2, 1, None), ("gpipe", 2, 4, None), ("gpipe", 3, 3, None), ("gpipe", 4, 8, None),
    ("1f1b", 2, 2, None), ("1f1b", 2, 5, None), ("1f1b", 3, 2, None), ("1f1b", 3, 6, None), ("1f1b", 4, 8, None),
    ("interleaved", 2, 2, 2), ("interleaved", 2, 4, 3), ("interleaved", 3, 6, 2), ("interleaved", 4, 4, 2),
]


@pytest.mark.parametrize("schedule,world,chunks,v", sorted(EQUIVALENCE, key=lambda c: c[1]))  # one world at a time
def test_training_equals_single_process(pool, schedule, world, chunks, v):
    res = pool.run(world, "tests.pipeline_cases:train_equivalence", schedule, chunks, v)
    names = sorted(n for r in res for n in r["names"])
    assert names == sorted(f"{i}.{k}" for i in range(0, 16, 2) for k in ("weight", "bias"))  # every layer once
    if schedule == "1f1b":
        assert [r["peak"][i] for i, r in enumerate(res)] == [min(world - i, chunks) for i in range(world)]
    if schedule == "gpipe":
        assert all(r["peak"] == {i: chunks} for i, r in enumerate(res))
    for r in res:  # the runtime holds what the simulator predicts
        assert all(r["simulated_peak"][s] == n for s, n in r["peak"].items())
        # every backward that sends an input gradient to another rank does so before computing dW
        assert r["split"] == chunks * sum(1 for s in r["stages"] if s > 0 and (s - 1) % world != s % world), r
    assert all(r["pair_links"] == [] for r in res)  # gloo keeps the communicator's transport


@pytest.mark.parametrize("schedule,world,chunks,v", [("gpipe", 3, 3, None), ("1f1b", 4, 8, None),
                                                     ("interleaved", 3, 6, 2), ("interleaved", 4, 4, 2)])
def test_training_over_a_group_per_neighbouring_pair(pool, schedule, world, chunks, v):
    # the path NCCL pipelines take ([Note: one stream per neighbour] in parallel/pipeline/links.py), on gloo
    res = pool.run(world, "tests.pipeline_cases:train_equivalence", schedule, chunks, v, pair_links=True)
    for rank, r in enumerate(res):
        stages = range(world * (v or 1))
        want = {s2 % world for s in stages if s % world == rank for s2 in (s - 1, s + 1)
                if s2 in stages and s2 % world != rank}
        assert r["pair_links"] == sorted(want), (rank, r["pair_links"])


def test_cpu_ranks_default_to_the_one_pass_backward(pool):
    # [Note: split backward]: on by default for CUDA devices only; the result is the same either way
    res = pool.run(2, "tests.pipeline_cases:train_equivalence", "1f1b", 4, split=None)
    assert [r["split"] for r in res] == [0, 0]


def test_training_float32_and_explicit_balance(pool):
    res = pool.run(2, "tests.pipeline_cases:train_equivalence", "1f1b", 4, dtype="float32", balance=[6, 10])
    assert res[0]["balance"] == [6, 10] and res[0]["names"] == sorted(
        f"{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias"))


def test_time_balance(pool):
    res = pool.run(2, "tests.pipeline_cases:time_balance")
    assert res[0]["balance"] == res[1]["balance"] and sum(res[0]["balance"]) == 8


def test_mesh_layout(pool):
    res = pool.run(4, "tests.pipeline_cases:mesh_layout", pp=2, dp=2)
    assert [r["coords"] for r in res] == [{"pp": 0, "dp": 0}, {"pp": 0, "dp": 1}, {"pp": 1, "dp": 0},
                                          {"pp": 1, "dp": 1}]
    assert [r["dp"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    flipped = pool.run(4, "tests.pipeline_cases:mesh_layout", dp=2, pp=2)
    assert [r["pp"] for r in flipped] == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.parametrize("schedule,dp_mode,per_step", [("1f1b", "once", 1), ("interleaved", "once", 1),
                                                       ("1f1b", "every", 2), ("gpipe", "manual", 4)])
def test_pp_dp_mesh_equals_single_process(pool, schedule, dp_mode, per_step):
    res = pool.run(4, "tests.pipeline_cases:mesh_pp_dp", schedule, dp_mode=dp_mode)
    assert all(r["reductions_per_step"] == per_step for r in res)
    for r in res:  # split everywhere but where a wrapper the pipeline was not told about reduces
        assert r["split"] == {"once": r["later"], "every": 0, "manual": r["later"]}[dp_mode], r


@pytest.mark.parametrize("case,message", [
    ("chunks_not_dividing", "a batch of 8 does not split into 3 equal micro-batches"),
    ("too_many_stages", "needs 2 stages but the model has only 1 layer"),
    ("too_many_virtual_stages", "needs 6 stages but the model has only 4 layers"),
    ("bad_schedule", "schedule: unknown 'zigzag'"),
    ("interleaved_chunks", "needs a multiple of the 2 pipeline ranks, got 3"),
    ("bad_balance", "balance: expected 2 positive layer counts"),
    ("not_sequential", "splits an nn.Sequential, got Linear"),
    ("ranks_disagree", "ranks disagree on the configuration"),
    ("shapes_disagree", "ranks disagree on the micro-batch shapes"),
])
def test_errors(pool, case, message):
    res = pool.run(2, "tests.pipeline_cases:expect_error", case)
    assert all(message in r for r in res), res


def test_mesh_error(pool):
    res = pool.run(2, "tests.pipeline_cases:expect_error", "mesh_size")
    assert all("= 4 ranks, but the communicator has 2" in r for r in res)


# -- the benchmark ------------------------------------------------------------------------------


def test_benchmark_runs_and_compares_with_torch(tmp_path):
    """A tiny end-to-end run on 2 local gloo ranks, torch.distributed.pipelining included."""
    import json
    import subprocess
    import sys

    out = tmp_path / "pipeline.json"
    cmd = [sys.executable, "-m", "benchmarks.pipeline", "--nproc", "2", "--layers", "4", "--hidden", "8",
           "--microbatch", "2", "--chunks", "2", "--iters", "1", "--rounds", "1", "--warmup", "1",
           "--schedules", "1f1b", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["schedule"], r["impl"]) for r in rows] == [("1f1b", "topocomm"), ("1f1b", "torch")]
    ours = {r["schedule"]: r for r in rows if r["impl"] == "topocomm"}
    assert ours["1f1b"]["peak_microbatches"] == [2, 1] == ours["1f1b"]["peak_bound"]
    assert 0.0 <= ours["1f1b"]["bubble"] < 1.0 and ours["1f1b"]["bubble_theory"] == pytest.approx(1 / 3)
    # CPU ranks run the one-pass backward: the input gradient is ready when the backward ends, and the split
    # formula is the formula itself
    assert ours["1f1b"]["backward_input_ms"] == pytest.approx(ours["1f1b"]["backward_ms"])
    assert ours["1f1b"]["bubble_theory_split"] == pytest.approx(1 / 3)
    assert all(r["samples_per_s"] > 0 for r in rows)


def test_split_bubble_formula():
    from benchmarks.pipeline import split_bubble

    assert split_bubble(4, 8, 1, 1.0, 2.0, 2.0) == pytest.approx(3 / 11)  # one-pass backward: (p-1)/(m+p-1)
    # input gradient after half the backward: the fill and drain cost (p-1)(f + b/2) = 6 against 8 x 3
    assert split_bubble(4, 8, 1, 1.0, 2.0, 1.0) == pytest.approx(6 / 30)


def test_replay_lets_an_input_gradient_go_before_its_weights():
    from benchmarks.pipeline import replay

    # two stages, one micro-batch: F0 (1), F1 (1), B1 (2, input gradient after 1), B0 (2)
    whole = [[[0, "F", 0, 1.0], [0, "B", 0, 2.0]], [[1, "F", 0, 1.0], [1, "B", 0, 2.0]]]
    split = [[[0, "F", 0, 1.0], [0, "B", 0, 2.0]], [[1, "F", 0, 1.0], [1, "B", 0, 2.0, 1.0]]]
    assert replay(whole, 2) == 6.0 and replay(split, 2) == 5.0


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 2, 2, None), ("gpipe", 4, 8, None), ("1f1b", 4, 8, None),
                                        ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2)])
def test_benchmark_replay_matches_the_simulator(name, p, m, v):
    # the pipeline benchmark's replay of measured action times, fed the simulator's own order and costs,
    # gives the simulator's step count
    from benchmarks.pipeline import replay

    sim = simulate(build(name, p, m, v), forward_cost=1, backward_cost=2)
    programs = [[[a.stage, a.kind.value, a.microbatch, sim.cost(a)] for _, a in sorted(prog, key=lambda x: x[0])]
                for prog in sim.starts]
    assert replay(programs, sim.schedule.nstages) == sim.steps

