"""recipes/evaluate.py end to end: generation from a tiny model and from training run folders,
torchrun against one process, score-only mode. The verdicts on the datasets' own solutions,
against OpenAI's harness and a reference: tests/test_pass_rule.py."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import ROOT, load_recipe, recipe_args, run_script, torchrun

pytestmark = pytest.mark.slow


def evaluate(out: Path, *args: str) -> dict:
    return load_recipe("evaluate").main(["--eval.output_dir", str(out), "--metrics.mlflow", "false", *args])


def write_samples(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def samples_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def toy_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    """Two sampled completions for each of 6 toy problems, in batches of 4 (a batch spans problems)."""
    return [
        "--config",
        str(ROOT / "configs" / "eval_mbpp_tiny.toml"),
        "--model.path",
        str(tiny / "mtp_model"),
        "--tokenizer.path",
        str(tiny / "tokenizer.model"),
        "--eval.problems",
        str(tiny / "data" / "toy_eval.json"),
        "--eval.task_ids",
        "[1, 40]",
        "--eval.limit",
        "6",
        "--eval.max_new_tokens",
        "24",
        "--eval.batch_size",
        "4",
        "--eval.n_samples",
        "2",
        "--eval.ks",
        "[1, 2]",
        "--eval.temperature",
        "0.8",
        "--eval.top_p",
        "0.95",
        "--eval.speculative",
        "false",
        "--eval.output_dir",
        str(out),
        *extra,
    ]


def test_a_tiny_model_is_evaluated_and_logged(tiny, tmp_path):
    out = tmp_path / "eval"
    run_script(["recipes/evaluate.py", *toy_args(tiny, out)])
    results = json.loads((out / "results.json").read_text())
    assert results["problems"] == 6 and results["samples"] == 12
    assert set(results["pass_at_k"]) == {"pass@1", "pass@2"}
    assert results["generation"]["new_tokens"] > 0 and results["execution"]["programs_per_s"] > 0
    samples = samples_of(out)
    assert [(s["task_id"], s["sample"]) for s in samples] == [(f"mbpp/{i}", j) for i in range(1, 7) for j in (0, 1)]
    assert all(s["status"] for s in samples) and all(s["prompt"].startswith("Below is an instruction") for s in samples)
    db = sqlite3.connect(out / "mlflow.db")
    logged = {k for (k,) in db.execute("select key from metrics")}
    assert {"eval/pass_at_1", "eval/pass_at_2", "eval/programs_per_s"} <= logged
    artifacts = {p.name for p in (out / "mlartifacts").rglob("*") if p.is_file()}
    assert {"samples.jsonl", "results.json"} <= artifacts


def test_torchrun_two_processes_give_the_one_process_samples(tiny, tmp_path):
    run_script(["recipes/evaluate.py", *toy_args(tiny, tmp_path / "one", "--metrics.mlflow", "false")])
    torchrun("recipes/evaluate.py", toy_args(tiny, tmp_path / "two", "--metrics.mlflow", "false"))
    one, two = (
        [{k: v for k, v in s.items() if k != "seconds"} for s in samples_of(tmp_path / run)] for run in ("one", "two")
    )
    assert one == two and len(one) == 12


def test_speculative_greedy_evaluation_gives_the_plain_greedy_completions(tiny, tmp_path):
    greedy = ["--eval.n_samples", "1", "--eval.ks", "[1]", "--eval.temperature", "0", "--metrics.mlflow", "false"]
    plain = evaluate(tmp_path / "plain", *toy_args(tiny, tmp_path / "plain", *greedy))
    fast = evaluate(tmp_path / "fast", *toy_args(tiny, tmp_path / "fast", *greedy, "--eval.speculative", "true"))
    completions = {run: [s["completion"] for s in samples_of(tmp_path / run)] for run in ("plain", "fast")}
    assert completions["fast"] == completions["plain"]
    assert plain["generation"]["tokens_per_forward"] <= 1.0 <= fast["generation"]["tokens_per_forward"]


def test_a_training_run_folder_is_evaluated_at_its_end(tiny, tmp_path):
    """An unfinished run's newest checkpoint, then the finished run's final/ export."""
    run = tmp_path / "baseline"
    short = [
        "--config",
        str(ROOT / "configs" / "eval_mbpp_tiny.toml"),
        "--model.path",
        str(run),
        "--eval.problems",
        str(tiny / "data" / "toy_eval.json"),
        "--eval.task_ids",
        "[1, 40]",
        "--eval.limit",
        "2",
        "--eval.max_new_tokens",
        "8",
    ]
    train = load_recipe("full_finetune_baseline").main
    train(recipe_args(tiny, run, "baseline_tiny.toml", **{"training.max_steps": 4, "training.stop_at_step": 2}))
    assert evaluate(tmp_path / "ckpt", *short)["policy"] == str(run / "checkpoints" / "step_000002")
    train(recipe_args(tiny, run, "baseline_tiny.toml", **{"training.max_steps": 4}))
    assert evaluate(tmp_path / "final", *short)["policy"] == str(run / "final")


def test_score_only_names_a_bad_line_and_an_unknown_task(tiny, tmp_path):
    toy = str(tiny / "data" / "toy_eval.json")
    common = [
        "--config",
        str(ROOT / "configs" / "eval_mbpp_tiny.toml"),
        "--eval.problems",
        toy,
        "--eval.task_ids",
        "[1, 40]",
        "--eval.output_dir",
        str(tmp_path / "out"),
        "--metrics.mlflow",
        "false",
    ]
    bad = write_samples(tmp_path / "bad.jsonl", [{"task_id": 1, "completion": "x = 1"}])
    bad.write_text(bad.read_text() + "{not json\n")
    proc = run_script(["recipes/evaluate.py", *common, "--eval.samples", str(bad)], check=False)
    assert proc.returncode != 0 and f"{bad}:2" in proc.stderr
    unknown = write_samples(tmp_path / "unknown.jsonl", [{"task_id": 999, "completion": "x = 1"}])
    proc = run_script(["recipes/evaluate.py", *common, "--eval.samples", str(unknown)], check=False)
    assert proc.returncode != 0 and "mbpp/999" in proc.stderr
