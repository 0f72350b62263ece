"""Pure schedule tests: every algorithm, verified symbolically for world sizes 1..64.

No processes: ``verify`` runs each Schedule on symbols (see collectives/verify.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from collectives.algorithms import _REGISTRY, build, names, pipelined
from collectives.execute import own_block_aside
from collectives.algorithms.halving_doubling import (
    halving_doubling_all_gather,
    halving_doubling_all_reduce,
    halving_doubling_reduce_scatter,
)
from collectives.algorithms.hierarchical import check_nodes, hierarchical_all_reduce
from collectives.algorithms.ring import ring_all_reduce
from collectives.algorithms.tree import double_tree_parents, tree_all_reduce, tree_broadcast, tree_reduce
from collectives.schedule import (
    Buffer,
    Collective,
    Recv,
    Schedule,
    Send,
    Step,
    chunk_bounds,
    format_schedule,
    parse_schedule,
)
from collectives.execute import Executor, segment_sizes
from collectives.verify import ScheduleError, verify

PAIRS = sorted(_REGISTRY, key=lambda p: (p[0], p[1].value))
EDGE_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 31, 32, 33, 63, 64)


def _node_maps(n: int) -> st.SearchStrategy[tuple[tuple[int, ...], ...]]:
    """Any partition of 0..n-1 into nodes, ranks shuffled (so nodes of unequal sizes too)."""
    def split(perm: list[int], cuts: list[int]) -> tuple[tuple[int, ...], ...]:
        b = [0, *sorted(set(cuts)), n]
        return tuple(tuple(perm[b[i]:b[i + 1]]) for i in range(len(b) - 1))
    cuts = st.lists(st.integers(1, n - 1), max_size=8) if n > 1 else st.just([])
    return st.builds(split, st.permutations(range(n)), cuts)


def _equal_nodes(n: int, local: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(j * local, (j + 1) * local)) for j in range(n // local))


@st.composite
def _cases(draw: st.DrawFn, max_n: int = 64) -> tuple[str, Collective, int, int | None, tuple | None, int]:
    name, coll = draw(st.sampled_from(PAIRS))
    # The quadratic-step algorithms cost O(n^2) to verify; keep half the draws small.
    n = draw(st.one_of(st.integers(1, min(16, max_n)), st.integers(1, max_n)))
    root = draw(st.integers(0, n - 1)) if coll.rooted else None
    nodes = draw(st.one_of(st.none(), _node_maps(n))) if name == "hierarchical" else None
    k = draw(st.integers(1, 8)) if pipelined(name, coll) else 1
    return name, coll, n, root, nodes, k


# --- every algorithm is correct -------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(_cases())
def test_every_registered_schedule_verifies(case) -> None:
    name, coll, n, root, nodes, k = case
    s = build(name, coll, n, root=root, nodes=nodes, pipeline=k)
    assert (s.world_size, s.collective, s.algorithm) == (n, coll, name)
    assert verify(s).rounds == s.nsteps  # every step of these algorithms runs in lockstep


@pytest.mark.parametrize("name,coll", PAIRS, ids=[f"{a}-{c.value}" for a, c in PAIRS])
@pytest.mark.parametrize("n", EDGE_SIZES)
def test_edge_world_sizes_verify(name: str, coll: Collective, n: int) -> None:
    verify(build(name, coll, n, root=n - 1 if coll.rooted else None))


@pytest.mark.parametrize("n", range(1, 65))
def test_log_step_algorithms_verify_for_every_world_size(n: int) -> None:
    for s in (halving_doubling_all_reduce(n), halving_doubling_reduce_scatter(n),
              halving_doubling_all_gather(n), tree_all_reduce(n), tree_all_reduce(n, 3),
              tree_broadcast(n, n // 2, 2), tree_reduce(n, n - 1, 2)):
        verify(s)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1), st.integers(1, 8))))
def test_tree_rooted_any_root_and_pipeline(case: tuple[int, int, int]) -> None:
    n, root, k = case
    for s in (tree_broadcast(n, root, k), tree_reduce(n, root, k)):
        assert s.nchunks == k
        assert verify(s).rounds == s.nsteps == (0 if n == 1 else k - 1 + math.ceil(math.log2(n)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 48).flatmap(lambda n: st.tuples(st.just(n), _node_maps(n))))
@example((8, ((0, 1, 2), (3, 4), (5, 6, 7))))
@example((4, ((2,), (0, 1, 3))))
def test_hierarchical_any_node_map(case: tuple[int, tuple[tuple[int, ...], ...]]) -> None:
    n, nodes = case
    verify(hierarchical_all_reduce(n, nodes))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(
    st.just(n), st.sampled_from([d for d in range(1, n + 1) if n % d == 0]), st.permutations(range(n)))))
def test_hierarchical_equal_nodes_use_rails(case: tuple[int, int, list[int]]) -> None:
    n, local, perm = case
    nodes = tuple(tuple(perm[i] for i in node) for node in _equal_nodes(n, local))
    s = hierarchical_all_reduce(n, nodes)
    nn = n // local
    assert s.nchunks == n
    assert verify(s).rounds == s.nsteps == 2 * (local - 1) + 2 * (nn - 1)


def test_hierarchical_degenerate_cases_are_rings() -> None:
    for n in (1, 2, 3, 8, 13):
        ring = ring_all_reduce(n).ranks
        assert hierarchical_all_reduce(n).ranks == ring
        assert build("hierarchical", Collective.ALL_REDUCE, n).ranks == ring
        assert hierarchical_all_reduce(n, tuple((r,) for r in range(n))).ranks == ring


def test_hierarchical_unequal_nodes_use_leaders() -> None:
    s = hierarchical_all_reduce(5, ((0, 1, 2), (3, 4)))
    assert s.nchunks == 2
    assert verify(s).rounds == s.nsteps == 2 + 2 * (2 - 1) + 2


@pytest.mark.parametrize("bad", [((0, 1), (1, 2)), ((0, 1),), ((0, 1, 2), ()), ((0, 1, 2, 3),)])
def test_hierarchical_rejects_bad_node_maps(bad) -> None:
    with pytest.raises(ValueError, match="nodes"):
        check_nodes(3, bad)


@pytest.mark.parametrize("make", [lambda: tree_all_reduce(4, 0), lambda: tree_broadcast(4, 4),
                                  lambda: halving_doubling_all_reduce(0), lambda: tree_reduce(0)])
def test_bad_arguments_raise(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_registry_names() -> None:
    assert names()[-1] == "native"
    for name in ("ring", "tree", "halving_doubling", "hierarchical", "pairwise"):
        assert name in names()
    with pytest.raises(ValueError, match="does not implement"):
        build("pairwise", Collective.ALL_REDUCE, 4)


def test_double_trees_are_complementary() -> None:
    for n in range(2, 65):
        leaves = []
        for parent in double_tree_parents(n):
            assert parent.count(-1) == 1
            kids = [parent.count(r) for r in range(n)]
            assert max(kids) <= 2
            leaves.append({r for r in range(n) if kids[r] == 0})
        assert not leaves[0] & leaves[1], n  # a leaf of one tree is interior in the other


# --- step counts and layouts -----------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16, 17, 64])
def test_step_counts(n: int) -> None:
    assert build("ring", Collective.ALL_REDUCE, n).nsteps == 2 * (n - 1)
    assert build("pairwise", Collective.ALL_TO_ALL, n).nsteps == n - 1
    bcast = build("tree", Collective.BROADCAST, n, root=n // 2)
    assert bcast.nsteps == verify(bcast).rounds == math.ceil(math.log2(n))
    m = 1 << (n.bit_length() - 1)
    fold = 0 if m == n else 2
    hd = build("halving_doubling", Collective.ALL_REDUCE, n)
    assert (hd.nsteps, hd.nchunks) == (2 * int(math.log2(m)) + fold, m)
    for coll in (Collective.REDUCE_SCATTER, Collective.ALL_GATHER):
        assert build("halving_doubling", coll, n).nsteps == int(math.log2(m)) + fold


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64])
def test_halving_doubling_power_of_two_is_2_log2_n(n: int) -> None:
    s = halving_doubling_all_reduce(n)
    assert verify(s).rounds == s.nsteps == 2 * int(math.log2(n))


@pytest.mark.parametrize("n,k", [(2, 1), (4, 1), (5, 4), (16, 8), (64, 2)])
def test_tree_all_reduce_steps(n: int, k: int) -> None:
    s = tree_all_reduce(n, k)
    height = math.floor(math.log2(n - 1)) + 1  # NCCL's tree: root 0 with one child, then log2
    assert s.nchunks == 2 * k
    assert s.nsteps == k - 1 + 2 * height


@pytest.mark.parametrize("n", [2, 3, 7, 16, 33])
def test_tree_all_reduce_per_step_load(n: int) -> None:
    # A rank does interior work in one tree and is a leaf in the other (rank 0
    # of odd n: the root's single child in tree 0), so per step it moves at
    # most 4 chunks each way, and at most one per tree on each link.
    s = tree_all_reduce(n, 8)
    for r in range(n):
        for step in s.steps(r):
            assert all(o.nchunks == 1 for o in step.ops)
            assert len(step.sends) <= 4 and len(step.recvs) <= 4
            for peer in range(n):
                assert sum(o.peer == peer for o in step.sends) <= 2
                assert sum(o.peer == peer for o in step.recvs) <= 2


# --- text form -------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(_cases(max_n=24))
def test_text_round_trip(case) -> None:
    name, coll, n, root, nodes, k = case
    s = build(name, coll, n, root=root, nodes=nodes, pipeline=k)
    assert parse_schedule(format_schedule(s)) == s
    assert str(s) == format_schedule(s)


RING_3 = """\
# all_reduce ring world=3 chunks=3
rank | step 0       | step 1       | step 2       | step 3
0    | S1[0] R2[2]+ | S1[2] R2[1]+ | S1[1] R2[0]= | S1[0] R2[2]=
1    | S2[1] R0[0]+ | S2[0] R0[2]+ | S2[2] R0[1]= | S2[1] R0[0]=
2    | S0[2] R1[1]+ | S0[1] R1[0]+ | S0[0] R1[2]= | S0[2] R1[1]=
"""

# Tree 0 is 0 <- 2 <- {1, 3} and carries chunk 0; tree 1 (mirrored) is
# 3 <- 1 <- {0, 2} and carries chunk 1. Up in steps 0-1, down in steps 2-3.
TREE_4 = """\
# all_reduce tree world=4 chunks=2
rank | step 0              | step 1 | step 2 | step 3
0    | S1[1]               | R2[0]+ | S2[0]  | R1[1]=
1    | S2[0] R0[1]+ R2[1]+ | S3[1]  | R3[1]= | S0[1] S2[1] R2[0]=
2    | S1[1] R1[0]+ R3[0]+ | S0[0]  | R0[0]= | S1[0] S3[0] R1[1]=
3    | S2[0]               | R1[1]+ | S1[1]  | R2[0]=
"""

BCAST_5 = """\
# broadcast tree world=5 chunks=1 root=1
rank | step 0 | step 1 | step 2
0    | -      | -      | R1[0]=
1    | S2[0]  | S3[0]  | S0[0]
2    | R1[0]= | S4[0]  | -
3    | -      | R1[0]= | -
4    | -      | R2[0]= | -
"""


@pytest.mark.parametrize("golden,s", [
    (RING_3, lambda: build("ring", Collective.ALL_REDUCE, 3)),
    (TREE_4, lambda: build("tree", Collective.ALL_REDUCE, 4)),
    (BCAST_5, lambda: build("tree", Collective.BROADCAST, 5, root=1)),
], ids=["ring3", "tree4", "bcast5"])
def test_golden_grids(golden: str, s) -> None:
    assert format_schedule(s()) == golden
    assert parse_schedule(golden) == s()


def test_pairwise_sends_from_the_input() -> None:
    s = build("pairwise", Collective.ALL_TO_ALL, 4)
    assert s.steps(1)[0].ops == (Send(2, 2, 3, Buffer.INPUT), Recv(0, 0, 1, reduce=False))
    assert "Si2[2]" in format_schedule(s)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9])
def test_own_block_copy_runs_aside_where_nothing_else_reads_or_writes_the_block(n: int) -> None:
    """[Note: own block aside] in execute.py: ring and direct all-gather send their own block alone (from the input
    then), pairwise all-to-all sends from the input; recursive doubling sends it merged with the partner's block,
    so its copy must come first; a schedule receiving into a rank's own block keeps it first too."""
    for name, coll in (("ring", Collective.ALL_GATHER), ("direct", Collective.ALL_GATHER),
                       ("pairwise", Collective.ALL_TO_ALL)):
        s = build(name, coll, n)
        assert all(own_block_aside(s, r) for r in range(n)), (name, n)
    hd = build("halving_doubling", Collective.ALL_GATHER, n)
    assert all(own_block_aside(hd, r) for r in range(n)) == (n == 2)
    into_own = _sched(Collective.ALL_GATHER, 2, 2, [[[Send(1, 0, 1), Recv(1, 0, 1, reduce=False)]],
                                                    [[Send(0, 1, 2), Recv(0, 0, 1, reduce=False)]]])
    assert own_block_aside(into_own, 1) and not own_block_aside(into_own, 0)


