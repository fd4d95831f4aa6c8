"""Report n-gram overlap between training data and the evaluation problems; optionally drop it.

    python scripts/check_contamination.py --train data/codecontests/train.jsonl \\
        --humaneval HumanEval.jsonl.gz --mbpp mbpp.jsonl --report data/contamination.json
    python scripts/check_contamination.py --train data/mbpp/mbpp_train.jsonl --mbpp mbpp.jsonl \\
        --report report.json --drop-to data/clean

--train: processed JSONL files. --humaneval / --mbpp: the evaluation files as evaluation reads them
(MBPP: its test split, task ids --mbpp-task-ids, 11-510 by default). A training problem is
contaminated when its rows share at least --min-shared distinct --n-grams of word tokens with one
evaluation problem (wmtp/data/contamination.py). The report (JSON, and a summary printed) names
each contaminated training problem, the evaluation problems and an example n-gram. --drop-to DIR
writes DIR/<name> for each training file without the rows of contaminated problems.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.atomic import atomic_write_text  # noqa: E402
from wmtp.data.contamination import DEFAULT_N, OverlapChecker, check_files, drop_contaminated  # noqa: E402
from wmtp.data.problems import ProblemFileError, load_humaneval, load_mbpp  # noqa: E402
from wmtp.logs import setup_logging  # noqa: E402

EXAMPLES_SHOWN = 10


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="processed training JSONL file(s)")
    parser.add_argument("--humaneval", type=Path, help="HumanEval.jsonl(.gz)")
    parser.add_argument("--mbpp", type=Path, help="MBPP JSON / JSONL")
    parser.add_argument("--mbpp-task-ids", type=int, nargs=2, default=[11, 510], metavar=("FIRST", "LAST"))
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="n-gram length in word tokens")
    parser.add_argument("--min-shared", type=int, default=1, help="shared n-grams that make a problem contaminated")
    parser.add_argument("--report", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--drop-to", type=Path, help="folder for copies of --train without contaminated problems")
    args = parser.parse_args(argv)
    if args.humaneval is None and args.mbpp is None:
        parser.error("give --humaneval and/or --mbpp")
    if args.n < 1 or args.min_shared < 1:
        parser.error("--n and --min-shared must be >= 1")
    if args.drop_to is not None and any((args.drop_to / p.name).resolve() == p.resolve() for p in args.train):
        parser.error("--drop-to must not be the folder of a --train file")
    t0 = time.perf_counter()
    try:
        problems = load_humaneval(args.humaneval) if args.humaneval else []
        first, last = args.mbpp_task_ids
        problems += load_mbpp(args.mbpp, task_ids=range(first, last + 1)) if args.mbpp else []
        checker = OverlapChecker(problems, n=args.n, min_shared=args.min_shared)
        bad_lines = check_files(checker, args.train)
    except (ProblemFileError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    report = {
        **checker.report(),
        "train_files": [str(p) for p in args.train],
        "bad_lines": bad_lines,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.drop_to is not None:
        args.drop_to.mkdir(parents=True, exist_ok=True)
        contaminated = {o["task_id"] for o in report["overlaps"]}
        report["dropped"] = {str(p): drop_contaminated(p, args.drop_to / p.name, contaminated) for p in args.train}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.report, json.dumps(report, indent=1) + "\n")
    print(
        f"[contamination] {report['train_problems']} training problems ({report['train_rows']} rows) against "
        f"{report['eval_problems']} evaluation problems, {args.n}-grams: {report['contaminated_problems']} "
        f"contaminated ({report['contaminated_rows']} rows), {len(report['eval_problems_hit'])} evaluation "
        f"problems hit; {bad_lines} lines that are not rows; {report['seconds']}s"
    )
    for o in report["overlaps"][:EXAMPLES_SHOWN]:
        print(f'  {o["task_id"]}: {o["shared"]} shared with {", ".join(o["eval_task_ids"][:5])}: "{o["example"]}"')
    for path, counts in report.get("dropped", {}).items():
        print(f"  {path}: kept {counts['kept']} rows, dropped {counts['dropped']} -> {args.drop_to}")
    print(f"[contamination] {args.report}")
    return report


if __name__ == "__main__":
    setup_logging()
    main()
