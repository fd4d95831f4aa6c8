"""The objectives experiment: does each objective do what it is for, against its own controls?

    python scripts/objectives_experiment.py --config configs/experiments/objectives.toml

From the tiny artifacts' pretrained base (scripts/make_tiny.py: an MTP model trained on a code corpus
of correct and buggy solutions, competent but imperfect), for every seed of the config:

    critic                 a value model: the base's trunk and a value head trained on correct and buggy
                           rows (critic.trunk = "own"); the verifiable arms take its values (critic.model)
    critic_frozen          the value head alone on the frozen base (the default critic), for comparison
    baseline_correct       baseline on correct rows only (the filter)
    baseline_all           baseline on every row, correct and buggy, weight 1 (no filter, no weight)
    verifiable             TD-weighted MTP on every row (balanced), from that seed's critic
    verifiable_shuffled    the same with each row's weights permuted within the row (td.control)
    verifiable_random      the same with the step's weights permuted across the global batch
    rho1                   Rho-1 on correct rows against the reference (the base fine-tuned on clean rows)
    rho1_random            the same number of pairs per head, chosen uniformly (rho1.control)

Every arm trains for the same steps on the same number of rows per step (the token budget;
the measured tokens are reported), and is evaluated by greedy pass@1 on held-out toy problems: the
training templates with a generator seed used nowhere else, any problem whose prompt appears in the
training, validation or corpus rows dropped. The base and the reference are evaluated too.

Seeds, budgets and the held-out seed are the config's, committed before its results are read; every
run is reported. The output folder (rebuilt on every run) gets one run folder per (seed, arm) with its
evaluation, `results.md` (the tables), `results.json` (every number) and `results.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wmtp.data.rows import tests_instruction  # noqa: E402
from wmtp.data.synthetic import synthetic_problems  # noqa: E402
from wmtp.layout import FINAL_DIR, TOKENIZER_FILENAME  # noqa: E402
from wmtp.logs import get_logger, setup_logging  # noqa: E402
from wmtp.training.metrics import read_metrics, sqlite_artifact_root  # noqa: E402

log = get_logger("experiment")

PRETRAINED = "pretrained"
HELDOUT_FILE = "heldout_problems.json"
EVAL_NAME = "heldout"
RESULTS_MD, RESULTS_JSON, RESULTS_PNG = "results.md", "results.json", "results.png"
MLFLOW_EXPERIMENT = "wmtp-objectives"
CONTEXT_RUNS = ("base", "reference")
"""Models evaluated once, as they are: where every arm starts, and Rho-1's reference."""
TABLE_DIAG_KEYS = (
    "diag/weight/correct",
    "diag/weight/incorrect",
    "diag/weight/first_diff",
    "diag/weight/other",
    "diag/weight/below_median",
    "diag/weight/auroc",
    "diag/weight/first_diff_correct",
    "diag/selected/first_diff",
    "diag/selected/other",
)
"""The training diagnostics of the results table, in its column order (SPEC "Controls and diagnostics")."""
DIAG_KEYS = (*TABLE_DIAG_KEYS, "diag/excess/first_diff", "diag/excess/other")
"""Every training diagnostic kept per arm and seed (means over steps, results.json)."""
CRITIC_VAL_KEYS = (
    "val/auroc",
    "val/value/correct",
    "val/value/incorrect",
    "val/diag/td/first_diff",
    "val/diag/td/other",
    "val/diag/td/below_median",
    "val/diag/td/auroc",
)
"""A critic's held-out figures at its final step, in the critics table's column order."""
VERIFIABLE_VAL_KEYS = (
    "val/diag/weight/correct",
    "val/diag/weight/incorrect",
    "val/diag/weight/first_diff",
    "val/diag/weight/other",
    "val/diag/weight/below_median",
    "val/diag/weight/auroc",
)
"""The verifiable arm's held-out weight diagnostics at its final step, in its table's column order."""


