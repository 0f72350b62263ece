"""Structural pricing: the rounds of a collective reduced to size- and parameter-free lines.

What [Note: structural lines] in model.py describes: a Layout (rank -> node,
NIC and host), the lines (tier, f, r, m, q, cut, side) of one round of transfers and
reductions (pricing.py evaluates a Struct, rounds with counts, at given sizes
and parameters), the rounds of any registry Schedule (the generic path), the
steps hosts post ahead of their devices, and the set-up copies around a
collective. structures.py generates the rounds of ring, chain, tree,
halving-doubling and hierarchical structures directly for any world size;
model.py caches structures per layout and prices them; native_model.py holds
the all-at-once structures (direct, pairwise, gather) and builds the backends'
own algorithms from all of them.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import execute
from .schedule import Collective, Recv, Schedule, Send
from .shm import DEFAULT_SLOT_BYTES, slot_bytes_setting
from .topology import Topology

# tiers: 0 a device's port, 1 a NIC, 2 a reduction alone, 3 a pair of devices, 4 set-up copies, 5 host steps,
# 6 a pair of devices whose ends each only send or only receive in the round ([Note: one way] in pricing.py)
_TIERS = ("intra", "inter", "local", "intra", "local", "latency", "intra")
SETUP = 4  # the tier of a collective's buffer copies outside its rounds ([Note: set-up copies])
HOST = 5  # the tier of the steps an asynchronous device's host does not post ([Note: posted ahead])
PAIR, ONE_WAY = 3, 6


def coefficients(L: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per line (theta in the order of model.THETA): latency a, seconds per byte over its link, seconds per byte of reduction."""
    t, m = L[:, 0].astype(int), L[:, 3]
    # q (column 4) already counts the host's share of messages ([Note: messages]): not stretched by m
    a = theta[1] + np.array([theta[2], theta[3], 0.0, theta[2], 0.0, 0.0, theta[2]])[t] + (m > 1) * theta[8] + L[:, 4] * theta[9]
    a = np.where(t == SETUP, 0.0, a)  # a set-up copy is no round ([Note: set-up copies])
    # [Note: CPU stretch] m slows what the host's cores do (intra-node copies, reductions, scheduling),
    # not the inter-node wire: bytes over a NIC (tier 1) move at the link's rate. The host's side of
    # those bytes is priced by the tier-0 line _lines adds beside an oversubscribed inter-node transfer.
    wire = np.where(t == 1, 1.0, m)
    per_byte = np.array([theta[4], theta[5], 0.0, theta[7], 0.0, 0.0, theta[7]])[t]
    return a, wire * L[:, 1] * per_byte, m * 3 * L[:, 2] * theta[6]


