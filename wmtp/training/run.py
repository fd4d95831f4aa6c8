"""Run-folder chores every recipe repeats: optimizer, resume, checkpoint cadence, logging setup.

Plain functions, so a recipe still reads top to bottom: it calls these where torchtune's recipes
inline the same lines.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from tqdm import tqdm

from wmtp.atomic import TMP_SUFFIX
from wmtp.config.loader import config_to_dict, flatten, to_toml
from wmtp.config.sections import DistributedConfig, ModelConfig, OptimizerConfig, S3Config, TrainingConfig
from wmtp.data.loader import GlobalBatchLoader
from wmtp.distributed.env import DistInfo, all_gather_objects
from wmtp.distributed.load import load_weights
from wmtp.distributed.parallelize import parallelize
from wmtp.layout import RUN_CONFIG
from wmtp.models import MTPTransformer
from wmtp.models.checkpoint import build_mtp, read_checkpoint
from wmtp.models.hf import NewHeads
from wmtp.training.checkpointer import Checkpointer
from wmtp.training.metrics import FINISHED, MetricLogger, raise_on_sigterm, status_for
from wmtp.training.plots import maybe_plot
from wmtp.training.s3 import S3Error, S3Sync, shared_attempt_id

log = logging.getLogger(__name__)


def setup_policy(
    model_cfg: ModelConfig,
    dist_cfg: DistributedConfig,
    info: DistInfo,
    *,
    mesh: DeviceMesh | None,
    vocab_size: int,
    param_dtype: torch.dtype | None,
    value_head: bool = False,
    value_head_path: str | None = None,
    trainable: Callable[[str], bool] | None = None,
) -> MTPTransformer:
    """The policy: built on the meta device, parallelised (float8, AC, compile, FSDP2 over `mesh`),
    materialised on the training device and filled with the checkpoint that rank 0 reads.

    value_head_path: a critic run's value_head.safetensors for the value head. trainable: which
    parameters (by name) train; the others are frozen before sharding.
    """
    # A Hugging Face model's new heads: "random" ones are drawn with the recipe's seed (training.seed).
    heads = NewHeads(model_cfg.n_future_tokens, model_cfg.new_heads, seed=torch.initial_seed())
    model = build_mtp(
        model_cfg.path, vocab_size=vocab_size, value_head=value_head, max_seq_len=model_cfg.max_seq_len, heads=heads
    )
    if trainable is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
    model = parallelize(model, dist_cfg, mesh=mesh, device=info.device, param_dtype=param_dtype)
    load_weights(
        model, lambda: read_checkpoint(model_cfg.path, model, value_head_path=value_head_path, heads=heads), info=info
    )
    if info.in_process_group:
        layout = (
            f"HSDP {mesh.shape[0]} replicas x {mesh.shape[1]} shards"
            if mesh is not None and mesh.ndim == 2
            else f"FSDP2 over {info.world_size} rank(s)"
        )
        log.info("[dist] %s, %s; weights read by rank 0 and broadcast", layout, info.device.type)
    return model


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def resume_latest(
    checkpointer: Checkpointer,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: GlobalBatchLoader,
    *,
    required: tuple[str, ...] = (),
) -> dict[str, Any] | None:
    """Restore model, optimizer, schedule and sampler from the newest checkpoint that loads.

    Returns its trainer state (step and any recipe extras), or None when there is none. A newer
    checkpoint that does not load (a missing or cut-short shard or .metadata, a truncated
    trainer_state.json, or one lacking "step", "scheduler", "loader" or the recipe's own `required`
    keys) is reported by path and reason, moved aside (`step_N.damaged`) and the next newest one is
    used; all ranks agree on each attempt (Checkpointer.load_latest). When every checkpoint is
    damaged it raises NoLoadableCheckpointError instead of starting over from step 0.
    """
    found = checkpointer.load_latest(model, optimizer, required=("step", "scheduler", "loader", *required))
    if found is None:
        return None
    path, state = found
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    log.info("[checkpoint] resumed from %s (step %d)", path, state["step"])
    return state


def save_training_state(
    checkpointer: Checkpointer,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: GlobalBatchLoader,
    *,
    s3: S3Sync,
    local_rank: int,
    **extra: Any,
) -> Path:
    """Save a training checkpoint (extra: JSON-serialisable recipe state), say where, and queue this
    rank's files for S3 (collective)."""
    state = {"scheduler": scheduler.state_dict(), "loader": loader.state_dict(), **extra}
    path = checkpointer.save(step, model, optimizer, state)
    log.info("[checkpoint] step %d -> %s", step, path)
    if s3.enabled:
        # A node that does not share rank 0's filesystem holds its part in the .tmp folder rank 0 never
        # renamed there. Then no node holds a whole checkpoint (rank 0's folder lacks the other nodes'
        # shards and would be taken as damaged at resume): every part goes to S3 from a staged copy
        # and is removed locally; a restart downloads the checkpoint from S3 on every node.
        local = path if path.is_dir() else path.with_name(path.name + TMP_SUFFIX)
        s3.upload_checkpoint(step, local)
        split = _any_rank(local != path)  # collective: every rank has staged its part
        if split and local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
        if split:
            log.info("[s3] step %d: the nodes share no filesystem; the checkpoint is kept on S3 only", step)
    return path


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (collective)."""
    return any(all_gather_objects(flag))


def open_s3(cfg: S3Config, output_dir: Path, info: DistInfo) -> S3Sync:
    """The run's S3 uploader (inert without s3.bucket). Collective: every rank calls it."""
    return S3Sync(cfg, output_dir=output_dir, rank=info.rank, world_size=info.world_size, attempt=shared_attempt_id())


