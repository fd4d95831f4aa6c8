"""HumanEval/MBPP problems: loaders (both MBPP formats, gzip), error messages, exact prompts, stops,
code extraction, and programs that pass with the reference solution and fail with a bug."""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import pytest

from wmtp.data.problems import HUMANEVAL, MBPP, Problem, ProblemFileError, load_humaneval, load_mbpp, load_problems
from wmtp.data.template import format_prompt
from wmtp.eval.problems import (
    ALPACA,
    RAW,
    build_program,
    build_prompt,
    completion_to_program,
    extract_code,
    reference_program,
    stop_sequences,
    truncate_at_stop,
)
from wmtp.eval.sandbox import run_programs

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HUMANEVAL_PATH = SHARED_DATA / "HumanEval.jsonl.gz"
MBPP_TEST_PATH = SHARED_DATA / "mbpp_test.json"
MBPP_TRAIN_PATH = SHARED_DATA / "mbpp_train.json"
needs_shared_data = pytest.mark.skipif(
    not all(path.is_file() for path in (HUMANEVAL_PATH, MBPP_TEST_PATH, MBPP_TRAIN_PATH)),
    reason=f"public eval data not found in {SHARED_DATA} (the 'shared/data' folder beside the repository)",
)

RUN_TIMEOUT_S = 30.0
"""Per program; references finish in well under a second (mbpp/123, seconds, is not among those run)."""
HUMANEVAL_RUN_IDS = ("HumanEval/0", "HumanEval/10", "HumanEval/38", "HumanEval/53", "HumanEval/163")
"""A few problems, two of them (10, 38) with a helper function in the prompt."""
MBPP_RUN_COUNT = 10
"""The first MBPP test problems (ids 11-20) are run."""

HE_RECORD = {
    "task_id": "Toy/0",
    "prompt": '\n\ndef add(a: int, b: int) -> int:\n    """Sum of a and b.\n    >>> add(1, 2)\n    3\n    """\n',
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}
MBPP_RECORDS = [
    {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\r\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 12,
        "text": "Write a function to get a box's size.",
        "code": "def size(box):\n    return box.n",
        "test_list": ["assert size(b) == 3"],
        "test_setup_code": "class Box:\n    n = 3\nb = Box()",
        "challenge_test_list": [],
    },
]


def run_all(programs: list[str]) -> list[bool]:
    """Whether each program runs to its end in the evaluation sandbox."""
    return [r.passed for r in run_programs(programs, timeout_s=RUN_TIMEOUT_S)]


def write_jsonl(path: Path, records: list[dict], *, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


@pytest.fixture(scope="module")
def humaneval() -> dict[str, Problem]:
    return {p.task_id: p for p in load_humaneval(HUMANEVAL_PATH)}


@pytest.fixture(scope="module")
def mbpp_test() -> list[Problem]:
    return load_mbpp(MBPP_TEST_PATH)


# ---------------------------------------------------------------- loaders


@needs_shared_data
def test_load_public_humaneval(humaneval: dict[str, Problem]) -> None:
    assert len(humaneval) == 164
    assert list(humaneval)[:2] == ["HumanEval/0", "HumanEval/1"]
    first = humaneval["HumanEval/0"]
    assert first.dataset == HUMANEVAL and first.entry_point == "has_close_elements"
    assert first.prompt.startswith("from typing import List\n") and "def check(candidate)" in first.test
    assert first.reference.startswith("    for idx, elem in enumerate(numbers):")


@needs_shared_data
def test_load_public_mbpp(mbpp_test: list[Problem]) -> None:
    assert [p.task_id for p in mbpp_test] == [f"mbpp/{i}" for i in range(11, 511)]
    assert all(p.dataset == MBPP and len(p.test_list) == 3 for p in mbpp_test)
    # CRLF of the original sources is normalised, as in the training rows (a lone final "\r" of
    # mbpp/104 and mbpp/255 stays, as it does there).
    assert not any("\r\n" in p.reference + p.text + p.test_setup_code + "".join(p.test_list) for p in mbpp_test)
    assert [p.task_id for p in load_mbpp(MBPP_TEST_PATH, task_ids=[20, 12])] == ["mbpp/12", "mbpp/20"]
    assert load_problems("mbpp", MBPP_TEST_PATH, task_ids=range(11, 14)) == mbpp_test[:3]
    assert "Node(" in next(p for p in mbpp_test if p.task_id == "mbpp/367").test_setup_code


@needs_shared_data
def test_mbpp_default_ids_missing_from_another_split() -> None:
    with pytest.raises(ProblemFileError, match=r"500 requested MBPP task ids are not in the file: 11, 12"):
        load_mbpp(MBPP_TRAIN_PATH)
    assert len(load_mbpp(MBPP_TRAIN_PATH, task_ids=None)) == 374


def test_humaneval_jsonl_and_gz_load_the_same(tmp_path: Path) -> None:
    other = {**HE_RECORD, "task_id": "Toy/1"}
    plain = load_humaneval(write_jsonl(tmp_path / "he.jsonl", [HE_RECORD, other]))
    packed = load_problems("humaneval", write_jsonl(tmp_path / "he.jsonl.gz", [HE_RECORD, other], gz=True))
    assert plain == packed
    assert plain[0] == Problem(
        task_id="Toy/0",
        dataset=HUMANEVAL,
        reference=HE_RECORD["canonical_solution"],
        prompt=HE_RECORD["prompt"],
        entry_point="add",
        test=HE_RECORD["test"],
    )


def test_mbpp_json_list_and_jsonl_load_the_same(tmp_path: Path) -> None:
    as_list = tmp_path / "mbpp.json"
    as_list.write_text(json.dumps(MBPP_RECORDS, indent=1))
    as_lines = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_RECORDS)
    problems = load_mbpp(as_list, task_ids=None)
    assert problems == load_mbpp(as_lines, task_ids=[11, 12])
    assert problems[0] == Problem(
        task_id="mbpp/11",
        dataset=MBPP,
        reference="def add(a, b):\n    return a + b",
        text="Write a function to add two numbers.",
        test_list=("assert add(1, 2) == 3", "assert add(0, 0) == 0"),
    )
    assert problems[1].test_setup_code == "class Box:\n    n = 3\nb = Box()"


