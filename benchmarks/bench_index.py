"""Benchmark the sidecar row index at CodeContests scale on a generated corpus.

    python benchmarks/bench_index.py                          # 3.7M rows in a temp dir, removed afterwards
    python benchmarks/bench_index.py --rows 200000 --out /data/bench --tokenizer path/to/tokenizer.model

Writes `<out>/train.jsonl`: rows grouped by problem as processed CodeContests is (13,328 problems,
47.5% correct as in the published set's 1,754,404 of 3,691,981 Python rows, statements of 500 to
2,500 characters, solutions of 5 to 60 lines, a few malformed lines), trains a small tokenizer on
a sample unless --tokenizer is given, then in the same run, each in a fresh interpreter so that
its peak RSS is its own: the single-process build (workers=1: one reading, parsing process, the
tokeniser threaded over every core) and the default build (one worker process per core). Then,
from the saved index: load time, a sampler plan of 200K rows (construction + draws) for each
sampler, and 10K rows chosen at random read from the file (with the page cache emptied first when
run as root, then warm). Prints a table and writes the figures as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
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

from wmtp.data.index import available_cores, build_index, index_paths, load_or_build_index  # noqa: E402
from wmtp.data.rows import make_row  # noqa: E402
from wmtp.data.template import format_prompt  # noqa: E402
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402

DEFAULT_ROWS = 3_700_000
DEFAULT_PROBLEMS = 13_328
"""CodeContests' training problems."""
CORRECT_SHARE = 1_754_404 / 3_691_981
MAX_DIFFICULTY = 28
STATEMENT_CHARS = (500, 2500)
SOLUTION_LINES = (5, 60)
TOKENIZER_SAMPLE_ROWS = 3000
TOKENIZER_VOCAB = 2048
CODE_LINES = 5000
"""Distinct generated code lines that solutions are assembled from."""
PLAN_ROWS = 200_000
READ_ROWS = 10_000
MALFORMED_LINES = 8
DROP_CACHES = "/proc/sys/vm/drop_caches"

