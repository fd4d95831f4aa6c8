"""The tiny end-to-end demo: make the tiny artifacts, then baseline, critic -> verifiable and Rho-1
on CPU, a table of their final steps; then each run evaluated (pass@k) on the toy problem set,
HumanEval's canonical solutions scored as a check of the harness, and one table comparing the runs.

    make demo        (or: python scripts/demo.py)

Everything lands under outputs/demo/ (rebuilt on every run) and artifacts/tiny/ (reused).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wmtp.data.problems import load_humaneval  # noqa: E402
from wmtp.layout import FINAL_DIR, MLFLOW_DB, TOKENIZER_FILENAME, VALUE_HEAD_FILENAME  # noqa: E402
from wmtp.training.metrics import read_metrics  # noqa: E402

TINY = ROOT / "artifacts" / "tiny_synthetic"
"""The demo's tiny artifacts come from the generator (whatever data is beside the checkout): the toy
evaluation set is drawn from the same templates, so the tiny models can solve some of it."""
TOY_EVAL = TINY / "data" / "toy_eval.json"
HUMANEVAL = ROOT.parent / "shared" / "data" / "HumanEval.jsonl.gz"
OUT = ROOT / "outputs" / "demo"
N_HEADS = 4
TRACKING_URI = f"sqlite:///{OUT / MLFLOW_DB}"
"""One MLflow store for the four demo runs, so the UI shows them side by side."""


def run(args: list[str]) -> None:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)


def recipe(name: str, config: str, *extra: str) -> Path:
    """Train one recipe, scoring the held-out rows every 25 steps (validation curves in report.png)."""
    out = OUT / name
    run(
        [
            f"recipes/full_finetune_{name}.py",
            "--config",
            f"configs/{config}",
            "--training.output_dir",
            str(out),
            "--model.path",
            str(TINY / "mtp_model"),
            "--tokenizer.path",
            str(TINY / TOKENIZER_FILENAME),
            "--data.train_path",
            str(TINY / "data" / "train.jsonl"),
            "--validation.path",
            str(TINY / "data" / "valid.jsonl"),
            "--validation.every",
            "25",
            "--metrics.experiment",
            "wmtp-demo",
            "--metrics.tracking_uri",
            TRACKING_URI,
            *extra,
        ]
    )
    return out


def fmt(value: float | None, width: int = 8) -> str:
    return (
        f"{'-':>{width}}"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:>{width}.4f}"
    )


def evaluate(runs: dict[str, Path]) -> None:
    """Each run's end state on the toy problem set (the critic's policy is the base model), and
    HumanEval's canonical solutions through the harness where the data is beside the checkout."""
    n_toy = len(json.loads(TOY_EVAL.read_text()))
    for out in runs.values():
        run(
            [
                "recipes/evaluate.py",
                "--config",
                "configs/eval_mbpp_tiny.toml",
                "--model.path",
                str(out),
                "--eval.problems",
                str(TOY_EVAL),
                "--eval.task_ids",
                f"[1, {n_toy}]",
                "--eval.output_dir",
                str(out / "eval" / "toy"),
                "--metrics.experiment",
                "wmtp-demo",
                "--metrics.tracking_uri",
                TRACKING_URI,
            ]
        )
    if HUMANEVAL.is_file():
        canonical = OUT / "humaneval_canonical.jsonl"
        canonical.write_text(
            "".join(
                json.dumps({"task_id": p.task_id, "completion": p.reference}) + "\n" for p in load_humaneval(HUMANEVAL)
            )
        )
        run(
            [
                "recipes/evaluate.py",
                "--config",
                "configs/eval_humaneval_tiny.toml",
                "--eval.problems",
                str(HUMANEVAL),
                "--eval.template",
                "raw",
                "--eval.samples",
                str(canonical),
                "--eval.n_samples",
                "1",
                "--eval.ks",
                "[1]",
                "--eval.output_dir",
                str(OUT / "humaneval_canonical"),
                "--metrics.experiment",
                "wmtp-demo",
                "--metrics.tracking_uri",
                TRACKING_URI,
            ]
        )
    else:
        print(f"[demo] no {HUMANEVAL}: the HumanEval harness check is skipped")


def main() -> None:
    t0 = time.perf_counter()
    run(["scripts/make_tiny.py", "--out", str(TINY), "--source", "synthetic"])
    shutil.rmtree(OUT, ignore_errors=True)
    runs = {
        "baseline": recipe("baseline", "baseline_tiny.toml"),
        "critic": recipe("critic", "critic_tiny.toml"),
    }
    runs["verifiable"] = recipe(
        "verifiable",
        "verifiable_tiny.toml",
        "--critic.value_head",
        str(runs["critic"] / FINAL_DIR / VALUE_HEAD_FILENAME),
    )
    runs["rho1"] = recipe("rho1", "rho1_tiny.toml", "--reference.path", str(TINY / "reference"))

    print("\n=== wmtp tiny demo: final step of each run ===")
    header = f"{'run':<11}{'steps':>6}{'loss':>9}" + "".join(f"{f'head {k}':>9}" for k in range(N_HEADS))
    print(header + f"{'  weights / selection / value':<}")
    for name, out in runs.items():
        rows = read_metrics(out)
        last = rows[-1]
        if name == "critic":
            last = [r for r in rows if "value_loss" in r][-1]
            held_out = [r for r in rows if "val/auroc" in r][-1]
            note = (
                f"  value loss {last['value_loss']:.4f}; held-out {int(held_out['val/rows'])} rows: V correct "
                f"{held_out['val/value/correct']:.3f} vs incorrect {held_out['val/value/incorrect']:.3f}, "
                f"AUROC {held_out['val/auroc']:.3f}"
            )
            print(f"{name:<11}{last['step']:>6}{fmt(None, 9)}" + fmt(None, 9) * N_HEADS + note)
            continue
        heads = "".join(fmt(last.get(f"loss/head_{k}"), 9) for k in range(N_HEADS))
        if name == "verifiable":
            note = (
                f"  w mean {last['weight/mean']:.3f} std {last['weight/std']:.3f} "
                f"[{last['weight/min']:.2f}, {last['weight/max']:.2f}] clipped {last['weight/clipped_share']:.1%}"
            )
        elif name == "rho1":
            note = "  selected " + " ".join(f"{last[f'selected/head_{k}']:.2f}" for k in range(N_HEADS))
        else:
            note = "  every valid pair, weight 1"
        print(f"{name:<11}{last['step']:>6}{fmt(last['loss'], 9)}{heads}{note}")

    evaluate(runs)
    print("\n=== the runs side by side: final losses, pass@k on the toy problem set ===", flush=True)
    run(["scripts/compare_runs.py", *map(str, runs.values())])

    print("\nrun folders:     " + ", ".join(str(p) for p in runs.values()))
    print("reports:         <run>/report.png (python scripts/plot_run.py RUN_DIR... overlays several)")
    print(
        "final models:    <run>/final (params.json + model.safetensors + tokenizer.model; "
        "the critic's is value_head.safetensors)"
    )
    print(f"MLflow UI:       {sys.executable} -m mlflow ui --backend-store-uri {TRACKING_URI}")
    print("                 (experiment 'wmtp-demo': one run per recipe)")
    print(f"demo time:       {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
