"""Fault-tolerant training (launch/fault_tolerant.py) under torchrun --max-restarts.

Two launches of the example, started at once (the ``runs`` fixture) so they
overlap: one uninterrupted, one whose rank 1 SIGKILLs itself in step 7 of the
first attempt. torchrun restarts the group, which resumes from the checkpoint
of step 4; its losses must equal the uninterrupted run's bitwise, step by step.

    python -m tests.test_fault_tolerance [--repeat 3]   # writes benchmarks/results/fault-tolerance-cpu.{md,json}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
NPROC, STEPS, EVERY, KILL_AT, KILL_RANK = 2, 12, 4, 7, 1
TIMEOUT_S = 30.0   # the example's collectives.init(timeout=...): generous, ranks start seconds apart under load
DETECT_S = 5.0     # a killed rank's sockets close at once: the survivor must fail well within this
LAUNCH_TIMEOUT_S = 180
RESULTS = REPO / "benchmarks" / "results" / "fault-tolerance-cpu"


@dataclass
class Run:
    name: str
    rc: int
    wall_s: float
    records: list[dict]
    output: str

    def events(self, event: str) -> list[dict]:
        return [r for r in self.records if r["event"] == event]

    def losses(self, attempt: int | None = None) -> dict[int, float]:
        """step -> loss, of ``attempt`` or (None) the last value logged for each step."""
        return {r["step"]: r["loss"] for r in self.events("step") if attempt is None or r["attempt"] == attempt}

    def detection(self) -> dict:
        """After the injected kill: how each survivor ended (its own error, or torchrun's SIGTERM) and when,
        and when the restarted group started."""
        kill = next(r for r in self.records if r["event"] in ("kill", "hang"))
        ends = [r for r in self.records if r["event"] in ("error", "terminated") and r["attempt"] == kill["attempt"]]
        restart = min(r["time"] for r in self.events("start") if r["attempt"] > kill["attempt"])
        return {"detect_s": min((r["time"] for r in ends), default=float("inf")) - kill["time"],
                "restart_s": restart - kill["time"], "ends": [{**r, "after_s": r["time"] - kill["time"]} for r in ends]}


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "TOPOCOMM_BACKEND", "TOPOCOMM_ALGO", "TOPOCOMM_DEBUG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RES_OPTIONS="timeout:1 attempts:1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all held at once while they are chosen, so two launches started
    together cannot draw the same rendezvous port."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def command(ckpt: Path, log: Path, fault: str | None, port: int) -> list[str]:
    """The launch; ``fault``: None, "kill" (rank KILL_RANK dies in step KILL_AT) or "hang" (it stops answering)."""
    # --monitor-interval 1 (default 0.1): torchrun would often stop the surviving rank before it notices
    # the dead peer itself; a second lets the survivor's own detection (tens of ms) be what is measured.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC), "--max-restarts", "3",
           "--monitor-interval", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "-m", "launch.fault_tolerant", "--ckpt", str(ckpt), "--log-file", str(log),
           "--steps", str(STEPS), "--every", str(EVERY), "--timeout", str(TIMEOUT_S)]
    if fault is not None:
        cmd += ["--kill-at-step", str(KILL_AT), "--kill-rank", str(KILL_RANK)] + (["--hang"] if fault == "hang" else [])
    return cmd


class Launch:
    """One torchrun launch of the example, in its own process group and directory."""

    def __init__(self, root: Path, name: str, fault: str | None, port: int) -> None:
        self.name, self.dir = name, root / name
        self.dir.mkdir(parents=True)
        self.out = open(self.dir / "torchrun.out", "w+")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(command(self.dir / "ckpt", self.dir / "train.jsonl", fault, port), env=_env(),
                                     cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self) -> Run:
        try:
            self.proc.wait(LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        wall = time.monotonic() - self.t0
        self.out.seek(0)
        output = self.out.read()
        self.out.close()
        log = self.dir / "train.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return Run(self.name, self.proc.returncode, wall, records, output)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def launch_all(root: Path, faults: dict[str, str | None]) -> list[Run]:
    """Start one launch per entry of ``faults`` (name -> fault) at once; their runs, once all have finished."""
    ports = _free_ports(len(faults))
    launches = [Launch(root, name, fault, port) for (name, fault), port in zip(faults.items(), ports)]
    try:
        runs = [launch.finish() for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    for run in runs:
        assert run.rc == 0, f"{run.name}: torchrun exit {run.rc}\n{run.output[-8000:]}"
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Run, Run]:
    plain, killed = launch_all(tmp_path_factory.mktemp("fault"), {"uninterrupted": None, "killed": "kill"})
    return plain, killed


def last_checkpoint_before(step: int) -> int:
    return (step - 1) // EVERY * EVERY


def test_uninterrupted_run_is_one_attempt(runs):
    plain, _ = runs
    assert {r["attempt"] for r in plain.records} == {0}
    assert [r["step"] for r in plain.events("step")] == list(range(1, STEPS + 1))
    assert [r["step"] for r in plain.events("checkpoint")] == [*range(EVERY, STEPS + 1, EVERY)]
    assert len(plain.events("done")) == NPROC and not plain.events("kill") and not plain.events("error")


def test_kill_happened_and_the_group_restarted(runs):
    _, killed = runs
    kills = killed.events("kill")
    assert [(k["attempt"], k["rank"], k["step"]) for k in kills] == [(0, KILL_RANK, KILL_AT)]
    after = [r for r in killed.records if r["attempt"] == 0 and r["rank"] == KILL_RANK and r["time"] > kills[0]["time"]]
    assert not after, after  # the rank died at the kill: it logged nothing more in that attempt
    restarted = [r for r in killed.events("start") if r["attempt"] > 0]
    assert restarted, "no attempt after the kill"
    first = min(r["attempt"] for r in restarted)
    assert sorted(r["rank"] for r in restarted if r["attempt"] == first) == list(range(NPROC))
    assert {r["resumed_from"] for r in restarted if r["attempt"] == first} == {last_checkpoint_before(KILL_AT)}
    # Before the kill, attempt 0 got as far as step KILL_AT - 1 and no further.
    assert max(killed.losses(0)) == KILL_AT - 1
    assert [(d["attempt"], d["step"]) for d in killed.events("done")] == [(max(r["attempt"] for r in restarted),
                                                                          STEPS)] * NPROC


def test_resumed_trajectory_equals_uninterrupted_bitwise(runs):
    plain, killed = runs
    reference = plain.losses(0)
    assert killed.losses() == reference  # the last value logged for each step, all steps present
    for attempt in sorted({r["attempt"] for r in killed.events("step")}):
        mine = killed.losses(attempt)
        assert mine == {s: reference[s] for s in mine}, f"attempt {attempt} differs from the uninterrupted run"
    replayed = killed.losses(0).keys() & killed.losses(1).keys()
    assert replayed == set(range(last_checkpoint_before(KILL_AT) + 1, KILL_AT))


def test_dead_rank_detected_within_the_timeout(runs):
    _, killed = runs
    d = killed.detection()
    how = ", ".join(f"rank {e['rank']}: {e['event']} after {e['after_s']:.3f} s" for e in d["ends"])
    print(f"dead rank: {how}; group restarted {d['restart_s']:.1f} s after the kill")
    assert {e["rank"] for e in d["ends"]} == set(range(NPROC)) - {KILL_RANK}, killed.output[-4000:]
    assert d["detect_s"] < DETECT_S
    # The survivor's own collective failed, naming what happened, before torchrun stopped it.
    assert any(e["event"] == "error" and "Connection" in e["error"] for e in d["ends"]), d["ends"]


# -- results ----------------------------------------------------------------------------------------

def _equal(run: Run, reference: dict[int, float]) -> bool:
    """Every loss ``run`` logged, in every attempt, equals ``reference``'s bitwise, and every step is there."""
    attempts = {r["attempt"] for r in run.events("step")}
    return run.losses() == reference and all(run.losses(a) == {s: reference[s] for s in run.losses(a)}
                                             for a in attempts)


def _stats(xs: list[float], digits: int) -> str:
    return " | ".join(f"{f(xs):.{digits}f}" for f in (min, statistics.median, max))


def _report(repeats: list[dict[str, Run]]) -> tuple[dict, str]:
    first = repeats[0]
    reference = first["uninterrupted"].losses(0)
    faulty = ("killed", "hung")
    det = {name: [rep[name].detection() for rep in repeats] for name in faulty}
    equal = all(_equal(rep[name], rep["uninterrupted"].losses(0)) for rep in repeats for name in faulty)
    cmd = " ".join(["python", *command(Path("CKPT"), Path("LOG"), "kill")[1:]])
    cmd = cmd.replace(cmd.split("--rdzv-endpoint ")[1].split()[0], "127.0.0.1:PORT")
    columns = [(name, a) for name in faulty for a in sorted({r["attempt"] for r in first[name].events("step")})]
    data = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, gloo over loopback",
        "command": cmd, "nproc": NPROC, "steps": STEPS, "every": EVERY, "kill_at_step": KILL_AT,
        "kill_rank": KILL_RANK, "timeout_s": TIMEOUT_S, "repeats": len(repeats), "bitwise_equal": equal,
        "losses": {"uninterrupted": reference,
                   **{f"{name}.attempt{a}": first[name].losses(a) for name, a in columns}},
        **{f"{name}_detect_s": [d["detect_s"] for d in det[name]] for name in faulty},
        **{f"{name}_restart_s": [d["restart_s"] for d in det[name]] for name in faulty},
        "survivor_ends": {name: [{k: e[k] for k in ("event", "rank", "after_s", "error", "signal") if k in e}
                                 for d in det[name] for e in d["ends"]] for name in faulty},
        "wall_s": {name: [rep[name].wall_s for rep in repeats] for name in first},
    }
    rows = []
    for s in range(1, STEPS + 1):
        cells = [f"{reference[s]:.9g}"]
        for name, a in columns:
            v = first[name].losses(a).get(s)
            cells.append("" if v is None else f"{v:.9g}" + (" =" if v == reference[s] else " DIFFERS"))
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    resumed = last_checkpoint_before(KILL_AT)
    heads = [f"{name} {a}" + (f" (fault in step {KILL_AT})" if a == 0 else f" (resumed after step {resumed})")
             for name, a in columns]
    ends = {name: sorted({re.sub(r"\[[0-9.:a-f]+\]:\d+", "[ADDR]:PORT", e["error"].split("] ", 1)[-1].split(". ")[0])
                          for d in det[name] for e in d["ends"] if e["event"] == "error"}) for name in faulty}
    md = "\n".join([
        "# Fault-tolerant training on CPU: a rank dies or hangs, torchrun restarts, nothing is lost",
        "",
        f"{data['date']}, torch {data['torch']}, {data['machine']} (shared with other jobs). "
        f"`python -m tests.test_fault_tolerance --repeat {len(repeats)}`: each repeat starts three torchrun "
        "launches at once, uninterrupted, killed and hung, of",
        "",
        f"    {cmd}",
        "",
        f"(without `--kill-at-step`, or with `--hang`). launch/fault_tolerant.py: ZeRO stage 2 + AdamW, {NPROC} ranks, "
        f"{STEPS} steps, an atomic checkpoint every {EVERY}. In attempt 0, rank {KILL_RANK} SIGKILLs itself "
        f"(killed) or sleeps without answering (hung) in step {KILL_AT}, after backward and before the optimizer "
        f"step; torchrun restarts the group, which resumes from the checkpoint of step {resumed}. "
        "tests/test_fault_tolerance.py runs the uninterrupted and killed launches and checks all of this.",
        "",
        "## Loss per step (global batch mean; `=`: bitwise equal to the uninterrupted run)",
        "",
        "| step | uninterrupted | " + " | ".join(heads) + " |",
        "|---:|---:|" + "---:|" * len(columns),
        *rows,
        "",
        f"All losses logged by the killed and hung runs, in every attempt of all {len(repeats)} repeats, equal "
        f"the uninterrupted run's bitwise: {'yes' if equal else 'NO'}.",
        "",
        "## Detecting the dead rank",
        "",
        f"Seconds from the fault (logged by the faulty rank just before SIGKILL or sleeping) to the surviving "
        f"rank's error (collectives.init timeout {TIMEOUT_S:g} s), and to the restarted group's first log line, "
        f"over {len(repeats)} repeats:",
        "",
        "| fault | detect min | median | max | restart min | median | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {name} | {_stats(data[f'{name}_detect_s'], 3)} | {_stats(data[f'{name}_restart_s'], 1)} |"
          for name in faulty],
        "",
        "The survivor's error: " + "; ".join(f"{name}: {', '.join(repr(e) for e in ends[name])}" for name in faulty)
        + ".",
        "",
        "A killed process's sockets are closed by the kernel, so the survivor's pending gloo transfer fails "
        "at once; a hung one keeps them open, so it fails by the timeout. Restart is torchrun's: noticing the "
        "exit (`--monitor-interval 1`), stopping the group (the hung rank on SIGTERM), a new rendezvous round, "
        "and two fresh Python processes importing torch, seconds on this busy 2-core machine.",
        "",
        "Wall time of a launch (s): " + "; ".join(f"{name} {', '.join(f'{w:.1f}' for w in ws)}"
                                                 for name, ws in data["wall_s"].items()) + ".",
        "",
    ])
    return data, md


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(prog="python -m tests.test_fault_tolerance")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    repeats = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            runs = launch_all(Path(tmp) / f"repeat-{i}", {"uninterrupted": None, "killed": "kill", "hung": "hang"})
            repeats.append({run.name: run for run in runs})
            print(f"repeat {i}: detect " + ", ".join(f"{r.name} {r.detection()['detect_s']:.3f} s" for r in runs[1:]),
                  flush=True)
    data, md = _report(repeats)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