@dataclass(frozen=True)
class _Layout:
    """Rank -> node, global NIC index and host, as arrays; ``cpus`` per host when ranks are CPU-bound;
    ``device``: ranks are accelerators whose hosts post steps ahead ([Note: posted ahead]); ``slot``: bytes
    of a shared-memory slot between CPU ranks ([Note: shared cores]); ``back_to_back``: price one call of a
    stream of calls on devices ([Note: back to back])."""
    node: np.ndarray
    nic: np.ndarray
    host: np.ndarray
    cpus: int
    key: tuple
    device: bool = False
    slot: float = float(DEFAULT_SLOT_BYTES)
    back_to_back: bool = False

    @classmethod
    def of(cls, topo: Topology, back_to_back: bool = False) -> _Layout:
        node = np.array(topo.node_of(), dtype=np.int64)
        nic = node * max(topo.nics_per_node, 1) + np.array(topo.nic_of(), dtype=np.int64)
        names = {h: i for i, h in enumerate(dict.fromkeys(topo.hosts))}
        host = np.array([names[topo.hosts[i]] for i in node] if topo.hosts else node, dtype=np.int64)
        device = bool(topo.devices) and topo.devices[0] != "cpu"
        cpus = 0 if device else topo.cpus
        slot = float(slot_bytes_setting()) if cpus else float(DEFAULT_SLOT_BYTES)
        stream = back_to_back and device
        return cls(node, nic, host, cpus, (tuple(map(tuple, topo.nodes)), topo.nics_per_node,
                                           tuple(host.tolist()), cpus, device, slot, stream), device, slot, stream)

    def stretch(self, busy: np.ndarray) -> np.ndarray:
        """Per rank: busy / cores (at least 1), the slowdown of plain time-slicing of the host's CPUs."""
        if not self.cpus:
            return np.ones(len(self.node))
        return np.maximum(1.0, np.bincount(self.host[busy], minlength=int(self.host.max()) + 1)[self.host] / self.cpus)

    def stretches(self, busy: np.ndarray, work: np.ndarray,
                  chain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per rank, how much longer its ``work`` takes with ``busy`` ranks sharing the host's CPUs: (the fair
        share, where it waits for no one; the geometric mean with busy / cores, where it waits for descheduled
        peers, as messages larger than a slot make it) ([Note: shared cores]). ``chain``: the work a rank's
        round takes one piece after another (default its own)."""
        m = self.stretch(busy)
        if not self.cpus:
            return m, m
        fair = np.bincount(self.host, work, minlength=int(self.host.max()) + 1)[self.host] / self.cpus
        chain = work if chain is None else chain
        share = np.clip(np.divide(fair, chain, out=m.copy(), where=chain > 0), 1.0, m)
        return share, np.sqrt(share * m)


# ((count, lines (k, 7): tier, f, r, m, q, cut, side), ...); side -1 / +1: the line holds only at buffer sizes up
# to / above cut, where the round's largest message fits a shared-memory slot / does not ([Note: shared cores])
Struct = tuple[tuple[int, np.ndarray], ...]
WIDTH = 7  # columns of a line


def edge_loads(lay: _Layout, src: np.ndarray, dst: np.ndarray, frac: float | np.ndarray) -> np.ndarray:
    """Per transfer (inter?, port load, pair load): fractions of the buffer on its busier port and on its pair.

    Transfers of a round that share a device port, a NIC or a pair of devices
    split its bandwidth, so a transfer ends when its resource has moved
    everything posted on it. A device port and a NIC carry each direction at
    full rate; a CPU rank's "port" is its one thread, which copies what it
    sends and what it receives one after the other ([Note: one thread]).
    """
    n = len(lay.node)
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    frac = np.broadcast_to(np.asarray(frac, float), src.shape)
    inter = lay.node[src] != lay.node[dst]
    ptx = np.where(inter, n + lay.nic[src], src)   # port ids: devices 0..n-1, NICs n..
    prx = np.where(inter, n + lay.nic[dst], dst)
    m = n + int(lay.nic.max()) + 1
    tx, rx = np.bincount(ptx, frac, m), np.bincount(prx, frac, m)
    if not lay.device:
        tx[:n] = rx[:n] = tx[:n] + rx[:n]
    port = np.maximum(tx[ptx], rx[prx])
    key = src * n + dst
    if n * n <= 1 << 24:
        pair = np.bincount(key, frac, n * n)[key]
    else:
        _, idx = np.unique(key, return_inverse=True)
        pair = np.bincount(idx.ravel(), frac)[idx.ravel()]
    return np.column_stack([inter.astype(float), port, np.where(inter, 0.0, pair)])


def _lines(loads: np.ndarray, r: np.ndarray, m: np.ndarray, q: np.ndarray, duplex: np.ndarray,
           cut: float = 0.0, side: int = 0) -> np.ndarray:
    """Lines of transfers: one on the port or NIC (tier 0/1), one on the pair for intra-node ones (tier 3,
    or 6 where neither end both sends and receives in the round: ``duplex`` false); ``cut``, ``side``: the
    buffer sizes they hold at (Struct).

    An inter-node transfer whose ends share oversubscribed cores (m > 1) also gets a tier-0 line: the
    host copies its bytes at the intra-node rate, stretched by m. The NIC line is not stretched
    ([Note: CPU stretch] in coefficients), so the slower of the wire and the host's copy binds: a
    rate-limited link is the wire, a loopback "NIC" between nodes on one host is the host.
    """
    intra = loads[:, 0] == 0
    host = ~intra & (m > 1)
    out = np.concatenate([np.column_stack([loads[:, 0], loads[:, 1], r, m, q]),
                          np.column_stack([np.where(duplex[intra], float(PAIR), float(ONE_WAY)), loads[intra, 2],
                                           r[intra], m[intra], q[intra]]),
                          np.column_stack([np.zeros(host.sum()), loads[host, 1], r[host], m[host], q[host]])])
    return _when(out, cut, side)


def _when(lines: np.ndarray, cut: float = 0.0, side: int = 0) -> np.ndarray:
    """(k, 5) lines with the columns cut and side (Struct) appended."""
    return np.column_stack([lines, np.full(len(lines), cut), np.full(len(lines), float(side))])


# [Note: one thread]
# On CPU the shared-memory transport moves a transfer's bytes by two copies, the sender's into a slot and
# the receiver's out of it, each on that rank's one thread: a rank that sends and receives in a round
# makes both copies in turn. NVLink and DMA engines carry both directions at once, so a GPU's port
# does not add them. A pipelined chain broadcast over 4 ranks on 2 cores does 6 copies of the buffer
# at any depth, as the binomial tree does in its two rounds, and pipelining then only adds rounds:
# measured at 4 MiB, tree 2714-3020 us at depths 1-8 against chain 3135-3914 (depth 1 runs 3 lone
# transfers), where ports that counted one direction priced the chain at depth 4 25% under the tree.


# [Note: messages]
# Every transfer is a message at each end: the executor posts it and, on CPU, the shared-memory
# transport copies it into or out of a slot and rings a doorbell, one message after another on the
# host. That host work is charged per message, not per round: direct handles n-1 sends and n-1
# receives a round, halving-doubling and ring one of each. A rank handles its own messages in turn;
# where ranks share cores (lay.cpus) the cores also handle the other local ranks' messages, so a rank
# waits for at least its host's messages divided among the cores (4 ranks on 2 cores: 24 / 2 = 12 for
# a round of direct, 8 / 2 = 4 for one of halving-doubling). A line's q is the larger at either end.
def messages(lay: _Layout, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Per rank, the messages of one round it waits for ([Note: messages])."""
    n = len(lay.node)
    own = (np.bincount(src, minlength=n) + np.bincount(dst, minlength=n)).astype(float)
    if not lay.cpus:
        return own
    return np.maximum(own, np.bincount(lay.host, own)[lay.host] / lay.cpus)


