"""Row schema, sandboxed test execution, mutants, and the MBPP / synthetic tiny datasets."""

from __future__ import annotations

import ast
import copy
import os
import random
import time
from pathlib import Path

import pytest

from wmtp.data.code_exec import Outcome, build_program, execute, run_many, run_tests
from wmtp.data.mbpp import mbpp_difficulty, mbpp_rows
from wmtp.data.mutate import mutants
from wmtp.data.rows import make_row, validate_row
from wmtp.data.synthetic import ROW_MAX_CHARS, synthetic_rows

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
MBPP_TRAIN = DATA_DIR / "mbpp_train.json"
N_MBPP_PROBLEMS = 15
SLOW_TIMEOUT_S = 1.0


def _row_program(row: dict) -> str:
    meta = row["metadata"]
    return build_program(row["output"], meta["tests"], meta.get("test_setup_code", ""))


def _good_row() -> dict:
    return make_row(instruction="Add one.", output="def f(x):\n    return x + 1", task_id="t/1",
                    is_correct=True, source="unit", difficulty=1, tests=["assert f(1) == 2"])


# --- rows -------------------------------------------------------------------------------------

def test_validate_row_accepts_good_rows() -> None:
    assert validate_row(_good_row()) is None
    no_tests = make_row(instruction="i", output="o", task_id="t", is_correct=False, source="s",
                        difficulty=0)
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


@pytest.mark.parametrize(("row", "reason"), [
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
])
def test_validate_row_names_the_problem(row: object, reason: str) -> None:
    assert validate_row(copy.deepcopy(row)) == reason


# --- code_exec --------------------------------------------------------------------------------

def test_run_tests_pass_and_fail() -> None:
    assert run_tests(build_program("def f(x):\n    return x + 1", ["assert f(1) == 2"]))
    assert not run_tests(build_program("def f(x):\n    return x", ["assert f(1) == 2"]))
    assert not run_tests("def f(:\n")
    assert not run_tests("x = bytearray(4 << 30)")  # over the address-space limit
    assert run_many(["pass", "raise SystemExit(3)", "import sys; sys.exit(0)"]) == [True, False, True]


def test_run_tests_runs_isolated_in_a_fresh_directory(tmp_path: Path) -> None:
    cwd_file = tmp_path / "cwd"
    program = ("import os, sys\n"
               "assert sys.flags.isolated and os.listdir('.') == ['program.py']\n"
               f"open({str(cwd_file)!r}, 'w').write(os.getcwd())\n")
    assert run_tests(program)
    workdir = Path(cwd_file.read_text())
    assert workdir != Path.cwd() and not workdir.exists()  # removed after the run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its new parent (init in a container may never reap).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    program = ("import os, subprocess, sys\n"
               "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
               f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
               "while True: pass\n")
    start = time.perf_counter()
    assert execute(program, timeout_s=SLOW_TIMEOUT_S) is Outcome.TIMEOUT
    assert time.perf_counter() - start < SLOW_TIMEOUT_S + 1.0
    start = time.perf_counter()
    assert not run_tests("while True: pass", timeout_s=SLOW_TIMEOUT_S)
    assert time.perf_counter() - start < SLOW_TIMEOUT_S + 1.0
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 2.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


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
    for fragment in ["xs[i] >= k", "xs[i] > k or", "xs[i - 1] != 0", "xs[i] // 2", "xs[i] * 2 - 1",
                     "range(2, len(xs))", "range(0, len(xs))", "if False", "return None",
                     "and xs[i - 1] == 0", "out[:4]", "out[:]", "xs[i + 1]"]:
        assert fragment in found, fragment


# --- MBPP -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mbpp_train() -> Path:
    if not MBPP_TRAIN.exists():
        pytest.skip(f"MBPP data not found at {MBPP_TRAIN} (public data sits beside the checkout)")
    return MBPP_TRAIN


def test_mbpp_rows_correct_pass_and_incorrect_fail(mbpp_train: Path) -> None:
    rows, stats = mbpp_rows(mbpp_train, with_incorrect=True, max_problems=N_MBPP_PROBLEMS,
                            incorrect_per_problem=2, seed=0)
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
    outcomes = run_many([_row_program(r) for r in rows], timeout_s=5.0)
    assert outcomes == [r["is_correct"] for r in rows]


def test_mbpp_rows_without_incorrect_is_deterministic(mbpp_train: Path) -> None:
    rows, stats = mbpp_rows(mbpp_train, with_incorrect=False, max_problems=N_MBPP_PROBLEMS)
    assert len(rows) == stats["correct_rows"] == N_MBPP_PROBLEMS
    assert all(r["is_correct"] and r["input"] == "" for r in rows)
    first = rows[0]
    assert first["task_id"] == "mbpp/601"
    assert first["instruction"].startswith("Write a function to find the longest chain")
    assert "\nYour code should pass these tests:\nassert max_chain_length(" in first["instruction"]
    assert first["metadata"]["difficulty"] == 2
    assert mbpp_rows(mbpp_train, with_incorrect=False, max_problems=N_MBPP_PROBLEMS)[0] == rows


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
    assert run_many([_row_program(r) for r in picked], timeout_s=5.0) == [r["is_correct"] for r in picked]