# --- the verifier catches broken schedules ---------------------------------------

def _sched(coll: Collective, n: int, nchunks: int, rows: list[list[list]], root: int | None = None) -> Schedule:
    return Schedule(coll, "broken", n, nchunks, tuple(tuple(Step(tuple(ops)) for ops in row) for row in rows),
                    root=root)


def _two_rank_all_reduce(rows: list[list[list]]) -> Schedule:
    return _sched(Collective.ALL_REDUCE, 2, 1, rows)


def test_verifier_accepts_a_correct_hand_schedule() -> None:
    verify(_two_rank_all_reduce([[[Send(1, 0, 1)], [Recv(1, 0, 1, reduce=False)]],
                                 [[Recv(0, 0, 1, reduce=True)], [Send(0, 0, 1)]]]))


def test_verifier_catches_missing_receive() -> None:
    s = _two_rank_all_reduce([[[Send(1, 0, 1)], [Recv(1, 0, 1, reduce=False)]],
                              [[], [Send(0, 0, 1)]]])
    with pytest.raises(ScheduleError, match="sends 1 messages to rank 1, which receives 0"):
        verify(s)


def test_verifier_catches_mismatched_chunk_ranges() -> None:
    s = _sched(Collective.ALL_REDUCE, 2, 2, [[[Send(1, 0, 2)], [Recv(1, 0, 2, reduce=False)]],
                                             [[Recv(0, 0, 1, reduce=True)], [Send(0, 0, 2)]]])
    with pytest.raises(ScheduleError, match=r"sends chunks \[0:2\] to rank 1, whose step 0 receives \[0:1\]"):
        verify(s)


