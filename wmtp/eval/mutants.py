"""MBPP rows with incorrect solutions that execution proves wrong.

Incorrect rows are single-site mutants of the reference (``wmtp.data.mutate``) that fail the
problem's tests in the sandbox, judged by the same rule as evaluation (``wmtp.eval.problems``
builds the program; it passes iff its last assert completed); a mutant that times out is not kept,
because a timeout on a busy machine does not prove the program wrong. Problems whose reference does
not pass are dropped and counted.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

from wmtp.data.mbpp import mbpp_number, mbpp_rows
from wmtp.data.mutate import mutants
from wmtp.data.problems import Problem, load_mbpp
from wmtp.eval.problems import build_program
from wmtp.eval.sandbox import run_programs

MUTANT_TIMEOUT_S = 1.0
"""Cap on a mutant's run: references finish in milliseconds and timed-out mutants are dropped anyway."""
CANDIDATES_PER_INCORRECT = 8
"""Mutants generated per wanted incorrect row; some survive the tests or loop forever."""


def _problem_seed(seed: int, task_id: int) -> int:
    # Per-problem mutant order that does not change when max_problems or the problem order changes.
    return zlib.crc32(f"{seed}:{task_id}".encode())


def mbpp_rows_with_incorrect(
    problems: str | os.PathLike[str] | Sequence[Problem],
    *,
    max_problems: int | None = None,
    incorrect_per_problem: int = 1,
    seed: int = 0,
    timeout_s: float = 5.0,
    workers: int = 2,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``wmtp.data.mbpp.mbpp_rows`` of the problems whose reference passes its tests, each with up
    to ``incorrect_per_problem`` mutants that fail them. Stats: problems, correct_rows,
    incorrect_rows, skipped (problems dropped, by reason), problems_short_of_incorrect,
    mutants_tested, mutants_passed, mutants_timed_out, seconds."""
    start = time.perf_counter()
    if isinstance(problems, (str, os.PathLike)):
        problems = load_mbpp(problems, task_ids=None)
    problems = list(problems)[:max_problems]
    stats: dict[str, Any] = {
        "skipped": {"reference_failed": 0, "reference_timed_out": 0},
        "mutants_tested": 0,
        "mutants_passed": 0,
        "mutants_timed_out": 0,
    }
    results = run_programs([build_program(p, p.reference) for p in problems], timeout_s=timeout_s, workers=workers)
    for result in results:
        if result.status == "timeout":
            stats["skipped"]["reference_timed_out"] += 1
        elif not result.passed:
            stats["skipped"]["reference_failed"] += 1
    kept = [p for p, r in zip(problems, results) if r.passed]
    wrong = _failing_mutants(kept, incorrect_per_problem, seed, timeout_s, workers, stats)
    stats["problems_short_of_incorrect"] = sum(len(m) < incorrect_per_problem for m in wrong)
    rows, row_stats = mbpp_rows(kept, incorrect={p.task_id: m for p, m in zip(kept, wrong)})
    stats.update(row_stats, problems=len(problems), seconds=round(time.perf_counter() - start, 2))
    return rows, stats


def _failing_mutants(
    problems: list[Problem], wanted: int, seed: int, timeout_s: float, workers: int, stats: dict[str, Any]
) -> list[list[str]]:
    """Per problem, the first ``wanted`` mutants (in seeded order) that fail the tests. Each round
    tests, for all problems at once, as many candidates as each still needs: most mutants fail, so
    few more programs run than are kept, and the worker pool stays busy."""
    mutant_timeout_s = min(timeout_s, MUTANT_TIMEOUT_S)
    pending = [
        mutants(p.reference, seed=_problem_seed(seed, mbpp_number(p.task_id)), limit=CANDIDATES_PER_INCORRECT * wanted)
        for p in problems
    ]
    kept: list[list[str]] = [[] for _ in problems]
    while True:
        batch = []  # (problem index, mutant)
        for i, candidates in enumerate(pending):
            need = wanted - len(kept[i])
            if need > 0 and candidates:
                take, pending[i] = candidates[:need], candidates[need:]
                batch.extend((i, m) for m in take)
        if not batch:
            return kept
        programs = [build_program(problems[i], m) for i, m in batch]
        results = run_programs(programs, timeout_s=mutant_timeout_s, workers=workers)
        stats["mutants_tested"] += len(batch)
        for (i, mutant), result in zip(batch, results):
            if result.passed:
                stats["mutants_passed"] += 1
            elif result.status == "timeout":
                stats["mutants_timed_out"] += 1
            elif len(kept[i]) < wanted:
                kept[i].append(mutant)
