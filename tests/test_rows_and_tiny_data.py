"""Row schema, mutants, and the MBPP / synthetic tiny datasets (labels checked in the sandbox)."""

from __future__ import annotations

import ast
import copy
import random
from pathlib import Path

import pytest

from wmtp.data.mbpp import mbpp_difficulty, mbpp_rows
from wmtp.data.mutate import mutants
from wmtp.data.problems import MBPP, Problem
from wmtp.data.rows import make_row, validate_row
from wmtp.data.synthetic import ROW_MAX_CHARS, synthetic_rows
from wmtp.eval.mutants import mbpp_rows_with_incorrect
from wmtp.eval.problems import build_program
from wmtp.eval.sandbox import run_programs

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
MBPP_TRAIN = DATA_DIR / "mbpp_train.json"
N_MBPP_PROBLEMS = 15


def _row_program(row: dict) -> str:
    # MBPP and synthetic rows alike: the solution, the setup code, the asserts.
    meta = row["metadata"]
    tests = Problem(row["task_id"], MBPP, "", test_list=tuple(meta["tests"]), test_setup_code=meta["test_setup_code"])
    return build_program(tests, row["output"])


def _passes(rows: list[dict]) -> list[bool]:
    return [r.passed for r in run_programs([_row_program(row) for row in rows], timeout_s=5.0)]


def _good_row() -> dict:
    return make_row(
        instruction="Add one.",
        output="def f(x):\n    return x + 1",
        task_id="t/1",
        is_correct=True,
        source="unit",
        difficulty=1,
        tests=["assert f(1) == 2"],
    )


# --- rows -------------------------------------------------------------------------------------


def test_validate_row_accepts_good_rows() -> None:
    assert validate_row(_good_row()) is None
    no_tests = make_row(instruction="i", output="o", task_id="t", is_correct=False, source="s", difficulty=0)
    assert no_tests["metadata"]["has_tests"] is False
    assert validate_row(no_tests) is None
    humaneval = _good_row()
    humaneval["metadata"]["entry_point"] = "f"
    assert validate_row(humaneval) is None


def _without(path: tuple[str, ...]) -> dict:
    row = _good_row()
    del (row["metadata"] if len(path) == 2 else row)[path[-1]]
    return row


def _with(path: tuple[str, ...], value: object) -> dict:
    row = _good_row()
    (row["metadata"] if len(path) == 2 else row)[path[-1]] = value
    return row


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ([1, 2], "row is not an object"),
        (_without(("output",)), "missing field 'output'"),
        (_without(("metadata",)), "missing field 'metadata'"),
        (_without(("metadata", "source")), "missing field 'metadata.source'"),
        (_with(("is_correct",), 1), "field 'is_correct' is not a bool"),
        (_with(("instruction",), None), "field 'instruction' is not a str"),
        (_with(("metadata",), []), "field 'metadata' is not an object"),
        (_with(("metadata", "difficulty"), "easy"), "metadata.difficulty is not an int"),
        (_with(("metadata", "difficulty"), True), "metadata.difficulty is not an int"),
        (_with(("metadata", "difficulty"), -1), "metadata.difficulty is negative"),
        (_with(("metadata", "has_tests"), "yes"), "metadata.has_tests is not a bool"),
        (_with(("metadata", "tests"), "assert f(1) == 2"), "metadata.tests is not a list of str"),
        (_with(("metadata", "tests"), []), "metadata.has_tests is true but metadata.tests is empty"),
        (_with(("metadata", "entry_point"), 3), "metadata.entry_point is not a str"),
    ],
)
def test_validate_row_names_the_problem(row: object, reason: str) -> None:
    assert validate_row(copy.deepcopy(row)) == reason


# --- mutate -----------------------------------------------------------------------------------

MUTABLE = """\
def f(xs, k):
\tout = []  # tabs and comments survive
\tfor i in range(1, len(xs)):
\t\tif xs[i] > k and not xs[i - 1] == 0:
\t\t\tout.append(xs[i] * 2 + 1)
\treturn out[:3] if True else None
"""


def test_mutants_are_valid_distinct_and_differ() -> None:
    found = mutants(MUTABLE, seed=0, limit=50)
    assert len(found) >= 20
    dumps = {ast.dump(ast.parse(m)) for m in found}  # every mutant parses
    assert len(dumps) == len(found)
    assert ast.dump(ast.parse(MUTABLE)) not in dumps
    assert all("# tabs and comments survive" in m and "\t\t\t" in m for m in found)
    assert mutants(MUTABLE, seed=0, limit=50) == found
    assert mutants(MUTABLE, seed=1, limit=5) != found[:5]
    assert len(mutants(MUTABLE, seed=0, limit=3)) == 3
    assert mutants("def f(:", seed=0, limit=3) == []
    assert mutants("pass", seed=0, limit=3) == []