def _humaneval_lines(tmp_path: Path, second_line: str) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HE_RECORD) + "\n" + second_line + "\n")
    return path


@pytest.mark.parametrize(
    "second_line, words",
    [
        (
            json.dumps({k: v for k, v in HE_RECORD.items() if k != "test"} | {"task_id": "Toy/1"}),
            ["line 2", "missing key 'test'"],
        ),
        (json.dumps(HE_RECORD | {"task_id": "Toy/1", "prompt": 3}), ["line 2", "key 'prompt' is not a string"]),
        (json.dumps(HE_RECORD | {"task_id": "Toy/1", "entry_point": "not a name"}), ["line 2", "'entry_point'"]),
        ('{"task_id": "Toy/1", "prompt": ', ["line 2", "malformed JSON"]),
        ("[1, 2]", ["line 2", "not a JSON object"]),
        (json.dumps(HE_RECORD), ["'Toy/0' appears more than once"]),
    ],
)
def test_humaneval_bad_input_is_named(tmp_path: Path, second_line: str, words: list[str]) -> None:
    path = _humaneval_lines(tmp_path, second_line)
    with pytest.raises(ProblemFileError) as info:
        load_humaneval(path)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_corrupt_gzip_and_unicode_line_separator(tmp_path: Path) -> None:
    corrupt = tmp_path / "he.jsonl.gz"
    corrupt.write_bytes(gzip.compress(json.dumps(HE_RECORD).encode())[:-12])
    with pytest.raises(ProblemFileError, match=r"he\.jsonl\.gz: corrupt gzip data"):
        load_humaneval(corrupt)
    # A raw U+2028 is legal inside a JSON string: it must not split the line.
    odd = HE_RECORD | {"prompt": HE_RECORD["prompt"].replace("Sum of", "Sum\u2028of")}
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(odd, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert load_humaneval(path)[0].prompt == odd["prompt"]


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"code": None}, ["key 'code' is not a string"]),
        ({"task_id": "12"}, ["key 'task_id' is not an int"]),
        ({"task_id": True}, ["key 'task_id' is not an int"]),
        ({"test_list": "assert size(b) == 3"}, ["key 'test_list' is not a list"]),
        ({"test_list": []}, ["'test_list' is not a non-empty list of strings"]),
        ({"test_setup_code": ["x = 1"]}, ["key 'test_setup_code' is not a string"]),
        ({"task_id": 11}, ["'mbpp/11' appears more than once"]),
    ],
)
@pytest.mark.parametrize("fmt", ["list", "jsonl"])
def test_mbpp_bad_input_is_named(tmp_path: Path, bad: dict, words: list[str], fmt: str) -> None:
    records = [MBPP_RECORDS[0], MBPP_RECORDS[1] | bad]
    if fmt == "list":
        path = tmp_path / "mbpp.json"
        path.write_text(json.dumps(records))
        where = "item 1"
    else:
        path = write_jsonl(tmp_path / "mbpp.jsonl", records)
        where = "line 2"
    with pytest.raises(ProblemFileError) as info:
        load_mbpp(path, task_ids=None)
    message = str(info.value)
    assert str(path) in message
    assert where in message or "more than once" in message
    for word in words:
        assert word in message


