"""Critic: learn a value head V_t = value_head(norm(h_trunk_t)) with the MTP model frozen.

Data: correct and incorrect solutions, 50/50. Reward R = 1 for a correct sample, else 0. Target:
Monte-Carlo G_t = R, or the lambda-return G_t = (1-λ) V_{t+1} + λ G_{t+1} (G_{t*} = R at the last
response-predicting state; values detached). Loss: mean over response-predicting states (t with
m_{t+1} = 1) of the whole global batch of (V_t - G_t)^2 (or Huber). Only the value head trains;
its weights (final/value_head.safetensors) start the verifiable recipe. Logged per step on the
training batch, and with [validation] on every held-out row: mean V on correct vs incorrect
samples and the AUROC of the last-state value (how well V at the end separates the two); where
the data knows an incorrect row's first differing token, the TD error δ_j = V_j - V_{j-1} there
against the row's other tokens (diag/td/*: a critic that sees the bug drops its value there).

critic.trunk = "own" also trains a copy of the trunk (token embeddings, trunk blocks, final norm)
with the value head: a value model, for when the frozen trunk's features do not keep what tells a
correct program from a buggy one at its end. Its final/ is then a whole model folder (params.json,
model.safetensors with value_head.weight, the tokenizer files) instead of value_head.safetensors, which
the verifiable recipe takes as critic.model and keeps frozen beside the policy.

    python recipes/full_finetune_critic.py --config configs/critic_tiny.toml
    torchrun --nproc_per_node=4 recipes/full_finetune_critic.py --config configs/critic_a100.toml
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
    CriticConfig,
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
from wmtp.distributed.env import all_gather_cat, all_reduce_sum, barrier, destroy, full_tensor, init_distributed
from wmtp.distributed.parallelize import build_mesh
from wmtp.layout import BEST_DIR, FINAL_DIR, VALUE_HEAD_KEY
from wmtp.logs import get_logger, setup_logging
from wmtp.losses import accumulation_dtype
from wmtp.models import save_mtp
from wmtp.models.checkpoint import model_args_of, save_value_head
from wmtp.models.hf import NewHeads
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
from wmtp.training.validation import PREFIX, BestExport, HeadSums, Validation
from wmtp.weighting.critic import binary_auroc, critic_targets, response_states, value_loss, value_stats
from wmtp.weighting.diagnostics import TokenDiagnostics, td_errors

log = get_logger("recipe")


class ValueStats:
    """Mean V on correct vs incorrect samples and AUROC of the last-state value, over micro-batches
    and ranks (the gathered last-state values of every row, so the AUROC is exact)."""

    SUMS = ("value_sum_correct", "count_correct", "value_sum_incorrect", "count_incorrect")
    LAST = ("last_values", "rewards", "last_valid")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self.SUMS), dtype=accumulation_dtype(device), device=device)
        self.last: dict[str, list[torch.Tensor]] = {key: [] for key in self.LAST}

    def add(
        self, values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None
    ) -> None:
        stats = value_stats(values, rewards, mask, segments=segments)
        self.sums += torch.stack([stats[key] for key in self.SUMS]).to(self.sums.dtype)
        for key, parts in self.last.items():
            parts.append(stats[key])

    def reduce(self, prefix: str = "") -> dict[str, float]:
        sums = all_reduce_sum(self.sums)
        scores, labels, keep = (all_gather_cat(torch.cat(self.last[key])) for key in self.LAST)
        return {
            f"{prefix}value/correct": float(sums[0] / sums[1].clamp(min=1)),
            f"{prefix}value/incorrect": float(sums[2] / sums[3].clamp(min=1)),
            f"{prefix}auroc": binary_auroc(scores[keep].cpu(), labels[keep].cpu()),
            f"{prefix}rows": int(keep.sum()),
        }


def _default_data() -> DataConfig:
    return DataConfig(sampler="balanced")


@dataclasses.dataclass
class CriticRecipeConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=_default_data)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = dataclasses.field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    critic: CriticConfig = dataclasses.field(default_factory=CriticConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)


class CriticRecipe:
    def __init__(self, cfg: CriticRecipeConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.training.output_dir)
        self.step = 0

    def trains(self, name: str) -> bool:
        """The parameters the critic learns: the value head, and with critic.trunk = "own" the token
        embeddings, the trunk blocks (layers[:-1]; layers[-1] is head 0) and the final norm."""
        if name == VALUE_HEAD_KEY:
            return True
        if self.cfg.critic.trunk == "frozen":
            return False
        block = name.split(".")[1] if name.startswith("layers.") else None
        return name.startswith(("tok_embeddings.", "norm.")) or (block is not None and int(block) < self.n_trunk)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.training.device)
        mesh = build_mesh(self.dist, cfg.distributed.hsdp_replicas)
        torch.manual_seed(cfg.training.seed)
        param_dtype, self.autocast = resolve_precision(cfg.training.precision, self.dist)
        self.n_trunk = model_args_of(Path(cfg.model.path), NewHeads(cfg.model.n_future_tokens)).n_trunk_layers

        self.tokenizer = load_tokenizer(cfg.tokenizer.path)
        # Heads and output stay frozen; the trunk too unless critic.trunk = "own". Built on the meta
        # device and sharded first; rank 0 alone reads the checkpoint (and critic.value_head).
        self.model = setup_policy(
            cfg.model,
            cfg.distributed,
            self.dist,
            mesh=mesh,
            vocab_size=self.tokenizer.vocab_size,
            param_dtype=param_dtype,
            value_head=True,
            value_head_path=cfg.critic.value_head,
            trainable=self.trains,
        )
        self.model_args = self.model.args
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self.optimizer = build_optimizer(self.trainable, cfg.optimizer)
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=cfg.lr_scheduler.warmup_steps,
            total_steps=cfg.training.max_steps,
            min_lr_ratio=cfg.lr_scheduler.min_lr_ratio,
        )
        self.n_future = self.model.n_future
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

        self.checkpointer = Checkpointer(
            self.out, keep_last=cfg.checkpoint.keep_last, is_main=self.dist.is_main, trainable_only=True
        )
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
        bar = progress_bar("critic", cfg, step=self.step, enabled=self.dist.is_main and self.cfg.metrics.progress_bar)
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
                    bar.set_postfix(value_loss=f"{metrics['value_loss']:.4f}", auroc=f"{metrics['auroc']:.3f}")
                else:
                    keys = ["value_loss", "value/correct", "value/incorrect", "auroc", "lr"]
                    log.info(step_line("critic", self.step, cfg.max_steps, metrics, keys))
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
        device, crit = self.dist.device, self.cfg.critic
        lam = 1.0 if crit.target == "mc" else crit.lam
        acc = accumulation_dtype(device)
        # Global denominator: response-predicting states of the whole global batch.
        n_states = all_reduce_sum(
            sum(response_states(mb["mask"], segments=mb.get("segments")).sum() for mb in micro_batches).to(acc)
        )
        loss_total = torch.zeros((), dtype=acc, device=device)
        stats = ValueStats(device)
        diag = TokenDiagnostics(device, acc)
        for mb in micro_batches:
            mask, rewards, segments = mb["mask"], mb["is_correct"].float(), mb.get("segments")
            with self.autocast:
                values = self.model(mb["tokens"], with_values=True, with_heads=False, segments=segments).values
            targets = critic_targets(values.detach(), rewards, mask, lam=lam, segments=segments)
            loss_sum, _ = value_loss(
                values, targets, response_states(mask, segments=segments), kind=crit.loss, huber_delta=crit.huber_delta
            )
            loss = loss_sum / n_states.clamp(min=1)
            # FSDP averages gradients over ranks; each rank holds a partial sum of one global loss.
            (loss * self.dist.world_size).backward()
            loss_total += loss.detach().to(acc)
            stats.add(values, rewards, mask, segments)
            diag.add_td(td_errors(values, rewards, mask, segments=segments), mb)
        metrics = clip_and_step(self.trainable, self.optimizer, self.scheduler, self.cfg.training.max_grad_norm)
        metrics.update(stats.reduce())
        metrics.update(diag.metrics())
        # The trunk runs forward (and backward when it trains); no head block, no vocabulary projection.
        metrics["tokens"], metrics["flops"] = step_work(
            micro_batches, self.model_args, heads=0, scored_pairs=0, backward=self.cfg.critic.trunk == "own"
        )
        metrics["value_loss"] = float(all_reduce_sum(loss_total))
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The value head on every held-out row, each row once across ranks: the value loss, mean V on
        correct vs incorrect rows, the AUROC of the last-state value and the TD errors at the first
        differing tokens (val/diag/td/*)."""
        crit = self.cfg.critic
        stats = ValueStats(self.dist.device)
        diag = TokenDiagnostics(self.dist.device, accumulation_dtype(self.dist.device))
        loss = HeadSums(("sum", "states"), 1, self.dist.device)
        for mb in self.validation.batches():
            mask, rewards, segments = mb["mask"], mb["is_correct"].float(), mb.get("segments")
            with self.autocast:
                values = self.model(mb["tokens"], with_values=True, with_heads=False, segments=segments).values
            lam = 1.0 if crit.target == "mc" else crit.lam
            targets = critic_targets(values, rewards, mask, lam=lam, segments=segments)
            v_sum, v_states = value_loss(
                values, targets, response_states(mask, segments=segments), kind=crit.loss, huber_delta=crit.huber_delta
            )
            loss.add(sum=v_sum.reshape(1), states=v_states.reshape(1))
            stats.add(values, rewards, mask, segments)
            diag.add_td(td_errors(values, rewards, mask, segments=segments), mb)
        total = loss.reduce()
        value = float(total["sum"][0] / total["states"][0].clamp(min=1))
        return {**stats.reduce(prefix=PREFIX), f"{PREFIX}value_loss": value, **diag.metrics(prefix=PREFIX)}

    def log_validation(self) -> None:
        metrics = self.validate()
        self.metrics.log(self.step, metrics)
        keys = ["val/value_loss", "val/value/correct", "val/value/incorrect", "val/auroc", "val/rows"]
        log.info(step_line("critic val", self.step, self.cfg.training.max_steps, metrics, keys))
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
        """`folder`/value_head.safetensors (final/ or best/): the value head the verifiable recipe starts
        from; with critic.trunk = "own" the value model instead (critic.model): params.json,
        model.safetensors (value_head.weight included) and the tokenizer files."""
        if self.cfg.critic.trunk == "own":
            sd = full_model_state_dict(self.model)
            if self.dist.is_main:
                log.info("[export] %s", save_mtp(folder, self.model_args, sd, extra_files=self.tokenizer.files))
            return
        weight = full_tensor(self.model.value_head.weight)
        if self.dist.is_main:
            log.info("[export] %s", save_value_head(folder, weight))

    def cleanup(self, status: str) -> None:
        """Wait (bounded) for S3 uploads, draw report.png, end the MLflow run with `status`."""
        close_run(self.metrics, self.s3, status=status, report=self.cfg.metrics.report, wait_s=self.cfg.s3.wait_s)
        destroy()


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = main_config(CriticRecipeConfig, argv)
    check_inputs_or_exit(cfg)
    run_recipe(CriticRecipe(cfg))


if __name__ == "__main__":
    main()