def test_verifier_catches_deadlock() -> None:
    # Both ranks receive first, in a step of their own, and send only afterwards.
    s = _two_rank_all_reduce([[[Recv(1, 0, 1, reduce=True)], [Send(1, 0, 1)]],
                              [[Recv(0, 0, 1, reduce=True)], [Send(0, 0, 1)]]])
    with pytest.raises(ScheduleError, match="deadlock"):
        verify(s)


def test_verifier_catches_double_counting() -> None:
    s = _two_rank_all_reduce([[[Send(1, 0, 1)], [Send(1, 0, 1)], [Recv(1, 0, 1, reduce=False)]],
                              [[Recv(0, 0, 1, reduce=True)], [Recv(0, 0, 1, reduce=True)], [Send(0, 0, 1)]]])
    with pytest.raises(ScheduleError, match="twice"):
        verify(s)


def test_verifier_catches_wrong_postcondition() -> None:
    s = _two_rank_all_reduce([[[Send(1, 0, 1)]], [[Recv(0, 0, 1, reduce=True)]]])  # rank 0 never gets the sum
    with pytest.raises(ScheduleError, match="rank 0 chunk 0 ends with contributions \\[0\\], expected \\[0, 1\\]"):
        verify(s)


def test_verifier_catches_different_reduction_orders() -> None:
    # Everyone sends its data to both others and reduces what it gets: each
    # rank ends with the full sum, but rank 2 adds in another order.
    rows = []
    for r in range(3):
        others = [p for p in range(3) if p != r]
        rows.append([[*(Send(p, 0, 1) for p in others), *(Recv(p, 0, 1, reduce=True) for p in others)]])
    with pytest.raises(ScheduleError, match="different orders"):
        verify(_sched(Collective.ALL_REDUCE, 3, 1, rows))


