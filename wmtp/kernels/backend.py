"""Which implementation the kernels use (Triton on CUDA, the chunked PyTorch fallback elsewhere), and
what a device supports.

Set `WMTP_KERNEL_BACKEND` (auto | triton | torch) or call `set_backend` to force one. "triton" on
a CPU tensor needs `TRITON_INTERPRET=1` (the tests run the Triton kernels that way).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
NO_FLOAT64_DEVICE_TYPES = {"mps"}
"""Device types without float64 tensors (Apple's MPS): accumulators there are float32. A test adds
"cpu" to this set to check that nothing creates a float64 tensor on such a device."""
ENV_VAR = "WMTP_KERNEL_BACKEND"
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for this process (None returns to the environment / auto choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    global _forced
    _forced = name


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """'triton' or 'torch' for tensors on `device`."""
    name = requested or _forced or os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"kernel backend 'triton' on {device.type} tensors needs TRITON_INTERPRET=1")
    return name


def accumulation_dtype(device: torch.device | str) -> torch.dtype:
    """The widest float a device has: float64 for sums, counts and statistics, float32 on MPS."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64_DEVICE_TYPES else torch.float64
