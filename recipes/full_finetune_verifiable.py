"""Verifiable: weight each target token by how much the critic's TD error says it helped.

For the action x_{t+1} taken in state t (m_{t+1} = 1): δ_t = γ V_{t+1} - V_t, or δ_t = R - V_t when
x_{t+1} is the last response token (R = 1 for a correct sample, 0 otherwise). A_t = δ_t (+ γλ A_{t+1}
with GAE), optionally normalised by a running mean/std, and w_{t+1} = clamp(exp(A_t / β), w_min, w_max)
from detached values. Head k at position t uses the weight of its target, w_{t+1+k}:

    L = (1/n) sum_k [ sum_t w_{t+1+k} CE_{t,k} / N_k ] + c_v L_value

N_k counts head k's valid pairs and L_value (the critic's loss on the same batch) its states, over
the whole global batch. Start from the critic recipe's value head; the curriculum sampler moves
from easy to hard problems over training.

With critic.model (a critic run's value model, made with critic.trunk = "own") the values come from
that model, frozen beside the policy, instead of the policy's own value head; its value loss is then
logged, not trained, and the policy has no value head.

td.control runs an ablation control instead of the TD weights (uniform, shuffled within each row,
or permuted across the global batch; `wmtp.weighting.controls`); everything else stays. Where the
data knows it, each step logs where its weights land (diag/weight/*: correct vs incorrect rows,
the first differing token of incorrect rows vs their other tokens) and where the critic's TD
errors do (diag/td/*). Held-out rows are scored with the TD weights themselves, control or not, so
a control run's val/diag/* show where its critic would have put them.

    python recipes/full_finetune_verifiable.py --config configs/verifiable_tiny.toml
    torchrun --nproc_per_node=4 recipes/full_finetune_verifiable.py --config configs/verifiable_a100.toml
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
    TDConfig,
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
from wmtp.models import MTPTransformer, save_mtp
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
from wmtp.weighting.controls import permute_across_batch, shuffle_within_rows, uniform_weights
from wmtp.weighting.critic import critic_targets, response_states, value_loss
from wmtp.weighting.diagnostics import TokenDiagnostics, td_errors
from wmtp.weighting.td import (
    AdvantageNormalizer,
    TDWeights,
    all_reduce_td_stats,
    empty_td_stats,
    merge_td_stats,
    td_head_weights,
    td_stats,
    td_weights_with_stats,
)

log = get_logger("recipe")


def _default_data() -> DataConfig:
    return DataConfig(sampler="curriculum")


@dataclasses.dataclass
class VerifiableRecipeConfig:
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
    td: TDConfig = dataclasses.field(default_factory=TDConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)


class VerifiableRecipe:
    def __init__(self, cfg: VerifiableRecipeConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.training.output_dir)
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup_value_model(self, mesh, param_dtype: torch.dtype | None) -> MTPTransformer:
        """critic.model, frozen and sharded like the policy (rank 0 reads it); its tokenizer must be the policy's."""
        path = self.cfg.critic.model
        if load_tokenizer(path).pieces() != self.tokenizer.pieces():
            raise ValueError(f"critic.model {path}: its tokenizer differs from the policy's ({self.tokenizer.path})")
        log.info("[verifiable] TD weights from the value model %s (frozen)", path)
        return setup_policy(
            ModelConfig(path=path, max_seq_len=self.cfg.model.max_seq_len),
            self.cfg.distributed,
            self.dist,
            mesh=mesh,
            vocab_size=self.tokenizer.vocab_size,
            param_dtype=param_dtype,
            value_head=True,
            trainable=lambda name: False,
        )

    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.training.device)
        mesh = build_mesh(self.dist, cfg.distributed.hsdp_replicas)
        torch.manual_seed(cfg.training.seed)
        param_dtype, self.autocast = resolve_precision(cfg.training.precision, self.dist)

        self.tokenizer = load_tokenizer(cfg.tokenizer.path)
        self.value_model = self.setup_value_model(mesh, param_dtype) if cfg.critic.model else None
        if self.value_model is None and not cfg.critic.value_head:
            log.info("[verifiable] no critic.value_head given: the value head starts at zero")
        # Built on the meta device and sharded first; rank 0 alone reads the checkpoint and value head.
        self.model = setup_policy(
            cfg.model,
            cfg.distributed,
            self.dist,
            mesh=mesh,
            vocab_size=self.tokenizer.vocab_size,
            param_dtype=param_dtype,
            value_head=self.value_model is None,
            value_head_path=cfg.critic.value_head,
        )
        self.n_future = self.model.n_future
        self.model_args = self.model.args
        self.normalizer = AdvantageNormalizer(momentum=cfg.td.ema_momentum, device=self.dist.device)

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
            self.normalizer.load_state_dict({k: torch.tensor(v) for k, v in state["normalizer"].items()})

        self.metrics = open_run(cfg, self.out, is_main=self.dist.is_main, step=self.step, loader=self.loader)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg = self.cfg.training
        bar = progress_bar(
            "verifiable", cfg, step=self.step, enabled=self.dist.is_main and self.cfg.metrics.progress_bar
        )
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
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", w=f"{metrics['weight/mean']:.3f}")
                else:
                    keys = [
                        "loss",
                        "value_loss",
                        *(f"loss/head_{k}" for k in range(self.n_future)),
                        "td/mean",
                        "weight/mean",
                        "weight/clipped_share",
                        "lr",
                    ]
                    log.info(step_line("verifiable", self.step, cfg.max_steps, metrics, keys))
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

    def td_weights(self, values: torch.Tensor, mb: dict[str, torch.Tensor]) -> TDWeights:
        """The critic's TD weights w_j [B, L] of a micro-batch from its (detached) values, with their statistics."""
        td = self.cfg.td
        return td_weights_with_stats(
            values.detach(),
            mb["is_correct"].float(),
            mb["mask"],
            beta=td.beta,
            w_min=td.w_min,
            w_max=td.w_max,
            gamma=td.gamma,
            lam=td.lam,
            normalizer=self.normalizer if td.normalize else None,
            segments=mb.get("segments"),
        )

    @torch.no_grad()
    def planned_weights(
        self, micro_batches: list[dict[str, torch.Tensor]]
    ) -> list[tuple[TDWeights, torch.Tensor, torch.Tensor]] | None:
        """Every micro-batch's (TD weights, the weights the step trains with, values) before any loss,
        when they cannot come from the policy's own forward: with a value model (critic.model), or
        under td.control = "random", whose permutation spans the global batch (the policy's trunk and
        value head then run once more, without gradient, on the parameters the step's forwards see).
        None: the weights are made inside each forward."""
        td = self.cfg.td
        if self.value_model is None and td.control != "random":
            return None
        planned = []
        for mb in micro_batches:
            with self.autocast:
                values = (self.value_model or self.model)(
                    mb["tokens"], with_values=True, with_heads=False, segments=mb.get("segments")
                ).values
            weights = self.td_weights(values, mb)
            planned.append((weights, self.controlled(weights, mb), values))
        if td.control == "random":
            permuted = permute_across_batch(
                [w.weights for w, _, _ in planned], micro_batches, seed=self.cfg.training.seed, step=self.step
            )
            planned = [(w, p, v) for (w, _, v), p in zip(planned, permuted)]
        return planned

    def controlled(self, weights: TDWeights, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weights the step trains with under td.control ("random": `planned_weights` permutes them)."""
        control = self.cfg.td.control
        if control == "uniform":
            return uniform_weights(mb["mask"])
        if control == "shuffled":
            return shuffle_within_rows(
                weights.weights, mb["mask"], mb["sample"], seed=self.cfg.training.seed, segments=mb.get("segments")
            )
        return weights.weights

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        device, n, td, crit = self.dist.device, self.n_future, self.cfg.td, self.cfg.critic
        value_lam = 1.0 if crit.target == "mc" else crit.lam
        acc = accumulation_dtype(device)
        # Denominators before any backward: valid pairs per head and value states, global batch.
        local_counts, counts = global_valid_pair_counts([mb["targets"] for mb in micro_batches])
        n_states = all_reduce_sum(
            sum(response_states(mb["mask"], segments=mb.get("segments")).sum() for mb in micro_batches).to(acc)
        )
        planned = self.planned_weights(micro_batches)
        # per head: weighted loss, unweighted CE, weight; then the value loss
        head_sums = torch.zeros(3, n, dtype=acc, device=device)
        value_sum = torch.zeros((), dtype=acc, device=device)
        stats = empty_td_stats(device)
        diag = TokenDiagnostics(device, acc)
        for i, mb in enumerate(micro_batches):
            targets, mask, segments = mb["targets"], mb["mask"], mb.get("segments")
            rewards = mb["is_correct"].float()
            mean_w = head_mean_weights(targets, counts)  # valid / (n N_k)
            step_td = {}

            def pair_weights(values: torch.Tensor) -> torch.Tensor:
                # Called by the model between the trunk and the heads' loss: TD weights from this
                # forward's detached values, known before the loss (gradients in the forward, 6NHV).
                if planned is None:
                    step_td["td"] = self.td_weights(values, mb)
                    step_td["used"] = self.controlled(step_td["td"], mb)
                else:
                    step_td["td"], step_td["used"], _ = planned[i]
                step_td["head_w"] = td_head_weights(step_td["used"], n, segments=segments)  # w_{t+1+k}
                return step_td["head_w"] * mean_w

            own_values = self.value_model is None
            with self.autocast:
                out = self.model(
                    mb["tokens"],
                    targets=targets,
                    with_values=own_values,
                    pair_weights=pair_weights,
                    reduction="sum",
                    segments=segments,
                )
            # The value model's values carry no gradient: its value loss is logged, not trained.
            values = out.values if own_values else planned[i][2]
            v_targets = critic_targets(values.detach(), rewards, mask, lam=value_lam, segments=segments)
            states = response_states(mask, segments=segments)
            v_sum, _ = value_loss(values, v_targets, states, kind=crit.loss, huber_delta=crit.huber_delta)
            v_loss = v_sum / n_states.clamp(min=1)
            loss = out.loss + td.value_coef * v_loss
            # FSDP averages gradients over ranks; each rank holds a partial sum of one global loss.
            (loss * self.dist.world_size).backward()
            head_w = step_td["head_w"]
            head_sums += torch.stack(
                [
                    (out.ce * head_w * mean_w).sum(dim=(0, 1)),
                    (out.ce * mean_w).sum(dim=(0, 1)),
                    (head_w * mean_w).sum(dim=(0, 1)),
                ]
            ).to(acc)
            value_sum += v_loss.detach().to(acc)
            stats = merge_td_stats(stats, step_td["td"].stats)
            diag.add_weights(step_td["used"], mb)
            diag.add_td(td_errors(values, rewards, mask, gamma=td.gamma, segments=segments), mb)
        all_reduce_sum(head_sums)
        all_reduce_sum(value_sum)
        all_reduce_td_stats(stats)
        if td.normalize:
            self.normalizer.update(stats)
        metrics = clip_and_step(
            self.model.parameters(), self.optimizer, self.scheduler, self.cfg.training.max_grad_norm
        )
        metrics["tokens"], metrics["flops"] = step_work(
            micro_batches, self.model_args, heads=n, scored_pairs=int(local_counts.sum())
        )
        policy_loss = float(head_sums[0].sum())
        metrics.update(
            loss=policy_loss + td.value_coef * float(value_sum),
            policy_loss=policy_loss,
            value_loss=float(value_sum),
            **td_stats(stats),
            **diag.metrics(),
        )
        for k in range(n):
            # Each sum carries 1/(n N_k): times n it is head k's mean over its valid pairs.
            metrics[f"loss/head_{k}"] = float(head_sums[0, k] * n)
            metrics[f"ce/head_{k}"] = float(head_sums[1, k] * n)
            metrics[f"weight/head_{k}"] = float(head_sums[2, k] * n)
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out, each row once across ranks: per head the TD-weighted and the plain CE (means over
        the head's pairs) and the mean weight; the value loss; val/loss = policy + c_v value, as in
        training; where the weights and TD errors land (val/diag/*). The TD weights themselves, also
        under a control; the advantage normaliser is read, not updated."""
        n, td, crit = self.n_future, self.cfg.td, self.cfg.critic
        sums = HeadSums(("weighted", "ce", "weight", "pairs"), n, self.dist.device)
        value = HeadSums(("sum", "states"), 1, self.dist.device)
        diag = TokenDiagnostics(self.dist.device, accumulation_dtype(self.dist.device))
        for mb in self.validation.batches():
            rewards, mask, segments = mb["is_correct"].float(), mb["mask"], mb.get("segments")
            with self.autocast:
                out = self.model(
                    mb["tokens"], targets=mb["targets"], with_values=self.value_model is None, segments=segments
                )
                values = (
                    out.values
                    if self.value_model is None
                    else self.value_model(mb["tokens"], with_values=True, with_heads=False, segments=segments).values
                )
            weights = self.td_weights(values, mb).weights
            head_w = td_head_weights(weights, n, segments=segments) * valid_pairs(mb["targets"])
            sums.add(weighted=out.ce * head_w, ce=out.ce, weight=head_w, pairs=valid_pairs(mb["targets"]))
            lam = 1.0 if crit.target == "mc" else crit.lam
            v_targets = critic_targets(values, rewards, mask, lam=lam, segments=segments)
            v_sum, v_states = value_loss(
                values,
                v_targets,
                response_states(mask, segments=segments),
                kind=crit.loss,
                huber_delta=crit.huber_delta,
            )
            value.add(sum=v_sum.reshape(1), states=v_states.reshape(1))
            diag.add_weights(weights, mb)
            diag.add_td(td_errors(values, rewards, mask, gamma=td.gamma, segments=segments), mb)
        s, v = sums.reduce(), value.reduce()
        metrics = {
            **per_head_means(s["weighted"], s["pairs"], "policy_loss"),
            **per_head_means(s["ce"], s["pairs"], "ce"),
            **per_head_means(s["weight"], s["pairs"], "weight"),
            **diag.metrics(prefix=PREFIX),
        }
        metrics["val/value_loss"] = float(v["sum"][0] / v["states"][0].clamp(min=1))
        metrics["val/loss"] = metrics["val/policy_loss"] + td.value_coef * metrics["val/value_loss"]
        return metrics

    def log_validation(self) -> None:
        metrics = self.validate()
        self.metrics.log(self.step, metrics)
        keys = [
            "val/loss",
            "val/policy_loss",
            "val/value_loss",
            *(f"val/ce/head_{k}" for k in range(self.n_future)),
            "val/weight",
        ]
        log.info(step_line("verifiable val", self.step, self.cfg.training.max_steps, metrics, keys))
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
            normalizer={k: v.tolist() for k, v in self.normalizer.state_dict().items()},
        )

    def export(self, folder: Path) -> None:
        """params.json + model.safetensors (value_head.weight included, unless the values come from
        critic.model) + the tokenizer files in `folder` (final/ or best/)."""
        sd = full_model_state_dict(self.model)
        if self.dist.is_main:
            log.info("[export] %s", save_mtp(folder, self.model_args, sd, extra_files=self.tokenizer.files))

    def cleanup(self, status: str) -> None:
        """Wait (bounded) for S3 uploads, draw report.png, end the MLflow run with `status`."""
        close_run(self.metrics, self.s3, status=status, report=self.cfg.metrics.report, wait_s=self.cfg.s3.wait_s)
        destroy()


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = main_config(VerifiableRecipeConfig, argv)
    check_inputs_or_exit(cfg)
    run_recipe(VerifiableRecipe(cfg))


if __name__ == "__main__":
    main()
