"""Fill a model built on the meta device with a checkpoint read once, by rank 0.

Every rank builds and parallelises the model on the meta device (no memory), materialises its
shards on the training device, and then receives the weights: rank 0 reads the checkpoint
(memory-mapped) and `set_model_state_dict(..., broadcast_from_rank0=True)` broadcasts one tensor at
a time, each rank keeping its shard. Rank 1 and up never hold more than their shards plus one full
tensor. The copy into the parameters casts to the model's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from wmtp.distributed.env import DistInfo, broadcast_object

StateDictReader = Callable[[], dict[str, torch.Tensor]]
"""Reads (and checks) the full state dict; called on rank 0 only."""


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


def load_weights(model: nn.Module, read: StateDictReader, *, info: DistInfo,
                 buffers_from: Callable[[], nn.Module] | None = None) -> None:
    """Materialise `model` (meta device, FSDP-sharded or not) on info.device and load rank 0's weights.

    buffers_from: on rank 0, a loaded module whose non-persistent buffers (e.g. a Hugging Face
    model's RoPE frequencies, which no state dict holds) are broadcast into the model's.
    """
    state = _read_on_main(read, info)
    model.to_empty(device=info.device)
    if info.in_process_group:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        set_model_state_dict(model, state, options=options)
    else:
        model.load_state_dict(state, strict=True)
    del state
    if buffers_from is not None:
        _broadcast_buffers(model, buffers_from() if info.is_main else None, info)


@torch.no_grad()
def _broadcast_buffers(model: nn.Module, source: nn.Module | None, info: DistInfo) -> None:
    persistent = set(model.state_dict())
    source_buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buf in model.named_buffers():
        if name in persistent:
            continue
        if info.is_main:
            buf.copy_(source_buffers[name])
        if info.in_process_group:
            dist.broadcast(buf, src=0)
