"""Fill a model built on the meta device with a checkpoint read once, by rank 0.

Every rank builds and parallelises the model on the meta device (no memory) and materialises its
shards on the training device. Rank 0 then reads the checkpoint (memory-mapped) and broadcasts
each tensor in pieces of at most `BROADCAST_PIECE_BYTES`; every rank copies the rows of each piece
that fall in its shard. No rank ever holds a full copy of a tensor beyond rank 0's mapping of the
file, so the peak on ranks > 0 is their shards plus one piece (`set_model_state_dict`'s broadcast
would add the largest full tensor: the embedding or the output projection). The copy into the
parameters casts to the model's dtype.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from wmtp.distributed.env import DistInfo, broadcast_object

StateDictReader = Callable[[], dict[str, torch.Tensor]]
"""Reads (and checks) the full state dict; called on rank 0 only."""
BROADCAST_PIECE_BYTES = 16 << 20
"""Rows of a tensor broadcast at once: big enough to keep the link busy, small next to a shard."""


def _read_on_main(read: StateDictReader, info: DistInfo) -> dict[str, torch.Tensor]:
    """Rank 0's tensors ({} elsewhere); a reading error stops every rank with rank 0's message."""
    state, error = {}, None
    if info.is_main:
        try:
            state = read()
        except (OSError, ValueError, RuntimeError) as e:
            error = e
    if info.in_process_group:
        error = broadcast_object(error)
    if error is not None:
        raise error
    return state


def _local_rows(target: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, first row, end row) of a parameter or buffer along dim 0.

    FSDP2 shards dim 0 as torch.chunk does (chunks of ceil(rows / shards) rows, the last ones
    shorter or empty) over the mesh dimensions whose placement is Shard(0); other dimensions
    (HSDP's replicate) hold the same rows.
    """
    if not isinstance(target, DTensor):
        return target, 0, target.shape[0]
    rows = target.shape[0]
    start, end = 0, rows
    for mesh_dim, placement in enumerate(target.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(f"cannot load a parameter sharded along dim {placement.dim}")
            shards, index = target.device_mesh.size(mesh_dim), target.device_mesh.get_local_rank(mesh_dim)
            size = math.ceil((end - start) / shards)
            start, end = min(start + index * size, end), min(start + (index + 1) * size, end)
    local = target.to_local()
    if local.shape[0] != end - start:
        raise RuntimeError(f"unexpected shard of {local.shape[0]} rows for rows {start}:{end}")
    return local, start, end


@torch.no_grad()
def _broadcast_into_shards(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    targets = model.state_dict(keep_vars=True)
    shapes = broadcast_object({k: (tuple(v.shape), v.dtype) for k, v in state.items()} if info.is_main else None)
    missing, unexpected = sorted(targets.keys() - shapes.keys()), sorted(shapes.keys() - targets.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    buffer = torch.empty(BROADCAST_PIECE_BYTES, dtype=torch.uint8, device=info.device)
    for key, (shape, dtype) in shapes.items():
        target = targets[key]
        if not shape:  # a scalar: one row of one element
            shape, target = (1,), target.view(1)
        local, start, end = _local_rows(target)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        rows_per_piece = max(1, BROADCAST_PIECE_BYTES // row_bytes)
        if rows_per_piece * row_bytes > BROADCAST_PIECE_BYTES:
            buffer = torch.empty(rows_per_piece * row_bytes, dtype=torch.uint8, device=info.device)
        for first in range(0, shape[0], rows_per_piece):
            n = min(rows_per_piece, shape[0] - first)
            piece = buffer[: n * row_bytes].view(dtype).view(n, *shape[1:])
            if info.is_main:
                piece.copy_(state[key][first : first + n])
            dist.broadcast(piece, src=0)
            lo, hi = max(first, start), min(first + n, end)
            if lo < hi:
                local[lo - start : hi - start].copy_(piece[lo - first : hi - first])


def load_weights(
    model: nn.Module, read: StateDictReader, *, info: DistInfo, buffers_from: Callable[[], nn.Module] | None = None
) -> None:
    """Materialise `model` (meta device, FSDP-sharded or not) on info.device and load rank 0's weights.

    buffers_from: on rank 0, a loaded module whose non-persistent buffers (e.g. a Hugging Face
    model's RoPE frequencies, which no state dict holds) are broadcast into the model's.
    """
    state = _read_on_main(read, info)
    model.to_empty(device=info.device)
    if info.in_process_group:
        _broadcast_into_shards(model, state, info)
    else:
        model.load_state_dict(state, strict=True)
    del state
    if buffers_from is not None:
        _broadcast_buffers(model, buffers_from() if info.is_main else None, info)


@torch.no_grad()
def _broadcast_buffers(model: nn.Module, source: nn.Module | None, info: DistInfo) -> None:
    """The non-persistent buffers of rank 0's `source` into `model`'s (same module names)."""
    source_buffers = dict(source.named_buffers()) if source is not None else {}
    for module_name, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buf = module._buffers.get(name)
            if buf is None:
                continue
            if info.is_main:
                buf.copy_(source_buffers[f"{module_name}.{name}" if module_name else name])
            if info.in_process_group:
                dist.broadcast(buf, src=0)


@contextlib.contextmanager
def dcp_quietly() -> Iterator[None]:
    """DCP warns on every save/load without a process group that it assumes one process: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