def test_verifier_catches_uninitialised_send() -> None:
    # Rank 1 forwards the broadcast in the same step it receives it.
    s = _sched(Collective.BROADCAST, 3, 1, [[[Send(1, 0, 1)]],
                                            [[Recv(0, 0, 1, reduce=False), Send(2, 0, 1)]],
                                            [[Recv(1, 0, 1, reduce=False)]]], root=0)
    with pytest.raises(ScheduleError, match="uninitialised"):
        verify(s)


def test_verifier_catches_send_and_overwrite_of_one_chunk() -> None:
    s = _two_rank_all_reduce([[[Send(1, 0, 1), Recv(1, 0, 1, reduce=False)]],
                              [[Recv(0, 0, 1, reduce=True), Send(0, 0, 1)]]])
    with pytest.raises(ScheduleError, match="overwrites chunks it sends"):
        verify(s)


# --- chunk layout ---------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.integers(1, 16), st.integers(0, 10_000))
def test_chunk_bounds_cover_blocks_evenly(blocks: int, per: int, per_block: int) -> None:
    bounds = chunk_bounds(per_block * blocks, per * blocks, blocks)
    assert bounds[0] == 0 and bounds[-1] == per_block * blocks
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    for b in range(blocks):
        mine = sizes[b * per:(b + 1) * per]
        assert sum(mine) == per_block and max(mine) - min(mine) <= 1


