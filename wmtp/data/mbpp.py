"""MBPP problems as processed rows, with any incorrect solutions given.

Problems are read by ``wmtp.data.problems.load_mbpp`` (google-research's JSON or JSONL, checked
line by line) and split by task id as the MBPP paper does (``MBPP_SPLITS``).

MBPP has no difficulty label; ``metadata.difficulty`` is a proxy from the length of the reference
solution in non-empty lines: 0 for <= 4 lines, 1 for <= 8, 2 above (train split: 41/36/23%).
Incorrect solutions are checked by execution, which is evaluation's business:
``wmtp.eval.mutants.mbpp_rows_with_incorrect`` finds mutants (``wmtp.data.mutate``) that fail the
tests and passes them here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from wmtp.data.problems import MBPP, Problem, load_mbpp, mbpp_instruction
from wmtp.data.rows import make_row

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


def mbpp_number(task_id: str) -> int:
    """The number of an MBPP task id ("mbpp/601" is 601)."""
    return int(task_id.rsplit("/", 1)[-1])


def mbpp_split(task_id: str) -> str:
    """The split of an MBPP problem ("mbpp/601" is in "train")."""
    return next((name for name, ids in MBPP_SPLITS.items() if mbpp_number(task_id) in ids), "other")


def mbpp_difficulty(code: str) -> int:
    """Difficulty bin 0..2 of a problem from its reference solution's non-empty line count."""
    lines = sum(1 for line in code.splitlines() if line.strip())
    return sum(lines > bound for bound in DIFFICULTY_LINE_BOUNDS)


def mbpp_rows(
    problems: str | os.PathLike[str] | Sequence[Problem],
    *,
    incorrect: Mapping[str, Sequence[str]] | None = None,
    max_problems: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of MBPP problems (a file for ``load_mbpp``, every problem in it, or loaded problems):
    one correct row per problem (its reference solution), then its ``incorrect`` solutions (by
    task id), and stats: problems, correct_rows, incorrect_rows."""
    if isinstance(problems, (str, os.PathLike)):
        problems = load_mbpp(problems, task_ids=None)
    problems = list(problems)[:max_problems]
    incorrect = incorrect or {}
    rows = []
    for p in problems:
        # The instruction is evaluation's alpaca instruction: the text, then the asserts.
        fields = dict(
            instruction=mbpp_instruction(p),
            task_id=p.task_id,
            source=SOURCE,
            difficulty=mbpp_difficulty(p.reference),
            tests=list(p.test_list),
            test_setup_code=p.test_setup_code,
            dataset=MBPP,
        )
        rows.append(make_row(output=p.reference, is_correct=True, **fields))
        rows.extend(make_row(output=m, is_correct=False, **fields) for m in incorrect.get(p.task_id, ()))
    correct = sum(r["is_correct"] for r in rows)
    return rows, {"problems": len(problems), "correct_rows": correct, "incorrect_rows": len(rows) - correct}
