"""Config sections shared by the recipes; each recipe composes the ones it needs.

Every field has a default and a docstring (shown by `--help` and `--dry-run`). A field with a
valid range says so in its docstring, and `__post_init__` checks it when the config is built: the
loader reports a FieldRangeError as `[section]: section.key must be ..., got ...` (exit 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal


class FieldRangeError(ValueError):
    """A field outside its valid range: `key` is the field's name (the loader prefixes its section,
    e.g. `training.micro_batch_size`), `requirement` the rest of the message."""

    def __init__(self, key: str, requirement: str) -> None:
        super().__init__(f"{key} {requirement}")
        self.key, self.requirement = key, requirement


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(key: str, value: Any, ok: bool, rule: str) -> None:
    if not (ok and _is_number(value) and math.isfinite(value)):
        raise FieldRangeError(key, f"must be {rule}, got {value!r}")


def _at_least(cfg: Any, key: str, low: float, *, optional: bool = False, strict: bool = False) -> None:
    """`cfg.key` >= low (> low when strict); None passes when optional."""
    value = getattr(cfg, key)
    if optional and value is None:
        return
    ok = _is_number(value) and (value > low if strict else value >= low)
    _require(key, value, ok, f"{'>' if strict else '>='} {low}" + (" or none" if optional else ""))


def _above(cfg: Any, key: str, low: float, *, optional: bool = False) -> None:
    _at_least(cfg, key, low, optional=optional, strict=True)


def _within(
    cfg: Any,
    key: str,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
    value: Any = None,
    name: str | None = None,
) -> None:
    value = getattr(cfg, key) if value is None else value
    ok = (
        _is_number(value)
        and (value > low if open_low else value >= low)
        and (value < high if open_high else value <= high)
    )
    rule = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    _require(name or key, value, ok, rule)


@dataclasses.dataclass
class ModelConfig:
    path: str = ""
    """Folder with params.json and consolidated.*.pth (Meta) or model.safetensors; or a Hugging Face
    causal-LM folder (config.json + safetensors) of a supported family (Llama 2/3.x, CodeLlama,
    Qwen2/2.5), which becomes an MTP model with n_future_tokens heads."""
    max_seq_len: int = 2048
    """Longest training sequence (tokens, >= 2: a sequence needs an input and a target); also the
    RoPE table size (x2)."""
    n_future_tokens: int = 0
    """Prediction heads of a model started from a Hugging Face folder (>= 1): its L blocks become the
    trunk and head 0, and n_future_tokens - 1 heads are added. 0 (>= 0): the checkpoint's own
    (params.json, or an exported folder's mtp_heads.safetensors); an MTP folder's count may only be
    repeated."""
    new_heads: Literal["copy_last", "random"] = "copy_last"
    """How the heads added to a Hugging Face model start: copies of its last block, or drawn from
    N(0, initializer_range) with training.seed (unit norms, zero biases)."""

    def __post_init__(self) -> None:
        _at_least(self, "max_seq_len", 2)
        _at_least(self, "n_future_tokens", 0)


@dataclasses.dataclass
class TokenizerConfig:
    path: str = ""
    """tokenizer.model (sentencepiece), tokenizer.json (Hugging Face; BOS/EOS/pad from the
    tokenizer_config.json beside it) or a folder containing one (tokenizer.model first). Evaluation:
    empty takes the one in (or beside) the model folder, or the training run's."""


@dataclasses.dataclass
class DataConfig:
    train_path: str = ""
    """Processed JSONL (one row per line); its sidecar index is built next to it on first use."""
    sampler: Literal["correct_only", "balanced", "curriculum"] = "correct_only"
    """Which rows a step draws: correct solutions only, 50/50 correct/incorrect, or a difficulty curriculum."""
    seed: int = 0
    """Seed of the sampling order (>= 0)."""
    curriculum_bin_edges: list[int] = dataclasses.field(default_factory=lambda: [0, 5, 10])
    """Curriculum: lower edges of the difficulty bins (bin i holds edges[i] <= difficulty < edges[i+1]);
    non-empty and strictly increasing (checked when sampler = "curriculum")."""
    curriculum_schedule: list[list[float]] = dataclasses.field(
        default_factory=lambda: [[0.0, 1.0, 0.0, 0.0], [0.5, 0.4, 0.6, 0.0], [1.0, 0.2, 0.3, 0.5]]
    )
    """Curriculum: rows [progress, w_bin0, w_bin1, ...]; weights are interpolated linearly in progress.
    At least one row; each has one weight per bin; progress strictly increasing within [0, 1];
    weights finite, >= 0, not all 0 in a row (checked when sampler = "curriculum")."""
    group_by_length: bool = True
    """Arrange each step's rows (the ones the sampler chose: same loss and gradients) into
    micro-batches by length, so a micro-batch pads its rows to similar lengths. false: the sampler's
    order. Rho-1 selects per micro-batch, so grouping changes which rows' pairs compete (README)."""
    packing: bool = False
    """Pack each step's rows end to end into sequences of model.max_seq_len (first-fit decreasing):
    positions restart at each row, attention stays within it, head k never predicts the next
    row's tokens. Micro-batches then hold training.micro_batch_size sequences (or
    micro_batch_tokens' worth)."""
    micro_batch_tokens: int = 0
    """Token budget of a micro-batch, padding included (>= 0; 0: a fixed count of
    training.micro_batch_size rows, or sequences when packing). A micro-batch holds as many rows
    (sequences when packing) as fit, at least one; every rank runs the same number of
    micro-batches, which then follows from the rows (grad_accum_steps only sizes the global
    batch). Needs group_by_length or packing."""

    def __post_init__(self) -> None:
        _at_least(self, "seed", 0)
        _at_least(self, "micro_batch_tokens", 0)
        if self.micro_batch_tokens and not (self.group_by_length or self.packing):
            raise FieldRangeError("micro_batch_tokens", "needs group_by_length = true or packing = true")
        if self.sampler != "curriculum":
            return
        edges = list(self.curriculum_bin_edges)
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
            raise FieldRangeError("curriculum_bin_edges", f"must be non-empty and strictly increasing, got {edges}")
        rows = [list(r) for r in self.curriculum_schedule]
        if not rows:
            raise FieldRangeError("curriculum_schedule", "must have at least one row [progress, w_bin0, ...]")
        for i, row in enumerate(rows):
            if len(row) != len(edges) + 1:
                raise FieldRangeError(
                    "curriculum_schedule",
                    f"row {i} must be [progress, one weight per bin] "
                    f"({len(edges) + 1} numbers for {len(edges)} bins), got {row}",
                )
            _within(self, "curriculum_schedule", 0, 1, value=row[0], name=f"curriculum_schedule[{i}][0] (progress)")
            weights = row[1:]
            if not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights) or not any(
                w > 0 for w in weights
            ):
                raise FieldRangeError(
                    "curriculum_schedule", f"row {i} weights must be finite and >= 0, not all 0, got {weights}"
                )
        progress = [r[0] for r in rows]
        if any(b <= a for a, b in zip(progress, progress[1:])):
            raise FieldRangeError("curriculum_schedule", f"progress points must strictly increase, got {progress}")


