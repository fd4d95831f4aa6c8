"""HumanEval and MBPP problems: loading their published files, and rebuilding a problem from a
processed row (``problem_from_row``) of any of the three datasets (and a CodeContests tests record),
so that every processed set is read the same way.

The alpaca instructions of the problems live here too, because training rows and evaluation
prompts must be the same text: MBPP's instruction is the training rows' (``wmtp.data.rows.tests_instruction``:
the problem text, ``TESTS_HEADER``, its asserts); HumanEval's is ``HUMANEVAL_TASK``, a newline, and the
function prompt (signature and docstring) unfenced, trimmed of its leading blank lines and trailing
whitespace: training instructions (CodeContests statements, MBPP text plus raw asserts) are a
natural-language task with any code inline and unfenced, and training responses are bare code, so
the eval prompt stays in that distribution (a bare function prompt with no task text, or a fenced
one, would not).

Prompts, stop sequences and the programs that are run are evaluation's (``wmtp.eval.problems``).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from wmtp.data.rows import TEST_COLUMNS, tests_instruction

HUMANEVAL = "humaneval"


MBPP = "mbpp"


CODECONTESTS = "codecontests"


DATASETS = (HUMANEVAL, MBPP, CODECONTESTS)
"""Dataset names the prompt/program functions know (``load_problems`` reads the first two's files)."""


HUMANEVAL_TASK = "Complete the following Python function:"
"""First line of the alpaca instruction of a HumanEval problem, before its function prompt."""


MBPP_TEST_TASK_IDS = range(11, 511)
"""The MBPP test split (Austin et al. 2021): task ids 11-510."""


MBPP_TASK_PREFIX = "mbpp/"
"""``Problem.task_id`` of MBPP problem 11 is "mbpp/11", as in the training rows (wmtp/data/mbpp.py)."""


HUMANEVAL_KEYS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
"""Keys (all strings) of an openai/human-eval record."""


MBPP_STR_KEYS = ("text", "code")
"""String keys of a google-research MBPP record (besides the int task_id and the list test_list)."""


MBPP_OPTIONAL_STR_KEYS = ("test_setup_code",)
"""String keys an MBPP record may leave out (empty then)."""


GZIP_MAGIC = b"\x1f\x8b"
"""First bytes of a gzip file."""


class ProblemFileError(ValueError):
    """A problem file that cannot be loaded; the message names the file, the line or item, and the key."""


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: what its prompts and programs are built from.

    HumanEval uses ``prompt``, ``entry_point`` and ``test``; MBPP uses ``text``, ``test_list`` and
    ``test_setup_code``; CodeContests ``text`` (the statement), ``io_tests`` and the limits.
    ``reference`` is the dataset's own solution (HumanEval's canonical_solution, a continuation of
    the prompt; MBPP's code, a whole program; a correct CodeContests solution or ""), kept to check
    the harness: ``reference_program`` must pass.
    """

    task_id: str
    dataset: str
    reference: str
    prompt: str = ""
    entry_point: str = ""
    test: str = ""
    text: str = ""
    test_list: tuple[str, ...] = ()
    test_setup_code: str = ""
    io_tests: tuple[tuple[str, str], ...] = ()
    """CodeContests: (stdin, expected stdout) pairs: public, then private, then generated tests."""
    time_limit_s: float | None = None
    """CodeContests: the problem's time limit per test (None: not published)."""
    memory_limit_bytes: int = 0
    """CodeContests: the problem's memory limit (0: not published)."""


def _read_text(path: str | os.PathLike[str]) -> str:
    # Gzip is recognised by its magic bytes, so a .jsonl.gz renamed .jsonl (or the reverse) still loads.
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ProblemFileError(f"{path}: corrupt gzip data ({e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProblemFileError(f"{path}: not UTF-8 text ({e})") from None


def _jsonl_records(path: str | os.PathLike[str], text: str) -> list[tuple[str, Any]]:
    """(where, object) per non-blank line, where = "path:line N"."""
    records = []
    # Not splitlines(): JSON strings may hold a raw U+2028 or form feed, which it would split on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:line {number}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ProblemFileError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    return records


def _require(where: str, obj: Any, key: str, expected: type, type_name: str) -> Any:
    if not isinstance(obj, dict):
        raise ProblemFileError(f"{where}: not a JSON object")
    if key not in obj:
        raise ProblemFileError(f"{where}: missing key '{key}'")
    value = obj[key]
    # bool is an int subclass, but a task_id of true is a broken file.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ProblemFileError(f"{where}: key '{key}' is not {type_name} (got {type(value).__name__})")
    return value


def _check_unique(path: str | os.PathLike[str], task_ids: list[str]) -> None:
    if not task_ids:
        raise ProblemFileError(f"{path}: no problems in the file")
    seen: set[str] = set()
    for task_id in task_ids:
        if task_id in seen:
            raise ProblemFileError(f"{path}: task_id {task_id!r} appears more than once")
        seen.add(task_id)


def load_humaneval(path: str | os.PathLike[str]) -> list[Problem]:
    """Problems of an openai/human-eval ``HumanEval.jsonl`` (or ``.jsonl.gz``), in file order."""
    problems = []
    for where, obj in _jsonl_records(path, _read_text(path)):
        fields = {key: _require(where, obj, key, str, "a string") for key in HUMANEVAL_KEYS}
        if not fields["entry_point"].isidentifier():
            raise ProblemFileError(f"{where}: key 'entry_point' is not a Python name: {fields['entry_point']!r}")
        problems.append(
            Problem(
                task_id=fields["task_id"],
                dataset=HUMANEVAL,
                reference=fields["canonical_solution"],
                prompt=fields["prompt"],
                entry_point=fields["entry_point"],
                test=fields["test"],
            )
        )
    _check_unique(path, [p.task_id for p in problems])
    return problems


def _normalise(text: str) -> str:
    # MBPP's sources use CRLF; the training rows (wmtp/data/mbpp.py) normalise them the same way.
    return text.replace("\r\n", "\n")


def _mbpp_problem(where: str, obj: Any) -> tuple[int, Problem]:
    task_id = _require(where, obj, "task_id", int, "an int")
    fields = {key: _require(where, obj, key, str, "a string") for key in MBPP_STR_KEYS}
    for key in MBPP_OPTIONAL_STR_KEYS:
        fields[key] = _require(where, obj, key, str, "a string") if key in obj else ""
    tests = _require(where, obj, "test_list", list, "a list")
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ProblemFileError(f"{where}: key 'test_list' is not a non-empty list of strings")
    return task_id, Problem(
        task_id=f"{MBPP_TASK_PREFIX}{task_id}",
        dataset=MBPP,
        reference=_normalise(fields["code"]),
        text=_normalise(fields["text"]),
        test_list=tuple(_normalise(t) for t in tests),
        test_setup_code=_normalise(fields["test_setup_code"]),
    )


def load_mbpp(path: str | os.PathLike[str], *, task_ids: Iterable[int] | None = MBPP_TEST_TASK_IDS) -> list[Problem]:
    """MBPP problems from google-research's JSON (a list of records, e.g. mbpp_test.json) or JSONL
    (``mbpp.jsonl``, one record per line), in file order.

    ``task_ids`` selects problems (default: the test split, 11-510); every one must be in the file.
    ``None`` keeps all the file's problems. Every record is checked, selected or not.
    """
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProblemFileError(f"{path}:line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        records = [(f"{path}: item {i}", obj) for i, obj in enumerate(items)]
    else:
        records = _jsonl_records(path, text)
    problems = [_mbpp_problem(where, obj) for where, obj in records]
    _check_unique(path, [p.task_id for _, p in problems])
    if task_ids is None:
        return [p for _, p in problems]
    wanted = set(task_ids)
    missing = sorted(wanted - {number for number, _ in problems})
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ProblemFileError(
            f"{path}: {len(missing)} requested MBPP task ids are not in the file: {shown} "
            "(task_ids=None loads every problem of the file)"
        )
    return [p for number, p in problems if number in wanted]


def load_problems(dataset: str, path: str | os.PathLike[str], **kwargs: Any) -> list[Problem]:
    """``load_humaneval`` or ``load_mbpp`` (with its keyword arguments) by dataset name."""
    if dataset == HUMANEVAL:
        return load_humaneval(path, **kwargs)
    if dataset == MBPP:
        return load_mbpp(path, **kwargs)
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")


def unknown_dataset(dataset: str) -> ValueError:
    return ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")


def humaneval_instruction(problem: Problem) -> str:
    """The alpaca instruction of a HumanEval problem: ``HUMANEVAL_TASK``, then its function prompt."""
    code = problem.prompt.lstrip("\n").rstrip()
    return f"{HUMANEVAL_TASK}\n{code}"


def mbpp_instruction(problem: Problem) -> str:
    """The alpaca instruction of an MBPP problem: its text, ``TESTS_HEADER``, its asserts."""
    return tests_instruction(problem.text, problem.test_list)


def _row_dataset(meta: dict[str, Any]) -> str:
    # Rows name their dataset; MBPP rows written before that say it in `source` only.
    return meta.get("dataset") or meta.get("source", "")


def _strip_suffix(where: str, text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise ProblemFileError(f"{where}: the instruction does not end with {what}")
    return text[: len(text) - len(suffix)]


def problem_from_row(
    row: dict[str, Any], tests: dict[str, Any] | None = None, *, where: str = "row", max_tests: int = 0
) -> Problem:
    """The problem of a processed row (``wmtp.data.rows``) of HumanEval, MBPP or CodeContests.

    CodeContests rows keep their tests in the split's ``*_tests.jsonl`` sidecar: pass the
    problem's record as ``tests`` (its public, private and generated tests in that order, the first
    ``max_tests`` of them if > 0). The row's own solution is the reference when it is correct.
    """
    meta = row["metadata"]
    dataset = _row_dataset(meta)
    reference = row["output"] if row["is_correct"] else ""
    if dataset == MBPP:
        test_list = tuple(meta.get("tests", ()))
        text = _strip_suffix(where, row["instruction"], tests_instruction("", test_list), "its tests")
        return Problem(
            task_id=row["task_id"],
            dataset=MBPP,
            reference=reference,
            text=text,
            test_list=test_list,
            test_setup_code=meta.get("test_setup_code", ""),
        )
    if dataset == HUMANEVAL:
        prompt = meta["prompt"]
        code = prompt.lstrip("\n")
        if reference and not reference.startswith(code):
            raise ProblemFileError(f"{where}: a correct HumanEval row's output does not begin with its prompt")
        return Problem(
            task_id=row["task_id"],
            dataset=HUMANEVAL,
            reference=reference[len(code) :],
            prompt=prompt,
            entry_point=meta["entry_point"],
            test=meta["tests"][0],
        )
    if dataset == CODECONTESTS:
        if tests is None:
            raise ProblemFileError(f"{where}: CodeContests problem {row['task_id']!r} needs its tests record")
        lists = [tests.get(column) or {} for column in TEST_COLUMNS]
        pairs = [pair for t in lists for pair in zip(t.get("input") or [], t.get("output") or [])]
        return Problem(
            task_id=row["task_id"],
            dataset=CODECONTESTS,
            reference=reference,
            text=row["instruction"],
            io_tests=tuple(pairs[:max_tests] if max_tests > 0 else pairs),
            time_limit_s=tests.get("time_limit_s"),
            memory_limit_bytes=int(tests.get("memory_limit_bytes") or 0),
        )
    raise ProblemFileError(f"{where}: rows of dataset {dataset!r} have no tests to run; known: {', '.join(DATASETS)}")
