"""Process-group setup and the few collectives the recipes use (no-ops without a process group).

Under torchrun a recipe always joins the process group, even with one process, so FSDP2, its
mixed precision and DCP run the same way on one GPU as on many. On CUDA the group has a gloo
backend for CPU tensors beside NCCL ("cpu:gloo,cuda:nccl"): the recipes reduce tensors on the
training device, and a host tensor that slips through costs a copy instead of crashing the run.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
"""How long a collective may wait for the slowest rank (e.g. rank 0 building a data index)."""
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Variables torchrun (and any env:// launcher) sets for every worker."""


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    """Processes on this node (torchrun's --nproc_per_node)."""
    device: torch.device
    in_process_group: bool
    """Launched by torchrun: FSDP2 and the collectives run, even with one process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.in_process_group


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("training.device = cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(kind)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors with gloo for CPU ones on GPUs; gloo alone elsewhere."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_kind: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (whatever its size)."""
    torchrun = launched_by_torchrun()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = pick_device(device_kind, local_rank)
    if torchrun and not dist.is_initialized():
        dist.init_process_group(
            backend=process_group_backend(device),
            timeout=PROCESS_GROUP_TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
        in_process_group=dist.is_initialized(),
    )


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (identity without a process group)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded value of a tensor (an FSDP2 DTensor is gathered; a plain tensor is itself)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order. The sizes of dim 0 may differ
    (ranks hold different numbers of rows when micro-batches are grouped by length or packed); the
    other dims must match."""
    return all_gather_with_offset(tensor)[0]


def all_gather_with_offset(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(`all_gather_cat(tensor)`, where this rank's rows start in it)."""
    if not _active():
        return tensor, 0
    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(n) for n in torch.cat(all_sizes).tolist()]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]), sum(counts[: dist.get_rank()])


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's Python object, in rank order, on every rank."""
    if not _active():
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def destroy() -> None:
    if _active():
        dist.destroy_process_group()
