"""The tiny end-to-end demo: every objective beside its controls, from a pretrained base, on CPU.

    make demo        (or: python scripts/demo.py)

1. The tiny artifacts (scripts/make_tiny.py --pretrained): data from a generator of small coding
   problems whose buggy solutions are known mutations of the correct ones, and a base MTP model
   pretrained on a corpus of such code, correct and buggy alike (competent but imperfect).
2. One seed of the objectives experiment (scripts/objectives_experiment.py with
   configs/experiments/demo.toml): a critic (a value model) and a value head on the frozen base for
   comparison; the baseline on correct rows and on all rows; verifiable, verifiable with its weights
   shuffled within rows and permuted across the batch; Rho-1 and Rho-1 with a random selection. Each
   run is evaluated by greedy pass@1 on held-out toy problems; the table shows it with the critic's
   AUROC and where the weights land (correct vs incorrect rows, the first differing token).
3. HumanEval's canonical solutions scored through the harness (164/164) when the data is beside the
   checkout, and scripts/compare_runs.py's table of the runs side by side.

Everything lands under outputs/demo/ (rebuilt on every run) and artifacts/tiny_synthetic/ (reused
while its inputs are unchanged). One MLflow store holds every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from objectives_experiment import MLFLOW_EXPERIMENT, ExperimentConfig, prepare, report  # noqa: E402

from wmtp.data.problems import load_humaneval  # noqa: E402
from wmtp.layout import METRICS_FILE, MLFLOW_DB  # noqa: E402
from wmtp.logs import get_logger, setup_logging  # noqa: E402

log = get_logger("demo")

CONFIG = ROOT / "configs" / "experiments" / "demo.toml"
HUMANEVAL = ROOT.parent / "shared" / "data" / "HumanEval.jsonl.gz"
OUT = ROOT / "outputs" / "demo"
TRACKING_URI = f"sqlite:///{OUT / MLFLOW_DB}"
"""One MLflow store for every demo run, so the UI shows them side by side."""


def run(args: list[str]) -> None:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)


def humaneval_check() -> None:
    """HumanEval's canonical solutions through the evaluation harness: every one must pass."""
    if not HUMANEVAL.is_file():
        log.info("[demo] no %s: the HumanEval harness check is skipped", HUMANEVAL)
        return
    canonical = OUT / "humaneval_canonical.jsonl"
    canonical.write_text(
        "".join(json.dumps({"task_id": p.task_id, "completion": p.reference}) + "\n" for p in load_humaneval(HUMANEVAL))
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
            MLFLOW_EXPERIMENT,
            "--metrics.tracking_uri",
            TRACKING_URI,
        ]
    )


def main() -> None:
    t0 = time.perf_counter()
    cfg = ExperimentConfig.load(CONFIG, tracking_uri=TRACKING_URI)
    exp = prepare(cfg, OUT)
    results = exp.run()
    print("\n=== wmtp tiny demo: each objective beside its controls, from the pretrained base ===\n")
    print(report(exp, results))
    humaneval_check()
    runs = sorted(p for p in OUT.glob("seed_*/*") if (p / METRICS_FILE).is_file())
    print("\n=== the runs side by side: final losses, pass@1 on the held-out toy problems ===", flush=True)
    run(["scripts/compare_runs.py", *map(str, runs)])

    print(f"\nrun folders:     {OUT}/seed_*/<run> (report.png in each; python scripts/plot_run.py RUN_DIR... overlays)")
    print(f"tables, plot:    {OUT}/results.md, results.png")
    print(f"MLflow UI:       {sys.executable} -m mlflow ui --backend-store-uri {TRACKING_URI}")
    print(f"demo time:       {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    setup_logging()
    main()