@dataclasses.dataclass
class TrainingConfig:
    output_dir: str = "outputs/run"
    """Run folder: resolved config, metrics.jsonl, checkpoints/, final/, the embedded MLflow store."""
    seed: int = 0
    """Seed for parameter initialisation that is not loaded (e.g. a new value head) and for the
    ablation controls' draws (td.control, rho1.control)."""
    micro_batch_size: int = 4
    """Sequences per device per forward/backward (>= 1)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (>= 1); global batch = micro_batch_size x grad_accum_steps x
    world size."""
    max_steps: int = 100
    """Optimizer steps of the whole run (>= 1; the LR schedule spans them)."""
    stop_at_step: int | None = None
    """Stop after this step (>= 1, with a checkpoint) without finishing, as a preempted job would;
    resume later. None: run to max_steps."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (> 0; None: no clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast (single device) or bf16 FSDP params with fp32 reduce on CUDA, fp32 on CPU/MPS."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if available, else MPS, else CPU."""
    log_every: int = 1
    """Log metrics every this many steps (>= 1)."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "grad_accum_steps", "max_steps", "log_every"):
            _at_least(self, key, 1)
        _at_least(self, "stop_at_step", 1, optional=True)
        _above(self, "max_grad_norm", 0, optional=True)


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 2e-5
    """Peak learning rate (AdamW; > 0)."""
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas: two numbers, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW epsilon (> 0)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (>= 0)."""

    def __post_init__(self) -> None:
        _above(self, "lr", 0)
        betas = list(self.betas)
        if len(betas) != 2:
            raise FieldRangeError("betas", f"must be two numbers [beta1, beta2], got {betas}")
        for i, beta in enumerate(betas):
            _within(self, "betas", 0, 1, open_high=True, value=beta, name=f"betas[{i}]")
        _above(self, "eps", 0)
        _at_least(self, "weight_decay", 0)


