"""Benchmark the sidecar row index on a generated CodeContests-sized JSONL.

    python scripts/bench_index.py                      # 1M rows in a temp dir, removed afterwards
    python scripts/bench_index.py --out /data/bench --rows 3700000 --tokenizer path/to/tokenizer.model

Writes `<out>/train.jsonl` (rows grouped by problem, as processed CodeContests is; a few malformed
lines), trains a small tokenizer on a sample unless --tokenizer is given, then builds the index in a
fresh interpreter so that its peak RSS is the index build's alone, and prints rows, wall time,
rows/s, index size on disk and peak RSS, plus the time to reload the fresh index.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wmtp.data.index import build_index, index_paths, load_or_build_index  # noqa: E402
from wmtp.data.rows import make_row  # noqa: E402
from wmtp.data.template import format_prompt  # noqa: E402
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402

DEFAULT_ROWS = 1_000_000
DEFAULT_PROBLEMS = 13_000
MAX_DIFFICULTY = 28
CORRECT_SHARE = 0.4
TOKENIZER_SAMPLE_ROWS = 3000
TOKENIZER_VOCAB = 2048
CODE_LINES = 5000
"""Distinct generated code lines that solutions are assembled from."""

WORDS = ("the of a to and is in that for you given an array integers string each test case output print "
         "number minimum maximum sum query queries graph tree vertex edge path length first line contains "
         "two three n m k q x y such at most least modulo answer if not possible otherwise find").split()
SYLLABLES = "ka lo mi zu pe ra ti no be sh ch ax el qu vi or un de st gr".split()
MADE_UP_WORDS = 3000
IDENTIFIERS = "n m k i j a b c x y ans res cnt dp s t arr nums left right mid total best cur".split()
CALLS = ["int(input())", "list(map(int, input().split()))", "input().strip()", "len(a)", "range(n)",
         "max(ans, cur)", "min(best, x)", "sum(a)", "sorted(a)", "print(ans)", "dp[i - 1] + a[i]",
         "a[i] % MOD", "(x + y) // 2", "s.count('1')", "collections.Counter(a)"]
KEYWORDS = ["for {v} in range({e}):", "if {v} > {e}:", "while {v} < {e}:", "{v} = {e}", "{v} += {e}",
            "return {e}", "print({e})", "{v}.append({e})", "elif {v} == {e}:", "else:", "def solve({v}):"]


def lexicon(rng: random.Random) -> list[str]:
    """Common problem-statement words plus made-up names, for a realistic variety of pieces."""
    made_up = ["".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(MADE_UP_WORDS)]
    return WORDS * (MADE_UP_WORDS // len(WORDS)) + made_up


def random_text(rng: random.Random, words_pool: list[str], n_chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < n_chars:
        word = rng.choice(words_pool)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def code_lines(rng: random.Random, words_pool: list[str]) -> list[str]:
    lines = []
    for _ in range(CODE_LINES):
        template = rng.choice(KEYWORDS)
        name = rng.choice(IDENTIFIERS + [rng.choice(words_pool)])
        expr = rng.choice(CALLS + IDENTIFIERS + [name, str(rng.randint(0, 10**9))])
        lines.append("    " * rng.randint(0, 3) + template.format(v=name, e=expr))
    return lines


def generate(path: Path, n_rows: int, n_problems: int, seed: int) -> dict[str, int]:
    """Stream `n_rows` rows (plus malformed lines) into `path`; returns what was written."""
    rng = random.Random(seed)
    words_pool = lexicon(rng)
    lines = code_lines(rng, words_pool)
    rows_per_problem = max(1, n_rows // n_problems)
    bad_every = max(1, n_rows // 8)  # a handful of malformed lines spread over the file
    written = bad = 0
    with open(path, "w", encoding="utf-8") as f:
        problem = 0
        while written < n_rows:
            statement = random_text(rng, words_pool, rng.randint(200, 800))
            difficulty = rng.randint(0, MAX_DIFFICULTY)
            for _ in range(min(rows_per_problem, n_rows - written)):
                n_lines = rng.randint(8, 60)  # ~250 .. ~2000 characters
                row = make_row(instruction=statement, output="\n".join(rng.choices(lines, k=n_lines)),
                               task_id=f"codecontests/{problem}", is_correct=rng.random() < CORRECT_SHARE,
                               source="codecontests", difficulty=difficulty)
                f.write(json.dumps(row) + "\n")
                written += 1
                if written % bad_every == 0:
                    broken = [json.dumps(row)[:50], json.dumps({k: v for k, v in row.items() if k != "output"}),
                              json.dumps({**row, "is_correct": "true"})][bad % 3]
                    f.write(broken + "\n")
                    bad += 1
            problem += 1
    return {"rows": written, "malformed": bad, "problems": problem}


def training_sample(path: Path, n: int, every: int) -> list[str]:
    """Prompt + response text of `n` rows, one every `every` lines (so that many problems appear)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if number % every:
                continue
            try:
                row = json.loads(line)
                texts.append(format_prompt(row["instruction"], row["input"]) + row["output"])
            except (ValueError, KeyError):
                continue
            if len(texts) >= n:
                break
    return texts