WORDS = (
    "the of a to and is in that for you given an array integers string each test case output print "
    "number minimum maximum sum query queries graph tree vertex edge path length first line contains "
    "two three n m k q x y such at most least modulo answer if not possible otherwise find"
).split()
SYLLABLES = "ka lo mi zu pe ra ti no be sh ch ax el qu vi or un de st gr".split()
MADE_UP_WORDS = 3000
IDENTIFIERS = "n m k i j a b c x y ans res cnt dp s t arr nums left right mid total best cur".split()
CALLS = [
    "int(input())",
    "list(map(int, input().split()))",
    "input().strip()",
    "len(a)",
    "range(n)",
    "max(ans, cur)",
    "min(best, x)",
    "sum(a)",
    "sorted(a)",
    "print(ans)",
    "dp[i - 1] + a[i]",
    "a[i] % MOD",
    "(x + y) // 2",
    "s.count('1')",
    "collections.Counter(a)",
]
KEYWORDS = [
    "for {v} in range({e}):",
    "if {v} > {e}:",
    "while {v} < {e}:",
    "{v} = {e}",
    "{v} += {e}",
    "return {e}",
    "print({e})",
    "{v}.append({e})",
    "elif {v} == {e}:",
    "else:",
    "def solve({v}):",
]


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
    bad_every = max(1, n_rows // MALFORMED_LINES)
    written = bad = problem = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_rows:
            statement = random_text(rng, words_pool, rng.randint(*STATEMENT_CHARS))
            difficulty = rng.randint(0, MAX_DIFFICULTY)
            for _ in range(min(rows_per_problem, n_rows - written)):
                code = "\n".join(rng.choices(lines, k=rng.randint(*SOLUTION_LINES)))
                row = make_row(
                    instruction=statement,
                    output=code,
                    task_id=f"{problem}_A. Problem {problem}",
                    is_correct=rng.random() < CORRECT_SHARE,
                    source="codeforces",
                    difficulty=difficulty,
                    dataset="codecontests",
                    language="python3",
                )
                f.write(json.dumps(row) + "\n")
                written += 1
                if written % bad_every == 0:
                    broken = [
                        json.dumps(row)[:50],
                        json.dumps({k: v for k, v in row.items() if k != "output"}),
                        json.dumps({**row, "is_correct": "true"}),
                    ][bad % 3]
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


def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def measure_build(jsonl: Path, tokenizer_path: Path, workers: int) -> dict[str, float]:
    """Build the index here (run in a fresh interpreter) and return the figures."""
    tokenizer = SentencePieceTokenizer(tokenizer_path)
    rss_before = _peak_rss_mb(resource.RUSAGE_SELF)
    start = time.perf_counter()
    index = build_index(jsonl, tokenizer, workers=workers)
    build_s = time.perf_counter() - start
    npz, meta = index_paths(jsonl)
    return {
        "rows": len(index),
        "skipped": sum(index.skipped.values()),
        "problems": len(index.problems),
        "build_s": build_s,
        "mean_tokens": float(index.rows["token_length"].mean()),
        "index_bytes": npz.stat().st_size + meta.stat().st_size,
        "npz_bytes": npz.stat().st_size,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(resource.RUSAGE_SELF),
        "workers_peak_rss_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN),
    }


def measure_use(jsonl: Path, tokenizer_path: Path, seed: int) -> dict[str, float]:
    """Load the saved index, plan 200K rows with each sampler, read 10K random rows (fresh interpreter)."""
    import numpy as np

    from wmtp.data.samplers import BalancedSampler, CorrectOnlySampler, CurriculumSampler

    tokenizer = SentencePieceTokenizer(tokenizer_path)
    start = time.perf_counter()
    index = load_or_build_index(jsonl, tokenizer, workers=1)
    out: dict[str, float] = {"load_s": time.perf_counter() - start}
    samplers = {
        "correct_only": lambda: CorrectOnlySampler(index, seed=seed, max_seq_len=2048),
        "balanced": lambda: BalancedSampler(index, seed=seed, max_seq_len=2048),
        "curriculum": lambda: CurriculumSampler(
            index,
            seed=seed,
            max_seq_len=2048,
            bin_edges=[0, 7, 14, 21],
            schedule=[(0.0, [4, 3, 2, 1]), (0.5, [1, 2, 3, 4])],
            total_samples=4 * PLAN_ROWS,
        ),
    }
    for name, make in samplers.items():
        start = time.perf_counter()
        ids = make().next_ids(PLAN_ROWS)
        out[f"plan_{name}_s"] = time.perf_counter() - start
        assert len(ids) == PLAN_ROWS
    chosen = np.random.default_rng(seed).choice(len(index), READ_ROWS, replace=False)
    start = time.perf_counter()
    rows = index.read_rows(chosen)
    out["read_s"] = time.perf_counter() - start
    assert len(rows) == READ_ROWS
    return out


def _drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that the next reads come from the disk."""
    try:
        os.sync()
        Path(DROP_CACHES).write_text("3\n")
    except OSError:
        return False
    return True


def _fresh(*args: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for train.jsonl and its index (default: a temp dir)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--problems", type=int, default=DEFAULT_PROBLEMS)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model to use instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--build", nargs=3, metavar=("JSONL", "TOKENIZER", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--use", nargs=2, metavar=("JSONL", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(json.dumps(measure_build(Path(args.build[0]), Path(args.build[1]), int(args.build[2]))))
        return
    if args.use:
        print(json.dumps(measure_use(Path(args.use[0]), Path(args.use[1]), args.seed)))
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_index_"))
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "train.jsonl"
    try:
        start = time.perf_counter()
        written = generate(jsonl, args.rows, args.problems, args.seed)
        print(
            f"generated {written['rows']:,} rows + {written['malformed']} malformed lines, "
            f"{written['problems']:,} problems, {jsonl.stat().st_size / 2**20:,.0f} MB "
            f"in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:
            start = time.perf_counter()
            sample = training_sample(jsonl, TOKENIZER_SAMPLE_ROWS, max(1, args.rows // TOKENIZER_SAMPLE_ROWS))
            tokenizer_path = train_sentencepiece(sample, out / "tokenizer", vocab_size=TOKENIZER_VOCAB)
            print(f"trained a {TOKENIZER_VOCAB}-piece tokenizer in {time.perf_counter() - start:.1f} s", flush=True)
        builds = {}
        for name, workers in (("single process", 1), ("worker processes", 0)):
            builds[name] = _fresh("--build", str(jsonl), str(tokenizer_path), str(workers))
            print(f"{name}: {builds[name]['build_s']:.1f} s", flush=True)
        single, parallel = builds["single process"], builds["worker processes"]
        assert single["rows"] == parallel["rows"] and single["index_bytes"] == parallel["index_bytes"]
        cold = _drop_page_cache() and _fresh("--use", str(jsonl), str(tokenizer_path), "--seed", str(args.seed))
        use = _fresh("--use", str(jsonl), str(tokenizer_path), "--seed", str(args.seed))
        rows = parallel["rows"]
        print(
            f"\n{rows:,} rows indexed ({parallel['skipped']} bad rows skipped, {parallel['problems']:,} problems, "
            f"{parallel['mean_tokens']:.0f} tokens/row on average), {jsonl.stat().st_size / 2**20:,.0f} MB "
            f"of JSONL, {available_cores()} cores"
        )
        print("| build | wall time | s per 1M rows | rows/s | peak RSS (main) | peak RSS (a worker) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in builds.items():
            print(
                f"| {name} | {r['build_s']:.1f} s | {r['build_s'] * 1e6 / rows:.1f} | {rows / r['build_s']:,.0f} | "
                f"{r['peak_rss_mb']:.0f} MB | {r['workers_peak_rss_mb']:.0f} MB |"
            )
        print(
            f"speed-up {single['build_s'] / parallel['build_s']:.2f}x; index on disk "
            f"{parallel['index_bytes'] / 2**20:.1f} MB ({parallel['npz_bytes'] / rows:.2f} B/row in the array file, "
            f"{parallel['index_bytes'] / rows:.2f} B/row with the metadata)"
        )
        print(
            f"load {use['load_s'] * 1000:.0f} ms; plan of {PLAN_ROWS:,} rows: "
            + ", ".join(f"{k[5:-2]} {v * 1000:.0f} ms" for k, v in use.items() if k.startswith("plan_"))
            + f"; {READ_ROWS:,} random rows read in {use['read_s'] * 1000:.0f} ms (page cache warm), "
            + (f"{cold['read_s'] * 1000:.0f} ms (cold)" if cold else "cold not measured (needs root)")
        )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "rows": rows,
                        "jsonl_bytes": jsonl.stat().st_size,
                        "cores": available_cores(),
                        "builds": builds,
                        "use": use,
                        "use_cold_cache": cold or None,
                    },
                    indent=1,
                )
            )
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
