"""Convert MBPP and HumanEval, as published, into processed JSONL rows (the training row schema).

    python scripts/prepare_mbpp_humaneval.py --mbpp mbpp.jsonl --humaneval HumanEval.jsonl.gz --out data/eval_sets
    python scripts/prepare_mbpp_humaneval.py --mbpp mbpp_train.json mbpp_validation.json --out data/mbpp \\
        --incorrect-per-problem 1

--mbpp takes google-research's mbpp.jsonl (all 974 problems) or split files (JSON lists); problems
are split by task id as the MBPP paper does: OUT/mbpp_{prompt,test,validation,train}.jsonl (each
split that has problems). --humaneval writes OUT/humaneval_test.jsonl. Rows keep their tests, setup
code and (HumanEval) prompt and entry point in metadata, and their instruction is evaluation's
alpaca instruction. --incorrect-per-problem N adds up to N incorrect MBPP rows per problem:
single-site mutants of the reference that fail its tests in the sandbox. OUT/stats.json (also
printed) counts rows per file. OUT is written atomically; an existing OUT is kept unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.atomic import atomic_directory  # noqa: E402
from wmtp.data.humaneval import humaneval_rows  # noqa: E402
from wmtp.data.mbpp import MBPP_SPLITS, mbpp_rows, mbpp_split  # noqa: E402
from wmtp.data.problems import ProblemFileError, load_mbpp  # noqa: E402
from wmtp.eval.mutants import mbpp_rows_with_incorrect  # noqa: E402
from wmtp.logs import setup_logging  # noqa: E402


def _write_jsonl(path: Path, rows: list[dict]) -> dict[str, int]:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    correct = sum(r["is_correct"] for r in rows)
    return {
        "rows": len(rows),
        "problems": len({r["task_id"] for r in rows}),
        "correct": correct,
        "incorrect": len(rows) - correct,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbpp", type=Path, nargs="*", default=[], help="MBPP file(s): mbpp.jsonl or split JSONs")
    parser.add_argument("--humaneval", type=Path, default=None, help="HumanEval.jsonl(.gz)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--incorrect-per-problem",
        type=int,
        default=0,
        help="incorrect MBPP rows per problem (mutants that fail its tests; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutants' order")
    parser.add_argument("--workers", type=int, default=2, help="sandbox programs run at once")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if not args.mbpp and args.humaneval is None:
        parser.error("give --mbpp and/or --humaneval")
    if args.incorrect_per_problem < 0:
        parser.error(f"--incorrect-per-problem must be >= 0, got {args.incorrect_per_problem}")
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} already exists (--force replaces it)")
    t0 = time.perf_counter()
    try:
        problems = [p for path in args.mbpp for p in load_mbpp(path, task_ids=None)]
        seen: set[str] = set()
        for p in problems:
            if p.task_id in seen:
                raise ProblemFileError(f"{p.task_id} appears in more than one --mbpp file")
            seen.add(p.task_id)
        he_rows = humaneval_rows(args.humaneval) if args.humaneval is not None else []
    except (ProblemFileError, OSError) as exc:
        sys.exit(f"error: {exc}")
    report: dict[str, dict] = {}
    with atomic_directory(args.out, overwrite=args.force) as tmp:
        for split in MBPP_SPLITS:
            chosen = [p for p in problems if mbpp_split(p.task_id) == split]
            if not chosen:
                continue
            if args.incorrect_per_problem > 0:
                rows, stats = mbpp_rows_with_incorrect(
                    chosen, incorrect_per_problem=args.incorrect_per_problem, seed=args.seed, workers=args.workers
                )
            else:
                rows, stats = mbpp_rows(chosen)
            report[f"mbpp_{split}.jsonl"] = {**_write_jsonl(tmp / f"mbpp_{split}.jsonl", rows), "build": stats}
        if he_rows:
            report["humaneval_test.jsonl"] = _write_jsonl(tmp / "humaneval_test.jsonl", he_rows)
        (tmp / "stats.json").write_text(json.dumps(report, indent=1) + "\n")
    print("| file | problems | rows | correct | incorrect |\n|---|---:|---:|---:|---:|")
    for name, r in report.items():
        print(f"| {name} | {r['problems']} | {r['rows']} | {r['correct']} | {r['incorrect']} |")
    print(f"[prepare] wrote {args.out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    setup_logging()
    main()
