"""Execution labelling: on-policy samples judged by running them, written as processed rows.

``LabellingSet`` reads the problems of a processed file (HumanEval, MBPP or CodeContests rows;
one problem per task_id) through its row index, with CodeContests tests from the split's
``*_tests.jsonl`` sidecar, read a problem at a time. ``labelled_rows`` turns a problem's k judged completions into k
processed rows: the problem's instruction and input, the completion as output, ``is_correct``
from execution, and in metadata the verdict (status, reason, tests passed / run / total) and the
problem's pass count (``samples_passed`` of ``samples``).

``LabelStore`` keeps a run resumable and shardable: each rank appends a problem's rows to its own
``rank<r>.jsonl``, fsyncs them, then appends a record naming the byte range to
``rank<r>.done.jsonl``. A problem is labelled once its record is complete; a restarted run (any
world size) skips such problems and ignores torn tails. ``merge`` writes ``labelled.jsonl`` with
every labelled problem's rows in file order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from wmtp.atomic import atomic_write, atomic_write_text
from wmtp.data.index import RowIndex
from wmtp.data.problems import CODECONTESTS, Problem, ProblemFileError, problem_from_row
from wmtp.data.rows import TEST_COLUMNS
from wmtp.eval.judge import Verdict

TESTS_SUFFIX = "_tests.jsonl"
"""CodeContests' tests sidecar of ``<split>.jsonl`` is ``<split>_tests.jsonl``."""
LABELLED_FILE = "labelled.jsonl"
SETTINGS_FILE = "settings.json"
ROW_SPECIFIC_METADATA = ("solution_id", "language")
"""Metadata of the source row that describes its own solution, not the problem: not copied."""

SKIP_NO_TESTS = "no tests"
SKIP_NO_TESTS_RECORD = "no tests record"
SKIP_FILE_IO = "reads or writes a named file"
SKIP_UNSUPPORTED = "dataset without runnable tests"
SKIP_PROMPT_TOO_LONG = "prompt + max_new_tokens over the model's positions"


@dataclasses.dataclass(frozen=True)
class LabellingProblem:
    position: int
    """The problem's position in the file (its first row's order among problems): seeds its samples."""
    task_id: str
    row: dict[str, Any]
    """The problem's first row: its instruction, input and metadata are the labelled rows'."""
    tests_offset: int | None = None
    """CodeContests: byte offset of the problem's record in the tests sidecar."""


def tests_path(jsonl_path: str | Path) -> Path:
    path = Path(jsonl_path)
    return path.with_name(path.stem + TESTS_SUFFIX)


