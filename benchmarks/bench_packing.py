"""Padding waste and real tokens per second: micro-batches padded, grouped by length, and packed.

    python benchmarks/bench_packing.py [--rows-per-step 64] [--rounds 2] [--all-timed] [--json out.json]
    python benchmarks/bench_packing.py --dry-run        # tiny model and steps: the script runs

Rows are CodeContests-shaped (`codecontests_lengths`): token lengths only, drawn from the
distributions below; the tokens themselves are random ids, which cost the same.

1. Padding share of a step (padding tokens / tokens in the step's micro-batches), averaged over
   `--padding-steps` steps, for global batches of 16, 64 and 256 rows and each arrangement: the
   sampler's order (micro-batches of 4 rows, as before), grouped by length (4 rows, or a budget of
   4 x 2048 tokens), packed into sequences of 2048 (4 per micro-batch).
2. Real (non-padding) tokens per second of the baseline recipe's own `train_step` on the mid-size
   model (dim 512, 8 blocks, 8 heads, V 32000, n = 4, max_seq_len 2048, fp32) over the same rows
   in each arrangement, the arrangements taking turns within each round (a shared host's drift
   bends every one alike), the weights put back before each step. Ratios are per round against
   the padded step of that round; the median over rounds is reported. Every arrangement's loss
   is checked against the padded one's (relative 1e-5). Each round also times the packed step's
   blocks alone (no vocabulary projection): the share of a step that padding makes longer, since
   the fused loss computes only the real response pairs whatever the arrangement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import cpu_model  # noqa: E402
from recipe_step import recipe_on_model, single_device  # noqa: E402

from wmtp.data.collate import collate_plan  # noqa: E402
from wmtp.data.packing import SAMPLER_ORDER, BatchLayout, padded_tokens, plan_step  # noqa: E402
from wmtp.models import ModelArgs  # noqa: E402

SEQ_LEN = 2048
MICRO_BATCH = 4
TOKEN_BUDGET = MICRO_BATCH * SEQ_LEN
LAYOUTS = {
    "padded (sampler order)": SAMPLER_ORDER,
    "grouped by length": BatchLayout(group_by_length=True),
    f"grouped, {TOKEN_BUDGET} tokens": BatchLayout(group_by_length=True, micro_batch_tokens=TOKEN_BUDGET),
    "packed": BatchLayout(packing=True),
}
PADDED = "padded (sampler order)"
TIMED = ("padded (sampler order)", "grouped by length", "packed")
"""Arrangements whose steps are timed (every one is in the padding table); --all-timed times them all."""
BLOCKS = "packed, blocks only"
"""The packed step's forward and backward without the vocabulary projection (a sum of the heads'
hidden states as the loss, no optimizer): the part of a step whose cost scales with the tokens
held, padding included."""
TOLERANCE = 1e-5

# CodeContests-shaped token lengths (LLaMA's 32K-piece tokenizer, ~3.5 characters per token).
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_RANGE = 420, 0.45, (120, 1600)
"""Alpaca template (~45 tokens) + problem statement: statements run from a short paragraph to a few
thousand characters with input/output sections and examples; log-normal, median 420 tokens
(p10 ~235, p90 ~750)."""
SOLUTION_MEDIAN, SOLUTION_SIGMA, SOLUTION_RANGE = 180, 0.9, (20, 2000)
"""Python solutions (correct and incorrect): mostly 10-40 lines with a long tail of long ones;
log-normal, median 180 tokens (p10 ~57, p90 ~570, p99 ~1,460), 20 to 2,000 tokens."""
MAX_ROW = SEQ_LEN
"""Rows over model.max_seq_len are excluded, as the samplers exclude them (the processed set keeps
rows of at most 2,048 tokens)."""


def codecontests_lengths(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) token lengths of n rows; BOS in the prompt, EOS in the response."""
    rng = np.random.default_rng(seed)
    prompts, responses = [], []
    while len(prompts) < n:
        p = int(np.clip(rng.lognormal(np.log(PROMPT_MEDIAN), PROMPT_SIGMA), *PROMPT_RANGE))
        r = int(np.clip(rng.lognormal(np.log(SOLUTION_MEDIAN), SOLUTION_SIGMA), *SOLUTION_RANGE))
        if p + r <= MAX_ROW:
            prompts.append(p)
            responses.append(r)
    return np.array(prompts), np.array(responses)


def padding_share(lengths: np.ndarray, rows_per_step: int, layout: BatchLayout) -> tuple[float, float]:
    """(padding tokens / tokens, micro-batches per step) over consecutive steps of these rows."""
    pad = total = micro = 0
    steps = len(lengths) // rows_per_step
    for s in range(steps):
        step = lengths[s * rows_per_step : (s + 1) * rows_per_step]
        plan = plan_step(
            step,
            layout,
            world_size=1,
            micro_batch_size=MICRO_BATCH,
            grad_accum=rows_per_step // MICRO_BATCH,
            seq_len=SEQ_LEN,
        )[0]
        held = padded_tokens(plan, step, packed=layout.packing, seq_len=SEQ_LEN)
        pad += held - int(step.sum())
        total += held
        micro += len(plan)
    return pad / total, micro / steps


