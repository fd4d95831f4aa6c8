"""One table of training runs side by side: recipe, final loss per head, and pass@k of each evaluation.

    python scripts/compare_runs.py outputs/demo/baseline outputs/demo/verifiable ...

A run folder is a recipe's training.output_dir (config.toml, metrics.jsonl). Its evaluations are
the `results.json` files under RUN_DIR/eval/<name>/ (recipes/evaluate.py with
--eval.output_dir RUN_DIR/eval/<name>); each <name> and pass@k becomes a column.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.layout import METRICS_FILE, RUN_CONFIG  # noqa: E402
from wmtp.training.metrics import read_metrics  # noqa: E402

RECIPE_SECTIONS = (("rho1", "rho1"), ("td", "verifiable"), ("critic", "critic"))
"""A run's recipe, told by the section only it has (checked in this order); none of them: baseline."""
EVAL_DIR = "eval"


def recipe_of(run: Path) -> str:
    sections = tomllib.loads((run / RUN_CONFIG).read_text()) if (run / RUN_CONFIG).is_file() else {}
    return next((name for section, name in RECIPE_SECTIONS if section in sections), "baseline")


def final_losses(run: Path) -> dict[str, float]:
    """The last logged loss, value loss and per-head losses."""
    if not (run / METRICS_FILE).is_file():
        return {}
    rows = read_metrics(run)
    last: dict[str, float] = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if k in ("loss", "value_loss") or k.startswith("loss/head_")})
    return last


def evaluations(run: Path) -> dict[str, dict[str, float]]:
    """{eval name: {pass@k: value}} from RUN_DIR/eval/*/results.json."""
    found = {}
    for results in sorted((run / EVAL_DIR).glob("*/results.json")):
        found[results.parent.name] = json.loads(results.read_text())["pass_at_k"]
    return found


def fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def table(runs: list[Path]) -> list[str]:
    data = [(run, recipe_of(run), final_losses(run), evaluations(run)) for run in runs]
    heads = sorted(
        {k for _, _, losses, _ in data for k in losses if k.startswith("loss/head_")},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    evals = sorted({(name, metric) for *_, ev in data for name, metrics in ev.items() for metric in metrics})
    header = ["run", "recipe", "loss", *(h.replace("loss/", "") for h in heads), *(f"{n} {m}" for n, m in evals)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for run, recipe, losses, ev in data:
        loss = losses.get("loss", losses.get("value_loss"))
        cells = [
            run.name,
            recipe,
            fmt(loss),
            *(fmt(losses.get(h)) for h in heads),
            *(fmt(ev.get(n, {}).get(m)) for n, m in evals),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    print("\n".join(table(args.runs)))


if __name__ == "__main__":
    main()
