"""benchmarks/gpu_check.sh, the prepared GPU check: its --dry-run runs every step on the CPU at tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TEST_ENV

pytestmark = pytest.mark.slow

DRY_RUN_TIMEOUT_S = 900


def test_gpu_check_dry_run_runs_and_checks_every_step(tmp_path):
    env = {**os.environ, **TEST_ENV, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DRY_RUN_TIMEOUT_S,
    )
    summary = (tmp_path / "gpu_check.md").read_text()
    assert proc.returncode == 0, summary + (tmp_path / "gpu_check.log").read_text()[-4000:]
    steps = [line for line in summary.splitlines() if line.startswith("- ")]
    assert len(steps) == 5 and all(": ok (" in line for line in steps), steps
    for recipe in ("baseline", "critic", "verifiable", "rho1"):
        assert f"| {recipe} | 3 |" in summary  # three steps each, loss finite
    assert "| eager (cpu) |" in summary and "| compiled (cpu) |" in summary
    assert "== loss fwd+bwd, N=64 D=32 V=512 n=4 float32, cpu" in summary
    assert "== TD weights, B=8 L=128 lambda=0.95, cpu" in summary
    assert "cuda" in summary.split("## CUDA tests", 1)[1]  # the CUDA tests were collected
