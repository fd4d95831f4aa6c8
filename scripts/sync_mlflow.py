"""Send a run folder's metrics, params, artifacts and status to MLflow: what a run could not send
while its tracking server was down (each value once; nothing MLflow already has is sent again).

    python scripts/sync_mlflow.py outputs/verifiable_a100 [RUN_DIR ...]

The tracking URI is the one the run used (mlflow_state.json); credentials come from MLflow's own
variables (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN). A folder
whose process died without closing its run (kill -9) is marked KILLED; resuming it marks it RUNNING.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.logs import setup_logging  # noqa: E402
from wmtp.training.metrics import sync_folder  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    failed = 0
    for run in args.runs:
        try:
            counts = sync_folder(run)
        except Exception as exc:  # noqa: BLE001 - report each folder and go on
            print(f"{run}: not synced: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"{run}: sent {counts['values']} metric values, {counts['params']} params, "
            f"{counts['artifacts']} artifacts ({counts['skipped']} values MLflow had already)"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    setup_logging()
    main()
