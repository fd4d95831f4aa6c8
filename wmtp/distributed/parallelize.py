"""Apply float8, activation checkpointing, per-block torch.compile and FSDP2 / HSDP to an MTP model.

Model code never imports this module; recipes call it after building the model on the meta device
and before loading its weights (`wmtp.distributed.load`), in torchtitan's order: float8, AC,
compile, then sharding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from wmtp.config.sections import DistributedConfig
from wmtp.distributed.env import DistInfo

FLOAT8_MIN_CAPABILITY = (8, 9)
"""float8 matmuls need Ada (sm_89) or Hopper (sm_90) tensor cores or newer."""
FLOAT8_DIM_MULTIPLE = 16
"""float8 matmuls need both dimensions of a weight to be multiples of 16."""
BLOCK_CONTAINERS = ("layers", "extra_heads")
"""The model's ModuleLists of transformer blocks (trunk and head 0, heads 1..n-1)."""


def transformer_blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every block: trunk and head blocks alike."""
    return [(getattr(model, name), i) for name in BLOCK_CONTAINERS for i in range(len(getattr(model, name)))]


def build_mesh(info: DistInfo, hsdp_replicas: int) -> DeviceMesh | None:
    """The data-parallel device mesh: 1-D (shard over all ranks), or 2-D (replicate x shard) for HSDP.

    None without a process group (a plain single-device run). Ranks are laid out row by row, so
    with hsdp_replicas = number of nodes each replica is one node: shards within a node (fast
    links), replicas across nodes (gradients all-reduced once per step).
    """
    if hsdp_replicas < 1 or info.world_size % hsdp_replicas:
        raise ValueError(
            f"distributed.hsdp_replicas ({hsdp_replicas}) must be >= 1 and divide the world size ({info.world_size})"
        )
    if not info.in_process_group:
        return None
    if hsdp_replicas == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        info.device.type, (hsdp_replicas, info.world_size // hsdp_replicas), mesh_dim_names=("replicate", "shard")
    )


def check_float8(device: torch.device) -> None:
    """Stop with a clear message where float8 training cannot run."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FLOAT8_MIN_CAPABILITY:
        found = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise RuntimeError(
            f"distributed.float8 = true needs a CUDA GPU with compute capability >= "
            f"{FLOAT8_MIN_CAPABILITY[0]}.{FLOAT8_MIN_CAPABILITY[1]} (H100, L40S, ...); this run has "
            f"{found}: set distributed.float8 = false"
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise RuntimeError("distributed.float8 = true needs torchao (pip install torchao)") from None


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """The linears float8 converts: those inside the transformer blocks with float8-friendly shapes.

    `output` is applied by the fused loss (it never runs as a module) and the value head has one
    output feature: both stay in high precision.
    """
    inside_block = fqn.split(".", 1)[0] in BLOCK_CONTAINERS
    return (
        isinstance(module, nn.Linear)
        and inside_block
        and module.in_features % FLOAT8_DIM_MULTIPLE == 0
        and module.out_features % FLOAT8_DIM_MULTIPLE == 0
    )


def convert_float8(model: nn.Module) -> list[str]:
    """Swap the block linears for torchao's Float8Linear (dynamic tensorwise scaling); returns their names."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = [fqn for fqn, module in model.named_modules() if float8_filter(module, fqn)]
    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=float8_filter)
    return chosen


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


def shard(
    model: nn.Module,
    blocks: list[nn.Module],
    *,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
) -> None:
    """fully_shard each block, then the root (embeddings, norm, output, value head).

    param_dtype bf16 gives bf16 compute with fp32 master weights and fp32 gradient reduction. A 2-D
    mesh makes it HSDP.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's parameters (norm, output) are the first the backward needs: keep them gathered.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, **kwargs)


def shard_frozen(model: nn.Module, blocks: list[nn.Module], methods: tuple[str, ...], *, mesh: DeviceMesh) -> None:
    """Shard an inference-only model (the Rho-1 reference) in its own dtype: every block's
    parameters are gathered for its forward and freed after it; `methods` (e.g. "logits") gather
    like forward does."""
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for name in methods:
        register_fsdp_forward_method(model, name)


def parallelize(
    model: nn.Module,
    cfg: DistributedConfig,
    *,
    mesh: DeviceMesh | None,
    device: torch.device,
    param_dtype: torch.dtype | None,
) -> nn.Module:
    """float8 (if asked), activation checkpointing, compile, then FSDP2 over `mesh` (None: not sharded)."""
    if cfg.float8:
        check_float8(device)
        convert_float8(model)
    apply_activation_checkpointing(model, cfg)
    if cfg.compile:
        apply_compile(model)
    if mesh is not None:
        shard(
            model,
            [container[i] for container, i in transformer_blocks(model)],
            mesh=mesh,
            param_dtype=param_dtype,
            reshard_after_forward=cfg.reshard_after_forward,
        )
    return model
