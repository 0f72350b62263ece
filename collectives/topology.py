"""Topology: which ranks share a node, what device each runs on, and the links between them.

A Topology is homogeneous per node: one intra-node fabric (every device has a
port of ``intra`` bandwidth into it) and ``nics_per_node`` NICs of ``nic``
bandwidth. Local rank i uses NIC ``i * nics_per_node // ranks_on_node``, so
with one NIC per GPU the NICs are rails and with fewer they are shared.

[Note: units] Bandwidths are bytes per second in ONE direction (links are
full duplex); latencies are seconds. Vendors quote bits (400 Gb/s InfiniBand is
50e9 B/s) and bidirectional sums (NVLink 4's "900 GB/s" is 18 links x 25 GB/s
each way, so 450e9 B/s per direction).

``Link.efficiency`` is the fraction of the nominal rate a long transfer
achieves (protocol headers, flow control); the model multiplies it in. The
defaults come from NCCL's own topology constants (src/graph/topo.h:
SM70/SM80_NVLINK_BW 20.0, SM90_NVLINK_BW 20.6, SM100_NVLINK_BW 40.1 GB/s per
link; PCI_BW 12.0 GB/s for Gen3 x16; NET_BW 12.0 GB/s for 100 Gbit/s).
Link latencies are NCCL's per-hop Simple-protocol ring latencies
(src/graph/tuning.cc hwLat: NVLink 3.4 us, PCI 5.7 us, NET 14 us).

Detection is the only code that reads the machine: NVML through nvidia-ml-py
when importable, sysfs for PCIe and NICs, and the launcher's environment or
the hostname for nodes; ranks exchange what they saw as JSON.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Link:
    kind: str          # e.g. "nvlink4x18", "nvswitch", "pcie4x16", "ib400", "eth100", "loopback"
    bandwidth: float   # bytes/s, one direction, nominal
    latency: float     # seconds per message (per hop)
    efficiency: float = 1.0

    @property
    def effective(self) -> float:
        return self.bandwidth * self.efficiency


@dataclass(frozen=True, slots=True)
class GPUSpec:
    fp16_flops: float       # dense FP16 tensor FLOP/s
    memory: float           # bytes
    memory_bandwidth: float  # bytes/s


# NVIDIA datasheets (SXM parts; dense FP16 tensor throughput as the seed table gives it).
GPUS: dict[str, GPUSpec] = {
    "V100": GPUSpec(125e12, 32e9, 0.9e12),
    "A100": GPUSpec(312e12, 80e9, 2.0e12),
    "H100": GPUSpec(990e12, 80e9, 3.35e12),
    "H200": GPUSpec(990e12, 141e9, 4.8e12),
    "B200": GPUSpec(2200e12, 192e9, 8.0e12),
}
# One CPU core streaming a reduction (estimate: STREAM-add per core on a server is 8-15 GB/s);
# calibration replaces it for a measured machine.
CPU = GPUSpec(1e12, 16e9, 10e9)

# NVLink per-link bandwidth per direction (GB/s) and NCCL's achieved per-link figure (topo.h).
_NVLINK = {1: (20.0, 18.0), 2: (25.0, 20.0), 3: (25.0, 20.0), 4: (25.0, 20.6), 5: (50.0, 40.1)}
_NVLINK_GEN_OF = {"V100": 2, "A100": 3, "H100": 4, "H200": 4, "B200": 5}
_NVML_NVLINK_GEN = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 5}
# PCIe per-lane bandwidth per direction (GB/s) after line coding (PCI-SIG: 8/16/32/64 GT/s, 128b/130b).
_PCIE_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
_PCIE_EFF = 12.0 / 15.75      # NCCL PCI_BW 12 GB/s for Gen3 x16 (15.75 GB/s nominal)
_NET_EFF = 12.0 / 12.5        # NCCL NET_BW 12 GB/s for 100 Gbit/s (12.5 GB/s)
_LAT_NVLINK, _LAT_PCI, _LAT_NET = 3.4e-6, 5.7e-6, 14e-6
_LAT_ETH = 25e-6              # estimate: kernel TCP/RoCE small-message latency, 2-3x InfiniBand's


def nvlink(gen: int, links: int, switch: bool = False) -> Link:
    nominal, achieved = _NVLINK[gen]
    kind = f"nvswitch-nvlink{gen}x{links}" if switch else f"nvlink{gen}x{links}"
    return Link(kind, links * nominal * 1e9, _LAT_NVLINK, achieved / nominal)


def pcie(gen: int, width: int = 16) -> Link:
    return Link(f"pcie{gen}x{width}", _PCIE_LANE[gen] * width * 1e9, _LAT_PCI, _PCIE_EFF)


def infiniband(gbps: float) -> Link:
    return Link(f"ib{gbps:g}", gbps * 1e9 / 8, _LAT_NET, _NET_EFF)


def ethernet(gbps: float) -> Link:
    return Link(f"eth{gbps:g}", gbps * 1e9 / 8, _LAT_ETH, _NET_EFF)


def loopback() -> Link:
    """CPU ranks on one host (gloo over TCP loopback, shared memory). Estimates; calibration replaces them."""
    return Link("loopback", 5e9, 30e-6, 1.0)


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    """This host's CPU model, as /proc/cpuinfo names it (elsewhere what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_spec(device: str) -> GPUSpec:
    """Spec of a device kind: a GPU model name (NVML's full name works) or "cpu"."""
    for name, spec in GPUS.items():
        if name in device.upper():
            return spec
    return CPU