@dataclasses.dataclass(frozen=True)
class Arm:
    recipe: str
    config: str
    overrides: dict[str, Any]
    data: str
    """How the table describes the arm's data."""


ARMS: dict[str, Arm] = {
    "baseline_correct": Arm("baseline", "baseline_tiny.toml", {"data.sampler": "correct_only"}, "correct"),
    "baseline_all": Arm("baseline", "baseline_tiny.toml", {"data.sampler": "balanced"}, "all (50/50)"),
    "verifiable": Arm("verifiable", "verifiable_tiny.toml", {"data.sampler": "balanced"}, "all (50/50)"),
    "verifiable_shuffled": Arm(
        "verifiable", "verifiable_tiny.toml", {"data.sampler": "balanced", "td.control": "shuffled"}, "all (50/50)"
    ),
    "verifiable_random": Arm(
        "verifiable", "verifiable_tiny.toml", {"data.sampler": "balanced", "td.control": "random"}, "all (50/50)"
    ),
    "rho1": Arm("rho1", "rho1_tiny.toml", {"data.sampler": "correct_only"}, "correct"),
    "rho1_random": Arm("rho1", "rho1_tiny.toml", {"data.sampler": "correct_only", "rho1.control": "random"}, "correct"),
}
CONTROLS = {"verifiable": ("verifiable_shuffled", "verifiable_random", "baseline_all"), "rho1": ("rho1_random",)}
"""Each objective and what it must beat (SPEC "Controls and diagnostics")."""


@dataclasses.dataclass
class ExperimentConfig:
    seeds: list[int]
    """One run of the critic and of every arm per seed (data order, control draws, value-head init)."""
    steps: int
    """Optimizer steps of every arm."""
    micro_batch_size: int
    """Rows per step of every arm (one process, no accumulation): with the steps, the row budget."""
    lr: float
    """Peak learning rate of every arm (cosine to 0.1x, after warmup_steps)."""
    warmup_steps: int
    critic_steps: int
    """Optimizer steps of the critic (a value model: trunk copy and value head, critic.trunk = "own")."""
    critic_lr: float
    frozen_critic_steps: int
    """Optimizer steps of the comparison critic (value head alone on the frozen base); 0: not run."""
    frozen_critic_lr: float
    rho1_select_head0: bool
    """Rho-1 selects head 0's pairs too (rho1.select_head0): greedy decoding follows head 0."""
    heldout_seed: int
    """Generator seed of the held-out toy problems (used by nothing else)."""
    heldout_problems: int
    max_new_tokens: int
    """Longest completion at evaluation (the toy solutions take ~30-60 tokens)."""
    parallel: int
    """Runs at once, one thread each."""
    base_steps: int
    """Pretraining steps of the base (scripts/make_tiny.py --base-steps)."""
    reference_steps: int
    """Fine-tuning steps of Rho-1's reference (scripts/make_tiny.py --reference-steps)."""
    tiny: str = "artifacts/tiny_synthetic"
    """Tiny artifacts (relative to the repository root or absolute); scripts/make_tiny.py makes them,
    pretrained/ included, or reuses them while their inputs are unchanged."""
    tracking_uri: str = ""
    """MLflow store for every run (empty: MLflow off, metrics.jsonl only)."""
    reports: bool = False
    """Draw each run's report.png."""
    arms: list[str] = dataclasses.field(default_factory=lambda: list(ARMS))
    """The arms run (default: every one; a subset for smoke runs)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; the arms are {list(ARMS)}")

    @classmethod
    def load(cls, path: Path, **overrides: Any) -> ExperimentConfig:
        table = tomllib.loads(path.read_text()).get("experiment")
        if table is None:
            raise SystemExit(f"{path}: no [experiment] table")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - fields)
        if unknown:
            raise SystemExit(f"{path}: unknown key(s) in [experiment]: {', '.join(unknown)}")
        try:
            return cls(**{**table, **{k: v for k, v in overrides.items() if v is not None}})
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"{path}: {exc}") from exc


# ------------------------------------------------------------------ running
def run_logged(args: list[str], log_file: Path, *, threads: int) -> None:
    """`python args...` from the repository root, its output in `log_file`; raises if it fails."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write("$ " + " ".join(args) + "\n")
        log.flush()
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}); {log_file}:\n{tail}")