@dataclasses.dataclass
class LRSchedulerConfig:
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak LR over this many steps (>= 0)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at peak LR x this at the last step (in [0, 1])."""

    def __post_init__(self) -> None:
        _at_least(self, "warmup_steps", 0)
        _within(self, "min_lr_ratio", 0, 1)


@dataclasses.dataclass
class CheckpointConfig:
    save_every: int = 0
    """Save a sharded (DCP) training checkpoint every this many steps (>= 0; 0: only at a stop)."""
    keep_last: int = 2
    """Keep this many newest training checkpoints; older ones are deleted after a save (>= 0; 0: keep
    every one). With 1, a newest checkpoint found damaged at resume has nothing to fall back to."""
    resume: bool = True
    """Resume from the newest complete checkpoint in output_dir/checkpoints when one exists."""
    export_final: bool = True
    """Write output_dir/final (params.json + model.safetensors + tokenizer.model) at the end."""
    keep_best: str = ""
    """Keep output_dir/best, the export at the validation step with the lowest value of this
    validation metric (e.g. "val/loss"); empty: no best export. Needs [validation]."""

    def __post_init__(self) -> None:
        _at_least(self, "save_every", 0)
        _at_least(self, "keep_last", 0)


@dataclasses.dataclass
class DistributedConfig:
    reshard_after_forward: bool = True
    """FSDP2: free gathered block parameters after the forward (ZeRO-3) or keep them (ZeRO-2)."""
    activation_checkpointing: Literal["none", "full", "every_n"] = "none"
    """Recompute block activations in the backward: none, every block, or every n-th block."""
    ac_every_n: int = 2
    """With activation_checkpointing = "every_n": checkpoint one block in this many (>= 1)."""
    compile: bool = False
    """torch.compile each transformer block."""
    hsdp_replicas: int = 1
    """HSDP: replicate the model over this many groups of ranks and shard it within each (set it to
    the number of nodes: shards within a node, gradients all-reduced across nodes). 1: plain FSDP2
    over all ranks. >= 1, and it must divide the world size (checked at setup)."""
    float8: bool = False
    """float8 training (torchao, dynamic tensorwise scaling) of the transformer blocks' linears;
    needs a GPU with compute capability >= 8.9 (H100) and stops at setup elsewhere."""

    def __post_init__(self) -> None:
        _at_least(self, "ac_every_n", 1)
        _at_least(self, "hsdp_replicas", 1)


@dataclasses.dataclass
class S3Config:
    bucket: str = ""
    """S3 bucket for checkpoints and the final export; empty: no S3. Credentials come from boto3's
    usual chain (environment, ~/.aws, instance role), never from this file."""
    prefix: str = ""
    """Key prefix of this run inside the bucket (e.g. "runs/verifiable_7b")."""
    endpoint_url: str = ""
    """An S3-compatible endpoint (MinIO, Ceph, ...); empty: AWS."""
    region: str = ""
    """AWS region; empty: boto3's default."""
    upload: Literal["checkpoints", "final", "both"] = "both"
    """What goes to S3: training checkpoints, the final export, or both."""
    keep_last: int = 2
    """Complete checkpoints kept on S3 (>= 1; older ones are deleted; the newest complete one and the
    final export never are)."""
    max_retries: int = 5
    """Attempts per file before an upload is given up (with a warning), backing off between them (>= 1)."""
    wait_s: float = 600.0
    """At the end of the run, wait at most this long for pending uploads (seconds, >= 0); what is still
    pending is reported."""

    def __post_init__(self) -> None:
        _at_least(self, "keep_last", 1)
        _at_least(self, "max_retries", 1)
        _at_least(self, "wait_s", 0)


