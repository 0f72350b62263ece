"""Evaluating structures: a Struct's lines (rounds.py) priced at sizes and parameters.

Each round takes its slowest line, rounds add up (model.py, [Note: structural
lines]); a tier-3 line's bytes move at the rate of their message size where the
profile has a measured curve ([Note: message size]; calibrate.py builds it from
benchmarks/p2p_curve.py), and the measured black boxes (native, our NVLink kernel)
interpolated from their tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rounds import _TIERS, HOST, ONE_WAY, PAIR, SETUP, Struct, coefficients

# [Note: message size]
# A tier-3 line is one stream between two devices, and its rate depends on the size of the message:
# on 4 x H200 (NCCL 2.28, benchmarks/p2p_curve.py) a ring step of grouped send/recv moved 143-160 GB/s
# per message from 32 to 128 MiB and 294-345 GB/s from 192 MiB up, where one constant bandwidth
# priced ring all-gather 0.75x at 64 MiB and 1.4x at 1 GiB. A MessageCurve holds the measured step
# times of one such message by size as a slowdown against the curve's fastest rate (1 there, the
# rate 1/B_pair stands for), interpolated on log size and held flat past its ends. Below the size
# where a step takes twice the smallest step's time, the time is mostly per-step cost (which
# step, alpha and msg price), so the slowdown there is held at that size's. A reducing transfer is
# posted in segments of at most ``segment`` bytes (execute.py), so its messages are no larger. The
# factor multiplies bytes / B_pair, keeping a prediction linear in theta.

# [Note: one way]
# The curve is measured on ring steps, where every GPU sends and receives at once. A transfer whose ends
# only send or only receive in the round (tier 6: a tree's or an unpipelined chain's rounds) moves at a
# rate of its own, with a curve of its own (benchmarks/p2p_curve.py --one-way: rank 0 sends to rank 1 and
# the others sit out). On 4 x H200 (NCCL 2.28) one such message moved 235-257 GB/s at 16-128 MiB and
# 352-369 GB/s from 256 MiB, where a ring step moved 117-158 and 297-358; on 2 x H200 it moved 274-347
# GB/s at 16-128 MiB. Without a one-way curve the line is priced at the flat 1/B_pair, where the port's
# line (tier 0) usually binds: a depth-1 chain reduce priced with the ring-step curve ran 1.9x faster, and
# a binomial broadcast of 64 MiB priced flat ran 0.74x of the price (two transfers of 270 us each, back to
# back, against 185 us at the port's rate). Each curve is a slowdown against its own fastest rate.


@dataclass(frozen=True)
class MessageCurve:
    """Per pair tier (PAIR: ring steps; ONE_WAY: [Note: one way]), log message size -> slowdown."""
    tables: tuple[tuple[int, np.ndarray, np.ndarray], ...]
    segment: float

    @classmethod
    def of(cls, points, segment: float, one_way=None) -> MessageCurve | None:
        """From measured [bytes, seconds] points of ring steps and of one-way transfers (benchmarks/p2p_curve.py);
        None without two points of either."""
        tables = tuple((tier, *t) for tier, pts in ((PAIR, points), (ONE_WAY, one_way))
                       if (t := _slowdowns(pts)) is not None)
        return cls(tables, float(segment)) if tables else None

    def factor(self, L: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """lines x sizes: how much slower than 1/B_pair each pair line's messages move (1 elsewhere)."""
        msg = L[:, 1][:, None] * nbytes[None, :]
        msg = np.where(L[:, 2][:, None] > 0, np.minimum(msg, self.segment), msg)
        x = np.log(np.maximum(msg, 1.0))
        out = np.ones_like(msg)
        for tier, log_bytes, slowdown in self.tables:
            out = np.where((L[:, 0] == tier)[:, None], np.interp(x, log_bytes, slowdown), out)
        return out