@dataclass
class Topology:
    nodes: list[list[int]]
    devices: list[str]                 # per rank: GPU model ("H100") or "cpu"
    fabric: str                        # "nvswitch" | "nvlink" | "pcie" | "shm"
    intra: Link                        # each device's port into the intra-node fabric
    nic: Link | None = None
    nics_per_node: int = 0
    name: str = "custom"
    hosts: list[str] = field(default_factory=list)   # per node; nodes on one host share its CPUs
    cpus: int = 0                                    # usable CPU cores per host (0: plenty, e.g. GPU nodes)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ranks = sorted(r for node in self.nodes for r in node)
        if ranks != list(range(len(self.devices))):
            raise ValueError(f"nodes {self.nodes} must partition ranks 0..{len(self.devices) - 1}")
        if len(self.nodes) > 1 and (self.nic is None or self.nics_per_node < 1):
            raise ValueError("a topology of several nodes needs a nic and nics_per_node >= 1")

    # -- queries ----------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def node_of(self) -> list[int]:
        out = [0] * self.world_size
        for i, node in enumerate(self.nodes):
            for r in node:
                out[r] = i
        return out

    def nic_of(self) -> list[int]:
        """Index of the NIC (within its node) each rank's inter-node traffic uses."""
        out = [0] * self.world_size
        k = max(self.nics_per_node, 1)
        for node in self.nodes:
            for i, r in enumerate(node):
                out[r] = i * k // len(node)
        return out

    @property
    def one_nvlink_node(self) -> bool:
        """Every rank on one node whose GPUs reach each other over NVLink (direct links or NVSwitch)."""
        return self.num_nodes == 1 and self.fabric in ("nvlink", "nvswitch")

    def device_spec(self, rank: int = 0) -> GPUSpec:
        return gpu_spec(self.devices[rank])

    def describe(self) -> str:
        per = {len(n) for n in self.nodes}
        lines = [f"topology {self.name}: {self.world_size} ranks on {self.num_nodes} node(s) "
                 f"of {'/'.join(map(str, sorted(per)))} {self.devices[0] if self.devices else '?'}",
                 f"  intra-node: {self.fabric} {self.intra.kind}: {self.intra.bandwidth / 1e9:g} GB/s "
                 f"per device per direction, {self.intra.latency * 1e6:g} us"]
        if self.nic is not None:
            lines.append(f"  inter-node: {self.nics_per_node} x {self.nic.kind}: "
                         f"{self.nic.bandwidth / 1e9:g} GB/s each per direction, {self.nic.latency * 1e6:g} us")
        return "\n".join(lines)

    # -- JSON -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Topology:
        d = dict(d)
        d["intra"] = Link(**d["intra"])
        d["nic"] = Link(**d["nic"]) if d.get("nic") else None
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Topology:
        return cls.from_json(json.loads(Path(path).read_text()))

    # -- constructors -------------------------------------------------------------
    @classmethod
    def local(cls, world_size: int, nodes: list[list[int]] | None = None, device: str = "cpu",
              cpus: int | None = None) -> Topology:
        """Ranks on one host (or the given emulated nodes) over loopback / shared memory, as gloo runs them.

        ``cpus``: cores the ranks share (default: this process's usable CPUs; 0: unlimited).
        """
        nodes = nodes if nodes is not None else [list(range(world_size))]
        multi = len(nodes) > 1
        return cls(nodes=[list(n) for n in nodes], devices=[device] * world_size, fabric="shm",
                   intra=loopback(), nic=loopback() if multi else None, nics_per_node=1 if multi else 0,
                   name="local", hosts=[socket.gethostname()] * len(nodes),
                   cpus=usable_cpus() if cpus is None else cpus)

    @classmethod
    def preset(cls, name: str, nodes: int = 1) -> Topology:
        if name not in PRESETS:
            raise ValueError(f"unknown topology preset {name!r}; choose from {', '.join(PRESETS)}")
        gpu, per_node, fabric, intra, nic, nics = PRESETS[name]
        return cls(nodes=[list(range(i * per_node, (i + 1) * per_node)) for i in range(nodes)],
                   devices=[gpu] * (per_node * nodes), fabric=fabric, intra=intra, nic=nic,
                   nics_per_node=nics, name=name, hosts=[f"{name}-{i}" for i in range(nodes)])

    @classmethod
    def detect(cls, comm: Any = None) -> Topology:
        """Detect this rank's hardware and, with a communicator, everyone's (exchanged as JSON)."""
        mine = detect_local()
        reports = comm.exchange_json(mine) if comm is not None else [mine]
        return from_reports(reports)


