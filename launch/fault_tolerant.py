"""Fault-tolerant ZeRO training under torchrun: checkpoint every K steps, resume after a crash, lose nothing.

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 -m launch.fault_tolerant \\
        --ckpt /tmp/ft --steps 12 --every 4 [--kill-at-step 7 --kill-rank 1 [--hang]] [--log-file run.jsonl]

Every K steps (and after the last) the ranks write an atomic sharded
checkpoint (``parallel.save_checkpoint``); on start they resume from the last
complete one (``parallel.load_checkpoint``). When a rank dies, the others'
next collective fails within ``--timeout`` (a closed connection usually fails
at once), every worker exits, and torchrun restarts the group, which resumes.
The run ends when step ``--steps`` is done.

[Note: nothing lost] A resumed run computes exactly the losses an
uninterrupted one does (bitwise, at the same world size), because everything
a step depends on is either a function of the step number or in the
checkpoint:

- the batch of step s is drawn from a generator seeded with s (the global
  batch; rank r takes its r-th slice), so the data position is the step;
- the step itself is a buffer of the model (``Regression.step``), so
  ``save_checkpoint`` writes it in the same atomic checkpoint as the weights
  and the optimizer state: the counter can never disagree with the weights,
  whatever moment the crash hits;
- weights, AdamW moments and AdamW's own step are in the checkpoint; the
  reductions (gloo, a fixed algorithm per size) are deterministic.

Fault injection: ``--kill-at-step S --kill-rank R`` makes rank R SIGKILL
itself in step S, after its backward (gradients reduce-scattered) and before
the optimizer step, in the first attempt only (``TORCHELASTIC_RESTART_COUNT``
is 0), so the restarted group runs through. With ``--hang`` it stops
answering instead (sleeps, sockets open): the others' collectives then fail
by the timeout, not by a closed connection.

Log: one JSON object a line, appended by every rank to ``--log-file`` (default
``<ckpt>/train.jsonl``), each with ``event``, ``attempt`` (torchrun's restart
count), ``rank`` and ``time`` (Unix seconds):

    start       resumed_from (last completed step), world_size
    step        step, loss (the global batch's mean loss, rank 0 only)
    checkpoint  step, path (rank 0 only)
    kill, hang  step (the injected fault, just before SIGKILL or sleeping)
    error       step, error (a surviving rank's collective failed; it exits non-zero)
    terminated  signal (torchrun stopped this rank, e.g. because another failed first)
    done        step

Restarts: torchrun hands every attempt the same store; ``collectives.init``
joins on a key space of the attempt's own ([Note: stale store keys] in
collectives/bootstrap.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import collectives
import parallel
from parallel.zero import ZeroModel

FEATURES = 16
SEED = 1234


class Regression(nn.Module):
    """A small MLP; ``step`` (a buffer, so in every checkpoint) is the last completed training step."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 1))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batch(step: int, rank: int, size: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of step ``step``'s global batch: the same tensors in every attempt. [Note: nothing lost]"""
    g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
    x = torch.randn(global_batch, FEATURES, generator=g)
    teacher = torch.linspace(-1.0, 1.0, FEATURES)
    y = torch.sin(3.0 * x @ teacher).unsqueeze(1) + 0.1 * torch.randn(global_batch, 1, generator=g)
    per = global_batch // size
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


