"""HumanEval problems as processed rows (one correct row each, from the canonical solution).

The instruction is evaluation's alpaca instruction (``wmtp.data.problems.humaneval_instruction``)
and the output the whole function: the prompt (its leading blank lines trimmed, as in the
instruction) followed by the canonical body, which is what a fine-tuned model is asked to write.
Metadata keeps what evaluation needs to rebuild the problem: the prompt, the ``check`` source as
the one test, and the entry point.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from wmtp.data.problems import HUMANEVAL, Problem, humaneval_instruction, load_humaneval
from wmtp.data.rows import make_row

SOURCE = "humaneval"
DIFFICULTY = 0
"""HumanEval has no difficulty label."""


def humaneval_rows(problems: str | os.PathLike[str] | Sequence[Problem]) -> list[dict[str, Any]]:
    """Rows of HumanEval problems (a ``HumanEval.jsonl(.gz)`` file or loaded problems)."""
    if isinstance(problems, (str, os.PathLike)):
        problems = load_humaneval(problems)
    return [
        make_row(
            instruction=humaneval_instruction(p),
            output=p.prompt.lstrip("\n") + p.reference,
            task_id=p.task_id,
            is_correct=True,
            source=SOURCE,
            difficulty=DIFFICULTY,
            tests=[p.test],
            dataset=HUMANEVAL,
            entry_point=p.entry_point,
            prompt=p.prompt,
        )
        for p in problems
    ]