# name -> (gpu, gpus per node, fabric, intra link, nic link, nics per node)
PRESETS: dict[str, tuple[str, int, str, Link, Link, int]] = {
    # DGX H100: NVLink 4, 18 links x 25 GB/s a direction through 4 NVSwitch chips (3.6 TB/s aggregate,
    # non-blocking); 8 ConnectX-7 400 Gb/s InfiniBand NICs, one per GPU (NVIDIA DGX H100 user guide).
    "dgx-h100": ("H100", 8, "nvswitch", nvlink(4, 18, switch=True), infiniband(400), 8),
    "dgx-h200": ("H200", 8, "nvswitch", nvlink(4, 18, switch=True), infiniband(400), 8),
    # DGX A100: NVLink 3, 12 links x 25 GB/s a direction through 6 NVSwitch chips; 8 x 200 Gb/s HDR IB.
    "dgx-a100": ("A100", 8, "nvswitch", nvlink(3, 12, switch=True), infiniband(200), 8),
    # DGX B200: NVLink 5, 18 links x 50 GB/s a direction; 8 x 400 Gb/s.
    "dgx-b200": ("B200", 8, "nvswitch", nvlink(5, 18, switch=True), infiniband(400), 8),
    # A workstation/cloud box: 4 GPUs on PCIe Gen4 x16 (no NVLink), one shared 100 GbE NIC.
    "pcie-4gpu": ("A100", 4, "pcie", pcie(4, 16), ethernet(100), 1),
    # Commodity cluster: 8-GPU NVSwitch nodes joined by a single shared 100 GbE NIC each.
    "ethernet-100g": ("A100", 8, "nvswitch", nvlink(3, 12, switch=True), ethernet(100), 1),
}


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------

_LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def detect_local(env: dict[str, str] | None = None, sysfs: str = "/sys") -> dict[str, Any]:
    """What this process sees: node key, device, NVLink/PCIe, NICs. JSON-able."""
    env = dict(os.environ) if env is None else env
    host = socket.gethostname()
    local_rank = next((int(env[v]) for v in _LOCAL_RANK_VARS if env.get(v, "").isdigit()), 0)
    # torchrun's GROUP_RANK names the agent: two agents on one host are two nodes.
    node = f"group{env['GROUP_RANK']}" if env.get("GROUP_RANK", "").isdigit() else host
    # TOPOCOMM_NIC_GBPS states the inter-node link where sysfs can't see it (veth, tunnels, VMs).
    nics = ([{"name": "configured", "kind": "eth", "gbps": float(env["TOPOCOMM_NIC_GBPS"])}]
            if env.get("TOPOCOMM_NIC_GBPS") else _detect_nics(sysfs))
    report: dict[str, Any] = {"host": host, "node": node, "local_rank": local_rank,
                              "cpus": usable_cpus(), "device": "cpu", "nics": nics}
    gpu = _detect_gpu(local_rank, sysfs)
    if gpu:
        report.update(gpu)
    return report


def _detect_gpu(local_rank: int, sysfs: str) -> dict[str, Any] | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return _detect_gpu_torch(local_rank)
    try:
        pynvml.nvmlInit()
    except Exception:
        return _detect_gpu_torch(local_rank)
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        h = pynvml.nvmlDeviceGetHandleByIndex(local_rank % count)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        out: dict[str, Any] = {"device": _short_gpu_name(name), "device_name": name, "gpus_on_host": count}
        links, versions, switch = 0, set(), False
        for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(h, link) != pynvml.NVML_FEATURE_ENABLED:
                    continue
            except Exception:
                continue
            links += 1
            try:
                versions.add(int(pynvml.nvmlDeviceGetNvLinkVersion(h, link)))
            except Exception:
                pass
            try:  # NVML_NVLINK_DEVICE_TYPE_SWITCH == 2
                switch |= pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, link) == 2
            except Exception:
                pass
        out["nvlink"] = {"links": links, "version": max(versions) if versions else None, "switch": switch}
        try:
            out["pcie"] = {"gen": int(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)),
                           "width": int(pynvml.nvmlDeviceGetMaxPcieLinkWidth(h))}
            bus = pynvml.nvmlDeviceGetPciInfo(h).busId
            out["pcie"].update(_sysfs_pcie(bus.decode() if isinstance(bus, bytes) else bus, sysfs))
        except Exception:
            pass
        return out
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _detect_gpu_torch(local_rank: int) -> dict[str, Any] | None:
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        i = local_rank % torch.cuda.device_count()
        name = torch.cuda.get_device_name(i)
        return {"device": _short_gpu_name(name), "device_name": name, "gpus_on_host": torch.cuda.device_count()}
    except Exception:
        return None


def _short_gpu_name(name: str) -> str:
    return next((g for g in GPUS if g in name.upper()), name)


def _sysfs_pcie(bus_id: str, sysfs: str) -> dict[str, Any]:
    """Current PCIe link of a device from sysfs (NVML's bus id has 8 hex digits of domain; sysfs 4)."""
    m = re.match(r"0*([0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-9])", bus_id)
    if not m:
        return {}
    base = Path(sysfs) / "bus/pci/devices" / m.group(1).lower()
    out: dict[str, Any] = {}
    try:
        gts = float((base / "current_link_speed").read_text().split()[0])
        out["current_gen"] = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}.get(gts)
        out["current_width"] = int((base / "current_link_width").read_text().strip())
    except (OSError, ValueError, IndexError):
        pass
    return out