def measure(jsonl: Path, tokenizer_path: Path, num_threads: int) -> dict[str, float]:
    """Build the index here (run in a fresh interpreter) and return the figures."""
    tokenizer = SentencePieceTokenizer(tokenizer_path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    index = build_index(jsonl, tokenizer, num_threads=num_threads)
    build_s = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    reloaded = load_or_build_index(jsonl, tokenizer)
    reload_s = time.perf_counter() - start
    assert len(reloaded) == len(index)
    npy, meta = index_paths(jsonl)
    return {"rows": len(index), "skipped": sum(index.skipped.values()), "build_s": build_s,
            "mean_tokens": float(index.rows["token_length"].mean()),
            "rows_per_s": len(index) / build_s, "source_mb": jsonl.stat().st_size / 2**20,
            "index_mb": (npy.stat().st_size + meta.stat().st_size) / 2**20, "npy_mb": npy.stat().st_size / 2**20,
            "rss_before_mb": rss_before, "peak_rss_mb": peak_rss, "reload_s": reload_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for train.jsonl and its index (default: a temp dir)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--problems", type=int, default=DEFAULT_PROBLEMS)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model to use instead of training one")
    parser.add_argument("--num-threads", type=int, default=0, help="sentencepiece threads (0: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", nargs=2, type=Path, metavar=("JSONL", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(*args.measure, args.num_threads)))
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_index_"))
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "train.jsonl"
    try:
        start = time.perf_counter()
        written = generate(jsonl, args.rows, args.problems, args.seed)
        print(f"generated {written['rows']} rows + {written['malformed']} malformed lines, "
              f"{written['problems']} problems, {jsonl.stat().st_size / 2**20:.0f} MB "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:
            start = time.perf_counter()
            tokenizer_path = train_sentencepiece(training_sample(jsonl, TOKENIZER_SAMPLE_ROWS, max(1, args.rows // TOKENIZER_SAMPLE_ROWS)), out / "tokenizer",
                                                 vocab_size=TOKENIZER_VOCAB)
            print(f"trained a {TOKENIZER_VOCAB}-piece tokenizer in {time.perf_counter() - start:.1f} s", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--num-threads", str(args.num_threads),
                               "--measure", str(jsonl), str(tokenizer_path)],
                              check=True, capture_output=True, text=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"rows indexed     {r['rows']:,} ({r['skipped']} bad rows skipped, "
              f"{r['mean_tokens']:.0f} tokens/row on average)\n"
              f"build wall time  {r['build_s']:.1f} s\n"
              f"rows/s           {r['rows_per_s']:,.0f} ({r['source_mb'] / r['build_s']:.1f} MB/s of JSONL)\n"
              f"index on disk    {r['index_mb']:.1f} MB (array {r['npy_mb']:.1f} MB, "
              f"{r['npy_mb'] * 2**20 / r['rows']:.0f} B/row)\n"
              f"peak RSS         {r['peak_rss_mb']:.0f} MB (interpreter + tokenizer before the build: "
              f"{r['rss_before_mb']:.0f} MB)\n"
              f"reload (fresh)   {r['reload_s'] * 1000:.0f} ms")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
