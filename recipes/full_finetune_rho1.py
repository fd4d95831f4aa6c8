"""Rho-1 on MTP heads: train each head k >= 1 only on the pairs a frozen reference finds easy.

r_j = reference CE of x_j given x_<j; excess e_{t,k} = CE_{t,k} - r_{t+1+k}. Head 0 keeps all of its
valid pairs; for each head k >= 1 the ceil(ρ N_k) valid pairs of the micro-batch with the LARGEST
excess get s = 1, the rest 0 (Lin et al. 2024 keep the high-excess tokens). Then

    L = (1/n) sum_k [ sum_t s_{t,k} CE_{t,k} / sum_t s_{t,k} ]

with the sums over the global batch. The selected count of a head in a micro-batch is ceil(ρ N_k),
known from the targets alone, so the denominators are fixed before the first backward.

rho1.control = "random" selects the same number of pairs per head uniformly instead (the ablation
control; `wmtp.weighting.controls`). Where the data knows a row's first differing token from its
sibling, each step logs the selected share and the excess at the pairs that predict it against the
other pairs of the selected heads (diag/selected/*, diag/excess/*). Held-out rows are scored with
the excess selection, control or not.

    python recipes/full_finetune_rho1.py --config configs/rho1_tiny.toml
    torchrun --nproc_per_node=4 recipes/full_finetune_rho1.py --config configs/rho1_a100.toml
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
    ReferenceConfig,
    Rho1Config,
    S3Config,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)
from wmtp.constants import IGNORE_INDEX
from wmtp.data.loader import GlobalBatchLoader
from wmtp.data.tokenizer import load_tokenizer
from wmtp.distributed.env import all_reduce_sum, barrier, destroy, init_distributed
from wmtp.distributed.load import load_weights
from wmtp.distributed.parallelize import build_mesh, shard_frozen
from wmtp.layout import BEST_DIR, FINAL_DIR
from wmtp.logs import get_logger, setup_logging
from wmtp.losses import accumulation_dtype
from wmtp.losses.normalization import valid_pair_counts
from wmtp.models import save_mtp
from wmtp.models.reference import ReferenceModel
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
from wmtp.training.validation import PREFIX, BestExport, HeadSums, Validation, per_head_means, valid_pairs
from wmtp.weighting.controls import random_selection_keys
from wmtp.weighting.diagnostics import TokenDiagnostics
from wmtp.weighting.rho1 import rho1_excess, rho1_select, rho1_selected_counts

log = get_logger("recipe")


@dataclasses.dataclass
class Rho1RecipeConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = dataclasses.field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    rho1: Rho1Config = dataclasses.field(default_factory=Rho1Config)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)


class Rho1Recipe:
    def __init__(self, cfg: Rho1RecipeConfig) -> None:
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
        # The reference is checked first: a tokenizer mismatch stops the run before any work. Like
        # the policy it is built on the meta device, sharded, and read by rank 0 alone.
        self.reference = ReferenceModel(
            cfg.reference.path,
            kind=cfg.reference.kind,
            tokenizer=self.tokenizer,
            device=self.dist.device,
            shard=None
            if mesh is None
            else lambda model, blocks, methods: shard_frozen(model, blocks, methods, mesh=mesh),
            fill=lambda model, read, buffers_from=None: load_weights(
                model, read, info=self.dist, buffers_from=buffers_from
            ),
        )
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
        bar = progress_bar("rho1", cfg, step=self.step, enabled=self.dist.is_main and self.cfg.metrics.progress_bar)
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
                    keys = [
                        "loss",
                        *(f"loss/head_{k}" for k in range(self.n_future)),
                        *(f"selected/head_{k}" for k in range(1, self.n_future)),
                        "lr",
                    ]
                    log.info(step_line("rho1", self.step, cfg.max_steps, metrics, keys))
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

    @property
    def selected_heads(self) -> torch.Tensor:
        """[n] bool: the heads whose pairs are selected (k >= 1, and head 0 with rho1.select_head0)."""
        heads = torch.ones(self.n_future, dtype=torch.bool, device=self.dist.device)
        heads[0] = self.cfg.rho1.select_head0
        return heads

    def select(
        self, excess: torch.Tensor, valid: torch.Tensor, mb: dict[str, torch.Tensor], *, control: str | None = None
    ) -> torch.Tensor:
        """The 0/1 selection [B, T, n] of a micro-batch: the largest excess per head, or under
        `control` (default rho1.control) "random" as many pairs drawn uniformly (the largest of
        per-row random keys)."""
        rho, n = self.cfg.rho1, self.n_future
        keys = excess
        if (rho.control if control is None else control) == "random":
            keys = random_selection_keys(
                mb["lengths"],
                mb["sample"],
                width=excess.shape[1],
                n_heads=n,
                seed=self.cfg.training.seed,
                segments=mb.get("segments"),
            )
        return rho1_select(
            keys.reshape(-1, n), valid.reshape(-1, n), ratio=rho.ratio, select_head0=rho.select_head0
        ).view_as(excess)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        device, n, rho = self.dist.device, self.n_future, self.cfg.rho1
        # Denominators before any backward: valid pairs N_k and selected pairs sum_mb ceil(ρ N_k^mb).
        valid_counts = [valid_pair_counts(mb["targets"]) for mb in micro_batches]
        local_valid = sum(valid_counts)
        selected = all_reduce_sum(
            sum(rho1_selected_counts(c, ratio=rho.ratio, select_head0=rho.select_head0) for c in valid_counts)
        )
        n_valid = all_reduce_sum(local_valid.clone())
        inv = torch.where(selected > 0, 1.0 / (n * selected.clamp(min=1)), torch.zeros_like(selected))
        # sums per head: weighted loss, excess over valid pairs
        head_loss = torch.zeros(n, dtype=accumulation_dtype(device), device=device)
        head_excess = torch.zeros_like(head_loss)
        diag = TokenDiagnostics(device, head_loss.dtype)
        for mb in micro_batches:
            tok, targets, segments = mb["tokens"], mb["targets"], mb.get("segments")
            valid = targets != IGNORE_INDEX
            ref_ce = self.reference.token_ce(tok, segments=segments)
            with self.autocast:
                # CE first (reduction "none"): the selection depends on it; the backward recomputes the logits.
                ce = self.model(tok, targets=targets, segments=segments).ce
            excess = rho1_excess(ce.detach(), ref_ce, valid)
            select = self.select(excess, valid, mb)
            per_pair = ce * select * inv.to(ce.dtype)
            (per_pair.sum() * self.dist.world_size).backward()
            head_loss += per_pair.detach().sum(dim=(0, 1)).to(head_loss.dtype)
            head_excess += excess.sum(dim=(0, 1)).to(head_excess.dtype)
            diag.add_selection(select, excess, valid, self.selected_heads, mb)
        all_reduce_sum(head_loss)
        all_reduce_sum(head_excess)
        metrics = clip_and_step(
            self.model.parameters(), self.optimizer, self.scheduler, self.cfg.training.max_grad_norm
        )
        metrics["tokens"], metrics["flops"] = step_work(
            micro_batches, self.model_args, heads=n, scored_pairs=int(local_valid.sum())
        )
        metrics["loss"] = float(head_loss.sum())
        metrics.update(diag.metrics())
        for k in range(n):
            metrics[f"loss/head_{k}"] = float(head_loss[k] * n)
            metrics[f"selected/head_{k}"] = float(selected[k] / n_valid[k].clamp(min=1))
            metrics[f"excess/head_{k}"] = float(head_excess[k] / n_valid[k].clamp(min=1))
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out, each row once across ranks, selecting per micro-batch as training does: per head
        the CE of the selected pairs (val/loss, the objective), the CE of all pairs, the mean excess
        and the selected fraction; where the selection lands (val/diag/*). The excess selection, also
        under a control."""
        n = self.n_future
        sums = HeadSums(("selected_ce", "selected", "ce", "excess", "pairs"), n, self.dist.device)
        diag = TokenDiagnostics(self.dist.device, accumulation_dtype(self.dist.device))
        for mb in self.validation.batches():
            targets = mb["targets"]
            valid = targets != IGNORE_INDEX
            ref_ce = self.reference.token_ce(mb["tokens"], segments=mb.get("segments"))
            with self.autocast:
                ce = self.model(mb["tokens"], targets=targets, segments=mb.get("segments")).ce
            excess = rho1_excess(ce, ref_ce, valid)
            select = self.select(excess, valid, mb, control="none")
            sums.add(selected_ce=ce * select, selected=select, ce=ce, excess=excess, pairs=valid_pairs(targets))
            diag.add_selection(select, excess, valid, self.selected_heads, mb)
        s = sums.reduce()
        return {
            **diag.metrics(prefix=PREFIX),
            **per_head_means(s["selected_ce"], s["selected"], "loss"),
            **per_head_means(s["ce"], s["pairs"], "ce"),
            **per_head_means(s["excess"], s["pairs"], "excess"),
            **per_head_means(s["selected"], s["pairs"], "selected"),
        }

    def log_validation(self) -> None:
        metrics = self.validate()
        self.metrics.log(self.step, metrics)
        keys = [
            "val/loss",
            *(f"val/loss/head_{k}" for k in range(self.n_future)),
            *(f"val/selected/head_{k}" for k in range(1, self.n_future)),
        ]
        log.info(step_line("rho1 val", self.step, self.cfg.training.max_steps, metrics, keys))
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
    cfg = main_config(Rho1RecipeConfig, argv)
    check_inputs_or_exit(cfg)
    run_recipe(Rho1Recipe(cfg))


if __name__ == "__main__":
    main()
