"""Calls timed back to back ([Note: back to back] in collectives/rounds.py) and the one-way message curve
([Note: one way] in collectives/pricing.py): what busbw's GPU rows measure, and how calibration reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import collectives.model as M
from collectives import calibrate
from collectives.pricing import MessageCurve
from collectives.rounds import ONE_WAY, PAIR
from collectives.schedule import Collective
from collectives.topology import Topology

C = Collective
MiB = 1 << 20
STEP, ALPHA = 1e-4, 1e-6
BASE = dict(intra_alpha=ALPHA, intra_bandwidth=1e15, pair_bandwidth=1e15, inter_alpha=0.0, inter_bandwidth=1e9,
            step_overhead=STEP, reduce_bandwidth=1e15, native_step=0.0, call_overhead=0.0, oversubscribed_step=0.0)
# ring steps: 2x slower than the fastest rate up to 1 MiB; one-way transfers: 4x up to 1 MiB
RING = [[256 << 10, 1e-4], [MiB, MiB / 1e9], [64 * MiB, 64 * MiB / 2e9]]
ONE = [[256 << 10, 1e-4], [MiB, MiB / 0.5e9], [64 * MiB, 64 * MiB / 2e9]]


def _gpus(n: int = 8, back_to_back: int = 0, **over) -> M.CostModel:
    topo = Topology.preset("dgx-h100", 1) if n == 8 else Topology.local(n, device="H200", cpus=0)
    return M.CostModel(topo, "nccl", profile=M.Params(**{**BASE, **over}), back_to_back=back_to_back)


def test_each_pair_tier_follows_its_own_curve():
    c = MessageCurve.of(RING, 1 << 40, ONE)
    lines = np.array([[PAIR, 1.0, 0.0, 1.0, 0.0], [ONE_WAY, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0]])
    g = c.factor(lines, np.array([MiB, 8 * MiB, 64 * MiB], dtype=float))
    np.testing.assert_allclose(g[0], [2.0, 1.5, 1.0])
    np.testing.assert_allclose(g[1], [4.0, 2.5, 1.0])  # 8 MiB lies halfway between 1 and 64 MiB on log size
    np.testing.assert_allclose(g[2], 1.0)  # a port line follows neither
    only_one_way = MessageCurve.of([], 1 << 40, ONE)
    np.testing.assert_allclose(only_one_way.factor(lines, np.array([MiB], dtype=float))[:, 0], [1.0, 4.0, 1.0])


def test_a_lone_transfer_pays_the_one_way_rate_and_a_relay_the_ring_rate():
    """A chain broadcast in one part moves one transfer a round (one way); in two parts its middle rounds
    relay (a rank sends and receives at once), at the ring-step rate."""
    S, bw = MiB, 1e9
    m = M.CostModel(Topology.local(4, cpus=0), "nccl",
                    profile=M.Params(**{**BASE, "pair_bandwidth": bw, "pair_curve": RING, "one_way_curve": ONE}))
    assert m.predict("broadcast", S, "ring", pipeline=1) == pytest.approx(3 * (STEP + ALPHA + 4 * S / bw), rel=1e-9)
    half = S / 2 / bw  # parts of 512 KiB: below both knees, so 4x one way and 2x relayed
    two = 4 * (STEP + ALPHA) + half * (4 + 2 + 2 + 4)
    assert m.predict("broadcast", S, "ring", pipeline=2) == pytest.approx(two, rel=1e-9)


def test_back_to_back_a_call_costs_its_busiest_ranks_rounds():
    """8 GPUs, zero bytes: a chain broadcast's inner ranks each work 2 of its 7 rounds, so n calls back to back
    take n - 1 times 2 rounds and one whole call; a binomial tree's root works all 3 rounds, and a ring keeps
    every rank busy: back to back they cost what one call does."""
    one, n = _gpus(), 20
    b2b = _gpus(back_to_back=n)
    call = one.predict(C.BROADCAST, 8, "ring", pipeline=1)
    assert call == pytest.approx(2 * STEP + 7 * ALPHA, rel=1e-9)  # steps posted ahead ([Note: posted ahead])
    period = 2 * (STEP + ALPHA)
    assert b2b.predict(C.BROADCAST, 8, "ring", pipeline=1) == pytest.approx((1 - 1 / n) * period + call / n, rel=1e-9)
    for coll, algo in ((C.BROADCAST, "tree"), (C.REDUCE, "tree"), (C.ALL_GATHER, "ring"), (C.ALL_REDUCE, "ring")):
        assert b2b.predict(coll, 8, algo, pipeline=1) == pytest.approx(one.predict(coll, 8, algo, pipeline=1), rel=1e-9)
    assert _gpus(back_to_back=1).predict(C.BROADCAST, 8, "ring", pipeline=1) == pytest.approx(call)


def test_back_to_back_counts_each_ranks_own_work():
    """2 GPUs reduce 64 MiB: the sender clones the buffer, the root reduces what arrives. Alone, a call
    takes the clone, the transfer and the reduction in turn; back to back the next call's clone runs while
    the root reduces, and a call costs the busier rank's share: the root's transfer and reduction."""
    S, R, B = 64 * MiB, 1e12, 1e11
    one = _gpus(2, reduce_bandwidth=R, intra_bandwidth=B, pair_bandwidth=B)
    b2b = _gpus(2, back_to_back=10 ** 6, reduce_bandwidth=R, intra_bandwidth=B, pair_bandwidth=B)
    step = STEP + ALPHA
    transfer, reduction, clone = S / B, 3 * S / R, 2 * S / R
    assert one.predict(C.REDUCE, S, "ring") == pytest.approx(step + transfer + reduction + clone, rel=1e-6)
    assert b2b.predict(C.REDUCE, S, "ring") == pytest.approx(step + transfer + reduction, rel=1e-5)


def test_cpu_ranks_price_one_call_either_way():
    """CPU ranks run a call on the host that makes it: calls do not overlap, and back_to_back changes nothing."""
    p = M.Params(**BASE)
    one = M.CostModel(Topology.local(4, cpus=2), "gloo", profile=p)
    b2b = M.CostModel(Topology.local(4, cpus=2), "gloo", profile=p, back_to_back=20)
    assert b2b.back_to_back == 0
    for coll, algo in ((C.BROADCAST, "ring"), (C.REDUCE, "tree"), (C.ALL_REDUCE, "ring")):
        assert b2b.predict(coll, MiB, algo) == one.predict(coll, MiB, algo)


@pytest.mark.parametrize("coll, algo", [(C.BROADCAST, "ring"), (C.BROADCAST, "tree"), (C.REDUCE, "ring"),
                                        (C.REDUCE, "tree"), (C.ALL_REDUCE, "tree"), (C.ALL_REDUCE, "ring")])
def test_the_fit_sees_back_to_back_prices_as_linear_in_theta(coll, algo):
    """calibrate.features: the weighted rounds of a back-to-back call, d prediction / d theta, times theta
    give the prediction (the fit is a linear least squares in theta)."""
    model = _gpus(back_to_back=20, reduce_bandwidth=2e12, intra_bandwidth=3e11, pair_bandwidth=4e11,
                  pair_curve=RING, one_way_curve=ONE)
    theta = M._theta(model.params)
    for k in (1, 4):
        for S in (64 << 10, 16 * MiB):
            x = calibrate.features(model, coll, algo, float(S), theta, pipeline=k)
            assert x @ theta == pytest.approx(model.predict(coll, S, algo, pipeline=k), rel=1e-9)


def test_sweeps_are_priced_as_busbw_timed_them(tmp_path):
    """A busbw header's -n (iters) reaches the rows, and calibration prices them as that many calls back to back."""
    topo = Topology.preset("dgx-h100", 1)
    path = tmp_path / "s.json"
    rows = [{"op": "broadcast", "algorithm": "ring", "bytes": MiB, "time_us": 10.0, "pipeline": 1}]
    path.write_text(json.dumps({"header": {"backend": "nccl", "world_size": 8, "iters": 20,
                                           "topology": topo.to_json()}, "rows": rows}))
    _, loaded = calibrate.load_rows(path)
    assert loaded[0]["iters"] == 20
    assert calibrate.sweep_model(topo, "nccl", M.Params(**BASE), loaded).back_to_back == 20