def _detect_nics(sysfs: str) -> list[dict[str, Any]]:
    """Active InfiniBand/RoCE ports (rate in Gb/s) and physical Ethernet interfaces (speed in Mb/s)."""
    nics: list[dict[str, Any]] = []
    for port in sorted(glob.glob(f"{sysfs}/class/infiniband/*/ports/*")):
        try:
            if "ACTIVE" not in Path(port, "state").read_text():
                continue
            rate = float(Path(port, "rate").read_text().split()[0])  # "400 Gb/sec (4X NDR)"
            layer = Path(port, "link_layer").read_text().strip() if Path(port, "link_layer").exists() else "InfiniBand"
        except (OSError, ValueError, IndexError):
            continue
        nics.append({"name": port.split("/")[-3], "kind": "ib" if layer == "InfiniBand" else "roce", "gbps": rate})
    for dev in sorted(glob.glob(f"{sysfs}/class/net/*")):
        if not Path(dev, "device").exists():  # lo, bridges, veth, ifb: not a physical NIC
            continue
        try:
            speed = int(Path(dev, "speed").read_text().strip())
        except (OSError, ValueError):
            speed = -1
        nics.append({"name": Path(dev).name, "kind": "eth", "gbps": speed / 1000 if speed > 0 else None})
    return nics


def from_reports(reports: list[dict[str, Any]]) -> Topology:
    """Builds the Topology from every rank's ``detect_local`` report (index = rank)."""
    keys: dict[str, list[int]] = {}
    for r, rep in enumerate(reports):
        keys.setdefault(rep["node"], []).append(r)
    nodes = list(keys.values())
    devices = [rep["device"] for rep in reports]
    first = reports[0]
    fabric, intra = _intra_link(first)
    nic, nics = _nic_link(first)
    if len(nodes) > 1 and nic is None:
        nic, nics = (loopback(), 1) if len({rep["host"] for rep in reports}) == 1 else (ethernet(10), 1)
    hosts = [reports[n[0]]["host"] for n in nodes]
    cpus = min(rep.get("cpus", 0) for rep in reports) if devices[0] == "cpu" else 0
    return Topology(nodes=nodes, devices=devices, fabric=fabric, intra=intra, nic=nic, nics_per_node=nics,
                    name="detected", hosts=hosts, cpus=cpus, details={"reports": reports})


def _intra_link(rep: dict[str, Any]) -> tuple[str, Link]:
    if rep["device"] == "cpu":
        return "shm", loopback()
    nv = rep.get("nvlink") or {}
    if nv.get("links"):
        # A known GPU fixes its NVLink generation; else NVML's nvmlNvlinkVersion_t (4: 3.0, 6: 4.0, 7: 5.0).
        gen = _NVLINK_GEN_OF.get(rep["device"]) or _NVML_NVLINK_GEN.get(nv.get("version") or 0, 4)
        switch = bool(nv.get("switch"))
        return ("nvswitch" if switch else "nvlink"), nvlink(gen, int(nv["links"]), switch=switch)
    pc = rep.get("pcie") or {}
    gen = pc.get("current_gen") or pc.get("gen") or 4
    width = pc.get("current_width") or pc.get("width") or 16
    return "pcie", pcie(int(gen), int(width))


def _nic_link(rep: dict[str, Any]) -> tuple[Link | None, int]:
    nics = rep.get("nics") or []
    rdma = [n for n in nics if n["kind"] in ("ib", "roce") and n.get("gbps")]
    if rdma:
        best = max(n["gbps"] for n in rdma)
        fast = [n for n in rdma if n["gbps"] == best]
        return (infiniband(best) if fast[0]["kind"] == "ib" else ethernet(best)), len(fast)
    eth = [n for n in nics if n.get("gbps")]
    if eth:
        best = max(n["gbps"] for n in eth)
        return ethernet(best), sum(1 for n in eth if n["gbps"] == best)
    return None, 0


def with_nodes(topo: Topology, nodes: list[list[int]]) -> Topology:
    """The same hardware with another rank-to-node map (e.g. emulated nodes on one host)."""
    return replace(topo, nodes=[list(n) for n in nodes])