def as_args(overrides: dict[str, Any]) -> list[str]:
    return [
        x
        for key, value in overrides.items()
        for x in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))
    ]


class Experiment:
    def __init__(self, cfg: ExperimentConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.tiny = ROOT / cfg.tiny if not Path(cfg.tiny).is_absolute() else Path(cfg.tiny)
        self.threads = 1 if cfg.parallel > 1 else 2

    def mlflow(self) -> dict[str, Any]:
        """The MLflow overrides of every run: one store for all of them, or MLflow off."""
        if not self.cfg.tracking_uri:
            return {"metrics.mlflow": False}
        return {
            "metrics.mlflow": True,
            "metrics.tracking_uri": self.cfg.tracking_uri,
            "metrics.experiment": MLFLOW_EXPERIMENT,
        }

    def train(self, recipe: str, config: str, run_dir: Path, overrides: dict[str, Any]) -> None:
        cfg = self.cfg
        common = {
            "tokenizer.path": self.tiny / TOKENIZER_FILENAME,
            "data.train_path": self.tiny / "data" / "train.jsonl",
            "validation.path": self.tiny / "data" / "valid.jsonl",
            "validation.every": 0,
            "training.output_dir": run_dir,
            "training.log_every": 1,
            "checkpoint.save_every": 0,
            "checkpoint.resume": False,
            "metrics.progress_bar": False,
            "metrics.report": cfg.reports,
            "metrics.mlflow": bool(cfg.tracking_uri),
            **(
                {"metrics.tracking_uri": cfg.tracking_uri, "metrics.experiment": "wmtp-objectives"}
                if cfg.tracking_uri
                else {}
            ),
            "metrics.run_name": f"{run_dir.parent.name}/{run_dir.name}",
        }
        args = [
            f"recipes/full_finetune_{recipe}.py",
            "--config",
            f"configs/{config}",
            *as_args({**common, **overrides}),
        ]
        run_logged(args, run_dir / "log.txt", threads=self.threads)

    def evaluate(self, model: Path, out: Path) -> float:
        problems = self.out / HELDOUT_FILE
        n = len(json.loads(problems.read_text()))
        overrides = {
            "model.path": model,
            "eval.problems": problems,
            "eval.task_ids": f"[1, {n}]",
            "eval.max_new_tokens": self.cfg.max_new_tokens,
            "eval.output_dir": out,
            "eval.workers": 1 if self.cfg.parallel > 1 else 0,
            "metrics.mlflow": bool(self.cfg.tracking_uri),
            **(
                {"metrics.tracking_uri": self.cfg.tracking_uri, "metrics.experiment": "wmtp-objectives"}
                if self.cfg.tracking_uri
                else {}
            ),
        }
        run_logged(
            ["recipes/evaluate.py", "--config", "configs/eval_mbpp_tiny.toml", *as_args(overrides)],
            out.parent / "eval_log.txt",
            threads=self.threads,
        )
        return json.loads((out / "results.json").read_text())["pass_at_k"]["pass@1"]

    # ------------------------------------------------------------------ the runs
    def critic(self, seed: int, *, trunk: str = "own") -> Path:
        """The seed's critic on the base, balanced data, Monte-Carlo targets; returns its final/."""
        cfg = self.cfg
        own = trunk == "own"
        run_dir = self.out / f"seed_{seed}" / ("critic" if own else "critic_frozen")
        self.train(
            "critic",
            "critic_tiny.toml",
            run_dir,
            {
                "model.path": self.tiny / PRETRAINED / "base",
                "data.seed": seed,
                "training.seed": seed,
                "training.max_steps": cfg.critic_steps if own else cfg.frozen_critic_steps,
                "training.micro_batch_size": cfg.micro_batch_size,
                "optimizer.lr": cfg.critic_lr if own else cfg.frozen_critic_lr,
                "lr_scheduler.warmup_steps": cfg.warmup_steps,
                "critic.trunk": trunk,
                "critic.target": "mc",
            },
        )
        return run_dir / FINAL_DIR

    def arm(self, seed: int, name: str, critic: Future | None) -> float:
        cfg, arm = self.cfg, ARMS[name]
        run_dir = self.out / f"seed_{seed}" / name
        overrides = {
            "model.path": self.tiny / PRETRAINED / "base",
            "data.seed": seed,
            "training.seed": seed,
            "training.max_steps": cfg.steps,
            "training.micro_batch_size": cfg.micro_batch_size,
            "training.grad_accum_steps": 1,
            "optimizer.lr": cfg.lr,
            "lr_scheduler.warmup_steps": cfg.warmup_steps,
            **arm.overrides,
        }
        if arm.recipe == "verifiable":
            overrides["critic.model"] = critic.result()
            overrides["critic.value_head"] = "none"
        if arm.recipe == "rho1":
            overrides["reference.path"] = self.tiny / PRETRAINED / "reference"
            overrides["rho1.select_head0"] = cfg.rho1_select_head0
        self.train(arm.recipe, arm.config, run_dir, overrides)
        return self.evaluate(run_dir, run_dir / "eval" / EVAL_NAME)

    def prepare_tracking(self) -> None:
        """Create the MLflow store and its experiment before runs share it in parallel: processes that
        each find a new SQLite store all create its tables, and all but one fail."""
        if not self.cfg.tracking_uri:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        if client.get_experiment_by_name(MLFLOW_EXPERIMENT) is None:
            client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=sqlite_artifact_root(self.cfg.tracking_uri))

    def run(self) -> dict[str, Any]:
        """Every run of the experiment; returns the collected results."""
        t0 = time.perf_counter()
        self.prepare_tracking()
        with ThreadPoolExecutor(max_workers=self.cfg.parallel) as pool:

            def timed(label: str, fn: Callable[..., Any], *args: Any) -> Any:
                start = time.perf_counter()
                value = fn(*args)
                shown = f"pass@1 {value:.3f}" if isinstance(value, float) else "done"
                log.info("[experiment] %s: %s (%.0fs)", label, shown, time.perf_counter() - start)
                return value

            # Critics first: a verifiable arm waits for its seed's critic, which is then already running.
            critics = {s: pool.submit(timed, f"seed {s} critic", self.critic, s) for s in self.cfg.seeds}
            frozen = [
                pool.submit(timed, f"seed {s} critic_frozen", lambda s=s: self.critic(s, trunk="frozen"))
                for s in self.cfg.seeds
                if self.cfg.frozen_critic_steps
            ]
            context = {
                name: pool.submit(
                    timed, name, self.evaluate, self.tiny / PRETRAINED / name, self.out / name / "eval" / EVAL_NAME
                )
                for name in CONTEXT_RUNS
            }
            order = sorted(self.cfg.arms, key=lambda a: ARMS[a].recipe == "verifiable")
            arms = {
                (s, a): pool.submit(timed, f"seed {s} {a}", self.arm, s, a, critics[s])
                for a in order
                for s in self.cfg.seeds
            }
            results = {
                "pass_at_1": {f"{s}/{a}": f.result() for (s, a), f in arms.items()},
                "context": {name: f.result() for name, f in context.items()},
            }
            for f in [*critics.values(), *frozen]:
                f.result()
        results["seconds"] = time.perf_counter() - t0
        return results


