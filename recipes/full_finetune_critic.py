"""Critic: learn a value head V_t = value_head(norm(h_trunk_t)) with the MTP model frozen.

Data: correct and incorrect solutions, 50/50. Reward R = 1 for a correct sample, else 0. Target:
Monte-Carlo G_t = R, or the lambda-return G_t = (1-λ) V_{t+1} + λ G_{t+1} (G_{t*} = R at the last
response-predicting state; values detached). Loss: mean over response-predicting states (t with
m_{t+1} = 1) of the whole global batch of (V_t - G_t)^2 (or Huber). Only the value head trains;
its weights (final/value_head.safetensors) start the verifiable recipe.

    python recipes/full_finetune_critic.py --config configs/critic_tiny.toml
    torchrun --nproc_per_node=4 recipes/full_finetune_critic.py --config configs/critic_a100.toml
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

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
    TokenizerConfig,
    TrainingConfig,
)
from wmtp.data.loader import GlobalBatchLoader
from wmtp.data.tokenizer import SentencePieceTokenizer
from wmtp.distributed.env import all_gather_cat, all_reduce_sum, destroy, full_tensor, init_distributed
from wmtp.distributed.parallelize import parallelize
from wmtp.models import load_mtp
from wmtp.models.checkpoint import load_value_head, save_value_head
from wmtp.training.checkpointer import Checkpointer
from wmtp.training.lr_schedule import build_scheduler
from wmtp.training.run import (build_optimizer, checkpoint_due, log_due, open_run, progress_bar, resume_latest,
                               save_training_state, stop_step)
from wmtp.training.step import clip_and_step, resolve_precision, step_line, throughput
from wmtp.weighting.critic import binary_auroc, critic_targets, response_states, value_loss, value_stats

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


class CriticRecipe:
    def __init__(self, cfg: CriticRecipeConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.training.output_dir)
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.training.device)
        torch.manual_seed(cfg.training.seed)
        param_dtype, self.autocast = resolve_precision(cfg.training.precision, self.dist)

        self.tokenizer = SentencePieceTokenizer(cfg.tokenizer.path)
        model = load_mtp(cfg.model.path, device=self.dist.device, dtype=torch.float32, value_head=True,
                         vocab_size=self.tokenizer.vocab_size, max_seq_len=cfg.model.max_seq_len)
        if cfg.critic.value_head:
            load_value_head(model, cfg.critic.value_head)
        # Trunk, heads, norm and output stay frozen: only the value head learns.
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("value_head."))
        self.model_args = model.args
        self.model = parallelize(model, cfg.distributed, world_size=self.dist.world_size, param_dtype=param_dtype)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self.optimizer = build_optimizer(self.trainable, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=cfg.lr_scheduler.warmup_steps,
                                         total_steps=cfg.training.max_steps,
                                         min_lr_ratio=cfg.lr_scheduler.min_lr_ratio)
        self.loader = GlobalBatchLoader(
            cfg.data, self.tokenizer, max_seq_len=cfg.model.max_seq_len, n_future=model.n_future,
            micro_batch_size=cfg.training.micro_batch_size, grad_accum_steps=cfg.training.grad_accum_steps,
            rank=self.dist.rank, world_size=self.dist.world_size, total_steps=cfg.training.max_steps)

        self.checkpointer = Checkpointer(self.out, keep_last=cfg.checkpoint.keep_last, is_main=self.dist.is_main,
                                         trainable_only=True)
        state = (resume_latest(self.checkpointer, self.model, self.optimizer, self.scheduler, self.loader)
                 if cfg.checkpoint.resume else None)
        if state is not None:
            self.step = state["step"]

        self.metrics = open_run(cfg, self.out, is_main=self.dist.is_main, step=self.step, loader=self.loader)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg = self.cfg.training
        bar = progress_bar("critic", cfg, step=self.step,
                           enabled=self.dist.is_main and self.cfg.metrics.progress_bar)
        while self.step < stop_step(cfg):
            t0 = time.perf_counter()
            metrics = self.train_step(self.loader.next_step())
            self.step += 1
            metrics.update(throughput(metrics.pop("tokens"), time.perf_counter() - t0, args=self.model_args,
                                      seq_len=self.cfg.model.max_seq_len, device=self.dist.device, n_heads_used=0))
            if log_due(self.step, cfg):
                self.metrics.log(self.step, metrics)
                if not bar.disable:
                    bar.set_postfix(value_loss=f"{metrics['value_loss']:.4f}", auroc=f"{metrics['auroc']:.3f}")
                elif self.dist.is_main:
                    keys = ["value_loss", "value/correct", "value/incorrect", "auroc", "lr"]
                    print(step_line("critic", self.step, cfg.max_steps, metrics, keys), flush=True)
            bar.update(1)
            if checkpoint_due(self.step, cfg, self.cfg.checkpoint.save_every):
                self.save_checkpoint()
        bar.close()
        if self.step >= cfg.max_steps and self.cfg.checkpoint.export_final:
            self.export_final()

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        device, crit = self.dist.device, self.cfg.critic
        lam = 1.0 if crit.target == "mc" else crit.lam
        # Global denominator: response-predicting states of the whole global batch.
        n_states = all_reduce_sum(sum(response_states(mb["mask"]).sum() for mb in micro_batches).double().to(device))
        # sums: loss, V on correct, #correct states, V on incorrect, #incorrect states
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        last = {"last_values": [], "rewards": [], "last_valid": []}
        tokens = 0
        for mb in micro_batches:
            mask = mb["mask"].to(device)
            rewards = mb["is_correct"].to(device).float()
            with self.autocast:
                values = self.model(mb["tokens"].to(device), with_values=True, with_heads=False).values
            targets = critic_targets(values.detach(), rewards, mask, lam=lam)
            loss_sum, _ = value_loss(values, targets, response_states(mask), kind=crit.loss,
                                     huber_delta=crit.huber_delta)
            loss = loss_sum / n_states.clamp(min=1)
            # FSDP averages gradients over ranks; each rank holds a partial sum of one global loss.
            (loss * self.dist.world_size).backward()
            stats = value_stats(values, rewards, mask)
            sums += torch.stack([loss.detach(), stats["value_sum_correct"], stats["count_correct"],
                                 stats["value_sum_incorrect"], stats["count_incorrect"]]).double()
            for key, parts in last.items():
                parts.append(stats[key])
            tokens += int(mb["lengths"].sum())
        all_reduce_sum(sums)
        scores, labels, keep = (all_gather_cat(torch.cat(last[k])) for k in ("last_values", "rewards", "last_valid"))
        metrics = clip_and_step(self.trainable, self.optimizer, self.scheduler, self.cfg.training.max_grad_norm)
        metrics.update({
            "value_loss": float(sums[0]), "tokens": tokens,
            "value/correct": float(sums[1] / sums[2].clamp(min=1)),
            "value/incorrect": float(sums[3] / sums[4].clamp(min=1)),
            "auroc": binary_auroc(scores[keep].cpu(), labels[keep].cpu()),
        })
        return metrics

    # ------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> None:
        save_training_state(self.checkpointer, self.step, self.model, self.optimizer, self.scheduler, self.loader)

    def export_final(self) -> None:
        """output_dir/final/value_head.safetensors: the value head the verifiable recipe starts from."""
        weight = full_tensor(self.model.value_head.weight)
        if self.dist.is_main:
            path = save_value_head(self.out / "final", weight)
            print(f"[export] {path}", flush=True)

    def cleanup(self) -> None:
        self.metrics.close()
        destroy()


def main(argv: list[str] | None = None) -> None:
    cfg = main_config(CriticRecipeConfig, argv)
    recipe = CriticRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    main()
