"""Execution throughput: HumanEval's canonical solutions through the sandbox and through plain
subprocesses, side by side.

    python benchmarks/bench_exec.py [--problems HumanEval.jsonl.gz] [--repeats 3]
    git show REV:wmtp/eval/sandbox.py > /tmp/old_sandbox.py
    python benchmarks/bench_exec.py --baseline /tmp/old_sandbox.py   # adds that sandbox's rows

Each program is ``prompt + canonical_solution + "\\n" + test + "\\ncheck(entry_point)"``; every one
must pass. Rows: ``run_programs`` with 2 workers and with the CPU count (and the same for the
``--baseline`` sandbox module, loaded from its file); a plain ``subprocess.run([sys.executable,
path])`` per program (no sandbox), sequentially and from a thread pool of the CPU count; and the
latter with the sandbox's interpreter and flags, which shows what the sandbox itself adds. Prints a
markdown table; the rows run in turn, ``--repeats`` rounds, and each reports its best round (a
shared machine only ever slows a run down; taking turns exposes every row to the same load).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import importlib.util
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


def measure(run: Callable[[], list[bool]]) -> float:
    """Wall time of one run; exits if any program failed."""
    start = time.perf_counter()
    passed = run()
    seconds = time.perf_counter() - start
    if not all(passed):
        sys.exit(f"{passed.count(False)} of {len(passed)} canonical solutions failed")
    return seconds


def load_sandbox(path: Path):
    """A sandbox module from its file (another revision's wmtp/eval/sandbox.py: standard library only)."""
    spec = importlib.util.spec_from_file_location("baseline_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=Path, default=DEFAULT_PROBLEMS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another sandbox.py whose run_programs is measured too")
    args = parser.parse_args()
    if not args.problems.exists():
        sys.exit(f"HumanEval not found at {args.problems} (pass --problems PATH)")
    programs = humaneval_programs(args.problems)
    cpus = os.cpu_count() or 1
    protections = sandbox_protections()
    rows = [
        (
            f"run_programs, {n} workers",
            n,
            lambda n=n: [r.passed for r in run_programs(programs, workers=n, timeout_s=TIMEOUT_S)],
        )
        for n in sorted({2, cpus})
    ]
    if args.baseline:
        baseline = load_sandbox(args.baseline)
        active = ", ".join(k for k, v in baseline.sandbox_protections().items() if v)
        print(f"baseline {args.baseline}: active {active}")
        rows += [
            (
                f"baseline run_programs, {n} workers",
                n,
                lambda n=n: [r.passed for r in baseline.run_programs(programs, workers=n, timeout_s=TIMEOUT_S)],
            )
            for n in sorted({2, cpus})
        ]
    rows += [
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
    best = [float("inf")] * len(rows)
    for _ in range(args.repeats):
        for i, (_, _, run) in enumerate(rows):
            best[i] = min(best[i], measure(run))
    print("| how | workers | seconds | programs/s |")
    print("|---|---:|---:|---:|")
    for (name, workers, _), seconds in zip(rows, best):
        print(f"| {name} | {workers} | {seconds:.2f} | {len(programs) / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