class JsonLog:
    """Appends one JSON line per event; a line is a single ``write`` on an O_APPEND file, so ranks never interleave."""

    def __init__(self, path: Path, rank: int, attempt: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.rank, self.attempt = rank, attempt

    def write(self, event: str, **fields: object) -> None:
        rec = {"event": event, "attempt": self.attempt, "rank": self.rank, "time": time.time(), **fields}
        os.write(self.fd, (json.dumps(rec) + "\n").encode())


def log_termination(log: JsonLog) -> None:
    """On SIGTERM (torchrun stopping the group), log it and exit at once, as the default action would."""
    def handler(signum: int, frame: object) -> None:
        log.write("terminated", signal=signal.Signals(signum).name)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def inject_fault(log: JsonLog, step: int, hang: bool) -> None:
    log.write("hang" if hang else "kill", step=step)
    if not hang:
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # until torchrun stops the group (SIGTERM, see log_termination)
        time.sleep(60)


def resume(ckpt: Path, model: ZeroModel, opt: torch.optim.Optimizer) -> int:
    """Load the last complete checkpoint under ``ckpt`` if there is one; the last completed step (0: none)."""
    if not (ckpt / "latest").exists():  # the pointer save_checkpoint replaces atomically (parallel/checkpoint.py)
        return 0
    parallel.load_checkpoint(ckpt, model, opt)
    step = int(model.module.step)
    adam_steps = {int(st["step"]) for st in opt.state.values()}
    if adam_steps != {step}:
        raise RuntimeError(f"checkpoint in {ckpt}: progress says step {step}, the optimizer {sorted(adam_steps)}")
    return step


def init_communicator(timeout: float) -> collectives.Communicator:
    """``collectives.init(timeout)``; under torchrun it joins on a fresh key space of the agent's
    store each attempt ([Note: stale store keys] in collectives/bootstrap.py)."""
    return collectives.init(timeout=timeout)


def train(args: argparse.Namespace, comm: collectives.Communicator, log: JsonLog, attempt: int) -> None:
    torch.manual_seed(SEED)
    model, opt = parallel.zero(Regression(args.width), torch.optim.AdamW, stage=args.stage, comm=comm,
                               lr=args.lr, weight_decay=0.01)
    start = resume(args.ckpt, model, opt)
    log.write("start", resumed_from=start, world_size=comm.size)
    faulty = attempt == 0 and comm.rank == args.kill_rank
    step = start
    try:
        for step in range(start + 1, args.steps + 1):
            x, y = batch(step, comm.rank, comm.size, args.global_batch)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if faulty and step == args.kill_at_step:
                inject_fault(log, step, args.hang)
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            comm.all_reduce(mean, op="avg")
            model.module.step.fill_(step)
            if comm.rank == 0:
                log.write("step", step=step, loss=mean.item())
            if step % args.every == 0 or step == args.steps:
                path = parallel.save_checkpoint(args.ckpt, model, opt, keep=args.keep)
                if comm.rank == 0:
                    log.write("checkpoint", step=step, path=str(path))
    except Exception as e:
        log.write("error", step=step, error=f"{type(e).__name__}: {e}"[:1000])
        raise
    log.write("done", step=step)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.fault_tolerant", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (on a file system all ranks see)")
    p.add_argument("--steps", type=int, default=12, help="train steps 1..STEPS")
    p.add_argument("--every", type=int, default=4, help="checkpoint after every EVERY-th step and the last")
    p.add_argument("--keep", type=int, default=1, help="complete checkpoints kept")
    p.add_argument("--kill-at-step", type=int, default=None, help="inject a fault in this step (first attempt only)")
    p.add_argument("--kill-rank", type=int, default=1, help="the rank the fault kills")
    p.add_argument("--hang", action="store_true", help="the fault: stop answering instead of dying")
    p.add_argument("--log-file", type=Path, default=None, help="JSON lines log (default: CKPT/train.jsonl)")
    p.add_argument("--timeout", type=float, default=10.0, help="collectives.init timeout, seconds")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage")
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args(argv)
    if args.every < 1 or args.steps < 1:
        p.error("--steps and --every must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    comm = init_communicator(args.timeout)
    if args.global_batch % comm.size:
        raise ValueError(f"--global-batch: {args.global_batch} is not a multiple of the world size {comm.size}")
    log = JsonLog(args.log_file or args.ckpt / "train.jsonl", comm.rank, attempt)
    log_termination(log)
    try:
        train(args, comm, log, attempt)
    finally:
        if dist.is_initialized():
            collectives.shutdown()  # closes the communicator (its transports) before destroying the group


if __name__ == "__main__":
    main()
    # Everything is logged and the group destroyed. torch's gloo teardown at interpreter exit sometimes
    # aborts ("terminate called without an active exception"), and torchrun would restart a finished
    # job for it: leave without the C++ teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