def _parse_record(line: bytes, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
        record["name"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProblemFileError(f"{where}: not a tests record ({exc})") from None
    return record


def _scan_tests(path: Path, names: set[str]) -> dict[str, tuple[int, str | None]]:
    """name -> (byte offset of its record, why it cannot be judged or None), for `names`: one read
    of the sidecar, one record parsed at a time (the tests of every problem can be gigabytes)."""
    found: dict[str, tuple[int, str | None]] = {}
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            record = _parse_record(line, f"{path}:{number}")
            if record["name"] not in names or record["name"] in found:
                continue
            reason = None
            if record.get("input_file") or record.get("output_file"):
                reason = SKIP_FILE_IO
            elif not any((record.get(c) or {}).get("input") for c in TEST_COLUMNS):
                reason = SKIP_NO_TESTS
            found[record["name"]] = (start, reason)
    return found


class LabellingSet:
    """The problems of a processed file (one per task_id, in file order) that can be judged, and
    the others counted by reason; a problem's tests are read from the sidecar when it is needed."""

    def __init__(self, index: RowIndex, *, max_problems: int = 0, max_tests: int = 0) -> None:
        self.max_tests = max_tests
        self.tests_path = tests_path(index.path)
        _, first = np.unique(index.rows["problem"], return_index=True)
        first = np.sort(first)
        if max_problems > 0:
            first = first[:max_problems]
        rows = index.read_rows(first)
        tests: dict[str, tuple[int, str | None]] = {}
        if any(_is_codecontests(r) for r in rows):
            if not self.tests_path.is_file():
                raise FileNotFoundError(f"{index.path}: CodeContests rows need their tests file {self.tests_path}")
            tests = _scan_tests(self.tests_path, {r["task_id"] for r in rows})
        self.items: list[LabellingProblem] = []
        self.skipped: dict[str, int] = {}
        for position, (row_id, row) in enumerate(zip(first.tolist(), rows)):
            offset = reason = None
            if _is_codecontests(row):
                offset, reason = tests.get(row["task_id"], (None, SKIP_NO_TESTS_RECORD))
            else:
                try:
                    problem_from_row(row, where=f"{index.path}: row {row_id}")
                except (ProblemFileError, KeyError, IndexError):
                    reason = SKIP_UNSUPPORTED
            if reason is not None:
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                continue
            self.items.append(LabellingProblem(position, row["task_id"], row, offset))

    def problem(self, item: LabellingProblem) -> Problem:
        """The problem to judge `item`'s samples against (its CodeContests tests read now)."""
        record = None
        if item.tests_offset is not None:
            with open(self.tests_path, "rb") as f:
                f.seek(item.tests_offset)
                record = _parse_record(f.readline(), f"{self.tests_path} at byte {item.tests_offset}")
        return problem_from_row(item.row, record, max_tests=self.max_tests)


def _is_codecontests(row: dict[str, Any]) -> bool:
    return row["metadata"].get("dataset") == CODECONTESTS


def labelled_rows(
    item: LabellingProblem,
    completions: Sequence[str],
    verdicts: Sequence[Verdict],
    *,
    policy: str,
    new_tokens: Sequence[int],
) -> list[dict[str, Any]]:
    """The processed rows of one problem's judged completions."""
    base = {k: v for k, v in item.row["metadata"].items() if k not in ROW_SPECIFIC_METADATA}
    passed = sum(v.passed for v in verdicts)
    rows = []
    for i, (completion, verdict, n_tokens) in enumerate(zip(completions, verdicts, new_tokens)):
        meta = {
            **base,
            "language": "python3",
            "label": "execution",
            "policy": policy,
            "sample": i,
            "solution_id": f"{item.row['task_id']}/sample/{i}",
            "status": verdict.status,
            "reason": verdict.reason,
            "tests_passed": verdict.tests_passed,
            "tests_run": verdict.tests_run,
            "tests_total": verdict.tests_total,
            "samples_passed": passed,
            "samples": len(verdicts),
            "new_tokens": int(n_tokens),
        }
        rows.append(
            {
                "instruction": item.row["instruction"],
                "input": item.row["input"],
                "output": completion,
                "task_id": item.row["task_id"],
                "is_correct": verdict.passed,
                "metadata": meta,
            }
        )
    return rows


def _fsync_append(f, data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


class LabelStore:
    """The labelled problems of an output folder, shared by the ranks of one or several runs."""

    def __init__(self, out: str | Path, rank: int) -> None:
        self.out = Path(out)
        self.rank = rank
        self.rows_path = self.out / f"rank{rank:05d}.jsonl"
        self.done_path = self.out / f"rank{rank:05d}.done.jsonl"

    def check_settings(self, settings: Mapping[str, Any], *, write: bool) -> None:
        """Refuse to resume a folder labelled with other settings; `write` (rank 0) records them."""
        path = self.out / SETTINGS_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            changed = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
            if changed:
                raise ValueError(
                    f"{self.out} was labelled with other settings ({'; '.join(changed)}); use another output folder"
                )
        elif write:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(dict(settings), indent=1) + "\n")

    def done(self) -> dict[str, dict[str, Any]]:
        """task_id -> its record {task_id, file, start, end, samples, passed}, from every rank's
        complete records whose byte range its rows file holds."""
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(self.out.glob("rank*.done.jsonl")):
            rows_file = path.with_name(path.name.replace(".done.jsonl", ".jsonl"))
            size = rows_file.stat().st_size if rows_file.is_file() else 0
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        complete = line.endswith("\n") and 0 <= record["start"] <= record["end"] <= size
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last record: that problem is labelled again
                    if complete:
                        out.setdefault(record["task_id"], {**record, "file": rows_file.name})
        return out

    def open(self) -> None:
        """Start appending: this rank's rows file is cut back to the end of its last complete record."""
        self.out.mkdir(parents=True, exist_ok=True)
        mine = [r for r in self.done().values() if r["file"] == self.rows_path.name]
        end = max((r["end"] for r in mine), default=0)
        with open(self.rows_path, "ab") as f:
            f.truncate(end)
        if self.done_path.is_file():  # a torn last record would swallow the next one
            data = self.done_path.read_bytes()
            with open(self.done_path, "ab") as f:
                f.truncate(data.rfind(b"\n") + 1)
        self._rows = open(self.rows_path, "ab")
        self._done = open(self.done_path, "ab")

    def add(self, task_id: str, rows: Sequence[dict[str, Any]], *, skipped: str | None = None) -> None:
        """Append one problem's rows, then the record that makes them count (a problem `skipped`
        for that reason has no rows: its record keeps it from being tried again)."""
        start = self._rows.tell()
        if rows:
            _fsync_append(self._rows, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r["metadata"]["status"]] = statuses.get(r["metadata"]["status"], 0) + 1
        record = {
            "task_id": task_id,
            "start": start,
            "end": self._rows.tell(),
            "samples": len(rows),
            "passed": sum(r["is_correct"] for r in rows),
            "statuses": statuses,
        }
        if skipped is not None:
            record["skipped"] = skipped
        _fsync_append(self._done, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        self._rows.close()
        self._done.close()

    def merge(self, order: Sequence[str]) -> dict[str, Any]:
        """Write labelled.jsonl: the rows of the problems of `order` that are labelled, in that
        order (atomically); returns problems, rows, correct rows and rows per status written, and
        the problems skipped while labelling, by reason."""
        done = self.done()
        counts: dict[str, Any] = {"problems": 0, "rows": 0, "correct": 0, "statuses": {}, "skipped": {}}
        files: dict[str, Any] = {}

        def add(table: dict[str, int], key: str, n: int) -> None:
            table[key] = table.get(key, 0) + n

        def write(out: BinaryIO) -> None:
            for task_id in order:
                record = done.get(task_id)
                if record is None:
                    continue
                if "skipped" in record:
                    add(counts["skipped"], record["skipped"], 1)
                    continue
                if record["file"] not in files:
                    files[record["file"]] = open(self.out / record["file"], "rb")
                f = files[record["file"]]
                f.seek(record["start"])
                out.write(f.read(record["end"] - record["start"]))
                counts["problems"] += 1
                counts["rows"] += record["samples"]
                counts["correct"] += record["passed"]
                for status, n in record["statuses"].items():
                    add(counts["statuses"], status, n)

        try:
            atomic_write(self.out / LABELLED_FILE, write)
        finally:
            for f in files.values():
                f.close()
        return counts