def test_mbpp_missing_key_malformed_and_empty(tmp_path: Path) -> None:
    missing = write_jsonl(tmp_path / "missing.jsonl", [{k: v for k, v in MBPP_RECORDS[0].items() if k != "text"}])
    with pytest.raises(ProblemFileError, match=r"missing\.jsonl:line 1: missing key 'text'"):
        load_mbpp(missing, task_ids=None)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"task_id": 11,\n "text": }\n]')
    with pytest.raises(ProblemFileError, match=r"broken\.json:line 3: malformed JSON"):
        load_mbpp(broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ProblemFileError, match="no problems"):
        load_mbpp(empty, task_ids=None)
    with pytest.raises(ValueError, match="unknown dataset 'apps'"):
        load_problems("apps", empty)


# ---------------------------------------------------------------- prompts and stops


def toy_humaneval() -> Problem:
    return Problem(
        task_id="Toy/0",
        dataset=HUMANEVAL,
        reference=HE_RECORD["canonical_solution"],
        prompt=HE_RECORD["prompt"],
        entry_point="add",
        test=HE_RECORD["test"],
    )


def toy_mbpp() -> Problem:
    return Problem(
        task_id="mbpp/12",
        dataset=MBPP,
        reference="def size(box):\n    return box.n",
        text="Write a function to get a box's size.",
        test_list=("assert size(b) == 3", "assert size(c) == 3"),
        test_setup_code="class Box:\n    n = 3\nb = c = Box()",
    )


def test_humaneval_prompts_exact() -> None:
    problem = toy_humaneval()
    assert build_prompt(problem, RAW) == HE_RECORD["prompt"]
    assert build_prompt(problem, ALPACA) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nComplete the following Python function:\n"
        'def add(a: int, b: int) -> int:\n    """Sum of a and b.\n    >>> add(1, 2)\n    3\n    """\n\n'
        "### Response:\n"
    )


def test_mbpp_prompts_exact() -> None:
    problem = toy_mbpp()
    assert build_prompt(problem, RAW) == '"""\nWrite a function to get a box\'s size.\nassert size(b) == 3\n"""\n'
    assert build_prompt(problem) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWrite a function to get a box's size.\nYour code should pass these tests:\n"
        "assert size(b) == 3\nassert size(c) == 3\n\n### Response:\n"
    )
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        build_prompt(problem, "chatml")


@needs_shared_data
def test_mbpp_alpaca_prompt_is_the_training_rows_prompt(mbpp_test: list[Problem]) -> None:
    from wmtp.data.mbpp import mbpp_rows

    rows, _ = mbpp_rows(MBPP_TEST_PATH, max_problems=20)
    assert len(rows) == 20
    for row, problem in zip(rows, mbpp_test):
        assert row["task_id"] == problem.task_id
        assert build_prompt(problem, ALPACA) == format_prompt(row["instruction"], row["input"])
        assert row["output"] == problem.reference


def test_stop_sequences() -> None:
    assert stop_sequences(toy_humaneval(), RAW) == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert stop_sequences("mbpp", RAW) == ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"]
    assert (
        stop_sequences("humaneval", ALPACA)
        == stop_sequences(toy_mbpp(), ALPACA)
        == ["\n### Instruction:", "\n### Input:", "\n### Response:"]
    )
    with pytest.raises(ValueError, match="unknown dataset 'apps'"):
        stop_sequences("apps", RAW)


def test_truncate_at_stop() -> None:
    stops = stop_sequences(HUMANEVAL, RAW)
    completion = "    return a + b\n\nif __name__ == '__main__':\n    print(add(1, 2))\ndef more(): pass\n"
    assert truncate_at_stop(completion, stops) == "    return a + b\n"
    # The earliest stop in the text wins, whatever its place in the list.
    assert truncate_at_stop("x\n#c\nclass A: pass", ["\nclass", "\n#"]) == "x"
    assert truncate_at_stop("    return a + b\n", stops) == "    return a + b\n"
    assert truncate_at_stop("    # comment inside\n    return 1\n", stops) == "    # comment inside\n    return 1\n"
    response = "def f():\n    return 1\n### Step\n\n### Instruction:\nAnother task"
    assert truncate_at_stop(response, stop_sequences(MBPP, ALPACA)) == "def f():\n    return 1\n### Step\n"
    with pytest.raises(ValueError, match="empty stop sequence"):
        truncate_at_stop("abc", ["\ndef", ""])