# [Note: shared cores]
# Ranks sharing a host's cores finish a round no sooner than the host's work over its cores, nor a rank
# sooner than its own work alone (McNaughton's bound). Work is memory traffic: 2 per byte copied into or out
# of a slot, 3 per byte reduced. That bound, the fair share, is host work / (cores * own work) within
# [1, busy / cores]: in tree all-reduce on 4 ranks, 2 cores the parents get 7/6 (14 / (2 * 6)), the leaves
# 2. It assumes every rank runs whenever it has work. It does not: a transfer moves through slots of a
# shared-memory channel, and a rank whose peer is descheduled waits for it, so the busy / cores of plain
# time-slicing binds too. A rank's stretch is the geometric mean of the two (parents sqrt(7/6 * 2) = 1.53),
# a transfer's that of its busier end; balanced rounds (ring, halving-doubling, direct) keep busy / cores.
# Refitted on the three fit sweeps of the 2-core machine, the fit's error was lowest between the two
# (rms of log predicted / measured 0.1606 at the mean, 0.1622 with the fair share alone, 0.1649 with
# busy / cores alone). On three held-out sweeps the picks lost 1.3 ms of the 297 ms the fastest
# algorithms took, against 7.8 ms with the fair share, which priced the pipelined tree all-reduce
# 1-3% below direct at 4-16 MiB where it ran 5-13% slower, and the pipelined chain broadcast of
# 16 MiB equal to the tree where it ran 7-11% slower (benchmarks/results/cpu-gloo-4rank.md).
# A message that fits one slot, though, is deposited whole while its receiver is descheduled, and
# the sender goes on: no one waits. So a round whose ranks are unequally loaded carries both: lines
# stretched by the fair share up to the buffer size at which its largest message fills a slot, and
# by the mean above it (Struct's cut and side; pricing.line_times drops the lines that do not hold).
# Refitted, the fit's error fell to 0.1604 (0.1609 with the cut at the 4 MiB channel), and the tree
# all-reduce at 1 MiB, priced 1.04-1.35x of its measured time, came down to the direct one's side.
# A rank that only sends, to a rank that only receives (and reduces, perhaps) and has no other peer, has
# work that does not overlap its peer's: the receiver copies a message out once it is in. Such a pair
# keeps one core busy at a time, so its chain of work is both ends' work, and the fair share divides the
# host's work by that chain, not by one end's. Binomial broadcast's second round on 4 ranks, 2 cores
# (0->1, 2->3): a fair share of 1, not 2 (host work 8 over 2 cores, a chain of 4), and sqrt(2) above the
# slot. Over twelve held-out sweeps on the 2-core EPYC guest, the tree broadcast took 0.80x the chain's
# time per byte (64 KiB-1 MiB and 4-16 MiB alike), where one stretch for both had priced them equal.
# Refitted on the same sweeps, the fit's error fell from 0.1521 to 0.1508 and the held-out sweeps' from
# 0.1286 to 0.1272; the tree broadcast's rows at 64 KiB-1 MiB went from 1.21/1.19/1.28x of each row's
# median to 1.20/1.12/1.11x.
def round_lines(lay: _Layout, src: np.ndarray, dst: np.ndarray, frac: float | np.ndarray,
                red_rank: np.ndarray | None = None, red_frac: float | np.ndarray = 0.0,
                rank: int | None = None) -> np.ndarray:
    """The lines of one round: transfers src->dst moving ``frac`` of the buffer; ranks reducing. ``rank``: only
    that rank's own transfers and reductions, in the round's company ([Note: back to back])."""
    n = len(lay.node)
    red = np.zeros(n)
    if red_rank is not None and len(red_rank):
        np.add.at(red, np.asarray(red_rank, np.int64), np.broadcast_to(red_frac, np.shape(red_rank)))
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    f = np.broadcast_to(np.asarray(frac, float), src.shape)
    q = messages(lay, src[f > 0], dst[f > 0])  # the executor skips empty transfers
    busy = np.bincount(np.concatenate([src, dst]), minlength=n) > 0
    lonely = np.flatnonzero((red > 0) & ~busy)
    busy[lonely] = True
    work = 2 * (np.bincount(src, f, minlength=n) + np.bincount(dst, f, minlength=n)) + 3 * red
    # Both ends of a transfer wait for it; the end with more work (copies, reductions) finishes last.
    heavy = np.where(work[src] >= work[dst], src, dst)
    both = (np.bincount(src, minlength=n) > 0) & (np.bincount(dst, minlength=n) > 0)  # ranks sending and receiving
    loads, r_edge, q_edge = edge_loads(lay, src, dst, f), np.maximum(red[src], red[dst]), np.maximum(q[src], q[dst])
    duplex, mine, alone_red = both[src] | both[dst], slice(None), lonely
    if rank is not None:
        mine, alone_red = (src == rank) | (dst == rank), lonely[lonely == rank]
        r_edge = np.full(len(src), red[rank])

    def lines(m: np.ndarray, cut: float = 0.0, side: int = 0) -> np.ndarray:
        out = np.concatenate([_lines(loads[mine], r_edge[mine], m[heavy][mine], q_edge[mine], duplex[mine], cut, side),
                              _when(np.column_stack([np.full(len(alone_red), 2.0), np.zeros(len(alone_red)),
                                                     red[alone_red], m[alone_red], q[alone_red]]), cut, side)])
        return _pareto(out) if len(out) else np.zeros((0, WIDTH))

    # a sender and a receiver that have no other peer work one after the other ([Note: shared cores])
    sends, recvs = np.bincount(src, minlength=n), np.bincount(dst, minlength=n)
    alone = (f > 0) & (sends[src] == 1) & (recvs[src] == 0) & (recvs[dst] == 1) & (sends[dst] == 0)
    chain = work.copy()
    chain[src[alone]] = chain[dst[alone]] = work[src[alone]] + work[dst[alone]]
    fair, m = lay.stretches(busy, work, chain)  # [Note: shared cores]
    if np.allclose(fair, m):
        return lines(m)
    # up to the buffer size where its largest message fills a slot, the round's ranks wait for no one
    g = float(f.max()) if len(f) else 0.0
    cut = lay.slot / g if g > 0 else np.inf
    return np.concatenate([lines(fair, cut, -1), lines(m, cut, 1)])


