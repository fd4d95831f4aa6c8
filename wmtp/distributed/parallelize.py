"""Apply activation checkpointing, per-block torch.compile and FSDP2 to an MTP model.

Model code never imports this module; recipes call it after building the model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from wmtp.config.sections import DistributedConfig


def transformer_blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every block: trunk and head blocks alike."""
    return [(container, i) for container in (model.layers, model.extra_heads) for i in range(len(container))]


def apply_activation_checkpointing(model: nn.Module, cfg: DistributedConfig) -> None:
    if cfg.activation_checkpointing == "none":
        return
    every = 1 if cfg.activation_checkpointing == "full" else cfg.ac_every_n
    if every < 1:
        raise ValueError(f"distributed.ac_every_n must be >= 1, got {every}")
    for n, (container, i) in enumerate(transformer_blocks(model)):
        if n % every == 0:
            container[i] = checkpoint_wrapper(container[i], preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    for container, i in transformer_blocks(model):
        container[i].compile()


def apply_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None, reshard_after_forward: bool) -> None:
    """fully_shard each block, then the root (embeddings, norm, output, value head).

    param_dtype bf16 gives bf16 compute with fp32 master weights and fp32 gradient reduction.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for container, i in transformer_blocks(model):
        fully_shard(container[i], reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's parameters (norm, output) are the first the backward needs: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def parallelize(model: nn.Module, cfg: DistributedConfig, *, world_size: int,
                param_dtype: torch.dtype | None) -> nn.Module:
    apply_activation_checkpointing(model, cfg)
    if cfg.compile:
        apply_compile(model)
    if world_size > 1:
        apply_fsdp(model, param_dtype=param_dtype, reshard_after_forward=cfg.reshard_after_forward)
    return model
