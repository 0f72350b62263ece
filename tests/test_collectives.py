"""Correctness sweep on gloo: world sizes 1..8, every collective and algorithm,
dtypes x ops x element counts {0, 1, 7, 1000, 2^20+3}, against a local reference.

Coverage is pairwise rather than the full product, to keep the suite fast on
two cores: for every (world size, collective, algorithm) every dtype meets
every op at counts 7 and 1000 (above 4 ranks, at one of the two in turn);
counts 0 and 1 run with every dtype; 2^20+3 runs with float32 (and bfloat16
up to 4 ranks). In-place layouts and roots other than 0 are
mixed in. Small cases run with 256-byte segments so multi-segment paths run too.
"""

from __future__ import annotations

import itertools

import pytest

import collectives.algorithms as algorithms
from collectives.schedule import Collective

FLOATS = ("float32", "float64", "float16", "bfloat16")
INTS = ("int32", "int64")
ALL_DTYPES = FLOATS + INTS
OPS = ("sum", "avg", "max", "min", "prod")
BIG = 2**20 + 3


def _ops_for(coll: Collective, dt: str) -> tuple[str, ...]:
    if not coll.reduces:
        return ("sum",)
    return tuple(op for op in OPS if op != "avg" or dt in FLOATS)


def cases_for(size: int) -> list[tuple]:
    cases = []
    seed = 0
    for coll in Collective:
        for algo in algorithms.supported(coll):
            for dt in ALL_DTYPES:
                ops = _ops_for(coll, dt)
                pairs = list(itertools.product(ops, (7, 1000)))
                if size > 4:  # bigger worlds cost more per case: each (dtype, op) at one count, in turn
                    pairs = [(op, (7, 1000)[k % 2]) for k, op in enumerate(ops)]
                for op, count in pairs:
                    seed += 1
                    root = (seed * 7) % size
                    in_place = coll in (Collective.REDUCE_SCATTER, Collective.ALL_GATHER) and seed % 2 == 0
                    cases.append((coll.value, algo, dt, op, count, root, seed, in_place))
                for count in (0, 1):
                    seed += 1
                    cases.append((coll.value, algo, dt, ops[seed % len(ops)], count, seed % size, seed, False))
            bigs = (("float32", "sum"),) + ((("bfloat16", _ops_for(coll, "bfloat16")[-1]),) if size <= 4 else ())
            for dt, op in bigs:
                big = max(1, BIG // size) if coll.blocked else BIG  # blocked: count is per-rank block
                seed += 1
                cases.append((coll.value, algo, dt, op, big, (size - 1) % size, seed, False))
    return cases


def _check(results: list[list[tuple[str, str | None]]], cases: list[tuple]) -> None:
    failures = []
    for i, case in enumerate(cases):
        errs = {r: res[i][0] for r, res in enumerate(results) if res[i][0]}
        if errs:
            failures.append(f"{case}: " + "; ".join(f"rank {r}: {e}" for r, e in errs.items()))
            continue
        digests = {res[i][1] for res in results}
        if case[0] == "all_reduce" and len(digests) != 1:
            failures.append(f"{case}: all-reduce results differ bitwise between ranks")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])


@pytest.mark.parametrize("size", range(1, 9))
def test_sweep(pool, size):
    cases = cases_for(size)
    results = pool.run(size, "tests.cases:sweep", cases, timeout=400)
    _check(results, cases)