def test_curve_files_must_match_the_flag(tmp_path):
    """--pair-curve takes ring steps, --one-way-curve one-way transfers (benchmarks/p2p_curve.py --one-way);
    a file given to the other fails naming the flag it belongs to."""
    ring, one = tmp_path / "ring.json", tmp_path / "one.json"
    ring.write_text(json.dumps({"header": {"world_size": 4, "pattern": "ring step (send to r+1, receive from r-1)"},
                                "points": RING}))
    one.write_text(json.dumps({"header": {"world_size": 4, "pattern": "one way (rank 0 sends to rank 1)"},
                               "points": ONE}))
    assert calibrate.load_curves([str(ring)], [str(one)]) == {4: {"pair_curve": RING, "one_way_curve": ONE}}
    with pytest.raises(ValueError, match="--one-way-curve"):
        calibrate.load_curve(one)
    with pytest.raises(ValueError, match="--pair-curve"):
        calibrate.load_curve(ring, one_way=True)


@pytest.mark.parametrize("topo", [Topology.preset("dgx-h100", 1), Topology.preset("dgx-h100", 2),
                                  Topology.local(3, device="H200", cpus=0), Topology.local(5, device="H200", cpus=0)],
                         ids=["dgx-h100", "dgx-h100 x2", "3 GPUs", "5 GPUs"])
def test_back_to_back_structures_match_schedule_pricing(topo, monkeypatch):
    """The busiest rank's rounds of the generated structures are those of the registry's Schedules, priced round
    by round (rounds.price_schedule), rank for rank."""
    lay, nodes = M._Layout.of(topo, back_to_back=True), tuple(map(tuple, topo.nodes))
    theta, sizes = M._theta(M.Params(**BASE)), np.array([1e3, 1e6, 1e9])
    for coll in C:
        for algo in M.algorithms.supported(coll):
            if algo == M.NATIVE:
                continue
            for k in ((1, 3) if M.algorithms.pipelined(algo, coll) else (1,)):
                fast = M._structure(lay, nodes, coll, algo, k)
                monkeypatch.setattr(M, "_GENERIC_ONLY", True)
                generic = M._structure(lay, nodes, coll, algo, k)
                monkeypatch.setattr(M, "_GENERIC_ONLY", False)
                np.testing.assert_allclose(M.evaluate(fast, theta, sizes), M.evaluate(generic, theta, sizes),
                                           rtol=1e-9, err_msg=f"{algo} {coll.value} pipeline {k}")
