"""Shared fixtures: tiny artifacts made once per session, and a way to run the recipes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TEST_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(TEST_ENV)


def run_script(args: list[str], *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository root, capturing output."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **TEST_ENV},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def load_recipe(name: str):
    """Import recipes/<name>.py as a module (recipes are scripts, not a package)."""
    path = ROOT / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Tiny artifacts from the synthetic generator (no shared/ needed), without the HF reference."""
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    run_script(["scripts/make_tiny.py", "--out", str(out), "--source", "synthetic", "--max-problems", "120",
                "--no-reference"])
    return out
