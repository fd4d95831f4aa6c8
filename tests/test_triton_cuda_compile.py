"""The Triton kernels compile for CUDA GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs the kernels' semantics on CPU, but it accepts code that the GPU compiler
rejects (types, layouts, unsupported ops). Every kernel, in every specialisation the wrappers
launch, goes through Triton's full compiler down to a cubin with the ptxas bundled in the triton
wheel: no driver needed. Runtime behaviour on a GPU is what the CUDA tests elsewhere cover.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from triton_cuda_compile import variants

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

SCRIPT = Path(__file__).with_name("triton_cuda_compile.py")
COMPILE_TIMEOUT_S = 600


def _ptxas() -> Path:
    return Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not _ptxas().exists():
        pytest.skip("this triton wheel ships no ptxas under triton/backends/nvidia/bin")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache: every variant is really compiled, and nothing is left in the user's cache.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=COMPILE_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", list(variants()))
def test_kernel_compiles_for_cuda(variant, compiled):
    assert compiled[variant] == "ok", compiled[variant]
