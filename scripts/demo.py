"""The tiny end-to-end demo: make the tiny artifacts, train the baseline recipe on CPU, report.

    make demo        (or: python scripts/demo.py)

Everything lands under outputs/demo/ (rebuilt on every run) and artifacts/tiny/ (reused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wmtp.training.metrics import embedded_tracking_uri, read_metrics  # noqa: E402

TINY = ROOT / "artifacts" / "tiny"
OUT = ROOT / "outputs" / "demo"


def run(args: list[str]) -> None:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)


def main() -> None:
    t0 = time.perf_counter()
    run(["scripts/make_tiny.py", "--out", str(TINY)])
    shutil.rmtree(OUT, ignore_errors=True)
    baseline = OUT / "baseline"
    run(["recipes/full_finetune_baseline.py", "--config", "configs/baseline_tiny.toml",
         "--training.output_dir", str(baseline)])

    rows = [r for r in read_metrics(baseline) if "loss" in r]
    first, last = rows[0], rows[-1]
    heads = sorted(k for k in last if k.startswith("loss/head_"))
    print("\n=== wmtp tiny demo ===")
    print(f"{'run':<10} {'steps':>5} {'loss first':>10} {'loss last':>10}  " + " ".join(f"{h[5:]:>7}" for h in heads))
    print(f"{'baseline':<10} {last['step']:>5} {first['loss']:>10.4f} {last['loss']:>10.4f}  "
          + " ".join(f"{last[h]:>7.4f}" for h in heads))
    print(f"\nrun folder:      {baseline}")
    print(f"final model:     {baseline / 'final'} (params.json + model.safetensors + tokenizer.model)")
    print(f"metrics:         {baseline / 'metrics.jsonl'}")
    print(f"MLflow UI:       {sys.executable} -m mlflow ui --backend-store-uri {embedded_tracking_uri(baseline)}")
    print(f"demo time:       {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
