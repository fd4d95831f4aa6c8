"""Make a CPU-only run catch what crashes a GPU run: host tensors in collectives, reads on rank > 0.

On CUDA, the loader's tensors and tensors made without `device=` live on the host, and a process
group created for NCCL refuses them. On a CPU run every tensor is on the same device, so nothing
would notice. `install(device)` marks such tensors instead:

- a tensor made by a torch factory (zeros, tensor, arange, ...) without a `device` argument, called
  from the project's own code, is a `HostTensor`; so is everything computed from one;
- `.to(device)` / `.cuda()` / `.to(device=...)` of a HostTensor gives a plain tensor (on the
  "device");
- the collectives of `torch.distributed` refuse a HostTensor, naming the call;
- on ranks other than 0, reading a model checkpoint raises (rank 0 reads, the others receive).

Third-party code (torch internals: FSDP2, DCP, optimizers) is left alone: it makes its own tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = tuple(str(ROOT / name) + "/" for name in ("wmtp", "recipes", "tests"))
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.tensor,
    torch.as_tensor,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.from_numpy,
}
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
)
MOVES = {torch.Tensor.to, torch.Tensor.cuda}


class HostTensor(torch.Tensor):
    """A tensor that would be on the host (CPU) while training on a GPU."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        if func in MOVES and _names_a_device(args[1:], kwargs) and isinstance(out, torch.Tensor):
            return out.as_subclass(torch.Tensor)
        return out


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args)


class _MarkHostFactories(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None and _called_from_project():
            return out.as_subclass(HostTensor)
        return out


def _called_from_project() -> bool:
    # Frame 0 is this function, 1 the mode's handler, 2 the code that called the factory.
    filename = sys._getframe(2).f_code.co_filename
    return filename.startswith(PROJECT_DIRS) and not filename.endswith("device_guard.py")


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _guarded(name: str, collective):
    def call(*args, **kwargs):
        for t in _tensors(list(args) + list(kwargs.values())):
            if isinstance(t, HostTensor):
                raise RuntimeError(
                    f"device guard: torch.distributed.{name} got a host tensor {tuple(t.shape)} "
                    f"{t.dtype}; a NCCL process group refuses it"
                )
        return collective(*args, **kwargs)

    return call


def _refuse_reads(name: str):
    def read(*args, **kwargs):
        raise RuntimeError(f"device guard: rank {dist.get_rank()} called {name}: only rank 0 reads checkpoints")

    return read


def install() -> None:
    """Mark host tensors and guard the collectives for the rest of this process."""
    for name in COLLECTIVES:
        setattr(dist, name, _guarded(name, getattr(dist, name)))
    _MarkHostFactories().__enter__()


def refuse_checkpoint_reads() -> None:
    """On this rank, reading a model checkpoint is an error (call on ranks > 0)."""
    import wmtp.models.checkpoint as checkpoint

    for name in ("read_state_dict", "read_hf_state_dict", "read_value_head"):
        setattr(checkpoint, name, _refuse_reads(name))
