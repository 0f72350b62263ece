"""Emulated multi-node on one host: network namespaces joined by veth pairs and a bridge.

    python -m launch.emulate --nodes 2 --nproc-per-node 2 --rate 1gbit -- python -m my.script args
    python -m launch.emulate --launcher torchrun --nodes 2 --nproc-per-node 2 -- python train.py
    python -m launch.emulate --check       # can this host emulate? (root / CAP_NET_ADMIN, ip, tc)
    python -m launch.emulate --cleanup     # remove namespaces left by emulations that were killed

Layout (every address lives in a namespace created here; the host's own
namespaces are never configured)::

    ns topocomm-<pid>-n0: lo, eth0 10.213.0.1/24 --veth--+
    ns topocomm-<pid>-n1: lo, eth0 10.213.0.2/24 --veth--+-- br0 in ns topocomm-<pid>-sw
    ...

A node is a namespace. Its ranks talk to each other through the node's own
address (the kernel routes that over loopback: fast, unshaped) and to other
nodes through eth0 and the bridge. The inter-node rate is a token bucket
(``tbf``; or ``htb``) on both ends of each node's veth, so every node has a
full-duplex "NIC" of ``rate`` per direction. netem is not in every kernel
(not in this one), so there is no added delay; the link latency is the
veth's (tens of microseconds).

Ranks get torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK = node, MASTER_ADDR = node 0's address,
MASTER_PORT) plus GLOO_SOCKET_IFNAME=eth0, so gloo binds to the emulated
NIC; ``--launcher torchrun`` runs one torchrun agent per namespace instead
(static rendezvous at node 0). ``TOPOCOMM_NIC_GBPS`` tells ranks the
emulated rate (topology detection cannot see it: a veth is not a NIC).

Teardown always runs: on exit, on an exception, on SIGTERM/SIGINT (atexit
and ``finally``): the ranks' process groups are killed, then the namespaces
are deleted, which removes their veths and the bridge with them.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "topocomm-"
SUBNET = "10.213.0"
IFNAME = "eth0"
ETC_NETNS = Path("/etc/netns")
MASTER_PORT = 29500  # free by construction: node 0's namespace holds only our ranks
_REPO = str(Path(__file__).resolve().parent.parent)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(rate: str) -> float:
    """tc's rate syntax (``1gbit``, ``500mbit``, ``100mbps``) in bits per second."""
    m = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(bit|bps)?", rate.strip().lower())
    if m is None:
        raise ValueError(f"rate: {rate!r} is not a rate like 1gbit, 500mbit or 100mbps")
    bits = float(m.group(1)) * _UNITS[m.group(2)]
    return bits * 8 if m.group(3) == "bps" else bits


@dataclass(frozen=True, kw_only=True, slots=True)
class EmulationSpec:
    nodes: int = 2
    """Emulated nodes (network namespaces)."""
    nproc_per_node: int = 2
    """Ranks per node."""
    rate: str | None = "1gbit"
    """Each node's link rate per direction, tc syntax; None: unshaped."""
    qdisc: str = "tbf"
    """The shaper: "tbf" (token bucket) or "htb" (hierarchical token bucket, one class)."""
    queue_ms: float = 20.0
    """tbf only: the longest a packet may wait in the shaper's queue (its ``latency``)."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.nproc_per_node < 1:
            raise ValueError("nodes and nproc_per_node must be positive")
        if self.nodes > 250:
            raise ValueError("at most 250 nodes (one /24)")
        if self.qdisc not in ("tbf", "htb"):
            raise ValueError(f"qdisc: {self.qdisc!r}; use tbf or htb")
        if self.rate is not None:
            parse_rate(self.rate)
        if self.queue_ms <= 0:
            raise ValueError("queue_ms must be positive")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"emulate: `{' '.join(cmd)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _namespaces() -> list[str]:
    p = _sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def cannot_emulate() -> str | None:
    """Why this host cannot emulate nodes (None: it can). Tries a namespace and a shaper for real."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    p = _sh("ip", "netns", "add", probe, check=False)
    if p.returncode != 0:
        return f"cannot create a network namespace (needs root or CAP_SYS_ADMIN + CAP_NET_ADMIN): {p.stderr.strip()}"
    try:
        _sh("ip", "-n", probe, "link", "set", "lo", "up", check=False)
        p = _sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                "rate", "1gbit", "burst", "64kb", "latency", "10ms", check=False)
        if p.returncode != 0:
            return f"cannot add a tbf qdisc in a namespace: {p.stderr.strip()}"
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    return None


