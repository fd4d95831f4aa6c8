"""Execution labelling: AlphaCode's output comparison, stdin/stdout judging with time limits, and
scripts/label_samples.py end to end (tiny policy, CodeContests shards in the published schema,
resume after a torn write, two ranks) feeding the critic recipe."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_recipe, recipe_args, run_script, torchrun
from test_codecontests import PUBLISHED_SCHEMA

from wmtp.data.codecontests import convert
from wmtp.data.problems import CODECONTESTS, MBPP, Problem
from wmtp.data.rows import validate_row
from wmtp.eval.judge import NO_TESTS, PASSED, WRONG_ANSWER, judge, outputs_match
from wmtp.eval.labelling import LabellingProblem, labelled_rows
from wmtp.eval.sandbox import run_program
from wmtp.training.metrics import read_metrics

# ---------------------------------------------------------------- output comparison


@pytest.mark.parametrize(
    "expected, actual, same",
    [
        ("3\n", "3", True),  # trailing whitespace
        ("1 2\n3", "  1\n2 3\n\n", True),  # any whitespace between tokens
        ("YES", "yes", True),
        ("Yes\nNo", "YES NO", True),  # lowercased
        ("YES", "YE S", False),
        ("abc", "abd", False),
        ("12345678901234567890", "12345678901234567890", True),
        ("12345678901234567890", "12345678901234567891", False),  # integers exact, beyond float precision
        ("007", "7", True),
        ("-0", "0", True),
        ("+5", "5", True),  # equal integers
        ("0.5", "0.500009", True),
        ("0.5", "0.50002", False),  # floats: absolute 1e-5
        ("1", "1.000001", True),
        ("1", "1.0001", False),  # an integer against a float
        ("1e-6", "0", True),
        ("2.5E3", "2500", True),
        ("1000000.0", "1000000.00001", True),
        ("nan", "nan", True),
        ("nan", "NaN", True),
        ("inf", "1e400", False),  # words, not numbers
        ("1 2", "1 2 3", False),
        ("", "", True),
        ("", "0", False),
        ("0", "", False),
    ],
)
def test_outputs_match_alphacode(expected, actual, same):
    assert outputs_match(expected, actual) is same


# ---------------------------------------------------------------- judging


def _cc_problem(tests, time_limit_s=2.0) -> Problem:
    return Problem(
        task_id="1_A. Sum",
        dataset=CODECONTESTS,
        reference="",
        text="Print a + b.",
        io_tests=tuple(tests),
        time_limit_s=time_limit_s,
        memory_limit_bytes=256 << 20,
    )


SUM_TESTS = [("1 2\n", "3\n"), ("5 7\n", "12\n"), ("-4 4\n", "0\n")]


def test_stdin_stdout_solutions_are_labelled_by_execution():
    problem = _cc_problem(SUM_TESTS, time_limit_s=0.5)
    completions = {
        "correct": "a, b = map(int, input().split())\nprint(a + b)",
        "fenced": "Here it is:\n```python\nimport sys\nprint(sum(map(int, sys.stdin.read().split())))\n```",
        "wrong": "a, b = map(int, input().split())\nprint(a * b + 1)",  # right on test 1 only
        "slow": "a, b = map(int, input().split())\nwhile True:\n    pass",
        "crash": "raise ValueError('no')",
        # A stdin/stdout program may end with exit(): judged by its output, it passes.
        "exits": "a, b = map(int, input().split())\nprint(a + b)\nexit()",
        "exits 1": "import sys\nprint(sum(map(int, input().split())))\nsys.exit(1)",
    }
    verdicts = dict(zip(completions, judge([(problem, c) for c in completions.values()], workers=2)))
    assert verdicts["correct"].passed and verdicts["fenced"].passed
    assert (verdicts["correct"].status, verdicts["correct"].tests_passed, verdicts["correct"].tests_total) == (
        PASSED,
        3,
        3,
    )
    wrong = verdicts["wrong"]
    assert (wrong.passed, wrong.status, wrong.tests_passed, wrong.tests_run) == (False, WRONG_ANSWER, 1, 2)
    assert wrong.reason == "test 2 of 3: wrong answer"
    slow = verdicts["slow"]
    assert not slow.passed and slow.status == "timeout" and slow.tests_run == 1
    assert slow.reason == "test 1 of 3: time limit exceeded (0.5 s)" and slow.seconds >= 0.5
    assert verdicts["crash"].status == "failed" and "ValueError: no" in verdicts["crash"].reason
    assert verdicts["exits"].passed and verdicts["exits"].tests_passed == 3
    assert (verdicts["exits 1"].status, verdicts["exits 1"].reason) == ("failed", "test 1 of 3: runtime error")

    item = LabellingProblem(
        0,
        problem.task_id,
        {
            "instruction": problem.text,
            "input": "",
            "output": "x",
            "task_id": problem.task_id,
            "is_correct": True,
            "metadata": {
                "source": "codeforces",
                "difficulty": 7,
                "has_tests": True,
                "dataset": CODECONTESTS,
                "solution_id": "1_A. Sum/correct/0",
            },
        },
    )
    rows = labelled_rows(item, list(completions.values()), list(verdicts.values()), policy="p", new_tokens=[1] * 7)
    assert all(validate_row(r) is None for r in rows)
    assert [r["is_correct"] for r in rows] == [True, True, False, False, False, True, False]
    assert all(r["metadata"]["samples_passed"] == 3 and r["metadata"]["samples"] == 7 for r in rows)
    assert rows[3]["metadata"]["reason"] == slow.reason and rows[3]["metadata"]["status"] == "timeout"
    assert rows[0]["metadata"]["solution_id"] == "1_A. Sum/sample/0" and rows[0]["metadata"]["difficulty"] == 7


def test_time_limit_scales_and_problems_without_tests_fail():
    # 0.3 s of work: over a 0.2 s limit, within it scaled by 5.
    busy = "import time\nt = time.time()\nwhile time.time() - t < 0.3:\n    pass\nprint(input())"
    problem = _cc_problem([("7\n", "7\n")], time_limit_s=0.2)
    assert judge([(problem, busy)])[0].status == "timeout"
    assert judge([(problem, busy)], time_scale=5.0)[0].passed
    empty = judge([(_cc_problem([]), "print(1)")])[0]
    assert (empty.passed, empty.status) == (False, NO_TESTS)


def test_assert_programs_are_one_test():
    problem = Problem(task_id="mbpp/2", dataset=MBPP, reference="", text="Add.", test_list=("assert add(1, 2) == 3",))
    good, bad = judge([(problem, "def add(a, b):\n    return a + b"), (problem, "def add(a, b):\n    return a - b")])
    assert (good.passed, good.tests_passed, good.tests_total) == (True, 1, 1)
    assert (bad.passed, bad.status, bad.tests_passed) == (False, "failed", 0) and "AssertionError" in bad.reason


# ---------------------------------------------------------------- label_samples.py end to end


def _problem_record(i: int, **overrides) -> dict:
    tests = {"input": [f"{i} {j}\n" for j in range(2)], "output": [f"{i + j}\n" for j in range(2)]}
    record = {name: None for name in PUBLISHED_SCHEMA.names}
    record.update(
        name=f"{100 + i}_A. Sum {i}",
        description=f"Read two integers and print their sum (problem {i}).",
        public_tests=tests,
        private_tests={"input": [], "output": []},
        generated_tests=tests,
        source=2,
        difficulty=7 + i % 3,
        solutions={"language": [3], "solution": ["print(sum(map(int, input().split())))"]},
        incorrect_solutions={"language": [3], "solution": ["print(0)"]},
        cf_rating=800,
        time_limit={"seconds": 1, "nanos": 0},
        memory_limit_bytes=256 << 20,
        input_file="",
        output_file="",
    )
    record.update(overrides)
    return record


def _rejudge(row: dict, tests_record: dict) -> bool:
    """Run a labelled row's code on its problem's tests one by one (sandboxed: it is model output)
    and compare the outputs token by token."""
    code = row["output"]
    if "```" in code:  # a fenced answer runs its first block (the tiny model is unlikely to write one)
        block = code.split("```")[1]
        code = block.split("\n", 1)[1] if "\n" in block and block.split("\n", 1)[1].strip() else code.split("```")[0]
    for column in ("public_tests", "private_tests", "generated_tests"):
        for given, expected in zip(tests_record[column]["input"], tests_record[column]["output"]):
            result = run_program(
                code,
                stdin=given,
                timeout_s=tests_record["time_limit_s"],
                memory_mb=(tests_record["memory_limit_bytes"] >> 20) + 32,
            )  # as the judge
            if not result.passed or result.stdout.split() != expected.split():
                return False
    return True


@pytest.mark.slow
def test_label_samples_resumes_shards_and_feeds_the_critic(tiny, tmp_path):
    problems = [_problem_record(i) for i in range(5)]
    problems.insert(2, _problem_record(9, input_file="input.txt"))  # file I/O: skipped, counted
    long = " ".join(["integers"] * 5000)  # a prompt longer than the model's positions: skipped, counted
    problems.append(_problem_record(8, description=long))
    (tmp_path / "src").mkdir()
    pq.write_table(
        pa.Table.from_pylist(problems, schema=PUBLISHED_SCHEMA),
        tmp_path / "src" / "train-00000-of-00001.parquet",
        row_group_size=2,
    )
    convert(tmp_path / "src", tmp_path / "cc", splits=["train"], progress=False)
    data, out = tmp_path / "cc" / "train.jsonl", tmp_path / "labelled"
    common = [
        "scripts/label_samples.py",
        "--policy",
        str(tiny / "mtp_model"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--samples",
        "2",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.0",
        "--workers",
        "2",
        "--max-seq-len",
        "512",
    ]

    first = run_script([*common, "--max-problems", "3"])
    assert "2 problems in" in first.stdout and "skipped 1" in first.stdout
    first_rows = [json.loads(line) for line in (out / "labelled.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in first_rows] == ["100_A. Sum 0"] * 2 + ["101_A. Sum 1"] * 2
    # A kill in the middle of the next problem's writes: a torn row and a torn record.
    with open(out / "rank00000.jsonl", "a") as f:
        f.write('{"instruction": "torn')
    with open(out / "rank00000.done.jsonl", "a") as f:
        f.write('{"task_id": "103_A. Sum 3", "sta')

    second = torchrun(common[0], common[1:], nproc=2)
    assert "6 problems in" in second.stdout and "2 already labelled" in second.stdout and "4 to label" in second.stdout
    rows = [json.loads(line) for line in (out / "labelled.jsonl").read_text().splitlines()]
    names = [p["name"] for p in problems if not p["input_file"] and p["description"] != long]
    assert [r["task_id"] for r in rows] == [n for n in names for _ in range(2)]
    assert rows[:4] == first_rows  # labelled problems are kept, not redone
    assert all((out / f"rank{r:05d}.done.jsonl").read_text().strip() for r in (0, 1))  # both ranks labelled
    records = {r["name"]: r for r in map(json.loads, (tmp_path / "cc" / "train_tests.jsonl").read_text().splitlines())}
    for row in rows:
        assert validate_row(row) is None
        meta = row["metadata"]
        assert row["instruction"] == next(p["description"] for p in problems if p["name"] == row["task_id"])
        assert meta["label"] == "execution" and meta["dataset"] == "codecontests" and meta["tests_total"] == 4
        assert row["is_correct"] == (meta["status"] == PASSED) == _rejudge(row, records[row["task_id"]])
        assert meta["samples_passed"] == sum(r["is_correct"] for r in rows if r["task_id"] == row["task_id"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["labelled_problems"] == 5 and stats["rows"] == 10
    assert stats["skipped"] == {
        "reads or writes a named file": 1,
        "prompt + max_new_tokens over the model's positions": 1,
    }
    assert stats["correct"] + stats["incorrect"] == 10

    refused = run_script([*common, "--temperature", "0.5"], check=False)
    assert refused.returncode != 0 and "temperature: 1.0 then, 0.5 now" in refused.stderr

    critic = load_recipe("full_finetune_critic")
    critic.main(
        recipe_args(
            tiny,
            tmp_path / "critic",
            "critic_tiny.toml",
            **{
                "data.train_path": out / "labelled.jsonl",
                "data.sampler": "curriculum",
                "data.curriculum_bin_edges": "[0]",
                "data.curriculum_schedule": "[[0.0, 1.0]]",
                "validation.path": "",
                "training.max_steps": 3,
                "model.max_seq_len": 512,
            },
        )
    )
    assert [m["step"] for m in read_metrics(tmp_path / "critic") if "value_loss" in m] == [1, 2, 3]