def _pareto(lines: np.ndarray) -> np.ndarray:
    """Drop lines that another line of the same tier, stretch and messages beats in both f and r (vectorised);
    the lines share one size range (cut, side: Struct)."""
    lines = np.round(lines, 12)
    when = lines[0, 5:]
    keep = []
    for t in np.unique(lines[:, 0]):
        sel = lines[lines[:, 0] == t]
        keys = sel[:, 3] + 1j * sel[:, 4]
        groups = np.unique(keys)
        for g in groups:
            sub = sel if len(groups) == 1 else sel[keys == g]
            z = np.unique(sub[:, 1] + 1j * sub[:, 2])[::-1]  # distinct (f, r): f descending, then r
            best_r = np.maximum.accumulate(np.concatenate([[-1.0], z.imag[:-1]]))
            z = z[z.imag > best_r]
            keep.append(np.column_stack([np.full(len(z), float(t)), z.real, z.imag, np.full(len(z), g.real),
                                         np.full(len(z), g.imag), np.tile(when, (len(z), 1))]))
    return np.concatenate(keep)


def _collect(rounds: list[np.ndarray]) -> Struct:
    return join(tuple((1, lines) for lines in rounds if len(lines)))


# [Note: posted ahead]
# A GPU rank's host posts each step to its stream and goes on to the next without waiting for the
# bytes, so a round costs the devices its transfer (alpha and bytes) while the host's cost of a step
# (step: the post of a grouped send/recv) is paid once per step of a rank, not once per round. A chain
# broadcast over 4 GPUs runs 3 rounds, yet no rank posts more than 2 steps; a binomial tree runs 2 and
# posts 2. On 4 x H200 at 64 KiB both took 17-25 us, and a step priced per round put the chain at
# 28 us. On device layouts a structure whose ranks sit out rounds therefore carries one more line, of
# tier HOST, counted H - R times (H: the most steps one rank posts, R: its rounds), that takes back the
# step of the rounds no host pays for: the prediction stays linear in theta (calibrate.py), and
# structures in which every rank works every round (ring, halving-doubling on 2^k ranks, direct,
# pairwise) are unchanged. On CPU the host moves the bytes itself, a step waits for the one before it,
# and every round costs its step.
# [Note: back to back]
# busbw, as nccl-tests does, times -n calls made back to back and one wait for them all. On devices a rank
# that has done its part of one call goes on to the next, so the calls overlap: after the first call, each
# call adds only what its busiest rank does, and n calls cost one call alone and n - 1 of the busiest rank's
# shares. CostModel(back_to_back=n) prices a call as (1 - 1/n) share + call / n. A rank's share is the rounds
# it works, each priced by its own transfers and reductions in the round's company (round_lines(..., rank)),
# and its own set-up copies (a reduce's senders clone their buffer, the root does not); the busiest rank
# works the most rounds, and among those moves and reduces the most bytes. Measured on 4 x H200 (NCCL 2.28,
# benchmarks/probes/overlap.py): a one-part chain broadcast of 1 GiB took 5.8 ms a call back to back and 8.8
# alone, its inner ranks working 2 of its 3 rounds; a binomial tree, whose root works every round, 5.80 and
# 5.84 ms; the chain of 64 MiB 526 and 841-850 us. Priced one call at a time against busbw, the fit had
# learned some of that overlap into its constants and priced the tree broadcast of 64 MiB 0.74x and the
# chain reduce of 4 MiB 1.25x of their medians over twenty-one held-out launches; priced back to back (with
# the one-way curve of [Note: one way] in pricing.py) and refitted, 0.93x and 1.09x. On 2 x H200 a reduce
# of 64-256 MiB ran 236-247 and 882-892 us back to back, about the root's transfer and reduction; the clone
# of the next call hides behind them. calibrate.py prices busbw's device rows this way; a Communicator's
# plan() prices a call alone, which is what a blocking call waits for. CPU ranks are priced one call at a
# time either way: the shared cores bound the host's work already ([Note: shared cores]).
def worked(lay: _Layout, rounds: list[np.ndarray], active: np.ndarray,
           lines_of: Callable[[int, int], np.ndarray] | None = None) -> Struct | Busy:
    """A structure from its rounds' lines and ``active`` (rounds x ranks: who sends, receives or reduces in each):
    one call's rounds and the steps its hosts post ([Note: posted ahead]); back to back on devices, a Busy
    whose ranks' own lines ``lines_of(round, rank)`` gives ([Note: back to back])."""
    active = np.asarray(active, bool)
    if lay.back_to_back and lines_of is not None:
        return Busy(active, lines_of)
    return join(_collect(rounds), posted(lay, active))


