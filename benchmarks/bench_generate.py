"""Generation speed on tiny MTP models with trained heads: uncached vs KV-cached greedy, and
self-speculative greedy (tokens per forward, wall-clock speed-up over cached greedy).

    python benchmarks/bench_generate.py [--steps 300] [--layers 6 32] [--max-new 96] [--repeats 5]

Each model (dim 64, n_future 4, character-level) is trained here for --steps on the synthetic code
corpus, as in tests/test_generate.py. --layers 6 is the test's shape (2 trunk blocks, 4 heads);
32 is 7B_1T_4's layout (28 trunk blocks, 4 heads). A speculative forward runs all 4 heads on a block
of 4 tokens while plain greedy runs head 0 on one token, so on an overhead-bound CPU model the
speed-up is about tokens/forward x (trunk + 1) / (trunk + 4): small with 2 trunk blocks, close to
tokens/forward with 28. Rows generate --max-new tokens each (eos_id None: a stream of functions),
so every mode does the same work; the speculative and greedy tokens are checked equal. Times are
medians of --repeats runs after a warm-up. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import cpu_model  # noqa: E402

from tests.test_generate import train_code_model  # noqa: E402
from wmtp.eval.generate import Generation, generate  # noqa: E402
from wmtp.models import ModelArgs, MTPTransformer  # noqa: E402

PROMPTS = [
    "def count_",
    "def add_3(x):\n",
    "def larger(a, b):\n",
    "def repeat_",
    "def times_",
    "def squares(",
    "def sum_above(xs):\n",
    "def divisible_by_",
]
"""Prompt texts; batch 1 uses the first."""
BATCH_SIZES = (1, len(PROMPTS))
TRAIN_SEQ_LEN = 128
"""Training windows as long as the generated sequences (prompt + max_new), so no position is unseen."""


def timed(model: MTPTransformer, prompts: list[list[int]], *, repeats: int, **kw) -> tuple[Generation, float]:
    """The generation and its median wall-clock seconds over `repeats` runs after one warm-up."""
    out = generate(model, prompts, **kw)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, prompts, **kw)
        seconds.append(time.perf_counter() - start)
    return out, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 32], help="n_layers of each model")
    parser.add_argument("--max-new", type=int, default=96, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    args = parser.parse_args()

    rows = []
    for n_layers in args.layers:
        shape = ModelArgs(
            dim=64,
            n_layers=n_layers,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=1,
            multiple_of=16,
            n_future_tokens=4,
            max_seq_len=256,
        )
        start = time.perf_counter()
        model, encode, _ = train_code_model(shape, steps=args.steps, seq_len=TRAIN_SEQ_LEN)
        train_s = time.perf_counter() - start
        print(
            f"trained n_layers={n_layers} ({len(model.trunk)} trunk blocks, {model.n_future} heads) "
            f"for {args.steps} steps in {train_s:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        for batch in BATCH_SIZES:
            prompts = [encode(p) for p in PROMPTS[:batch]]
            kw = dict(max_new_tokens=args.max_new, eos_id=None, repeats=args.repeats)
            uncached, t_uncached = timed(model, prompts, use_cache=False, **kw)
            cached, t_cached = timed(model, prompts, **kw)
            spec, t_spec = timed(model, prompts, speculative=True, **kw)
            if not uncached.tokens == cached.tokens == spec.tokens:
                raise AssertionError(f"n_layers={n_layers} batch={batch}: the modes' tokens differ")
            modes = [
                ("greedy, uncached", uncached, t_uncached),
                ("greedy, KV cache", cached, t_cached),
                ("self-speculative", spec, t_spec),
            ]
            for mode, gen, seconds in modes:
                rows.append(
                    (
                        f"{n_layers} ({len(model.trunk)} + {model.n_future})",
                        batch,
                        mode,
                        gen.new_tokens,
                        gen.forwards,
                        gen.tokens_per_forward,
                        gen.new_tokens / seconds,
                        t_cached / seconds,
                    )
                )

    print(
        f"\nGeneration on {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{dt.date.today().isoformat()}; dim 64, n_future 4, {args.steps} training steps, "
        f"{args.max_new} new tokens per row, median of {args.repeats}.\n"
    )
    print(
        "| n_layers (trunk + heads) | batch | mode | new tokens | forwards | tokens / forward | tokens/s "
        "| vs KV-cached greedy |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for model_s, batch, mode, new, forwards, tpf, tps, speedup in rows:
        print(f"| {model_s} | {batch} | {mode} | {new} | {forwards} | {tpf:.2f} | {tps:,.0f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
