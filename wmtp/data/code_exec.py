"""Run a Python program (a solution followed by its tests) in a resource-limited subprocess.

The sandbox is basic, not a security boundary: ``python -I`` in a fresh temporary directory with a
minimal environment, its own session (so a timeout kills every process it started), rlimits on
memory, CPU time, file size and process count, stdin closed and output discarded.
"""

from __future__ import annotations

import enum
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

MEMORY_LIMIT_BYTES = 1 << 30
"""Address-space limit of the program (RLIMIT_AS)."""
FILE_SIZE_LIMIT_BYTES = 16 << 20
"""Largest file the program may write (RLIMIT_FSIZE)."""
MAX_USER_PROCESSES = 512
"""RLIMIT_NPROC. Linux counts every process and thread of the user (and ignores it for root), so this
only bounds fork bombs; a program that cannot fork because the user is already above it just fails."""
CPU_GRACE_S = 1
"""CPU seconds allowed beyond the wall-clock timeout, so the timeout, not SIGXCPU, normally fires."""
PROGRAM_NAME = "program.py"
# Threaded BLAS pools would spawn threads the process limit and memory limit do not expect.
SANDBOX_ENV = {
    "PATH": os.defpath,
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class Outcome(enum.Enum):
    """How a program run ended."""

    PASSED = "passed"
    FAILED = "failed"
    TIMEOUT = "timeout"


def build_program(code: str, tests: Sequence[str], setup_code: str = "") -> str:
    """Solution, then the setup code (MBPP's may use the solution's classes), then the tests."""
    return "\n\n".join([code, setup_code, "\n".join(tests)]) + "\n"


def _limit_resources(cpu_seconds: int) -> None:
    """Runs in the child between fork and exec. preexec_fn is not fork-safe in general when other
    threads exist (``run_many``), so this stays a handful of setrlimit calls: no imports, no locks."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard_nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    if hard_nproc == resource.RLIM_INFINITY or hard_nproc >= MAX_USER_PROCESSES:
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_USER_PROCESSES, MAX_USER_PROCESSES))


def _kill_group(pgid: int) -> None:
    # The program may have left children behind even when it exited by itself.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute(program: str, *, timeout_s: float = 5.0) -> Outcome:
    """Run ``program`` with ``python -I`` in a fresh directory; PASSED iff it exits 0 in time."""
    cpu_seconds = math.ceil(timeout_s) + CPU_GRACE_S
    with tempfile.TemporaryDirectory(prefix="wmtp-exec-", ignore_cleanup_errors=True) as workdir:
        path = os.path.join(workdir, PROGRAM_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", PROGRAM_NAME],
            cwd=workdir,
            env={**SANDBOX_ENV, "HOME": workdir, "TMPDIR": workdir},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _limit_resources(cpu_seconds),
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return Outcome.TIMEOUT
        finally:
            _kill_group(proc.pid)
            proc.wait()
    return Outcome.PASSED if returncode == 0 else Outcome.FAILED


def run_tests(program: str, *, timeout_s: float = 5.0) -> bool:
    """True iff ``program`` (solution + tests) exits with status 0 within ``timeout_s``."""
    return execute(program, timeout_s=timeout_s) is Outcome.PASSED


def execute_many(programs: Sequence[str], *, timeout_s: float = 5.0, workers: int = 2) -> list[Outcome]:
    """``execute`` over ``programs`` with ``workers`` concurrent subprocesses, in input order."""
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: execute(p, timeout_s=timeout_s), programs))


def run_many(programs: Sequence[str], *, timeout_s: float = 5.0, workers: int = 2) -> list[bool]:
    """``run_tests`` over ``programs`` with ``workers`` concurrent subprocesses, in input order."""
    return [o is Outcome.PASSED for o in execute_many(programs, timeout_s=timeout_s, workers=workers)]
