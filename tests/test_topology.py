"""Topology: presets and their units, JSON round trip, detection (this machine, fake sysfs, reports)."""

from __future__ import annotations

import json

import pytest

from collectives import topology as T
from collectives.topology import GPUS, Topology


def test_presets_carry_the_published_numbers_in_bytes_per_second():
    h = Topology.preset("dgx-h100", nodes=2)
    assert h.world_size == 16 and h.nodes == [list(range(8)), list(range(8, 16))]
    assert h.fabric == "nvswitch" and h.devices == ["H100"] * 16
    assert h.intra.bandwidth == 450e9          # NVLink 4: 18 links x 25 GB/s a direction (900 GB/s both ways)
    assert h.nic.bandwidth == 50e9 and h.nics_per_node == 8   # 400 Gb/s = 50 GB/s, one NIC per GPU
    a = Topology.preset("dgx-a100")
    assert a.intra.bandwidth == 300e9 and a.nic.bandwidth == 25e9 and a.nics_per_node == 8
    assert Topology.preset("ethernet-100g", 2).nic.bandwidth == 12.5e9
    p = Topology.preset("pcie-4gpu")
    assert p.fabric == "pcie" and p.world_size == 4 and 30e9 < p.intra.bandwidth < 33e9   # Gen4 x16
    with pytest.raises(ValueError, match="dgx-h100"):
        Topology.preset("dgx-h999")


def test_gpu_table():
    assert {g: (s.fp16_flops / 1e12, s.memory / 1e9, s.memory_bandwidth / 1e12) for g, s in GPUS.items()} == {
        "V100": (125, 32, 0.9), "A100": (312, 80, 2.0), "H100": (990, 80, 3.35),
        "H200": (990, 141, 4.8), "B200": (2200, 192, 8.0)}
    assert T.gpu_spec("NVIDIA H100 80GB HBM3") is GPUS["H100"]
    assert T.gpu_spec("cpu") is T.CPU


def test_nics_are_rails_or_shared():
    assert Topology.preset("dgx-h100", 2).nic_of() == list(range(8)) * 2
    assert Topology.preset("ethernet-100g", 2).nic_of() == [0] * 16
    assert Topology.preset("dgx-h100", 3).node_of() == [0] * 8 + [1] * 8 + [2] * 8


@pytest.mark.parametrize("make", [lambda: Topology.preset("dgx-a100", 3), lambda: Topology.local(4),
                                  lambda: Topology.local(6, nodes=[[0, 2, 4], [1, 3, 5]])])
def test_save_load_round_trip(tmp_path, make):
    topo = make()
    path = tmp_path / "topo.json"
    topo.save(path)
    json.loads(path.read_text())  # plain JSON
    assert Topology.load(path) == topo


def test_bad_node_maps_are_refused():
    with pytest.raises(ValueError, match="partition"):
        Topology(nodes=[[0, 1], [1, 2]], devices=["cpu"] * 3, fabric="shm", intra=T.loopback())
    with pytest.raises(ValueError, match="nic"):
        Topology(nodes=[[0], [1]], devices=["cpu"] * 2, fabric="shm", intra=T.loopback())


def test_detect_this_machine():
    topo = Topology.detect()
    assert topo.world_size == 1 and topo.nodes == [[0]]
    rep = topo.details["reports"][0]
    assert rep["cpus"] >= 1 and isinstance(rep["nics"], list)
    if rep["device"] == "cpu":
        assert topo.fabric == "shm"
    json.dumps(topo.to_json())


class _FakeComm:
    """What Topology.detect needs of a Communicator: every rank's JSON report."""

    def __init__(self, reports):
        self.reports, self.rank, self.size = reports, 0, len(reports)

    def exchange_json(self, obj):
        return self.reports


def test_detect_groups_ranks_by_torchrun_agent_then_host():
    env = [{"GROUP_RANK": str(g), "LOCAL_RANK": str(i)} for g in (0, 1) for i in (0, 1)]
    reports = [T.detect_local(e, sysfs="/nonexistent") for e in env]
    topo = Topology.detect(_FakeComm(reports))  # one host, two torchrun agents: two nodes
    assert topo.nodes == [[0, 1], [2, 3]] and topo.nic is not None
    same_host = [T.detect_local({"OMPI_COMM_WORLD_LOCAL_RANK": str(i)}, sysfs="/nonexistent") for i in range(3)]
    assert Topology.detect(_FakeComm(same_host)).nodes == [[0, 1, 2]]


def test_detect_reads_nics_and_pcie_from_sysfs(tmp_path):
    port = tmp_path / "class/infiniband/mlx5_0/ports/1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (port / "link_layer").write_text("InfiniBand\n")
    eth = tmp_path / "class/net/eth0"
    (eth / "device").mkdir(parents=True)
    (eth / "speed").write_text("100000\n")
    (tmp_path / "class/net/lo").mkdir(parents=True)  # virtual: no device link
    nics = T._detect_nics(str(tmp_path))
    assert {"name": "mlx5_0", "kind": "ib", "gbps": 400.0} in nics
    assert {"name": "eth0", "kind": "eth", "gbps": 100.0} in nics and len(nics) == 2
    dev = tmp_path / "bus/pci/devices/0000:18:00.0"
    dev.mkdir(parents=True)
    (dev / "current_link_speed").write_text("16.0 GT/s PCIe\n")
    (dev / "current_link_width").write_text("16\n")
    assert T._sysfs_pcie("00000000:18:00.0", str(tmp_path)) == {"current_gen": 4, "current_width": 16}


def test_reports_of_an_nvlink_machine():
    """What NVML reports on a 4-GPU NVLink box (no NVSwitch) and on an NVSwitch node."""
    base = {"host": "gpu1", "node": "gpu1", "cpus": 64, "device": "H100",
            "nics": [{"name": "mlx5_0", "kind": "ib", "gbps": 400.0}] * 2}
    mesh = Topology.detect(_FakeComm([{**base, "local_rank": i, "nvlink": {"links": 6, "version": 4,
                                                                             "switch": False}} for i in range(4)]))
    assert mesh.fabric == "nvlink" and mesh.intra.bandwidth == 150e9
    sw = T.from_reports([{**base, "local_rank": i, "nvlink": {"links": 18, "version": 4, "switch": True}}
                         for i in range(8)])
    assert sw.fabric == "nvswitch" and sw.intra.bandwidth == 450e9
    assert sw.nic.bandwidth == 50e9 and sw.nics_per_node == 2
    pci = T.from_reports([{**base, "local_rank": 0, "pcie": {"gen": 5, "width": 16}}])
    assert pci.fabric == "pcie" and pci.intra.kind == "pcie5x16"