@dataclass(frozen=True)
class Busy:
    """Who works which rounds of a structure, and each rank's own lines in them ([Note: back to back])."""
    active: np.ndarray  # rounds x ranks
    lines_of: Callable[[int, int], np.ndarray]  # (round, rank) -> the rank's own transfers and reductions

    def struct(self, setup: Struct, copies: np.ndarray) -> Struct:
        """The rounds of the busiest rank, with ``setup`` (the set-up copies) if ``copies`` says it makes them
        (copying_ranks): the rank working the most rounds, and among those, the most bytes moved and reduced
        (16 of them tried)."""
        extra = sum(float(L[:, 2].sum()) for _, L in setup)
        count = self.active.sum(axis=0)
        tied = np.flatnonzero(count == count.max())
        best: tuple[float, list[np.ndarray], int] | None = None
        for b in tied[np.unique(np.linspace(0, len(tied) - 1, min(len(tied), 16)).astype(int))]:
            rounds = [self.lines_of(int(t), int(b)) for t in np.flatnonzero(self.active[:, b])]
            work = sum(float((L[:, 1] + L[:, 2]).max()) for L in rounds if len(L)) + extra * copies[b]
            if best is None or work > best[0]:
                best = (work, rounds, int(b))
        return join(_collect(best[1]), setup if copies[best[2]] else ())