def step_batches(prompts: np.ndarray, responses: np.ndarray, layout: BatchLayout, vocab: int, n_future: int):
    """The step's micro-batches in `layout`, built by the loader's collation from random token ids."""
    rng = np.random.default_rng(0)
    examples = {}
    for i, (p, r) in enumerate(zip(prompts.tolist(), responses.tolist())):
        tokens = [1, *rng.integers(3, vocab, p + r - 2).tolist(), 2]
        examples[i] = (tokens, [0] * p + [1] * r)
    lengths = prompts + responses
    plan = plan_step(
        lengths,
        layout,
        world_size=1,
        micro_batch_size=MICRO_BATCH,
        grad_accum=len(lengths) // MICRO_BATCH,
        seq_len=SEQ_LEN,
    )[0]
    batches = collate_plan(examples, plan, pad_id=0, n_future=n_future, packed=layout.packing, seq_len=SEQ_LEN)
    for batch in batches:
        batch["is_correct"] = torch.ones(len(batch["lengths"]), dtype=torch.bool)
    return batches


def throughput(args, model_args: ModelArgs) -> dict:
    recipe, _ = recipe_on_model("baseline", model_args, single_device(torch.device("cpu")))
    weights = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    prompts, responses = codecontests_lengths(args.rows_per_step, seed=args.seed + 1)
    real = int((prompts + responses).sum())
    timed = list(LAYOUTS) if args.all_timed else list(TIMED)
    batches = {
        name: step_batches(prompts, responses, LAYOUTS[name], model_args.vocab_size, model_args.n_future_tokens)
        for name in timed
    }

    def step(name: str) -> tuple[float, float]:
        recipe.model.load_state_dict(weights)
        t0 = time.perf_counter()
        metrics = recipe.train_step(batches[name])
        return time.perf_counter() - t0, metrics["loss"]

    def blocks_only() -> tuple[float, float]:
        t0 = time.perf_counter()
        for batch in batches["packed"]:
            recipe.model(batch["tokens"], segments=batch["segments"]).hidden.sum().backward()
        recipe.model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float("nan")

    for name in timed:  # warm-up: one micro-batch of each arrangement
        recipe.model.load_state_dict(weights)
        recipe.train_step(batches[name][:1])
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: step(name) for name in timed})
        rounds[-1][BLOCKS] = blocks_only()
        print(f"  round {len(rounds)}: " + ", ".join(f"{n} {t:.1f} s" for n, (t, _) in rounds[-1].items()), flush=True)
    out = {}
    for name in timed:
        times = [r[name][0] for r in rounds]
        loss_err = max(abs(r[name][1] - r[PADDED][1]) / abs(r[PADDED][1]) for r in rounds)
        assert loss_err <= TOLERANCE, f"{name}: loss differs from the padded step's by {loss_err:.2e}"
        out[name] = {
            "median_s": statistics.median(times),
            "real_tokens_per_s": real / statistics.median(times),
            "speedup_vs_padded": statistics.median(r[PADDED][0] / r[name][0] for r in rounds),
            "tokens_in_micro_batches": sum(b["tokens"].numel() for b in batches[name]),
            "micro_batches": len(batches[name]),
            "max_loss_rel_err": loss_err,
        }
    blocks_share = statistics.median(r[BLOCKS][0] / r["packed"][0] for r in rounds)
    return {"real_tokens": real, "rows": args.rows_per_step, "cases": out, "blocks_share_of_packed_step": blocks_share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-step", type=int, default=64, help="global batch of the timed step (rows)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--all-timed", action="store_true", help="also time the token-budget arrangement")
    parser.add_argument("--padding-steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, two rounds: check that it runs")
    args = parser.parse_args()
    model_args = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, n_future_tokens=4, max_seq_len=SEQ_LEN)
    if args.dry_run:
        model_args = ModelArgs(
            dim=32, n_layers=4, n_heads=4, vocab_size=512, n_future_tokens=2, max_seq_len=SEQ_LEN, multiple_of=16
        )
        args.rounds, args.padding_steps, args.rows_per_step = 2, 20, 8
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": os.getloadavg(), "torch": torch.__version__}

    lengths = {}
    for rows in (16, 64, 256):
        p, r = codecontests_lengths(rows * args.padding_steps, seed=args.seed)
        lengths[rows] = p + r
    sample = lengths[16]
    report["rows"] = {
        "mean": float(sample.mean()),
        "percentiles": {q: float(np.percentile(sample, q)) for q in (10, 50, 90, 99)},
    }
    print(
        f"CodeContests-shaped rows: mean {sample.mean():.0f} tokens, "
        + ", ".join(f"p{q} {v:.0f}" for q, v in report["rows"]["percentiles"].items())
    )
    print("| rows per step | " + " | ".join(LAYOUTS) + " |")
    print("|---:|" + "---:|" * len(LAYOUTS))
    report["padding"] = {}
    for rows, lens in lengths.items():
        shares = {name: padding_share(lens, rows, layout) for name, layout in LAYOUTS.items()}
        report["padding"][rows] = {n: {"share": s, "micro_batches": m} for n, (s, m) in shares.items()}
        print(f"| {rows} | " + " | ".join(f"{s:.1%} ({m:.1f} mb)" for s, m in shares.values()) + " |")

    print(f"timed step: {args.rows_per_step} rows, {args.rounds} rounds, arrangements in turn")
    report["throughput"] = throughput(args, model_args)
    report["load_after"] = os.getloadavg()
    print("| arrangement | micro-batches | tokens held | median step | real tokens/s | vs padded |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, c in report["throughput"]["cases"].items():
        print(
            f"| {name} | {c['micro_batches']} | {c['tokens_in_micro_batches']:,} | {c['median_s']:.2f} s | "
            f"{c['real_tokens_per_s']:,.0f} | {c['speedup_vs_padded']:.2f}x |"
        )
    share = report["throughput"]["blocks_share_of_packed_step"]
    print(f"blocks (forward + backward without the vocabulary projection): {share:.0%} of the packed step")
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
