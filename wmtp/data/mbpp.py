"""MBPP problems as processed rows, optionally with execution-checked incorrect solutions.

Problems are read by ``wmtp.eval.problems.load_mbpp`` (google-research's JSON or JSONL, checked
line by line) and split by task id as the MBPP paper does (``MBPP_SPLITS``).

MBPP has no difficulty label; ``metadata.difficulty`` is a proxy from the length of the reference
solution in non-empty lines: 0 for <= 4 lines, 1 for <= 8, 2 above (train split: 41/36/23%).
Incorrect rows are single-site mutants of the reference (``wmtp.data.mutate``) that fail the
problem's tests in the sandbox (``wmtp.eval.sandbox``); a mutant that times out is not kept,
because a timeout on a busy machine does not prove the program wrong.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wmtp.data.mutate import mutants
from wmtp.data.rows import make_row
from wmtp.eval import problems as eval_problems
from wmtp.eval.problems import MBPP, Problem, load_mbpp
from wmtp.eval.sandbox import run_programs

SOURCE = "mbpp"
MBPP_SPLITS: Mapping[str, range] = {
    "prompt": range(1, 11),
    "test": range(11, 511),
    "validation": range(511, 601),
    "train": range(601, 975),
}
"""Task ids of each split (Austin et al. 2021): few-shot prompts, test, validation, train."""
DIFFICULTY_LINE_BOUNDS = (4, 8)
"""Upper bounds (inclusive) on reference lines of difficulty 0 and 1; longer solutions are 2."""
MUTANT_TIMEOUT_S = 1.0
"""Cap on a mutant's run: references finish in milliseconds and timed-out mutants are dropped anyway."""
CANDIDATES_PER_INCORRECT = 8
"""Mutants generated per wanted incorrect row; some survive the tests or loop forever."""


def build_program(code: str, tests: Sequence[str], setup_code: str = "") -> str:
    """An MBPP-style test program: the solution, then the setup code (which may use the solution's
    classes), then the asserts (as evaluation builds it)."""
    problem = Problem(task_id="", dataset=MBPP, reference="", test_list=tuple(tests), test_setup_code=setup_code)
    return eval_problems.build_program(problem, code)


def _number(task_id: str) -> int:
    return int(task_id.rsplit("/", 1)[-1])


def mbpp_split(task_id: str) -> str:
    """The split of an MBPP problem ("mbpp/601" is in "train")."""
    return next((name for name, ids in MBPP_SPLITS.items() if _number(task_id) in ids), "other")


def mbpp_difficulty(code: str) -> int:
    """Difficulty bin 0..2 of a problem from its reference solution's non-empty line count."""
    lines = sum(1 for line in code.splitlines() if line.strip())
    return sum(lines > bound for bound in DIFFICULTY_LINE_BOUNDS)


def _problem_seed(seed: int, task_id: int) -> int:
    # Per-problem mutant order that does not change when max_problems or the problem order changes.
    return zlib.crc32(f"{seed}:{task_id}".encode())


@dataclass(frozen=True)
class _Problem:
    problem: Problem
    row_fields: dict[str, Any]
    """``make_row`` arguments shared by the problem's correct and incorrect rows."""

    @property
    def code(self) -> str:
        return self.problem.reference

    def program(self, code: str) -> str:
        """The problem's test program around the solution ``code``."""
        return eval_problems.build_program(self.problem, code)


def mbpp_rows(
    problems: str | os.PathLike[str] | Sequence[Problem],
    *,
    with_incorrect: bool,
    max_problems: int | None = None,
    incorrect_per_problem: int = 1,
    seed: int = 0,
    timeout_s: float = 5.0,
    workers: int = 2,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of MBPP problems (a file for ``load_mbpp``, every problem in it, or loaded problems):
    one correct row per problem, then up to ``incorrect_per_problem`` incorrect rows if
    ``with_incorrect``, and stats: problems, correct_rows, incorrect_rows, skipped (problems
    dropped, by reason), problems_short_of_incorrect, mutants_tested, mutants_passed,
    mutants_timed_out, seconds."""
    start = time.perf_counter()
    if isinstance(problems, (str, os.PathLike)):
        problems = load_mbpp(problems, task_ids=None)
    problems = list(problems)[:max_problems]
    stats: dict[str, Any] = {
        "problems": len(problems),
        "correct_rows": 0,
        "incorrect_rows": 0,
        "skipped": {"reference_failed": 0, "reference_timed_out": 0},
        "problems_short_of_incorrect": 0,
        "mutants_tested": 0,
        "mutants_passed": 0,
        "mutants_timed_out": 0,
    }
    # The instruction is evaluation's alpaca instruction: the text, then the asserts.
    cases = [
        _Problem(
            p,
            dict(
                instruction=eval_problems.mbpp_instruction(p),
                task_id=p.task_id,
                source=SOURCE,
                difficulty=mbpp_difficulty(p.reference),
                tests=list(p.test_list),
                test_setup_code=p.test_setup_code,
                dataset=MBPP,
            ),
        )
        for p in problems
    ]

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


def _failing_mutants(
    cases: list[_Problem], wanted: int, seed: int, timeout_s: float, workers: int, stats: dict[str, Any]
) -> list[list[str]]:
    """Per case, the first ``wanted`` mutants (in seeded order) that fail the tests. Each round tests,
    for all problems at once, as many candidates as each still needs: most mutants fail, so few
    more programs run than are kept, and the worker pool stays busy."""
    mutant_timeout_s = min(timeout_s, MUTANT_TIMEOUT_S)
    pending = [
        mutants(c.code, seed=_problem_seed(seed, _number(c.problem.task_id)), limit=CANDIDATES_PER_INCORRECT * wanted)
        for c in cases
    ]
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
        results = run_programs([cases[i].program(m) for i, m in batch], timeout_s=mutant_timeout_s, workers=workers)
        stats["mutants_tested"] += len(batch)
        for (i, mutant), result in zip(batch, results):
            if result.passed:
                stats["mutants_passed"] += 1
            elif result.status == "timeout":
                stats["mutants_timed_out"] += 1
            elif len(kept[i]) < wanted:
                kept[i].append(mutant)
