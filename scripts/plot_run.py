"""PNG report of training runs: the curves of metrics.jsonl, a panel per quantity (wmtp/training/plots.py).

    python scripts/plot_run.py outputs/verifiable_tiny                   # -> outputs/verifiable_tiny/report.png
    python scripts/plot_run.py outputs/demo/baseline outputs/demo/verifiable --out compare.png

One run folder: RUN_DIR/report.png (unless --out). Several: one figure with the runs overlaid (a colour
per run), written to --out (default runs_report.png in the current folder). Prints the path written.
Needs matplotlib, the optional extra "plots": pip install 'wmtp[plots]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.layout import METRICS_FILE, REPORT_NAME  # noqa: E402
from wmtp.logs import setup_logging  # noqa: E402
from wmtp.training.plots import PlotsUnavailable, plot_runs  # noqa: E402

MULTI_DEFAULT = "runs_report.png"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"PNG to write (default: RUN_DIR/{REPORT_NAME} for one run, ./{MULTI_DEFAULT} for several)",
    )
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / METRICS_FILE).is_file()]
    if missing:
        parser.error(f"no {METRICS_FILE} in: {', '.join(missing)}")
    out = args.out or (args.runs[0] / REPORT_NAME if len(args.runs) == 1 else Path(MULTI_DEFAULT))
    try:
        path = plot_runs(args.runs, out)
    except PlotsUnavailable as exc:
        sys.exit(f"error: {exc}")
    print(path)


if __name__ == "__main__":
    setup_logging()
    main()