# --- the executor's segments pair up ----------------------------------------------

def _posted(s, rank: int, count: int, seg: int, cuda: bool) -> tuple[dict, dict]:
    """Sizes of the messages ``rank`` posts, per peer in posting order: (sent, received)."""
    work, inp = torch.zeros(count), torch.zeros(count)
    bounds = s.bounds(count)
    scratch = Executor._scratch(s, rank, bounds, work)
    sent: dict[int, list[int]] = {}
    received: dict[int, list[int]] = {}
    for step, segs in zip(s.steps(rank), segment_sizes(s, rank, seg, count, cuda)):
        groups, _ = Executor._plan_step(step.ops, bounds, segs, work, inp, scratch, None)
        for g in groups:
            for peer, t in g.sends:
                sent.setdefault(peer, []).append(t.numel())
            for peer, t in g.recvs:
                received.setdefault(peer, []).append(t.numel())
    return sent, received


@settings(max_examples=150, deadline=None)
@given(_cases(max_n=12), st.integers(0, 300), st.integers(1, 40), st.booleans())
def test_segments_pair_up_between_ranks(case, m: int, seg: int, cuda: bool) -> None:
    """Every message a rank posts to a peer meets a receive of the same size at the same position
    there: the two ends of a transfer cut it into the same segments (CUDA segments only transfers
    into reducing receives; a rank that only sends must still cut like its receiver)."""
    name, coll, n, root, nodes, k = case
    s = build(name, coll, n, root=root, nodes=nodes, pipeline=k)
    count = m * s.blocks
    posted = [_posted(s, r, count, seg, cuda) for r in range(n)]
    for a in range(n):
        for b in range(n):
            assert posted[a][0].get(b, []) == posted[b][1].get(a, []), (a, b, str(s))


def test_segments_pair_up_for_a_send_only_rank() -> None:
    """The case that hung on 2 GPUs: rank 1 of a 2-rank reduce only sends; rank 0 reduces."""
    s = build("ring", Collective.REDUCE, 2, root=0, pipeline=1)
    sent, _ = _posted(s, 1, 1000, 64, cuda=True)
    _, received = _posted(s, 0, 1000, 64, cuda=True)
    assert sent[0] == received[1] and len(sent[0]) > 1
