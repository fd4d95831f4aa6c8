"""Convert the published CodeContests parquet shards into processed JSONL rows (wmtp/data/codecontests.py).

    python scripts/prepare_codecontests.py --src code_contests/ --out data/codecontests \\
        --tokenizer artifacts/llama/tokenizer.model

--src holds (or holds data/ with) train-*-of-*.parquet, valid-*.parquet and test-*.parquet.
OUT/{train,valid,test}.jsonl      Python 2/3 solutions, correct and incorrect, one row each
OUT/{split}_tests.jsonl           each problem's tests, limits and I/O files, keyed by problem name
OUT/{split}.jsonl.index.*         the rows' sidecar index (with --tokenizer), as training builds it
OUT/stats.json                    counts per split (also printed as a table)

Rows longer than --token-limit tokens (BOS + prompt + response + EOS with --tokenizer) are dropped;
without --tokenizer no length filter runs and no token lengths are reported. Every shard's columns
are checked first: a missing column or one of another type stops the run, naming file and column.
OUT is written atomically; an existing OUT is kept unless --force.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.data.codecontests import DEFAULT_TOKEN_LIMIT, SPLITS, SchemaError, convert, format_table  # noqa: E402
from wmtp.data.tokenizer import load_tokenizer  # noqa: E402
from wmtp.logs import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="folder of the published parquet shards")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.model or tokenizer.json (or its folder) for the token limit; none: no length filter",
    )
    parser.add_argument("--token-limit", type=int, default=DEFAULT_TOKEN_LIMIT)
    parser.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated subset of {','.join(SPLITS)}")
    parser.add_argument("--threads", type=int, default=-1, help="tokeniser threads (-1: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    splits = [s for s in args.splits.split(",") if s]
    if not splits or any(s not in SPLITS for s in splits):
        parser.error(f"--splits must name some of {', '.join(SPLITS)}, got {args.splits!r}")
    if args.token_limit < 1:
        parser.error(f"--token-limit must be >= 1, got {args.token_limit}")
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} already exists (--force replaces it)")
    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
        report = convert(
            args.src,
            args.out,
            tokenizer=tokenizer,
            token_limit=args.token_limit,
            splits=splits,
            overwrite=args.force,
            progress=False if args.no_progress else None,
            num_threads=args.threads,
        )
    except (SchemaError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    if tokenizer is None:
        print("(no --tokenizer: no token-length filter, no token lengths)")
    print(f"[codecontests] wrote {args.out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    setup_logging()
    main()
