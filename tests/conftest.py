"""Shared fixtures: tiny artifacts made once per session, and a way to run the recipes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TEST_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(TEST_ENV)


def _import_installed_kernels() -> None:
    """transformers (5.2x) imports Hugging Face's `kernels` package, which the checkout's kernels/
    folder (the source of wmtp.kernels) shadows while the repository root is on sys.path, as it
    is under `python -m pytest`: import the installed one first, from the other paths."""
    if importlib.util.find_spec("transformers") is None:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != ROOT]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_installed_kernels()


def needs_cuda(test):
    """A CUDA-only test: `pytest -m cuda` selects it; without a GPU it is skipped, saying so."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def run_script(args: list[str], *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository root, capturing output."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def recipe_args(tiny: Path, out: Path, config: str, **overrides) -> list[str]:
    """Command line of a recipe on the tiny artifacts: small, fast, MLflow off unless overridden."""
    args = {
        "model.path": tiny / "mtp_model",
        "tokenizer.path": tiny / "tokenizer.model",
        "data.train_path": tiny / "data" / "train.jsonl",
        "training.output_dir": out,
        "training.max_steps": 30,
        "training.micro_batch_size": 4,
        "training.log_every": 1,
        "checkpoint.save_every": 0,
        "metrics.mlflow": "false",
        "metrics.progress_bar": "false",
        "metrics.report": "false",
        "optimizer.lr": 3e-3,
        "lr_scheduler.warmup_steps": 3,
    }
    args.update(overrides)
    return ["--config", str(ROOT / "configs" / config)] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


def torchrun(script: str, args: list[str], *, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run a recipe under torchrun (gloo on CPU), one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
    """Tiny artifacts from the synthetic generator (no shared/ needed)."""
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    run_script(["scripts/make_tiny.py", "--out", str(out), "--source", "synthetic", "--max-problems", "120"])
    return out
