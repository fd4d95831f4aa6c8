"""Baseline MTP fine-tuning: every head learns its future token on correct solutions.

    L = (1/n) sum_k [ sum_t CE_{t,k} / N_k ]

N_k counts the valid pairs of head k over the whole global batch (all micro-batches, all ranks),
taken before the first backward. One file, one class: copy it and edit it for an ablation.

    python recipes/full_finetune_baseline.py --config configs/baseline_tiny.toml
    torchrun --nproc_per_node=4 recipes/full_finetune_baseline.py --config configs/baseline_a100.toml
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from wmtp.config.inputs import check_inputs_or_exit
from wmtp.config.loader import main_config
from wmtp.config.sections import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    LRSchedulerConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    S3Config,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)
from wmtp.data.loader import GlobalBatchLoader
from wmtp.data.tokenizer import load_tokenizer
from wmtp.distributed.env import all_reduce_sum, barrier, destroy, init_distributed
from wmtp.distributed.parallelize import build_mesh
from wmtp.layout import BEST_DIR, FINAL_DIR
from wmtp.logs import get_logger, setup_logging
from wmtp.losses import accumulation_dtype
from wmtp.losses.normalization import global_valid_pair_counts, head_mean_weights
from wmtp.models import save_mtp
from wmtp.training.checkpointer import Checkpointer, full_model_state_dict
from wmtp.training.lr_schedule import build_scheduler
from wmtp.training.run import (
    build_optimizer,
    checkpoint_due,
    close_run,
    fetch_from_s3,
    log_due,
    open_run,
    open_s3,
    progress_bar,
    resume_latest,
    run_recipe,
    save_training_state,
    setup_policy,
    stop_step,
)
from wmtp.training.step import clip_and_step, resolve_precision, step_line, step_work, throughput
from wmtp.training.validation import BestExport, HeadSums, Validation, per_head_means, valid_pairs

log = get_logger("recipe")


@dataclasses.dataclass
class BaselineConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = dataclasses.field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)


class BaselineRecipe:
    def __init__(self, cfg: BaselineConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.training.output_dir)
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.training.device)
        mesh = build_mesh(self.dist, cfg.distributed.hsdp_replicas)
        torch.manual_seed(cfg.training.seed)
        param_dtype, self.autocast = resolve_precision(cfg.training.precision, self.dist)

        self.tokenizer = load_tokenizer(cfg.tokenizer.path)
        # Built on the meta device and sharded first; rank 0 alone reads the checkpoint.
        self.model = setup_policy(
            cfg.model,
            cfg.distributed,
            self.dist,
            mesh=mesh,
            vocab_size=self.tokenizer.vocab_size,
            param_dtype=param_dtype,
        )
        self.n_future = self.model.n_future
        self.model_args = self.model.args

        self.optimizer = build_optimizer(self.model.parameters(), cfg.optimizer)
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=cfg.lr_scheduler.warmup_steps,
            total_steps=cfg.training.max_steps,
            min_lr_ratio=cfg.lr_scheduler.min_lr_ratio,
        )
        self.loader = GlobalBatchLoader(
            cfg.data,
            self.tokenizer,
            max_seq_len=cfg.model.max_seq_len,
            n_future=self.n_future,
            micro_batch_size=cfg.training.micro_batch_size,
            grad_accum_steps=cfg.training.grad_accum_steps,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            total_steps=cfg.training.max_steps,
            device=self.dist.device,
        )
        self.validation = Validation(
            cfg.validation,
            self.tokenizer,
            info=self.dist,
            max_seq_len=cfg.model.max_seq_len,
            n_future=self.n_future,
            micro_batch_size=cfg.training.micro_batch_size,
            max_steps=cfg.training.max_steps,
            layout=self.loader.layout,
        )
        self.best = BestExport(cfg.checkpoint.keep_best, self.out)

        self.checkpointer = Checkpointer(self.out, keep_last=cfg.checkpoint.keep_last, is_main=self.dist.is_main)
        self.s3 = open_s3(cfg.s3, self.out, self.dist)
        if cfg.checkpoint.resume:
            fetch_from_s3(self.s3, self.checkpointer, self.dist)
        state = (
            resume_latest(self.checkpointer, self.model, self.optimizer, self.scheduler, self.loader)
            if cfg.checkpoint.resume
            else None
        )
        if state is not None:
            self.step = state["step"]

        self.metrics = open_run(cfg, self.out, is_main=self.dist.is_main, step=self.step, loader=self.loader)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg = self.cfg.training
        bar = progress_bar("baseline", cfg, step=self.step, enabled=self.dist.is_main and self.cfg.metrics.progress_bar)
        while self.step < stop_step(cfg):
            t0 = time.perf_counter()
            metrics = self.train_step(self.loader.next_step())
            self.step += 1
            metrics.update(
                throughput(
                    metrics.pop("tokens"), metrics.pop("flops"), time.perf_counter() - t0, device=self.dist.device
                )
            )
            if log_due(self.step, cfg):
                self.metrics.log(self.step, metrics)
                if not bar.disable:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                else:
                    keys = ["loss", *(f"loss/head_{k}" for k in range(self.n_future)), "lr", "tokens_per_s"]
                    log.info(step_line("baseline", self.step, cfg.max_steps, metrics, keys))
            bar.update(1)
            if checkpoint_due(self.step, cfg, self.cfg.checkpoint.save_every):
                self.save_checkpoint()
            if self.validation.due(self.step):
                self.log_validation()
        bar.close()
        if self.step >= cfg.max_steps and self.cfg.checkpoint.export_final:
            self.export(self.out / FINAL_DIR)
            self.s3.upload_final(self.out / FINAL_DIR)
        # Ranks leave together: a barrier also waits for this rank's pending collectives, and a
        # process group torn down with work in flight can abort its process.
        barrier()

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        device, n = self.dist.device, self.n_future
        local_counts, counts = global_valid_pair_counts([mb["targets"] for mb in micro_batches])
        head_sums = torch.zeros(n, dtype=accumulation_dtype(device), device=device)
        for mb in micro_batches:
            mean_w = head_mean_weights(mb["targets"], counts)  # valid / (n N_k)
            with self.autocast:
                # The weights are known before the loss: gradients in the forward (6NHV, not 8NHV).
                out = self.model(
                    mb["tokens"],
                    targets=mb["targets"],
                    pair_weights=mean_w,
                    reduction="sum",
                    segments=mb.get("segments"),
                )
            # FSDP averages gradients over ranks; each rank holds a partial sum of one global loss.
            (out.loss * self.dist.world_size).backward()
            head_sums += (out.ce * mean_w).sum(dim=(0, 1)).to(head_sums.dtype)
        all_reduce_sum(head_sums)
        metrics = clip_and_step(
            self.model.parameters(), self.optimizer, self.scheduler, self.cfg.training.max_grad_norm
        )
        metrics["tokens"], metrics["flops"] = step_work(
            micro_batches, self.model_args, heads=n, scored_pairs=int(local_counts.sum())
        )
        metrics["loss"] = float(head_sums.sum())
        for k in range(n):
            # head_sums[k] = sum_t CE_{t,k} / (n N_k): times n it is head k's mean CE.
            metrics[f"loss/head_{k}"] = float(head_sums[k] * n)
            metrics[f"pairs/head_{k}"] = float(counts[k])
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out loss per head (mean CE over its pairs, each row once across ranks) and their mean."""
        sums = HeadSums(("ce", "pairs"), self.n_future, self.dist.device)
        for mb in self.validation.batches():
            with self.autocast:
                out = self.model(mb["tokens"], targets=mb["targets"], segments=mb.get("segments"))
            sums.add(ce=out.ce, pairs=valid_pairs(mb["targets"]))
        s = sums.reduce()
        return per_head_means(s["ce"], s["pairs"], "loss")

    def log_validation(self) -> None:
        metrics = self.validate()
        self.metrics.log(self.step, metrics)
        keys = ["val/loss", *(f"val/loss/head_{k}" for k in range(self.n_future))]
        log.info(step_line("baseline val", self.step, self.cfg.training.max_steps, metrics, keys))
        if self.best.improved(metrics):
            self.export(self.out / BEST_DIR)
            if self.dist.is_main:
                self.best.record(self.step)

    # ------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> None:
        save_training_state(
            self.checkpointer,
            self.step,
            self.model,
            self.optimizer,
            self.scheduler,
            self.loader,
            s3=self.s3,
            local_rank=self.dist.local_rank,
        )

    def export(self, folder: Path) -> None:
        """params.json + model.safetensors (+ the tokenizer files) in `folder` (final/ or best/)."""
        sd = full_model_state_dict(self.model)
        if self.dist.is_main:
            log.info("[export] %s", save_mtp(folder, self.model_args, sd, extra_files=self.tokenizer.files))

    def cleanup(self, status: str) -> None:
        """Wait (bounded) for S3 uploads, draw report.png, end the MLflow run with `status`."""
        close_run(self.metrics, self.s3, status=status, report=self.cfg.metrics.report, wait_s=self.cfg.s3.wait_s)
        destroy()


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = main_config(BaselineConfig, argv)
    check_inputs_or_exit(cfg)
    run_recipe(BaselineRecipe(cfg))


if __name__ == "__main__":
    main()
