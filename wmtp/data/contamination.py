"""N-gram overlap between training rows and evaluation problems (HumanEval, MBPP test).

Text is lowercased and split into word tokens (runs of letters, digits and underscores); two texts
overlap when they share an n-gram of ``n`` consecutive tokens (13 by default, as GPT-3's
contamination study used). An evaluation problem contributes its whole text: HumanEval's prompt,
canonical solution and tests, MBPP's statement, reference code and asserts. A training row
contributes its instruction, input and output. N-grams of mostly numbers ("0 0 0 ...", "1 2 3 4 ...",
test data) are not counted: fewer than ``MIN_WORD_SHARE`` of their tokens hold a letter. A training
problem (task_id) is contaminated when
its rows share at least ``min_shared`` distinct n-grams with one evaluation problem; the report
names the evaluation problems and an example n-gram, and ``drop_contaminated`` writes a copy of a
training file without the rows of contaminated problems.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from wmtp.atomic import atomic_write
from wmtp.data.problems import HUMANEVAL, Problem

DEFAULT_N = 13
MIN_WORD_SHARE = 0.5
"""Share of an n-gram's tokens that must hold a letter for it to count."""
_WORD = re.compile(r"\w+")
_LETTER = re.compile(r"[^\W\d_]")

Ngram = tuple[str, ...]


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int) -> set[Ngram]:
    """The distinct n-grams of word tokens of `text` (none if it has fewer than n tokens)."""
    tokens = word_tokens(text)
    return set(zip(*(tokens[i:] for i in range(n))))


def is_wordy(gram: Ngram) -> bool:
    """Whether at least MIN_WORD_SHARE of the n-gram's tokens hold a letter."""
    return sum(bool(_LETTER.search(t)) for t in gram) >= MIN_WORD_SHARE * len(gram)


def problem_text(problem: Problem) -> str:
    """Everything of an evaluation problem a training row could have copied."""
    if problem.dataset == HUMANEVAL:
        return "\n".join([problem.prompt, problem.reference, problem.test])
    return "\n".join([problem.text, problem.reference, problem.test_setup_code, *problem.test_list])


@dataclasses.dataclass
class Overlap:
    """One contaminated training problem."""

    task_id: str
    eval_task_ids: list[str]
    """Evaluation problems it shares at least min_shared n-grams with."""
    shared: int
    """Distinct n-grams shared with the evaluation problem it shares most with."""
    example: str
    rows: int = 0
    """Training rows of the problem (all of them are dropped)."""


class OverlapChecker:
    """The n-grams of a set of evaluation problems, and the training problems that share them."""

    def __init__(self, problems: Sequence[Problem], *, n: int = DEFAULT_N, min_shared: int = 1) -> None:
        if n < 1 or min_shared < 1:
            raise ValueError(f"need n >= 1 and min_shared >= 1, got {n} and {min_shared}")
        self.n, self.min_shared = n, min_shared
        self.owners: dict[Ngram, list[str]] = {}
        for problem in problems:
            for gram in filter(is_wordy, ngrams(problem_text(problem), n)):
                self.owners.setdefault(gram, []).append(problem.task_id)
        self.eval_problems = len(problems)
        self._shared: dict[str, set[Ngram]] = {}  # training task_id -> n-grams it shares
        self._rows: dict[str, int] = {}
        self._last_prompt: tuple[str, str] | None = None

    def add_row(self, row: dict[str, Any]) -> None:
        task_id = row["task_id"]
        self._rows[task_id] = self._rows.get(task_id, 0) + 1
        texts = [row["output"]]
        prompt = (row["instruction"], row["input"])
        if prompt != self._last_prompt:  # a problem's rows share one statement: check it once
            texts += list(prompt)
            self._last_prompt = prompt
        for text in texts:
            tokens = word_tokens(text)
            found = self.owners.keys() & set(zip(*(tokens[i:] for i in range(self.n))))
            if found:
                self._shared.setdefault(task_id, set()).update(found)

    def overlaps(self) -> list[Overlap]:
        """Contaminated training problems, most shared n-grams first."""
        out = []
        for task_id, grams in self._shared.items():
            per_eval: dict[str, list[Ngram]] = {}
            for gram in grams:
                for owner in self.owners[gram]:
                    per_eval.setdefault(owner, []).append(gram)
            hits = {e: g for e, g in per_eval.items() if len(g) >= self.min_shared}
            if hits:
                best = max(hits, key=lambda e: (len(hits[e]), e))
                out.append(
                    Overlap(
                        task_id=task_id,
                        eval_task_ids=sorted(hits),
                        shared=len(hits[best]),
                        example=" ".join(min(hits[best])),
                        rows=self._rows[task_id],
                    )
                )
        return sorted(out, key=lambda o: (-o.shared, o.task_id))

    def report(self) -> dict[str, Any]:
        overlaps = self.overlaps()
        per_eval: dict[str, int] = {}
        for o in overlaps:
            for e in o.eval_task_ids:
                per_eval[e] = per_eval.get(e, 0) + 1
        return {
            "n": self.n,
            "min_shared": self.min_shared,
            "eval_problems": self.eval_problems,
            "train_problems": len(self._rows),
            "train_rows": sum(self._rows.values()),
            "contaminated_problems": len(overlaps),
            "contaminated_rows": sum(o.rows for o in overlaps),
            "eval_problems_hit": dict(sorted(per_eval.items())),
            "overlaps": [dataclasses.asdict(o) for o in overlaps],
        }


def iter_rows(path: str | Path) -> Iterator[tuple[int, bytes, dict[str, Any] | None]]:
    """(line number, raw line, row or None when the line is not a row object) of a processed JSONL."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            valid = isinstance(row, dict) and all(
                isinstance(row.get(k), str) for k in ("task_id", "instruction", "input", "output")
            )
            yield number, line, row if valid else None


def check_files(checker: OverlapChecker, paths: Iterable[str | Path]) -> int:
    """Feed every row of the training files to `checker`; returns the lines that are not rows."""
    bad = 0
    for path in paths:
        for _, _, row in iter_rows(path):
            if row is None:
                bad += 1
            else:
                checker.add_row(row)
    return bad


def drop_contaminated(src: str | Path, dst: str | Path, task_ids: set[str]) -> dict[str, int]:
    """Copy `src` to `dst` (atomically) without the rows of `task_ids`; lines that are not rows are
    copied as they are (the index skips and counts them). Returns rows kept and dropped."""
    counts = {"kept": 0, "dropped": 0}

    def write(out: BinaryIO) -> None:
        for _, line, row in iter_rows(src):
            if row is not None and row["task_id"] in task_ids:
                counts["dropped"] += 1
                continue
            out.write(line if line.endswith(b"\n") else line + b"\n")
            counts["kept"] += 1

    atomic_write(dst, write)
    return counts
