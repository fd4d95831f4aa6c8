"""Run-folder chores every recipe repeats: optimizer, resume, checkpoint cadence, logging setup.

Plain functions, so a recipe still reads top to bottom: it calls these where torchtune's recipes
inline the same lines.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch.distributed.device_mesh import DeviceMesh
from tqdm import tqdm

from wmtp.config.loader import config_to_dict, flatten, to_toml
from wmtp.config.sections import DistributedConfig, ModelConfig, OptimizerConfig, TrainingConfig
from wmtp.data.loader import GlobalBatchLoader
from wmtp.distributed.env import DistInfo
from wmtp.distributed.load import load_weights
from wmtp.distributed.parallelize import parallelize
from wmtp.models import MTPTransformer
from wmtp.models.checkpoint import build_mtp, read_checkpoint
from wmtp.training.checkpointer import Checkpointer
from wmtp.training.metrics import MetricLogger


def setup_policy(model_cfg: ModelConfig, dist_cfg: DistributedConfig, info: DistInfo, *, mesh: DeviceMesh | None,
                 vocab_size: int, param_dtype: torch.dtype | None, value_head: bool = False,
                 value_head_path: str | None = None,
                 trainable: Callable[[str], bool] | None = None) -> MTPTransformer:
    """The policy: built on the meta device, parallelised (float8, AC, compile, FSDP2 over `mesh`),
    materialised on the training device and filled with the checkpoint that rank 0 reads.

    value_head_path: a critic run's value_head.safetensors for the value head. trainable: which
    parameters (by name) train; the others are frozen before sharding.
    """
    model = build_mtp(model_cfg.path, vocab_size=vocab_size, value_head=value_head,
                      max_seq_len=model_cfg.max_seq_len)
    if trainable is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
    model = parallelize(model, dist_cfg, mesh=mesh, device=info.device, param_dtype=param_dtype)
    load_weights(model, lambda: read_checkpoint(model_cfg.path, model, value_head_path=value_head_path), info=info)
    if info.is_main and info.in_process_group:
        layout = (f"HSDP {mesh.shape[0]} replicas x {mesh.shape[1]} shards" if mesh is not None and mesh.ndim == 2
                  else f"FSDP2 over {info.world_size} rank(s)")
        print(f"[dist] {layout}, {info.device.type}; weights read by rank 0 and broadcast", flush=True)
    return model


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def resume_latest(checkpointer: Checkpointer, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, loader: GlobalBatchLoader
                  ) -> dict[str, Any] | None:
    """Restore model, optimizer, schedule and sampler from the newest complete checkpoint.

    Returns its trainer state (step and any recipe extras), or None when there is none.
    """
    latest = checkpointer.latest()
    if latest is None:
        return None
    state = checkpointer.load(latest, model, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    return state


def save_training_state(checkpointer: Checkpointer, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    loader: GlobalBatchLoader, **extra: Any) -> Path:
    """Save a training checkpoint (extra: JSON-serialisable recipe state) and say where."""
    state = {"scheduler": scheduler.state_dict(), "loader": loader.state_dict(), **extra}
    path = checkpointer.save(step, model, optimizer, state)
    if checkpointer.is_main:
        print(f"[checkpoint] step {step} -> {path}", flush=True)
    return path


def open_run(cfg: Any, output_dir: Path, *, is_main: bool, step: int, loader: GlobalBatchLoader) -> MetricLogger:
    """Write the resolved config, start the metric sinks, and report the data counts (rank 0)."""
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.toml").write_text(to_toml(cfg, with_docs=False))
    logger = MetricLogger(cfg.metrics, output_dir, params=flatten(config_to_dict(cfg)), enabled=is_main)
    if is_main:
        logger.log_artifact(output_dir / "config.toml")
        print(f"[data] {loader.summary()}", flush=True)
        logger.log(step, {f"data/{k}": v for k, v in loader.counts().items()})
    return logger


def progress_bar(name: str, cfg: TrainingConfig, *, step: int, enabled: bool) -> tqdm:
    """A tqdm bar on rank 0 in a terminal; disabled otherwise (the recipe prints lines instead)."""
    return tqdm(total=cfg.max_steps, initial=step, desc=name, dynamic_ncols=True,
                disable=not (enabled and sys.stdout.isatty()))


def stop_step(cfg: TrainingConfig) -> int:
    """The step this invocation ends at: max_steps, or earlier with stop_at_step."""
    return min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)


def log_due(step: int, cfg: TrainingConfig) -> bool:
    return step % cfg.log_every == 0 or step in (1, stop_step(cfg))


def checkpoint_due(step: int, cfg: TrainingConfig, save_every: int) -> bool:
    """Every save_every steps, and always when stopping before the end (to resume from)."""
    stop = stop_step(cfg)
    return bool(save_every and step % save_every == 0) or (step == stop and stop < cfg.max_steps)