def _slowdowns(points) -> tuple[np.ndarray, np.ndarray] | None:
    """(log bytes, slowdown against the fastest rate) of measured points ([Note: message size])."""
    pts = sorted((float(b), float(t)) for b, t in points or () if b > 0 and t > 0)
    if len(pts) < 2:
        return None
    S, t = np.array(pts).T
    knee = int(np.argmax(t >= 2 * t.min())) if (t >= 2 * t.min()).any() else len(t) - 1
    rate = S / t
    slow = rate[knee:].max() / rate
    slow[:knee] = slow[knee]
    return np.log(S), slow


def line_times(L: np.ndarray, theta: np.ndarray, nbytes: np.ndarray,
               curve: MessageCurve | None = None) -> np.ndarray:
    """lines x sizes: each line's seconds in one round (the round takes its slowest)."""
    a, bl, br = coefficients(L, theta)
    wire = bl[:, None] * nbytes[None, :]
    if curve is not None:
        wire = wire * curve.factor(L, nbytes)
    t = a[:, None] + wire + br[:, None] * nbytes[None, :]
    side = L[:, 6]
    if side.any():  # lines that hold only up to or only above a buffer size (Struct; [Note: shared cores])
        above = nbytes[None, :] > L[:, 5][:, None]
        t = np.where(((side < 0)[:, None] & above) | ((side > 0)[:, None] & ~above), -np.inf, t)
    return t


def binding(L: np.ndarray, theta: np.ndarray, nbytes: float,
            curve: MessageCurve | None = None) -> tuple[int, float]:
    """The round's slowest line at ``nbytes`` and its message-size slowdown (1 off the pair tier)."""
    S = np.array([float(nbytes)])
    j = int(np.argmax(line_times(L, theta, S, curve)[:, 0]))
    return j, float(curve.factor(L[j:j + 1], S)[0, 0]) if curve is not None else 1.0


def evaluate(struct: Struct, theta: np.ndarray, nbytes: np.ndarray, step: float | None = None,
             curve: MessageCurve | None = None) -> np.ndarray:
    """Predicted seconds at each size in ``nbytes`` (an array); ``step`` overrides the step overhead."""
    th = theta.copy()
    if step is not None:
        th[1] = step
    total = np.full(np.shape(nbytes), th[0])
    for count, L in struct:
        total = total + count * np.max(line_times(L, th, nbytes, curve), axis=0)
    return total


def breakdown(struct: Struct, theta: np.ndarray, nbytes: float, curve: MessageCurve | None = None) -> dict[str, float]:
    """Seconds spent on latency, bytes per tier and reduction, following each round's slowest line."""
    out = dict.fromkeys(("latency", "intra", "inter", "reduce"), 0.0)
    out["latency"] = theta[0]
    for count, L in struct:
        a, bl, br = coefficients(L, theta)
        j, g = binding(L, theta, nbytes, curve)
        out["latency"] += count * a[j]
        out["reduce"] += count * br[j] * nbytes
        if int(L[j, 0]) not in (2, SETUP, HOST):
            out[_TIERS[int(L[j, 0])]] += count * bl[j] * g * nbytes
    return out


def _measured(fit: list, S: np.ndarray) -> np.ndarray:
    """A calibrated black box (native, or our NVLink kernel): [alpha, seconds per byte] and, optionally,
    the measured (bytes, seconds) points it was fitted to. Between the first and last point the time is
    interpolated on log-log axes (NCCL switches protocol and algorithm with size, which no one line
    follows); beyond them the line's slope continues from the nearest point, so the price does not
    jump where the points end (the line alone put NCCL's 2-GPU all-gather at 1.125 GiB 4% below its
    measured 1 GiB point, and below our ring there, which ran 1.22x faster at 1 GiB)."""
    t = fit[0] + fit[1] * S
    if len(fit) > 2 and len(fit[2]) >= 2:
        pts = np.asarray(fit[2], dtype=float)
        inside = np.exp(np.interp(np.log(np.maximum(S, 1.0)), np.log(pts[:, 0]), np.log(pts[:, 1])))
        below = pts[0, 1] + fit[1] * (S - pts[0, 0])
        above = pts[-1, 1] + fit[1] * (S - pts[-1, 0])
        t = np.where(S < pts[0, 0], below, np.where(S > pts[-1, 0], above, inside))
    return t