def posted(lay: _Layout, active: np.ndarray) -> Struct:
    """The HOST line of a structure whose ``active`` (rounds x ranks) says who works ([Note: posted ahead])."""
    if not lay.device:
        return ()
    active = np.asarray(active, bool)
    active = active[active.any(axis=1)]
    return _host_line(lay, int(active.sum(axis=0).max()) - len(active)) if len(active) else ()


def _host_line(lay: _Layout, spare: int) -> Struct:
    """``spare`` (<= 0) rounds' worth of steps taken back where a device's host posts ahead ([Note: posted ahead])."""
    return ((spare, _when(np.array([[float(HOST), 0.0, 0.0, 1.0, 0.0]]))),) if spare and lay.device else ()


def _active(n: int, *rounds) -> np.ndarray:
    """rounds x ranks: whether each rank sends or receives in each round, from per-round arrays of ranks."""
    out = np.zeros((len(rounds), n), bool)
    for i, ranks in enumerate(rounds):
        out[i, np.asarray(ranks, np.int64)] = True
    return out


# -- rounds of a Schedule -----------------------------------------------------

def schedule_rounds(s: Schedule) -> list[list[int]]:
    """Rendezvous round of every (rank, step), as verify.py's Trace defines it, in O(ops)."""
    n = s.world_size
    sends: dict[tuple[int, int], list[int]] = {}
    recvs: dict[tuple[int, int], list[int]] = {}
    partners: list[list[list[tuple[int, int]]]] = [[[] for _ in s.ranks[r]] for r in range(n)]
    for r in range(n):
        for i, st in enumerate(s.ranks[r]):
            for op in st.ops:
                (sends.setdefault((r, op.peer), []) if isinstance(op, Send)
                 else recvs.setdefault((op.peer, r), [])).append(i)
    for (a, b), ss in sends.items():
        for i, j in zip(ss, recvs.get((a, b), [])):
            partners[a][i].append((b, j))
            partners[b][j].append((a, i))
    rnd: list[list[int]] = [[-1] * len(s.ranks[r]) for r in range(n)]
    at, stack, waiting = [0] * n, list(range(n)), {}
    while stack:
        r = stack.pop()
        while at[r] < len(rnd[r]):
            i = at[r]
            t, blocked = (rnd[r][i - 1] + 1 if i else 0), None
            for p, j in partners[r][i]:
                if j and rnd[p][j - 1] < 0:
                    blocked = (p, j - 1)
                    break
                t = max(t, rnd[p][j - 1] + 1 if j else 0)
            if blocked:
                waiting.setdefault(blocked, []).append(r)
                break
            rnd[r][i] = t
            at[r] += 1
            stack.extend(waiting.pop((r, i), ()))
    if any(at[r] < len(rnd[r]) for r in range(n)):
        raise ValueError(f"{s.algorithm} {s.collective.value}: schedule deadlocks; run verify() on it")
    return rnd