@dataclasses.dataclass
class ValidationConfig:
    path: str = ""
    """Held-out processed JSONL scored during training; empty: no validation."""
    every: int = 0
    """Steps between validations (>= 0; 0: only after the last step)."""
    max_rows: int = 0
    """Score at most this many rows of the file, from its start (>= 0; 0: every row that fits)."""

    def __post_init__(self) -> None:
        _at_least(self, "every", 0)
        _at_least(self, "max_rows", 0)


@dataclasses.dataclass
class MetricsConfig:
    mlflow: bool = True
    """Log params, metrics and the resolved config to MLflow (rank 0 only)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else a SQLite store in output_dir."""
    experiment: str = "wmtp"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name (default: the output folder's name)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 (off when stdout is not a terminal)."""
    report: bool = True
    """Draw output_dir/report.png (loss, validation, LR, throughput and the recipe's own curves) at the
    end of the run and log it to MLflow; needs the optional extra "plots" (matplotlib)."""


@dataclasses.dataclass
class CriticConfig:
    value_head: str | None = None
    """Value head to start from (value_head.safetensors of a critic run); None: a zero-initialised head."""
    target: Literal["mc", "lambda"] = "mc"
    """Value target: Monte-Carlo G_t = R, or the lambda-return over detached values."""
    lam: float = 0.95
    """lambda of the lambda-return (in [0, 1]; 1.0 equals Monte-Carlo)."""
    loss: Literal["mse", "huber"] = "mse"
    """Value loss: squared error or Huber."""
    huber_delta: float = 1.0
    """Huber transition point (> 0)."""
    trunk: Literal["frozen", "own"] = "frozen"
    """Critic recipe: "frozen" trains the value head alone on the model's frozen trunk; "own" trains a
    copy of the trunk with it (token embeddings, trunk blocks, the final norm; heads and output stay
    frozen and unused), a value model whose features are learnt for the value, for when the frozen
    features do not tell the outcome apart. Its final/ is then a model folder for critic.model."""
    model: str | None = None
    """Verifiable recipe: a value model (a critic run's final/ made with critic.trunk = "own"), frozen,
    whose values make the TD weights instead of the policy's value head; its value loss is logged,
    not trained. None: the policy's value head (critic.value_head). Not with critic.value_head."""

    def __post_init__(self) -> None:
        _within(self, "lam", 0, 1)
        _above(self, "huber_delta", 0)
        if self.model and self.value_head:
            raise FieldRangeError("model", "and critic.value_head are exclusive: the TD weights come from one critic")


@dataclasses.dataclass
class TDConfig:
    beta: float = 0.9
    """Temperature of w = exp(A / beta) (> 0)."""
    w_min: float = 0.1
    """Lower clamp of the token weight (>= 0, <= w_max)."""
    w_max: float = 5.0
    """Upper clamp of the token weight (>= w_min)."""
    gamma: float = 1.0
    """Discount of the TD error (in (0, 1])."""
    lam: float = 0.0
    """GAE lambda (in [0, 1]; 0: the advantage is the TD error itself)."""
    normalize: bool = False
    """Normalise the advantage by a running (EMA) mean/std before the exp."""
    ema_momentum: float = 0.99
    """Momentum of the running mean/std used by normalize (in [0, 1))."""
    value_coef: float = 0.5
    """c_v: weight of the value loss added to the weighted MTP loss (>= 0)."""
    control: Literal["none", "uniform", "shuffled", "random"] = "none"
    """Ablation control (everything of the run kept but where the weights land): none (the TD
    weights), uniform (every weight 1), shuffled (each row's weights permuted among its own response
    targets), random (the step's weights permuted across the whole global batch). Draws are seeded
    by training.seed and the data's coordinates (resumable, independent of world size)."""

    def __post_init__(self) -> None:
        _above(self, "beta", 0)
        _at_least(self, "w_min", 0)
        _require("w_max", self.w_max, _is_number(self.w_max) and self.w_max >= self.w_min, f">= w_min ({self.w_min})")
        _within(self, "gamma", 0, 1, open_low=True)
        _within(self, "lam", 0, 1)
        _within(self, "ema_momentum", 0, 1, open_high=True)
        _at_least(self, "value_coef", 0)


@dataclasses.dataclass
class Rho1Config:
    ratio: float = 0.6
    """k_percent: share of each head's valid pairs (largest excess first) that is trained, per
    micro-batch (in (0, 1])."""
    select_head0: bool = False
    """Apply the selection to head 0 too (by default head 0 keeps every valid pair)."""
    control: Literal["none", "random"] = "none"
    """Ablation control: none (the largest-excess pairs), or random (per head the same number of
    valid pairs, chosen uniformly; seeded by training.seed and each row's draw number)."""

    def __post_init__(self) -> None:
        _within(self, "ratio", 0, 1, open_low=True)


@dataclasses.dataclass
class ReferenceConfig:
    path: str = ""
    """Reference model: a Hugging Face causal LM folder, or a Meta-format MTP folder (head 0 is used)."""
    kind: Literal["auto", "hf", "mtp"] = "auto"
    """auto: MTP when the folder has params.json, Hugging Face otherwise."""


@dataclasses.dataclass
class EvalConfig:
    dataset: Literal["humaneval", "mbpp"] = "humaneval"
    """Benchmark: HumanEval (164 problems) or MBPP (its test split, task ids 11-510)."""
    problems: str = ""
    """Problem file: HumanEval.jsonl(.gz) (openai/human-eval) or MBPP's JSON / JSONL (google-research)."""
    task_ids: list[int] = dataclasses.field(default_factory=lambda: [11, 510])
    """MBPP: first and last task id evaluated (the test split is 11-510): two ids, first <= last."""
    limit: int = 0
    """Evaluate only the first this many problems (>= 0; 0: all)."""
    template: Literal["alpaca", "raw"] = "alpaca"
    """Prompt: the training template (models fine-tuned by these recipes) or the benchmark's own
    prompt (base models)."""
    n_samples: int = 1
    """Completions per problem: the n of pass@k (>= 1)."""
    ks: list[int] = dataclasses.field(default_factory=lambda: [1])
    """Report pass@k for each of these k (each in [1, n_samples])."""
    temperature: float = 0.0
    """0: greedy decoding; above 0: sampling at this temperature (>= 0)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this much probability (in (0, 1])."""
    max_new_tokens: int = 512
    """Longest completion (tokens, >= 1)."""
    batch_size: int = 16
    """Prompts per generation batch (per rank, >= 1)."""
    seed: int = 0
    """Seed of the sampling (>= 0): batch b draws from seed + b, so a run repeats exactly."""
    speculative: bool = False
    """Greedy self-speculative decoding with the MTP heads (same tokens, fewer forwards)."""
    samples: str = ""
    """Score-only mode: execute and score this JSONL of {task_id, completion} (human-eval's format)
    instead of generating; no model is loaded."""
    timeout_s: float = 10.0
    """Wall-clock limit of one program's run (seconds, > 0)."""
    memory_mb: int = 2048
    """Address-space limit of one program's run (MiB, >= 1)."""
    workers: int = 0
    """Programs run at once on each rank (>= 0; 0: the CPUs of this node shared by its ranks)."""
    require_isolation: bool = False
    """Refuse to run unless the sandbox isolates programs fully here (read-only files or a uid of
    their own, PID and network namespaces, a per-program process limit, not root); otherwise what
    is missing is only logged as a warning."""
    output_dir: str = "outputs/eval"
    """Folder for samples.jsonl, results.json, the resolved config and the embedded MLflow store."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if available, else MPS, else CPU."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 weights on CUDA, fp32 elsewhere."""

    def __post_init__(self) -> None:
        _at_least(self, "n_samples", 1)
        if not self.ks or any(not 1 <= k <= self.n_samples for k in self.ks):
            raise FieldRangeError(
                "ks", f"must be one or more k, each in [1, n_samples = {self.n_samples}], got {list(self.ks)}"
            )
        _at_least(self, "temperature", 0)
        if self.speculative and self.temperature > 0:
            raise FieldRangeError(
                "speculative", f"needs greedy decoding (temperature = 0), got temperature {self.temperature}"
            )
        _within(self, "top_p", 0, 1, open_low=True)
        for key in ("batch_size", "max_new_tokens", "memory_mb"):
            _at_least(self, key, 1)
        for key in ("limit", "seed", "workers"):
            _at_least(self, key, 0)
        _above(self, "timeout_s", 0)
        ids = list(self.task_ids)
        if len(ids) != 2 or ids[0] > ids[1]:
            raise FieldRangeError("task_ids", f"must be [first, last] with first <= last, got {ids}")
