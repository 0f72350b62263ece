"""Launchers: torchrun (one node; two agents as two nodes), mpiexec with the MPI communicator, SLURM
(its environment, and the batch script under a stand-in srun), and the emulated multi-node.

Every launched rank runs ``tests/launch_worker.py`` and writes a JSON report; the tests read them.
Each launch starts real processes that import torch, so the launches of the selected tests all
start at once (the ``launches`` fixture) and overlap; each test then waits for its own.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from collectives.bootstrap import LaunchError, expand_nodelist, launch_env, tasks_per_node

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
TIMEOUT_S = 150


def _env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "TOPOCOMM_BACKEND", "TOPOCOMM_ALGO")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(RES_OPTIONS="timeout:1 attempts:1", OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.update(extra)
    return env


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> str:
    """Wait for all; kill their process groups on timeout. Returns their output; fails on a non-zero exit."""
    outs, codes = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            out, _ = p.communicate()
            out += f"\n(killed after {timeout} s)"
        outs.append(out)
        codes.append(p.returncode)
    text = "\n".join(f"--- {' '.join(p.args[:4])} (exit {c}) ---\n{o[-6000:]}" for p, c, o in zip(procs, codes, outs))
    assert all(c == 0 for c in codes), text
    return text


def _reports(out: Path, n: int, log: str = "") -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert len(files) == n, f"{len(files)} of {n} ranks reported\n{log}"
    reps = sorted((json.loads(f.read_text()) for f in files), key=lambda d: d["rank"])
    for d in reps:
        assert not d["problems"], f"rank {d['rank']}: " + "\n".join(d["problems"])
        bad = [(c, e) for c, e in zip(d["cases"], d["errors"]) if e]
        assert not bad, f"rank {d['rank']}: {len(bad)} cases failed: {bad[:10]}"
    assert [d["rank"] for d in reps] == list(range(n))
    for i, case in enumerate(reps[0]["cases"]):
        if case[0] == "all_reduce":
            assert len({d["digests"][i] for d in reps}) == 1, f"{case}: results differ bitwise between ranks"
    return reps


# -- the launches ------------------------------------------------------------------

def _worker(mode: str, out: Path) -> list[str]:
    return ["-m", "tests.launch_worker", mode, str(out)]


def _torchrun_single(out: Path) -> list[subprocess.Popen]:
    return [_start(["bash", str(LAUNCH / "torchrun-single.sh"), *_worker("allreduce", out)], _env(NPROC="3"))]


def _torchrun_two_agents(out: Path) -> list[subprocess.Popen]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(NNODES="2", NPROC="2", MASTER=f"127.0.0.1:{port}", JOB_ID=f"test-{uuid.uuid4().hex[:8]}")
    cmd = ["bash", str(LAUNCH / "torchrun-multi.sh"), *_worker("multinode", out)]
    return [_start(cmd, env), _start(cmd, env)]


def _mpiexec(out: Path) -> list[subprocess.Popen]:
    pytest.importorskip("mpi4py")
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH")
    env = _env(NP="3", MPIEXEC=mpiexec, TOPOCOMM_BACKEND="mpi")
    return [_start(["bash", str(LAUNCH / "mpirun.sh"), *_worker("mpi", out)], env)]


def _slurm_batch(out: Path) -> list[subprocess.Popen]:
    """launch/slurm.sbatch under stand-ins for scontrol and srun: 2 tasks on 2 'nodes' of one host."""
    bin_dir = out.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\necho localhost\n")
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        # Stand-in for srun: drop srun's options, start SLURM_NTASKS tasks, one per node.
        while [[ "$1" == --* ]]; do shift; done
        pids=()
        for ((i = 0; i < SLURM_NTASKS; i++)); do
            SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_STEP_ID=0 "$@" & pids+=($!)
        done
        rc=0
        for p in "${pids[@]}"; do wait "$p" || rc=$?; done
        exit $rc
        """))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="localhost,localhost", SLURM_NTASKS="2",
               SLURM_NNODES="2", SLURM_TASKS_PER_NODE="1(x2)", SLURM_SUBMIT_DIR=str(REPO))
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    return [_start(["bash", str(LAUNCH / "slurm.sbatch"), *_worker("slurm", out)], env)]


