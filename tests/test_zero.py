"""ZeRO stages 1-3 and sharded checkpoints.

Pure tests of the flat layouts and unit partitioning run in this process. The
rest run on the persistent gloo worlds (tests/zero_cases.py) and compare with
single-process training on the global batch. World-size cases are ordered so
that each world starts once even when only three worlds are kept alive
(checkpoints are saved at world 2 first, then loaded at worlds 1, 3 and 4).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from parallel.zero._flat import FlatLayout, flatten_into, slot_views
from parallel.zero._units import bucket_units, module_units
from tests import zero_cases as zc
from tests.harness import run_torchrun

TOL = 2e-6  # float32 reordering of the gradient average, over three AdamW steps


# -- pure: layouts and units ---------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_layout_shards_cover_every_element_once(world):
    layout = FlatLayout.build([("a", (3, 5)), ("b", (7,)), ("c", (1,))], world)
    assert layout.numel == 23 and layout.shard == math.ceil(23 / world) and layout.padded % world == 0
    covered = []
    for r in range(world):
        lo, hi = layout.bounds(r)
        assert hi - lo <= layout.shard
        covered += range(lo, hi)
        pieces = layout.pieces(lo, hi)
        assert sum(p.end - p.start for p in pieces) == hi - lo
        assert all(p.flat_start == layout.slots["abc".index(p.name)].offset + p.start for p in pieces)
    assert covered == list(range(23))
    assert FlatLayout.from_json(layout.to_json()) == layout


def test_flatten_and_views_round_trip():
    layout = FlatLayout.build([("w", (2, 3)), ("b", (3,))], 4)
    flat = torch.full((layout.padded,), 9.0)
    w, b = torch.arange(6.0).view(2, 3), torch.tensor([-1.0, -2.0, -3.0])
    flatten_into(flat, layout, [w, None])
    assert flat[6:9].eq(0).all() and flat[9:].eq(0).all()  # None -> zeros; padding zeroed
    flatten_into(flat, layout, [w, b])
    vw, vb = slot_views(flat, layout)
    assert torch.equal(vw, w) and torch.equal(vb, b) and vw.data_ptr() == flat.data_ptr()


def test_bucket_units_last_registered_first():
    net = zc.make_model()
    named = list(net.named_parameters())
    groups = bucket_units(named, 2, bucket_bytes=400)
    flat = [n for g in groups for n, _ in g]
    assert flat == [n for n, _ in reversed(named)]
    assert all(sum(p.numel() * 4 for _, p in g) <= 400 or len(g) == 1 for g in groups)


def _unit_names(module, policy=None):
    return [(m is module, [n for n, _ in ps]) for m, ps in module_units(module, list(module.named_parameters()), policy)]


def test_module_units_default_policy():
    block = ["norm.weight", "norm.bias", "lin.weight", "lin.bias"]
    assert _unit_names(zc.make_model()) == [  # root first, then the children, through the ModuleList
        (True, ["scale"]), (False, ["embed.weight", "embed.bias"]),
        (False, [f"blocks.0.{x}" for x in block]), (False, [f"blocks.1.{x}" for x in block]),
        (False, ["head.weight", "head.bias"])]
    by_class = _unit_names(zc.make_model(), (nn.Linear,))  # the root keeps the norms and the scale
    assert [len(names) for _, names in by_class] == [5, 2, 2, 2, 2]


def test_module_units_shared_parameters_go_to_the_common_owner():
    tied = dict((n, root) for root, names in _unit_names(zc.make_model("tied")) for n in names)
    assert tied["embed.weight"] is True and tied["unembed.bias"] is False
    shared = dict((n, root) for root, names in _unit_names(zc.make_model("shared")) for n in names)
    assert shared == {"a.weight": True, "a.bias": True, "out.weight": False, "out.bias": False}


# -- on gloo worlds, grouped by world size -------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, pool):
    """Checkpoints saved at world 2 after two steps, one per stage."""
    root = tmp_path_factory.mktemp("zero-ckpt")
    dirs = {}
    for stage in (1, 2, 3):
        dirs[stage] = str(root / f"stage{stage}")
        errs = pool.run(2, "tests.zero_cases:save_after", dirs[stage], stage, "net", 2)
        assert max(errs) < TOL
    return dirs


def _equivalence(pool, world):
    for results in pool.run(world, "tests.zero_cases:equivalence"):
        for cfg, err, _units, copied in results:
            assert err < TOL, f"world {world}, (stage, model, optimizer, micro, bucket_mb) = {cfg}: error {err:.3g}"
            # stage 3 accumulates gradients straight into the reduce-scatter buckets ([Note: gradient
            # buckets in place]); only stages 1 and 2 copy them
            assert cfg[0] != 3 or copied == 0, f"world {world}, {cfg}: {copied} units' gradients were copied"


def _load(pool, world, saved):
    # each saved stage loads into another stage, so layouts and strategies differ between save and load
    for stage, directory in saved.items():
        load_stage = (stage + world) % 3 + 1
        errs = pool.run(world, "tests.zero_cases:load_and_continue", directory, load_stage, "net", 2, 2)
        assert max(errs) < TOL, f"saved at world 2 stage {stage}, loaded at world {world} stage {load_stage}: {errs}"


def _mixed(pool, world):
    for res in pool.run(world, "tests.zero_cases:mixed_precision"):
        for r in res:
            stage, report = r["stage"], r["report"]
            assert r["compute_dtypes"] == ["torch.bfloat16"] and r["master_dtype"] == "torch.float32"
            assert r["out_dtype"] == ("torch.float32" if stage == 2 else "torch.bfloat16")  # output_dtype
            assert r["error"] < 5e-2, r  # bf16 forward/backward vs the float32 reference
            padded = sum(n for n, _ in [(s * world, s) for _, s in r["units"]])
            shard = sum(s for _, s in r["units"])
            steps = 4 * len(r["units"])  # AdamW's float32 step counter per unit
            assert report["optimizer"] == 12 * shard + steps, (stage, report)  # master + exp_avg + exp_avg_sq
            if stage == 1:
                assert (report["params"], report["grads"]) == (2 * padded, 2 * padded)
            elif stage == 2:
                assert (report["params"], report["grads"]) == (2 * padded, 2 * shard)
            else:
                assert (report["params"], report["grads"]) == (2 * shard, 2 * shard)


def _clipping(pool, world):
    for results in pool.run(world, "tests.zero_cases:clipping"):
        for stage, err, norm_err in results:
            assert err < TOL and norm_err < TOL, f"stage {stage}: parameter error {err:.3g}, norm error {norm_err:.3g}"


def _atomic(pool, world, directory):
    res = pool.run(world, "tests.zero_cases:interrupted_saves", directory)
    for r in res:
        assert len(r["errors"]) == 2 and all("the previous checkpoint (ckpt-000001) is intact" in e for e in r["errors"])
        assert "simulated crash while writing" in r["errors"][0] and "publishing" in r["errors"][1]
        assert r["restored_error"] == 0.0  # loading after the failures gives the good checkpoint back
        assert r["first"] == "ckpt-000001" and r["second"] == "ckpt-000002"
        assert r["after"] == ["ckpt-000002", "latest"]  # failed saves' leftovers cleaned, old pruned


def _api(pool, world):
    (r,) = pool.run(world, "tests.zero_cases:api_checks")
    assert r["isinstance"] and r["hook_calls"] == 2 and r["lr"] == pytest.approx(5e-3) and r["step_without_backward"]
    assert r["stage"].startswith("stage:") and r["wrap"].startswith("wrap:")
    assert "LBFGS is not element-wise" in r["lbfgs"] and "head.bias" in r["frozen"]


CASES = [(2, "equivalence"), (2, "atomic"), (1, "equivalence"), (1, "load"), (1, "api"),
         (3, "equivalence"), (3, "load"), (3, "mixed"), (3, "clipping"), (4, "equivalence"), (4, "load")]


@pytest.mark.parametrize("world,check", CASES, ids=[f"{c}-world{w}" for w, c in CASES])
def test_zero(pool, saved, tmp_path, world, check):
    if check == "equivalence":
        _equivalence(pool, world)
    elif check == "load":
        _load(pool, world, saved)
    elif check == "mixed":
        _mixed(pool, world)
    elif check == "clipping":
        _clipping(pool, world)
    elif check == "atomic":
        _atomic(pool, world, str(tmp_path / "atomic"))
    else:
        _api(pool, world)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_nccl_two_gpus():
    proc = run_torchrun("tests.zero_cases", 2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