def cleanup_stale() -> list[str]:
    """Delete namespaces of emulations whose process is gone (killed before teardown). Returns their names."""
    gone = []
    for ns in _namespaces():
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-\w+", ns)
        if m is None or _alive(int(m.group(1))):
            continue
        _delete_ns(ns)
        gone.append(ns)
    _remove_empty_etc()
    return gone


def _delete_ns(ns: str) -> None:
    """Kill what still runs inside ``ns`` (only processes an emulation started live there), then delete it."""
    pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _sh("ip", "netns", "del", ns, check=False)
    shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def _remove_empty_etc() -> None:
    try:
        ETC_NETNS.rmdir()  # only when empty: another emulation may be using it
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Emulation:
    """Namespaces, veths, bridge and shapers for ``spec``; a context manager (``up`` / ``down``)."""

    def __init__(self, spec: EmulationSpec) -> None:
        self.spec = spec
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.node_ns = [f"{self.tag}-n{i}" for i in range(spec.nodes)]
        self.procs: list[subprocess.Popen] = []
        self._created: list[str] = []

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    # -- network ------------------------------------------------------------------
    def __enter__(self) -> Emulation:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        atexit.register(self.down)
        try:
            self._add_ns(self.switch)
            _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.node_ns):
                self._add_ns(ns)
                b = f"port{i}"
                # Created inside the namespaces: nothing appears in the host's, so no name can clash.
                _sh("ip", "-n", ns, "link", "add", IFNAME, "type", "veth", "peer", "name", b, "netns", self.switch)
                _sh("ip", "-n", self.switch, "link", "set", b, "master", "br0")
                _sh("ip", "-n", self.switch, "link", "set", b, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", IFNAME)
                _sh("ip", "-n", ns, "link", "set", IFNAME, "up")
                if self.spec.rate is not None:
                    self._shape(ns, IFNAME)        # node -> others
                    self._shape(self.switch, b)    # others -> node
        except BaseException:
            self.down()
            raise

    def _add_ns(self, ns: str) -> None:
        _sh("ip", "netns", "add", ns)
        self._created.append(ns)
        # `ip netns exec` mounts /etc/netns/<ns>/* over /etc/*: names for the nodes' addresses (so reverse
        # lookups of peers answer at once) and no name server (the host's is unreachable from here).
        etc = ETC_NETNS / ns
        etc.mkdir(parents=True, exist_ok=True)
        try:
            hosts = Path("/etc/hosts").read_text()
        except OSError:
            hosts = "127.0.0.1 localhost\n"
        names = "".join(f"{self.address(i)} {self.tag}-node{i}\n" for i in range(self.spec.nodes))
        (etc / "hosts").write_text(hosts.rstrip("\n") + "\n" + names)
        (etc / "resolv.conf").write_text("options timeout:1 attempts:1\n")

    def _shape(self, ns: str, dev: str) -> None:
        bits = parse_rate(self.spec.rate)  # type: ignore[arg-type]
        # Burst: 2 ms at the rate (timer granularity), at least 64 KiB (one TSO segment).
        burst = str(max(64 * 1024, int(bits / 8 * 2e-3)))
        tc = ("ip", "netns", "exec", ns, "tc")
        if self.spec.qdisc == "tbf":
            _sh(*tc, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{bits:.0f}bit", "burst", burst,
                "latency", f"{self.spec.queue_ms:g}ms")
        else:
            _sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
            _sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                "rate", f"{bits:.0f}bit", "ceil", f"{bits:.0f}bit", "burst", burst, "cburst", burst)

    def down(self) -> None:
        """Kill the ranks, then delete the namespaces (idempotent; runs at exit too)."""
        self.kill()
        for ns in reversed(self._created):
            _delete_ns(ns)
        self._created.clear()
        _remove_empty_etc()
        atexit.unregister(self.down)

    # -- ranks --------------------------------------------------------------------
    def rank_env(self, node: int, local: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        s = self.spec
        env = {**os.environ,
               "RANK": str(node * s.nproc_per_node + local), "WORLD_SIZE": str(s.world_size),
               "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(s.nproc_per_node),
               "GROUP_RANK": str(node), "ROLE_RANK": str(node * s.nproc_per_node + local),
               **self._node_env(), **(extra or {})}
        return env

    def _node_env(self) -> dict[str, str]:
        env = {"MASTER_ADDR": self.address(0), "MASTER_PORT": str(MASTER_PORT), "GLOO_SOCKET_IFNAME": IFNAME,
               "RES_OPTIONS": "timeout:1 attempts:1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])),
               "TOPOCOMM_EMULATED_NODES": str(self.spec.nodes)}
        if self.spec.rate is not None:
            env["TOPOCOMM_NIC_GBPS"] = f"{parse_rate(self.spec.rate) / 1e9:g}"
        return env

    def _popen(self, ns: str, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def launch(self, cmd: Sequence[str], launcher: str = "direct", env: dict[str, str] | None = None) -> None:
        """Start ``cmd`` on every rank ("direct") or one torchrun agent per node running it ("torchrun";
        ``cmd`` is then ``python script.py ...`` or ``python -m module ...``)."""
        s = self.spec
        if launcher == "direct":
            for i, ns in enumerate(self.node_ns):
                for j in range(s.nproc_per_node):
                    self._popen(ns, cmd, self.rank_env(i, j, env))
        elif launcher == "torchrun":
            if len(cmd) < 2 or "python" not in Path(cmd[0]).name:
                raise ValueError("launcher torchrun: the command must be `python script.py ...` or `python -m mod ...`")
            for i, ns in enumerate(self.node_ns):
                agent = [cmd[0], "-m", "torch.distributed.run", "--nnodes", str(s.nodes), "--node-rank", str(i),
                         "--nproc-per-node", str(s.nproc_per_node), "--master-addr", self.address(0),
                         "--master-port", str(MASTER_PORT), "--local-addr", self.address(i), *cmd[1:]]
                self._popen(ns, agent, {**os.environ, **self._node_env(), **(env or {})})
        else:
            raise ValueError(f"launcher: {launcher!r}; use direct or torchrun")

    def wait(self, timeout: float | None = None, grace: float = 10.0) -> int:
        """Wait for every process; after the first failure the rest get ``grace`` seconds. Returns the first
        non-zero exit code (124 on timeout), else 0."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failed: int | None = None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            bad = next((c for c in codes if c not in (None, 0)), None)
            if bad is not None and failed is None:
                failed = bad
                deadline = min(deadline or float("inf"), time.monotonic() + grace)
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                return failed if failed is not None else 124
            time.sleep(0.05)
        return failed if failed is not None else next((c for c in codes if c), 0)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # the session this Popen started: the rank and its children
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 3
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self.procs.clear()


def run(spec: EmulationSpec, cmd: Sequence[str], launcher: str = "direct", timeout: float | None = None,
        env: dict[str, str] | None = None) -> int:
    """Set up, run ``cmd`` on the emulated nodes, tear down; returns the exit code."""
    with Emulation(spec) as emu:
        emu.launch(cmd, launcher, env)
        return emu.wait(timeout)


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: teardown runs


def teardown_on_signals() -> None:
    """Make SIGTERM and SIGINT unwind (so ``with Emulation(...)`` and atexit tear down); main thread only."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.emulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="inter-node rate per direction, tc syntax; 'none' unshaped")
    p.add_argument("--qdisc", choices=("tbf", "htb"), default="tbf")
    p.add_argument("--queue-ms", type=float, default=20.0, help="tbf: longest wait in the shaper's queue")
    p.add_argument("--launcher", choices=("direct", "torchrun"), default="direct")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the ranks are killed")
    p.add_argument("--check", action="store_true", help="only report whether this host can emulate")
    p.add_argument("--cleanup", action="store_true", help="remove namespaces of emulations that were killed")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command run by every rank")
    a = p.parse_args(argv)
    if a.check:
        why = cannot_emulate()
        print(why or "ok: this host can emulate nodes")
        return 1 if why else 0
    if a.cleanup:
        print("\n".join(cleanup_stale()) or "nothing to clean up")
        return 0
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("a command to run is required after --")
    why = cannot_emulate()
    if why:
        print(f"emulate: {why}", file=sys.stderr)
        return 2
    cleanup_stale()
    spec = EmulationSpec(nodes=a.nodes, nproc_per_node=a.nproc_per_node,
                         rate=None if a.rate.lower() == "none" else a.rate, qdisc=a.qdisc, queue_ms=a.queue_ms)
    teardown_on_signals()
    return run(spec, cmd, a.launcher, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