@pytest.mark.parametrize(
    "response, code",
    [
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),
        ("```python\ndef f():\n    return 1\n```\n", "def f():\n    return 1\n"),
        ("Here it is:\n\n```\ndef f():\n    return 1\n```\nIt returns 1.", "def f():\n    return 1\n"),
        ("```py\nx = 1\n```\nand a test:\n```python\nassert x == 1\n```", "x = 1\n"),
        ("Sure:\n```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # unterminated
        ("def f():\n    return 1\n```", "def f():\n    return 1\n"),  # stray closing fence
        ("```python", ""),
    ],
)
def test_extract_code(response: str, code: str) -> None:
    assert extract_code(response) == code


def test_programs_exact() -> None:
    he, mb = toy_humaneval(), toy_mbpp()
    check = HE_RECORD["test"] + "\ncheck(add)\n"
    assert reference_program(he) == HE_RECORD["prompt"] + "    return a + b\n" + "\n" + check
    assert completion_to_program(he, "    return a + b\n\ndef extra(): pass\n", RAW) == reference_program(he)
    response = "```python\ndef add(a, b):\n    return a + b\n```\n### Instruction:\nmore"
    assert completion_to_program(he, response, ALPACA) == (
        HE_RECORD["prompt"] + "\ndef add(a, b):\n    return a + b\n" + "\n" + check
    )
    assert reference_program(mb) == (
        "def size(box):\n    return box.n\nclass Box:\n    n = 3\nb = c = Box()\n"
        "assert size(b) == 3\nassert size(c) == 3\n"
    )
    assert completion_to_program(mb, "def size(box):\n    return box.n\nassert size(b) == 3", RAW) == build_program(
        mb, "def size(box):\n    return box.n"
    )


# ---------------------------------------------------------------- programs that run


def test_alpaca_humaneval_response_forms_run() -> None:
    prompt = (
        "from typing import List\n\n\ndef double(x: int) -> int:\n    return 2 * x\n\n\n"
        'def quad(xs: List[int]) -> List[int]:\n    """Each times four."""\n'
    )
    problem = Problem(
        task_id="Toy/1",
        dataset=HUMANEVAL,
        reference="    return [double(double(x)) for x in xs]\n",
        prompt=prompt,
        entry_point="quad",
        test="def check(candidate):\n    assert candidate([1, 2]) == [4, 8]\n",
    )
    responses = [
        # A whole function without the prompt's import or helper: both come from the prompt.
        "```python\ndef quad(xs: List[int]) -> List[int]:\n    return [double(double(x)) for x in xs]\n```",
        # Only the body: it continues the prompt's function.
        "    return [4 * x for x in xs]\n",
        # A wrong redefinition replaces the prompt's (docstring-only) function and fails.
        "def quad(xs):\n    return xs\n",
    ]
    assert run_all([completion_to_program(problem, r, ALPACA) for r in responses]) == [True, True, False]


@needs_shared_data
def test_humaneval_reference_passes_and_bug_fails(humaneval: dict[str, Problem]) -> None:
    programs, expected = [], []
    for task_id in HUMANEVAL_RUN_IDS:
        p = humaneval[task_id]
        programs += [
            reference_program(p),
            completion_to_program(p, p.prompt + p.reference, ALPACA),  # a whole re-defined function
            build_program(p, "    return None\n"),
        ]  # the deliberate bug
        expected += [True, True, False]
    assert run_all(programs) == expected


def _function_under_test(problem: Problem) -> str:
    """The reference's function that the first assert calls."""
    names = [node.name for node in ast.walk(ast.parse(problem.reference)) if isinstance(node, ast.FunctionDef)]
    return next(name for name in names if f"{name}(" in problem.test_list[0])


@needs_shared_data
def test_mbpp_reference_passes_and_bug_fails(mbpp_test: list[Problem]) -> None:
    programs, expected = [], []
    for p in mbpp_test[:MBPP_RUN_COUNT]:
        broken = f"{p.reference}\n\ndef {_function_under_test(p)}(*args, **kwargs):\n    return None\n"
        programs += [
            reference_program(p),
            completion_to_program(p, f"```python\n{p.reference}\n```", ALPACA),
            build_program(p, broken),
        ]
        expected += [True, True, False]
    assert run_all(programs) == expected
