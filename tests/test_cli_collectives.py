"""python -m collectives {topology, explain, simulate}, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from collectives import algorithms
from collectives.__main__ import main
from collectives.sizes import format_size, parse_size
from collectives.schedule import Collective
from collectives.topology import Topology


def _run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "collectives", *args], capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


def test_topology_save_then_explain_from_the_file(tmp_path):
    saved = tmp_path / "here.json"
    _run("topology", "--save", str(saved))
    assert Topology.load(saved).world_size == 1
    preset = tmp_path / "h100.json"
    Topology.preset("dgx-h100").save(preset)
    out = _run("explain", "--topology", str(preset), "--nodes", "16", "--op", "all_reduce", "--bytes", "1G").stdout
    assert "128 ranks on 16 node(s)" in out and "pick:" in out
    for name in algorithms.supported(Collective.ALL_REDUCE):
        assert name in out
    assert "busbw" in out and ("bandwidth-bound" in out or "latency-bound" in out)


def test_simulate_writes_a_plot(tmp_path):
    plot = tmp_path / "sim.png"
    out = _run("simulate", "--topology", "dgx-a100", "--nodes", "2", "--op", "all_reduce",
               "--max-bytes", "64M", "--plot", str(plot)).stdout
    assert plot.stat().st_size > 1000 and "64M" in out and "pick" in out


def test_bad_topology_fails_with_a_message():
    with pytest.raises(SystemExit, match="preset"):
        main(["explain", "--topology", "nowhere", "--op", "all_reduce", "--bytes", "1K"])


def test_sizes():
    assert parse_size("1G") == 1 << 30 and parse_size("64M") == 64 << 20 and parse_size("1K") == 1024
    assert parse_size("4096") == 4096 and parse_size("1.5GiB") == 3 << 29 and parse_size(".5K") == 512
    assert format_size(1 << 30) == "1G" and format_size(3000) == "3000"
    with pytest.raises(Exception):
        parse_size("lots")


def test_topology_preset_json(capsys):
    main(["topology", "--preset", "dgx-h100", "--nodes", "2"])
    assert json.loads(capsys.readouterr().out)["nics_per_node"] == 8
    main(["simulate", "--topology", "pcie-4gpu", "--max-bytes", "1M"])  # every op, no plot
    out = capsys.readouterr().out
    assert all(op.value in out for op in Collective)