# ------------------------------------------------------------------ held-out problems
def heldout_problems(cfg: ExperimentConfig, tiny: Path) -> tuple[list[dict[str, Any]], int]:
    """The first cfg.heldout_problems generated problems (seed cfg.heldout_seed) whose prompt is in no
    training, validation or corpus row, numbered 1..N; and how many drawn before them were dropped."""
    seen = set()
    for path in (tiny / "data" / "train.jsonl", tiny / "data" / "valid.jsonl", tiny / PRETRAINED / "corpus.jsonl"):
        with open(path) as f:
            seen.update(json.loads(line)["instruction"] for line in f)
    chosen, dropped = [], 0
    for problem in synthetic_problems(2 * cfg.heldout_problems, seed=cfg.heldout_seed):
        if tests_instruction(problem["text"], problem["test_list"]) in seen:
            dropped += 1
        elif len(chosen) < cfg.heldout_problems:
            chosen.append({**problem, "task_id": len(chosen) + 1})
    if len(chosen) < cfg.heldout_problems:
        raise SystemExit(f"only {len(chosen)} unseen problems drawn; lower heldout_problems")
    return chosen, dropped


# ------------------------------------------------------------------ the tables
def mean_over_steps(run_dir: Path, key: str) -> float:
    """The mean of a training metric over the run's logged steps (NaN where never logged)."""
    values = [r[key] for r in read_metrics(run_dir) if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else math.nan


def last_value(run_dir: Path, key: str) -> float:
    values = [r[key] for r in read_metrics(run_dir) if key in r]
    return values[-1] if values else math.nan


def tokens_seen(run_dir: Path) -> float:
    """Tokens the run trained on: the sum over steps of tokens/s x step time."""
    return sum(r["tokens_per_s"] * r["step_time_s"] for r in read_metrics(run_dir) if "tokens_per_s" in r)


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def collect(exp: Experiment, results: dict[str, Any]) -> dict[str, Any]:
    """Per arm and seed: pass@1, tokens, and the training diagnostics (means over steps); per seed the
    critic's held-out AUROC and TD diagnostics."""
    seeds, out = exp.cfg.seeds, exp.out
    per_arm: dict[str, dict[str, Any]] = {}
    for name in exp.cfg.arms:
        runs = {s: out / f"seed_{s}" / name for s in seeds}
        per_arm[name] = {
            "pass_at_1": {s: results["pass_at_1"][f"{s}/{name}"] for s in seeds},
            "tokens": {s: tokens_seen(r) for s, r in runs.items()},
            "diagnostics": {k: {s: mean_over_steps(r, k) for s, r in runs.items()} for k in DIAG_KEYS},
        }
    critic = {
        name: {k: {s: last_value(out / f"seed_{s}" / name, k) for s in seeds} for k in CRITIC_VAL_KEYS}
        for name in ("critic", "critic_frozen")
        if (out / f"seed_{seeds[0]}" / name).is_dir()
    }
    held_out_weights = (
        {k: {s: last_value(out / f"seed_{s}" / "verifiable", k) for s in seeds} for k in VERIFIABLE_VAL_KEYS}
        if "verifiable" in exp.cfg.arms
        else {}
    )
    return {"arms": per_arm, "critic": critic, "verifiable_held_out": held_out_weights, "context": results["context"]}


def verdicts(data: dict[str, Any]) -> list[str]:
    """Each objective against each of its controls: mean difference and whether it exceeds the spread
    (the larger of the two arms' std over seeds); paired per-seed differences."""
    lines = []
    arms = data["arms"]
    for objective, controls in CONTROLS.items():
        for control in controls:
            if objective not in arms or control not in arms:
                continue
            mine, theirs = arms[objective]["pass_at_1"], arms[control]["pass_at_1"]
            (m1, s1), (m2, s2) = mean_std(list(mine.values())), mean_std(list(theirs.values()))
            spread = max(s1, s2)
            paired = [mine[s] - theirs[s] for s in mine]
            above = m1 - m2 > spread
            lines.append(
                f"- {objective} vs {control}: {m1 - m2:+.3f} pass@1 (spread {spread:.3f}): "
                f"{'above the spread' if above else 'NOT above the spread'}; "
                f"per seed {', '.join(f'{d:+.3f}' for d in paired)}"
            )
    return lines


def tables(exp: Experiment, data: dict[str, Any], results: dict[str, Any]) -> str:
    seeds = exp.cfg.seeds
    arms = data["arms"]
    lines = [
        f"Held-out toy problems: {exp.cfg.heldout_problems} (generator seed {exp.cfg.heldout_seed}), greedy pass@1.",
        f"Every arm: {exp.cfg.steps} steps x {exp.cfg.micro_batch_size} rows from the pretrained base; "
        f"seeds {', '.join(map(str, seeds))}; wall time {results['seconds'] / 60:.1f} min.",
        "",
        "| run | data | pass@1 (mean ± std) | " + " | ".join(f"seed {s}" for s in seeds) + " | tokens/run |",
        "|---|---|---|" + "---:|" * len(seeds) + "---:|",
    ]
    for name in CONTEXT_RUNS:
        value = data["context"][name]
        lines.append(f"| {name} (no training) | - | {fmt(value)} | " + " | ".join(fmt(value) for _ in seeds) + " | - |")
    for name in exp.cfg.arms:
        arm, values = ARMS[name], arms[name]["pass_at_1"]
        mean, std = mean_std(list(values.values()))
        tokens = statistics.fmean(arms[name]["tokens"].values())
        lines.append(
            f"| {name} | {arm.data} | {fmt(mean)} ± {fmt(std)} | "
            + " | ".join(fmt(values[s]) for s in seeds)
            + f" | {tokens:,.0f} |"
        )
    lines += ["", "Objectives against their controls:", *verdicts(data), ""]

    def cell(name: str, key: str) -> str:
        mean, _ = mean_std(list(arms[name]["diagnostics"][key].values()))
        return fmt(mean)

    lines += [
        "Training diagnostics (mean over steps and seeds) of the weights each arm trained with: mean weight on "
        "correct / incorrect rows; at the first differing token of incorrect rows vs their other response tokens; "
        "share of those rows where it is below the row's median; AUROC of a low weight there within its row; the "
        "weight at the same place in correct rows. Rho-1: the selected share of the pairs predicting the first "
        "differing token vs the other pairs of the selected heads.",
        "",
        "| run | w correct | w incorrect | w first diff | w other | below median | AUROC "
        "| w first diff (correct rows) | selected first diff | selected other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in exp.cfg.arms:
        lines.append(f"| {name} | " + " | ".join(cell(name, k) for k in TABLE_DIAG_KEYS) + " |")
    lines += [
        "",
        "Critics on held-out rows (their final step), per seed: AUROC of the last-state value; mean V on correct / "
        "incorrect rows; TD error δ at the first differing token of incorrect rows vs their other tokens; share "
        "of those rows where δ there is below the row's median; AUROC of a low δ there within its row. critic: "
        "the value model the verifiable arms use (trunk copy + value head); critic_frozen: the value head alone on "
        "the frozen base.",
        "",
        "| critic | seed | AUROC | V correct | V incorrect | δ first diff | δ other | below median | AUROC low δ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, critic), s in ((c, s) for c in data["critic"].items() for s in seeds):
        lines.append(f"| {name} | {s} | " + " | ".join(fmt(critic[k][s]) for k in CRITIC_VAL_KEYS) + " |")
    held = data["verifiable_held_out"]
    if not held:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Verifiable weights on held-out rows (the verifiable arm's final step), per seed:",
        "",
        "| seed | w correct | w incorrect | w first diff | w other | below median | AUROC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(fmt(held[k][s]) for k in VERIFIABLE_VAL_KEYS) + " |")
    return "\n".join(lines) + "\n"


def _paired_bars(ax, data: dict[str, Any], names: list[str], keys: tuple[tuple[str, str], ...], title: str) -> None:
    """For each arm, one bar per (diagnostic key, label): its mean over steps and seeds."""
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        means = [mean_std(list(data["arms"][n]["diagnostics"][key].values()))[0] for n in names]
        ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))], means, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def plot(exp: Experiment, data: dict[str, Any], path: Path) -> None:
    """pass@1 per arm (bars: mean; dots: seeds; lines: the base and the reference), the verifiable weights
    at the first differing token against the other tokens, and Rho-1's selected share there."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.2), layout="constrained")
    ax, ax_w, ax_s = fig.subplots(1, 3, width_ratios=[1.6, 1, 0.8])
    names = exp.cfg.arms
    for i, name in enumerate(names):
        values = list(data["arms"][name]["pass_at_1"].values())
        ax.bar(i, statistics.fmean(values), color=f"C{i}", alpha=0.6)
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    for (name, value), style in zip(data["context"].items(), (":", "--")):
        ax.axhline(value, color="0.4", linestyle=style, linewidth=1, label=f"{name} {value:.3f}")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("greedy pass@1 (held-out toy problems)")
    ax.set_title(f"objectives and controls: {len(exp.cfg.seeds)} seeds (dots), mean (bars)", fontsize=10)
    ax.legend(fontsize=8)
    place = (("first_diff", "first differing token"), ("other", "other tokens"))
    weighted = [n for n in names if ARMS[n].recipe == "verifiable"]
    _paired_bars(
        ax_w, data, weighted, tuple((f"diag/weight/{k}", label) for k, label in place), "where the weights land"
    )
    ax_w.axhline(1.0, color="0.4", linewidth=0.8)
    ax_w.set_ylabel("mean training weight, incorrect rows")
    selected = [n for n in names if ARMS[n].recipe == "rho1"]
    _paired_bars(
        ax_s, data, selected, tuple((f"diag/selected/{k}", label) for k, label in place), "where Rho-1 selects"
    )
    ax_s.set_ylabel("selected share of the pairs")
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ main
def prepare(cfg: ExperimentConfig, out: Path) -> Experiment:
    """A fresh output folder, the tiny artifacts with their pretrained base (made, or reused when
    their inputs are unchanged) and the held-out problems."""
    exp = Experiment(cfg, out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    make_tiny = ["scripts/make_tiny.py", "--out", str(exp.tiny), "--source", "synthetic", "--pretrained"]
    make_tiny += ["--base-steps", str(cfg.base_steps), "--reference-steps", str(cfg.reference_steps)]
    run_logged(make_tiny, out / "make_tiny.txt", threads=2)
    problems, dropped = heldout_problems(cfg, exp.tiny)
    (out / HELDOUT_FILE).write_text(json.dumps(problems, indent=1) + "\n")
    log.info("[experiment] %d held-out problems (%d drawn dropped: prompt seen in training)", len(problems), dropped)
    return exp


def report(exp: Experiment, results: dict[str, Any]) -> str:
    data = collect(exp, results)
    text = tables(exp, data, results)
    (exp.out / RESULTS_MD).write_text(text)
    (exp.out / RESULTS_JSON).write_text(json.dumps({"config": dataclasses.asdict(exp.cfg), **data}, indent=1) + "\n")
    try:
        plot(exp, data, exp.out / RESULTS_PNG)
    except ImportError:
        log.info("[experiment] matplotlib not installed: no plot (pip install 'wmtp[plots]')")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "experiments" / "objectives.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "objectives")
    args = parser.parse_args()
    cfg = ExperimentConfig.load(args.config)
    exp = prepare(cfg, args.out)
    results = exp.run()
    print("\n" + report(exp, results))
    log.info("[experiment] %s, %s, %s", exp.out / RESULTS_MD, exp.out / RESULTS_JSON, exp.out / RESULTS_PNG)


if __name__ == "__main__":
    setup_logging()
    main()
