"""Ranks sharing a host's cores ([Note: shared cores] in collectives/rounds.py): how much longer a round's
copies and reductions take when more ranks are busy than the host has cores."""

from __future__ import annotations

import numpy as np
import pytest

import collectives.model as M
from collectives.pricing import line_times
from collectives.topology import Topology


def test_ranks_sharing_cpus_stretch_their_rounds():
    """4 CPU ranks on 2 cores: a round where all four work takes twice as long as one where two do."""
    lay = M._Layout.of(Topology.local(4, cpus=2))
    busy_all = M.round_lines(lay, np.arange(4), (np.arange(4) + 1) % 4, 0.25)
    busy_two = M.round_lines(lay, np.array([0]), np.array([1]), 0.25)
    assert busy_all[:, 3].tolist() == [2.0, 2.0] and busy_two[:, 3].tolist() == [1.0, 1.0]


def test_shared_cores_stretch_loaded_ranks_less():
    """[Note: shared cores] by hand, tree all-reduce's first round on 4 ranks, 2 cores: leaves 0, 3 send half (work 1);
    parents 2, 1 send half, get two halves, reduce them (2 * 1.5 + 3 = 6); 14 / 2 cores = 7 -> a fair share of 7/6
    for the parents, 2 for the leaves; busy / cores is 2; the stretch is the geometric mean of the two."""
    lay = M._Layout.of(Topology.local(4, cpus=2))
    parents = np.sqrt(7 / 6 * 2)
    work = np.array([1.0, 6, 6, 1])
    fair, mean = lay.stretches(np.ones(4, bool), work)
    assert mean.tolist() == pytest.approx([2, parents, parents, 2])
    assert fair.tolist() == pytest.approx([2, 7 / 6, 7 / 6, 2])
    lines = M.round_lines(lay, np.array([1, 3, 2, 0]), np.array([2, 2, 1, 1]), 0.5, np.array([2, 1]), 1.0)
    # messages of half the buffer fill a 1 MiB slot at a 2 MiB buffer: up to there the fair share, above it the mean
    small, large = lines[lines[:, 6] < 0], lines[lines[:, 6] > 0]
    assert len(small) == len(large) and len(small) + len(large) == len(lines)
    assert small[:, 3].tolist() == pytest.approx([7 / 6] * len(small))
    assert large[:, 3].tolist() == pytest.approx([parents] * len(large))
    assert lines[:, 5].tolist() == pytest.approx([2 * lay.slot] * len(lines)) and lay.slot == 1 << 20


def test_a_sender_and_receiver_with_no_other_peer_keep_one_core_busy():
    """[Note: shared cores]: binomial broadcast's second round on 4 ranks, 2 cores (0->1, 2->3, a whole buffer each):
    each pair's ends work one after the other (chain 2 + 2), so the host's work (8) over 2 cores is one chain, a fair
    share of 1 up to the slot and sqrt(1 * 2) above it. The mirror, binomial reduce's first round (1->0, 3->2, the
    receivers reducing: chain 2 + 5 = 7 of 14), has a fair share of 1 too; a ring round (each rank sends and receives)
    keeps busy / cores."""
    lay = M._Layout.of(Topology.local(4, cpus=2))
    bcast = M.round_lines(lay, np.array([0, 2]), np.array([1, 3]), 1.0)
    small, large = bcast[bcast[:, 6] < 0], bcast[bcast[:, 6] > 0]
    assert len(small) and len(large) and len(small) + len(large) == len(bcast)
    assert small[:, 3].tolist() == pytest.approx([1.0] * len(small))
    assert large[:, 3].tolist() == pytest.approx([np.sqrt(2)] * len(large))
    assert set(bcast[:, 5].tolist()) == {float(lay.slot)}  # a whole-buffer message fills the slot at its size
    reduce = M.round_lines(lay, np.array([1, 3]), np.array([0, 2]), 1.0, np.array([0, 2]), 1.0)
    assert reduce[reduce[:, 6] < 0][:, 3].tolist() == pytest.approx([1.0] * int((reduce[:, 6] < 0).sum()))
    fair, _ = lay.stretches(np.ones(4, bool), np.array([5.0, 2, 5, 2]))  # the same round without the pairing
    assert fair.tolist() == pytest.approx([7 / 5, 2, 7 / 5, 2])
    ring = M.round_lines(lay, np.arange(4), (np.arange(4) + 1) % 4, 1.0)
    assert ring[:, 3].tolist() == pytest.approx([2.0] * len(ring)) and not ring[:, 6].any()


def test_rounds_whose_messages_fit_a_slot_wait_for_no_one(monkeypatch):
    """[Note: shared cores]: tree all-reduce's first round on 4 ranks, 2 cores, priced by hand. The parents' reduction
    binds, stretched by the fair share 7/6 while the round's half-buffer messages fit a slot and by sqrt(7/6 * 2)
    once they do not."""
    lay = M._Layout.of(Topology.local(4, cpus=2))
    lines = M.round_lines(lay, np.array([1, 3, 2, 0]), np.array([2, 2, 1, 1]), 0.5, np.array([2, 1]), 1.0)
    theta = np.zeros(len(M.THETA))
    theta[6] = 1e-9  # seconds per byte of reduction traffic only
    below, above = 2.0 * lay.slot, 2.0 * lay.slot + 2
    t = line_times(lines, theta, np.array([below, above])).max(axis=0)
    assert t[0] == pytest.approx(7 / 6 * 3 * 1.0 * 1e-9 * below)
    assert t[1] == pytest.approx(np.sqrt(7 / 6 * 2) * 3 * 1.0 * 1e-9 * above)
    # a round whose ranks are all equally loaded has one stretch: its lines hold at every size
    ring = M.round_lines(lay, np.arange(4), (np.arange(4) + 1) % 4, 0.25)
    assert not ring[:, 6].any()
    # the slot is the transport's: set larger, the cut moves with it
    monkeypatch.setenv("TOPOCOMM_SHM_SLOT_BYTES", str(4 << 20))
    wide = M._Layout.of(Topology.local(4, cpus=2))
    assert wide.slot == 4 << 20 and wide.key != lay.key
    lines = M.round_lines(wide, np.array([1, 3, 2, 0]), np.array([2, 2, 1, 1]), 0.5, np.array([2, 1]), 1.0)
    assert set(lines[:, 5].tolist()) == {8.0 * (1 << 20)}