def price_schedule(s: Schedule, lay: _Layout) -> Struct:
    """Structural lines of every round of a Schedule (the generic path, any algorithm)."""
    rnd = schedule_rounds(s)
    per: dict[int, tuple[list, list, list, list, list]] = {}
    for r in range(s.world_size):
        for i, st in enumerate(s.ranks[r]):
            src, dst, frac, rr, rf = per.setdefault(rnd[r][i], ([], [], [], [], []))
            for op in st.ops:
                if isinstance(op, Send):
                    src.append(r)
                    dst.append(op.peer)
                    frac.append(op.nchunks / s.nchunks)
                elif isinstance(op, Recv) and op.reduce:
                    rr.append(r)
                    rf.append(op.nchunks / s.nchunks)
    args = [(np.array(a, np.int64), np.array(b, np.int64), np.array(f, float), np.array(c, np.int64),
             np.array(d, float)) for a, b, f, c, d in per.values()]
    live = [(lines, x) for x in args if len(lines := round_lines(lay, *x))]

    def lines_of(t: int, rank: int) -> np.ndarray:  # [Note: back to back]
        return round_lines(lay, *live[t][1], rank=rank)

    who = [np.concatenate([src, dst, red]) for _, (src, dst, _, red, _) in live]
    return worked(lay, [lines for lines, _ in live], _active(s.world_size, *who), lines_of)


def join(*parts: Struct) -> Struct:
    counts: Counter = Counter()
    arrays: dict[bytes, np.ndarray] = {}
    for part in parts:
        for c, L in part:
            counts[L.tobytes()] += c
            arrays[L.tobytes()] = L
    return tuple((c, arrays[k]) for k, c in counts.items())


# [Note: set-up copies]
# execute.run_collective copies outside the rounds: reduce-scatter reduces a clone of its input and
# copies its block out, reduce clones the buffer on every rank but the root, all-gather and
# all-to-all copy the rank's own block (an all-gather called in place has it there already: on the 2-core
# EPYC guest its rows ran 7% faster than out of place at 1-16 MiB, 0.28 ms of 2.05 at 4 MiB, the copy's
# cost). Copying x bytes moves 2x bytes of memory, priced like a reduction (3 bytes of traffic per byte)
# as a line reducing 2x/3, in tier SETUP: no step, latency or message. On 2 x H200 reduce-scatter of 1 GiB
# ran 1.3 ms over its rounds: the copies at ~2 TB/s.
_SETUP_COPY = {Collective.REDUCE_SCATTER: lambda n: 1 + 1 / n, Collective.REDUCE: lambda n: 1.0,
               Collective.ALL_GATHER: lambda n: 1 / n, Collective.ALL_TO_ALL: lambda n: 1 / n}


def setup_struct(lay: _Layout, coll: Collective, root: int = 0, algorithm: str | None = None,
                 in_place: bool = False) -> Struct:
    """The buffer copies run_collective makes around our schedules, as one SETUP line ([Note: set-up copies]);
    none for an own-block copy that ``algorithm`` hides on a device (own_block_hidden), or for an all-gather
    called in place."""
    n = len(lay.node)
    copy = _SETUP_COPY.get(coll)
    if copy is None or n < 2 or (in_place and coll is Collective.ALL_GATHER):
        return ()
    if algorithm is not None and lay.device and coll in _OWN_BLOCK and own_block_hidden(algorithm, coll, n):
        return ()
    busy = copying_ranks(n, coll, root)
    m = float(lay.stretch(busy)[busy].max())
    return ((1, _when(np.array([[float(SETUP), 0.0, 2 * copy(n) / 3, m, 0.0]]))),)


def copying_ranks(n: int, coll: Collective, root: int = 0) -> np.ndarray:
    """Per rank, whether run_collective makes set-up copies there: every rank, but a reduce's root, which
    reduces in place ([Note: set-up copies])."""
    return np.arange(n) != root if coll is Collective.REDUCE else np.ones(n, bool)


_OWN_BLOCK = (Collective.ALL_GATHER, Collective.ALL_TO_ALL)


@functools.lru_cache(maxsize=None)
def own_block_hidden(algorithm: str, coll: Collective, n: int) -> bool:
    """Whether ``algorithm``'s own-block copy costs a device nothing: it runs beside the schedule on every rank
    and each rank has one step (execute.py's [Note: own block aside]: on 4 x H200 a copy beside three steps
    hid a fifth of its time). Checked on at most 16 ranks: the shape of the algorithm decides."""
    from . import algorithms
    s = algorithms.build(algorithm, coll, min(n, 16), root=0)
    return all(execute.own_block_aside(s, r) and sum(bool(st.ops) for st in s.steps(r)) <= 1
               for r in range(s.world_size))
