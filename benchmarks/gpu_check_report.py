"""Tables for `gpu_check.sh` from what its steps wrote, and the checks on them (exit 1 if one fails).

python benchmarks/gpu_check_report.py recipes WORK --steps 20 [--require-falling]
python benchmarks/gpu_check_report.py mfu mfu.json mfu_compile.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.training.metrics import read_metrics  # noqa: E402

RECIPES = {"baseline": "loss", "critic": "value_loss", "verifiable": "loss", "rho1": "loss"}
WINDOW = 5
"""Steps averaged at the start and at the end to call a loss falling."""


def recipes(work: Path, steps: int, require_falling: bool) -> int:
    print("| recipe | steps | first loss | last loss | finite | falling | tokens/s (median) | peak memory |")
    print("|---|---:|---:|---:|---|---|---:|---:|")
    failures = []
    for name, key in RECIPES.items():
        rows = [r for r in read_metrics(work / f"run_{name}") if key in r]
        losses = [r[key] for r in rows]
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        window = min(WINDOW, max(1, len(losses) // 2))
        falling = finite and statistics.mean(losses[-window:]) < statistics.mean(losses[:window])
        tok_s = statistics.median(r["tokens_per_s"] for r in rows) if rows else math.nan
        peak = max((r.get("peak_memory_gib", 0.0) for r in rows), default=0.0)
        print(
            f"| {name} | {len(rows)} | {losses[0]:.4f} | {losses[-1]:.4f} | {finite} | {falling} | {tok_s:,.0f} | "
            f"{f'{peak:.2f} GiB' if peak else '-'} |"
        )
        if len(rows) != steps or not finite or (require_falling and not falling):
            failures.append(name)
    if failures:
        print(f"\nFAILED: {', '.join(failures)} (wrong step count, a non-finite loss, or a loss that did not fall)")
    return 1 if failures else 0


def mfu(files: list[Path]) -> int:
    print("| run | parameters | step | tokens/s | TFLOP/s | MFU | peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    bad = False
    for path in files:
        r = json.loads(path.read_text())
        mfu_text = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
        print(
            f"| {'compiled' if r['compile'] else 'eager'} ({r['device']}) | {r['params'] / 1e9:.2f}B | "
            f"{r['step_s']:.3f} s | {r['tokens_per_s']:,.0f} | {r['tflops_per_s']:.1f} | {mfu_text} | {peak} |"
        )
        bad |= not (r["step_s"] > 0 and math.isfinite(r["tflops_per_s"]))
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    rec = sub.add_parser("recipes")
    rec.add_argument("work", type=Path)
    rec.add_argument("--steps", type=int, required=True)
    rec.add_argument("--require-falling", action="store_true")
    m = sub.add_parser("mfu")
    m.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    sys.exit(recipes(args.work, args.steps, args.require_falling) if args.what == "recipes" else mfu(args.files))


if __name__ == "__main__":
    main()
