"""Execution throughput: HumanEval's canonical solutions through the sandbox and through plain
subprocesses, side by side.

    python benchmarks/bench_exec.py [--problems HumanEval.jsonl.gz] [--repeats 3]

Each program is ``prompt + canonical_solution + "\\n" + test + "\\ncheck(entry_point)"``; every one
must pass. Rows: ``run_programs`` with 2 workers and with the CPU count; a plain
``subprocess.run([sys.executable, path])`` per program (no sandbox), sequentially and from a thread
pool of the CPU count; and the latter with the sandbox's interpreter and flags, which shows what the
sandbox itself adds. Prints a markdown table; each row reports the best of ``--repeats`` runs (a
shared machine only ever slows a run down).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import cpu_model  # noqa: E402

from wmtp.eval.sandbox import run_programs, sandbox_protections, sandbox_python  # noqa: E402

DEFAULT_PROBLEMS = ROOT.parent / "shared" / "data" / "HumanEval.jsonl.gz"
TIMEOUT_S = 10.0


def humaneval_programs(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [
        p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems
    ]


def plain(programs: list[str], workers: int, command: Sequence[str] = (sys.executable,)) -> list[bool]:
    """One ``subprocess.run([*command, path])`` per program, ``workers`` at a time."""
    with tempfile.TemporaryDirectory(prefix="bench-exec-") as tmp:
        paths = []
        for i, program in enumerate(programs):
            paths.append(os.path.join(tmp, f"p{i}.py"))
            Path(paths[-1]).write_text(program, encoding="utf-8")

        def run(path: str) -> bool:
            return (
                subprocess.run(
                    [*command, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=TIMEOUT_S
                ).returncode
                == 0
            )

        if workers == 1:
            return [run(p) for p in paths]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(run, paths))


def measure(run: Callable[[], list[bool]], repeats: int) -> float:
    """Best wall time of ``repeats`` runs; exits if any program failed."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        passed = run()
        best = min(best, time.perf_counter() - start)
        if not all(passed):
            sys.exit(f"{passed.count(False)} of {len(passed)} canonical solutions failed")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=Path, default=DEFAULT_PROBLEMS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.problems.exists():
        sys.exit(f"HumanEval not found at {args.problems} (pass --problems PATH)")
    programs = humaneval_programs(args.problems)
    cpus = os.cpu_count() or 1
    protections = sandbox_protections()
    rows = [
        (
            "run_programs, 2 workers",
            2,
            lambda: [r.passed for r in run_programs(programs, workers=2, timeout_s=TIMEOUT_S)],
        ),
        (
            f"run_programs, {cpus} workers",
            cpus,
            lambda: [r.passed for r in run_programs(programs, workers=cpus, timeout_s=TIMEOUT_S)],
        ),
        ("plain subprocess.run, sequential", 1, lambda: plain(programs, 1)),
        (f"plain subprocess.run, {cpus} threads", cpus, lambda: plain(programs, cpus)),
        (
            f"plain, sandbox's `python -I -S`, {cpus} threads",
            cpus,
            lambda: plain(programs, cpus, (sandbox_python(), "-I", "-S")),
        ),
    ]
    print(
        f"{len(programs)} HumanEval canonical solutions; {cpu_model()}, {cpus} CPUs; "
        f"{dt.datetime.now().isoformat(timespec='seconds')}; load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    print(f"sandbox interpreter: {sandbox_python()}; plain: {sys.executable}")
    print("active: " + ", ".join(k for k, v in protections.items() if v))
    print()
    print("| how | workers | seconds | programs/s |")
    print("|---|---:|---:|---:|")
    for name, workers, run in rows:
        seconds = measure(run, args.repeats)
        print(f"| {name} | {workers} | {seconds:.2f} | {len(programs) / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