EMULATED_RATE = "200mbit"


def _emulated(out: Path) -> list[subprocess.Popen]:
    from launch.emulate import cannot_emulate

    why = cannot_emulate()
    if why:
        print(f"SKIP emulated multi-node: {why}")
        pytest.skip(f"cannot emulate nodes here: {why}")
    return [_start([sys.executable, "-m", "launch.emulate", "--nodes", "2", "--nproc-per-node", "2",
                    "--rate", EMULATED_RATE, "--timeout", "120", "--", sys.executable, *_worker("emulated", out)],
                   _env())]


_STARTERS = {
    "test_torchrun_single_node": (_torchrun_single, 3),
    "test_torchrun_two_agents_are_two_nodes": (_torchrun_two_agents, 4),
    "test_mpiexec_mpi_communicator": (_mpiexec, 3),
    "test_slurm_batch_script": (_slurm_batch, 2),
    "test_emulated_two_nodes_rate_limited": (_emulated, 4),
}


class Launches:
    def __init__(self, root: Path, names: set[str]) -> None:
        self.started: dict[str, tuple[list[subprocess.Popen] | BaseException, Path, int]] = {}
        for name in names:
            start, n = _STARTERS[name]
            out = root / name / "out"
            out.parent.mkdir(parents=True)
            try:
                self.started[name] = (start(out), out, n)
            except BaseException as e:  # noqa: BLE001 - a skip or failure belongs to its test
                self.started[name] = (e, out, n)

    def result(self, name: str) -> tuple[list[dict], list[subprocess.Popen]]:
        procs, out, n = self.started[name]
        if isinstance(procs, BaseException):
            raise procs
        log = _finish(procs)
        return _reports(out, n, log), procs

    def close(self) -> None:
        for procs, _, _ in self.started.values():
            for p in procs if isinstance(procs, list) else ():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


@pytest.fixture(scope="module")
def launches(request, tmp_path_factory):
    names = {item.originalname for item in request.session.items if item.module is request.module} & set(_STARTERS)
    ls = Launches(tmp_path_factory.mktemp("launches"), names)
    yield ls
    ls.close()


# -- torchrun ----------------------------------------------------------------------

def test_torchrun_single_node(launches):
    reps, _ = launches.result("test_torchrun_single_node")
    assert {d["source"] for d in reps} == {"torchrun"}
    assert reps[0]["nodes"] == [[0, 1, 2]]
    assert {c[1] for c in reps[0]["cases"]} >= {"ring", "tree", "halving_doubling", "hierarchical", "native"}


def test_torchrun_two_agents_are_two_nodes(launches):
    reps, _ = launches.result("test_torchrun_two_agents_are_two_nodes")
    nodes = reps[0]["nodes"]
    assert sorted(map(sorted, nodes)) == [[0, 1], [2, 3]], nodes
    assert all(d["nodes"] == nodes and d["local_world_size"] == 2 for d in reps)
    assert any(c[1] == "hierarchical" for c in reps[0]["cases"])


# -- MPI ---------------------------------------------------------------------------

def test_mpiexec_mpi_communicator(launches):
    reps, _ = launches.result("test_mpiexec_mpi_communicator")
    assert {d["backend"] for d in reps} == {"mpi"}
    assert reps[0]["nodes"] == [[0, 1, 2]] and reps[0]["gloo_nodes"] == [[0, 1, 2]]
    colls = {(c[0], c[1]) for c in reps[0]["cases"]}
    assert ("all_reduce", "native") in colls and ("all_to_all", "native") in colls
    assert {c[2] for c in reps[0]["cases"] if c[1] == "native"} >= {"bfloat16", "float16", "int64", "float64"}


# -- SLURM -------------------------------------------------------------------------

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[007-008,010],cpu-a1", "SLURM_NTASKS": "14",
         "SLURM_TASKS_PER_NODE": "4(x3),2", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
         "SLURM_STEP_ID": "0"}


