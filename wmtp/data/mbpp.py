"""MBPP problems as processed rows, optionally with execution-checked incorrect solutions.

MBPP has no difficulty label; ``metadata.difficulty`` is a proxy from the length of the reference
solution in non-empty lines: 0 for <= 4 lines, 1 for <= 8, 2 above (train split: 41/36/23%).
Incorrect rows are single-site mutants of the reference (``wmtp.data.mutate``) that fail the
problem's tests in the sandbox (``wmtp.eval.sandbox``); a mutant that times out is not kept,
because a timeout on a busy machine does not prove the program wrong.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

from wmtp.data.mutate import mutants
from wmtp.data.rows import make_row, tests_instruction
from wmtp.eval.sandbox import run_programs

SOURCE = "mbpp"
DIFFICULTY_LINE_BOUNDS = (4, 8)
"""Upper bounds (inclusive) on reference lines of difficulty 0 and 1; longer solutions are 2."""
MUTANT_TIMEOUT_S = 1.0
"""Cap on a mutant's run: references finish in milliseconds and timed-out mutants are dropped anyway."""
CANDIDATES_PER_INCORRECT = 8
"""Mutants generated per wanted incorrect row; some survive the tests or loop forever."""


def build_program(code: str, tests: Sequence[str], setup_code: str = "") -> str:
    """An MBPP-style test program: the solution, then the setup code (which may use the solution's
    classes), then the asserts."""
    return "\n\n".join([code, setup_code, "\n".join(tests)]) + "\n"


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n")


def mbpp_difficulty(code: str) -> int:
    """Difficulty bin 0..2 of a problem from its reference solution's non-empty line count."""
    lines = sum(1 for line in code.splitlines() if line.strip())
    return sum(lines > bound for bound in DIFFICULTY_LINE_BOUNDS)


def _problem_seed(seed: int, task_id: int) -> int:
    # Per-problem mutant order that does not change when max_problems or the problem order changes.
    return zlib.crc32(f"{seed}:{task_id}".encode())


@dataclass(frozen=True)
class _Problem:
    task_id: int
    code: str
    tests: list[str]
    setup_code: str
    row_fields: dict[str, Any]
    """``make_row`` arguments shared by the problem's correct and incorrect rows."""

    def program(self, code: str) -> str:
        """The problem's test program around the solution ``code``."""
        return build_program(code, self.tests, self.setup_code)


def mbpp_rows(json_path: str | os.PathLike[str], *, with_incorrect: bool,
              max_problems: int | None = None, incorrect_per_problem: int = 1, seed: int = 0,
              timeout_s: float = 5.0, workers: int = 2) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of an MBPP split (one correct row per problem, then up to ``incorrect_per_problem``
    incorrect rows if ``with_incorrect``) and stats: problems, correct_rows, incorrect_rows,
    skipped (problems dropped, by reason), problems_short_of_incorrect, mutants_tested,
    mutants_passed, mutants_timed_out, seconds."""
    start = time.perf_counter()
    with open(json_path, encoding="utf-8") as f:
        problems = json.load(f)[:max_problems]
    stats: dict[str, Any] = {
        "problems": len(problems), "correct_rows": 0, "incorrect_rows": 0,
        "skipped": {"reference_failed": 0, "reference_timed_out": 0},
        "problems_short_of_incorrect": 0, "mutants_tested": 0, "mutants_passed": 0,
        "mutants_timed_out": 0,
    }
    cases = []
    for p in problems:
        code, setup = _normalise(p["code"]), _normalise(p["test_setup_code"])
        tests = [_normalise(t) for t in p["test_list"]]
        cases.append(_Problem(p["task_id"], code, tests, setup, dict(
            instruction=tests_instruction(_normalise(p["text"]), tests), task_id=f"mbpp/{p['task_id']}",
            source=SOURCE, difficulty=mbpp_difficulty(code), tests=tests, test_setup_code=setup)))

    incorrect: list[list[str]] = [[] for _ in cases]
    if with_incorrect:
        results = run_programs([c.program(c.code) for c in cases], timeout_s=timeout_s, workers=workers)
        for result in results:
            if result.status == "timeout":
                stats["skipped"]["reference_timed_out"] += 1
            elif not result.passed:
                stats["skipped"]["reference_failed"] += 1
        cases = [c for c, r in zip(cases, results) if r.passed]
        incorrect = _failing_mutants(cases, incorrect_per_problem, seed, timeout_s, workers, stats)
        stats["problems_short_of_incorrect"] = sum(len(m) < incorrect_per_problem for m in incorrect)

    rows = []
    for case, wrong in zip(cases, incorrect):
        rows.append(make_row(output=case.code, is_correct=True, **case.row_fields))
        rows.extend(make_row(output=m, is_correct=False, **case.row_fields) for m in wrong)
        stats["incorrect_rows"] += len(wrong)
    stats["correct_rows"] = len(cases)
    stats["seconds"] = round(time.perf_counter() - start, 2)
    return rows, stats


def _failing_mutants(cases: list[_Problem], wanted: int, seed: int, timeout_s: float, workers: int,
                     stats: dict[str, Any]) -> list[list[str]]:
    """Per case, the first ``wanted`` mutants (in seeded order) that fail the tests. Each round tests,
    for all problems at once, as many candidates as each still needs: most mutants fail, so few
    more programs run than are kept, and the worker pool stays busy."""
    mutant_timeout_s = min(timeout_s, MUTANT_TIMEOUT_S)
    pending = [mutants(c.code, seed=_problem_seed(seed, c.task_id), limit=CANDIDATES_PER_INCORRECT * wanted)
               for c in cases]
    kept: list[list[str]] = [[] for _ in cases]
    while True:
        batch = []  # (case index, mutant)
        for i, candidates in enumerate(pending):
            need = wanted - len(kept[i])
            if need > 0 and candidates:
                take, pending[i] = candidates[:need], candidates[need:]
                batch.extend((i, m) for m in take)
        if not batch:
            return kept
        results = run_programs([cases[i].program(m) for i, m in batch],
                               timeout_s=mutant_timeout_s, workers=workers)
        stats["mutants_tested"] += len(batch)
        for (i, mutant), result in zip(batch, results):
            if result.passed:
                stats["mutants_passed"] += 1
            elif result.status == "timeout":
                stats["mutants_timed_out"] += 1
            elif len(kept[i]) < wanted:
                kept[i].append(mutant)