def fetch_from_s3(s3: S3Sync, checkpointer: Checkpointer, info: DistInfo) -> None:
    """Resume from S3: on each node, local rank 0 downloads the newest complete checkpoint there when no
    local one is as new (a preempted job restarted on a fresh machine). Collective."""
    path = None
    if s3.enabled and info.local_rank == 0:
        try:
            path = s3.download_latest(checkpointer.root)
        except S3Error as exc:
            log.warning("[s3] warning: cannot look for checkpoints on S3 (%s); resuming from local ones only", exc)
    # Rank 0 says what every node downloaded (other ranks' info lines are not printed).
    for rank, downloaded in enumerate(all_gather_objects(path)):
        if downloaded is not None:
            log.info("[s3] downloaded %s (rank %d)", downloaded, rank)


def open_run(cfg: Any, output_dir: Path, *, is_main: bool, step: int, loader: GlobalBatchLoader) -> MetricLogger:
    """Write the resolved config, start the metric sinks at `step`, and report the data counts (rank 0)."""
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_CONFIG).write_text(to_toml(cfg, with_docs=False))
    logger = MetricLogger(
        cfg.metrics, output_dir, params=flatten(config_to_dict(cfg)), enabled=is_main, resume_step=step
    )
    if is_main:
        logger.log_artifact(output_dir / RUN_CONFIG)
        log.info("[data] %s", loader.summary())
        if step == 0:
            logger.log(step, {f"data/{k}": v for k, v in loader.counts().items()})
    return logger


def close_run(metrics: MetricLogger, s3: S3Sync, *, status: str, report: bool, wait_s: float) -> None:
    """End of a run: wait (bounded) for S3 uploads and report them, draw report.png (rank 0, when
    matplotlib is installed), and close the metric sinks with the run's status."""
    if s3.enabled:
        log.info("[s3] rank %d: %s", s3.rank, s3.wait(wait_s))
        s3.close()
    if report and metrics.enabled:  # rank 0
        report = maybe_plot(metrics.output_dir)
        if report is not None:
            metrics.log_artifact(report)
    metrics.close(status)


def run_recipe(recipe: Any) -> None:
    """setup, train, cleanup: the MLflow run ends FINISHED, FAILED (an exception) or KILLED (SIGTERM,
    Ctrl-C). SIGTERM (torchrun, a scheduler's preemption) raises, so cleanup runs."""
    raise_on_sigterm()
    recipe.setup()
    try:
        recipe.train()
    except BaseException as exc:
        recipe.cleanup(status=status_for(exc))
        raise
    recipe.cleanup(status=FINISHED)


def progress_bar(name: str, cfg: TrainingConfig, *, step: int, enabled: bool) -> tqdm:
    """A tqdm bar on rank 0 in a terminal; disabled otherwise (the recipe prints lines instead)."""
    return tqdm(
        total=cfg.max_steps, initial=step, desc=name, dynamic_ncols=True, disable=not (enabled and sys.stdout.isatty())
    )


def stop_step(cfg: TrainingConfig) -> int:
    """The step this invocation ends at: max_steps, or earlier with stop_at_step."""
    return min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)


def log_due(step: int, cfg: TrainingConfig) -> bool:
    return step % cfg.log_every == 0 or step in (1, stop_step(cfg))


def checkpoint_due(step: int, cfg: TrainingConfig, save_every: int) -> bool:
    """Every save_every steps, and always when stopping before the end (to resume from)."""
    stop = stop_step(cfg)
    return bool(save_every and step % save_every == 0) or (step == stop and stop < cfg.max_steps)