def test_slurm_environment():
    info = launch_env(SLURM)
    assert info == {"source": "slurm", "rank": 9, "world_size": 14, "local_rank": 1, "local_world_size": 4,
                    "node": 2, "master_addr": "gpu007", "master_port": 29500 + 4242 % 1000}
    last = launch_env({**SLURM, "SLURM_PROCID": "13", "SLURM_NODEID": "3", "MASTER_ADDR": "10.0.0.1",
                       "MASTER_PORT": "1234"})
    assert (last["local_world_size"], last["master_addr"], last["master_port"]) == (2, "10.0.0.1", 1234)
    # torchrun inside srun: torchrun's variables win.
    tr = launch_env({**SLURM, "RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert tr["source"] == "torchrun" and tr["rank"] == 3
    # The batch script itself (no srun step) is one process, not rank 9 of 14 waiting for the rest.
    assert launch_env({k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"})["source"] == "single"
    with pytest.raises(LaunchError, match="SLURM_NODEID"):
        launch_env({k: v for k, v in SLURM.items() if k != "SLURM_NODEID"})


def test_slurm_lists():
    assert expand_nodelist("gpu[007-008,010],cpu-a1") == ["gpu007", "gpu008", "gpu010", "cpu-a1"]
    assert expand_nodelist("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]
    assert expand_nodelist("node-9") == ["node-9"]
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]


def test_slurm_batch_script(launches):
    reps, _ = launches.result("test_slurm_batch_script")
    assert {d["source"] for d in reps} == {"slurm"}
    assert reps[0]["nodes"] == [[0], [1]]  # from SLURM_NODEID, though both run on one host


# -- partial environments ---------------------------------------------------------------

def test_partial_torchrun_environment_lists_what_is_missing():
    with pytest.raises(LaunchError) as e:
        launch_env({"RANK": "1", "WORLD_SIZE": "4"})
    msg = str(e.value)
    assert "MASTER_ADDR" in msg and "MASTER_PORT" in msg and "missing" in msg
    with pytest.raises(LaunchError, match="RANK, MASTER_PORT|RANK .*MASTER_PORT"):
        launch_env({"WORLD_SIZE": "4", "MASTER_ADDR": "h"})
    with pytest.raises(LaunchError, match="not an integer"):
        launch_env({"RANK": "one", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(LaunchError, match="not in"):
        launch_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    # MASTER_ADDR/PORT alone (as a SLURM script exports them) are not a torchrun launch.
    assert launch_env({"MASTER_ADDR": "h", "MASTER_PORT": "1"})["source"] == "single"


def test_mpi_environment_without_mpi4py_needs_an_address(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchError, match="mpi4py.*MASTER_ADDR"):
        launch_env(env)
    info = launch_env({**env, "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert (info["rank"], info["world_size"], info["local_rank"], info["local_world_size"]) == (1, 4, 1, 2)


# -- emulated multi-node ---------------------------------------------------------------

def test_emulated_two_nodes_rate_limited(launches):
    from launch.emulate import PREFIX, parse_rate

    assert parse_rate("1gbit") == 1e9 and parse_rate("100mbps") == 8e8
    reps, procs = launches.result("test_emulated_two_nodes_rate_limited")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{PREFIX}{procs[0].pid}-" not in left, f"namespaces left behind:\n{left}"
    assert reps[0]["nodes"] == [[0, 1], [2, 3]]
    assert any(c[1] == "hierarchical" for c in reps[0]["cases"])
    t, nbytes = reps[0]["p2p_seconds"], reps[0]["p2p_bytes"]
    wire = nbytes * 8 / parse_rate(EMULATED_RATE)  # 0.17 s at 200 Mbit/s
    assert reps[0]["peers"]["inter"][1] == 1 and reps[0]["peers"]["intra"][1] == 0
    assert t["inter"] >= 0.9 * wire, f"inter-node transfer took {t['inter']:.3f} s, the rate limit allows {wire:.3f}"
    assert t["intra"] < 0.5 * wire, f"intra-node transfer took {t['intra']:.3f} s: the shaper is on the wrong path"
