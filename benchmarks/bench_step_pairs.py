"""Old against new recipe step, interleaved in one process: the ratio that host drift cannot bend.

    python benchmarks/bench_step_pairs.py [--rounds 7] [--prompt 1]

`pytest benchmarks/test_bench_step.py` runs every case in its own process, one after the other; on
a shared VM the host's speed drifts by 10-20% over minutes, more than the difference between the
two loss paths. Here each recipe (baseline, verifiable) runs its recompute-path step and its own
`train_step` alternately, `--rounds` times each after a warm-up, on the same model, weights and
batch (weights put back before every step), and the median of the per-round time ratios is
printed with the medians of the times and tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_bench_step as bench  # noqa: E402

from wmtp.training.step import clip_and_step  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=bench.SHAPE["prompt"], help="unscored lead tokens per row")
    args = parser.parse_args()
    bench.SHAPE["prompt"] = args.prompt
    device = torch.device("cpu")
    tokens = bench.SHAPE["batch"] * bench.SHAPE["seq"]
    print(
        f"{bench.TABLE.split(' (')[0]}, {bench.SHAPE['seq'] - args.prompt} response tokens per row; "
        f"{args.rounds} interleaved rounds after one warm-up each"
    )
    print("| recipe | recompute path (8NHV) | train_step (6NHV) | median ratio | tokens/s old -> new |")
    print("|---|---:|---:|---:|---:|")
    cases = (("baseline", bench.recompute_baseline_step), ("verifiable", bench.recompute_verifiable_step))
    for name, old_step in cases:
        recipe, _, batch = bench.setup_recipe(device, name)
        weights = {k: v.clone() for k, v in recipe.model.state_dict().items()}

        def old() -> None:
            recipe.model.load_state_dict(weights)
            old_step(recipe, batch, clip_and_step)

        def new() -> None:
            recipe.model.load_state_dict(weights)
            recipe.train_step([batch])

        old(), new()
        pairs = [(timed(old), timed(new)) for _ in range(args.rounds)]
        t_old, t_new = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        ratio = statistics.median(o / n for o, n in pairs)
        print(
            f"| {name} | {t_old:.3f} s | {t_new:.3f} s | {ratio:.3f}x | "
            f"{tokens / t_old:,.0f} -> {tokens / t_new:,.0f} |"
        )


if __name__ == "__main__":
    main()
