"""GPU tests: the correctness sweep over NCCL on 2 GPUs and on all GPUs, and every pipeline schedule against
one process (skipped without 2 GPUs)."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_torchrun

pytestmark = pytest.mark.cuda
NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(NGPU < 2, reason="needs at least 2 CUDA GPUs")
@pytest.mark.parametrize("nproc", sorted({2, NGPU}))
def test_nccl_sweep(nproc):
    proc = run_torchrun("tests.gpu_sweep", nproc)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cases passed" in proc.stdout


@pytest.mark.skipif(NGPU < 2, reason="needs at least 2 CUDA GPUs")
def test_pipeline_schedules_over_nccl():
    proc = run_torchrun("tests.pipeline_cases", min(NGPU, 4), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count(": ok") == min(NGPU, 4)