def test_mutants_cover_the_documented_kinds() -> None:
    found = "\n".join(mutants(MUTABLE, seed=0, limit=1000))
    for fragment in [
        "xs[i] >= k",
        "xs[i] > k or",
        "xs[i - 1] != 0",
        "xs[i] // 2",
        "xs[i] * 2 - 1",
        "range(2, len(xs))",
        "range(0, len(xs))",
        "if False",
        "return None",
        "and xs[i - 1] == 0",
        "out[:4]",
        "out[:]",
        "xs[i + 1]",
    ]:
        assert fragment in found, fragment


# --- MBPP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mbpp_train() -> Path:
    if not MBPP_TRAIN.exists():
        pytest.skip(f"MBPP data not found at {MBPP_TRAIN} (public data sits beside the checkout)")
    return MBPP_TRAIN


def test_mbpp_rows_correct_pass_and_incorrect_fail(mbpp_train: Path) -> None:
    rows, stats = mbpp_rows_with_incorrect(mbpp_train, max_problems=N_MBPP_PROBLEMS, incorrect_per_problem=2, seed=0)
    assert all(validate_row(r) is None for r in rows)
    correct = [r for r in rows if r["is_correct"]]
    incorrect = [r for r in rows if not r["is_correct"]]
    assert stats["problems"] == N_MBPP_PROBLEMS
    assert stats["correct_rows"] == len(correct) == N_MBPP_PROBLEMS - sum(stats["skipped"].values())
    assert stats["incorrect_rows"] == len(incorrect) >= N_MBPP_PROBLEMS
    assert {r["task_id"] for r in incorrect} <= {r["task_id"] for r in correct}
    for r in rows:
        assert "\r" not in r["output"] + r["instruction"]
        assert r["task_id"].startswith("mbpp/") and r["metadata"]["source"] == "mbpp"
        assert r["instruction"].endswith("\n".join(r["metadata"]["tests"]))
    assert _passes(rows) == [r["is_correct"] for r in rows]


def test_mbpp_rows_without_incorrect_is_deterministic(mbpp_train: Path) -> None:
    rows, stats = mbpp_rows(mbpp_train, max_problems=N_MBPP_PROBLEMS)
    assert len(rows) == stats["correct_rows"] == N_MBPP_PROBLEMS
    assert all(r["is_correct"] and r["input"] == "" for r in rows)
    first = rows[0]
    assert first["task_id"] == "mbpp/601"
    assert first["instruction"].startswith("Write a function to find the longest chain")
    assert "\nYour code should pass these tests:\nassert max_chain_length(" in first["instruction"]
    assert first["metadata"]["difficulty"] == 2
    assert mbpp_rows(mbpp_train, max_problems=N_MBPP_PROBLEMS)[0] == rows


def test_mbpp_difficulty_bins() -> None:
    assert mbpp_difficulty("def f():\n\n    return 1\n") == 0
    assert mbpp_difficulty("\n".join(["x = 1"] * 8)) == 1
    assert mbpp_difficulty("\n".join(["x = 1"] * 9)) == 2


# --- synthetic --------------------------------------------------------------------------------


def test_synthetic_rows_are_valid_short_and_varied() -> None:
    rows = synthetic_rows(300, seed=0)
    assert len(rows) == 600
    assert all(validate_row(r) is None for r in rows)
    assert all(len(r["instruction"]) + len(r["input"]) + len(r["output"]) < ROW_MAX_CHARS for r in rows)
    assert [r["is_correct"] for r in rows[:4]] == [True, False, True, False]
    assert rows[0]["task_id"] == rows[1]["task_id"] and rows[0]["metadata"]["source"] == "synthetic"
    assert {r["metadata"]["difficulty"] for r in rows} == {0, 1, 2}
    assert len({r["output"] for r in rows}) > 100
    assert len({r["instruction"] for r in rows}) > 250
    assert synthetic_rows(5, seed=0) == rows[:10]
    assert synthetic_rows(5, seed=1) != rows[:10]


def test_synthetic_labels_hold_when_executed() -> None:
    rows = synthetic_rows(200, seed=7)
    sample = random.Random(0).sample(range(0, len(rows), 2), 30)
    picked = [rows[j] for i in sample for j in (i, i + 1)]
    assert _passes(picked) == [r["is_correct"] for r in picked]
