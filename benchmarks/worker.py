"""Runs one benchmark case in a fresh process: `python benchmarks/worker.py SPEC.json` (see harness.py)."""

import sys
from pathlib import Path

# The project root first, so that this checkout's `wmtp` is the one imported.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from harness import worker_main  # noqa: E402

if __name__ == "__main__":
    worker_main(sys.argv[1])
