"""MBPP and HumanEval as processed rows (scripts/prepare_mbpp_humaneval.py), read back as problems
and by the row index; the n-gram contamination check against a naive count written here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import ROOT, run_script

from wmtp.data.contamination import OverlapChecker
from wmtp.data.index import build_index
from wmtp.data.problems import HUMANEVAL, MBPP, Problem, load_humaneval, load_mbpp, problem_from_row
from wmtp.data.rows import validate_row
from wmtp.data.template import format_prompt
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from wmtp.eval.problems import build_prompt, reference_program
from wmtp.eval.sandbox import run_programs

SHARED = ROOT.parent / "shared" / "data"

MBPP_RECORDS = [
    {
        "task_id": 3,
        "text": "Write a function to add one.",
        "code": "def inc(x):\r\n    return x + 1",
        "test_list": ["assert inc(1) == 2"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 12,
        "text": "Write a function to double a number.",
        "code": "def dbl(x):\n    return 2 * x",
        "test_list": ["assert dbl(2) == 4", "assert dbl(0) == 0"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 515,
        "text": "Write a function to reverse a string.",
        "code": "def rev(s):\n    return s[::-1]",
        "test_list": ["assert rev('ab') == 'ba'"],
        "challenge_test_list": [],
    },  # no test_setup_code key
    {
        "task_id": 610,
        "text": "Write a function to get a box's size.",
        "code": "class Box:\n    n = 3\n\ndef size(b):\n    return b.n",
        "test_list": ["assert size(box) == 3"],
        "test_setup_code": "box = Box()",
        "challenge_test_list": [],
    },
    {
        "task_id": 974,
        "text": "Write a function to square.",
        "code": "def sq(x):\n    return x * x",
        "test_list": ["assert sq(3) == 9"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
]
HUMANEVAL_RECORDS = [
    {
        "task_id": "HumanEval/0",
        "prompt": '\n\ndef add(a: int, b: int) -> int:\n    """Add a and b."""\n',
        "entry_point": "add",
        "canonical_solution": "    return a + b\n",
        "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n',
        "entry_point": "total",
        "canonical_solution": "    return sum(xs)\n",
        "test": "\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n",
    },
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sets")
    (root / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MBPP_RECORDS))
    (root / "HumanEval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HUMANEVAL_RECORDS))
    run_script(
        [
            "scripts/prepare_mbpp_humaneval.py",
            "--mbpp",
            str(root / "mbpp.jsonl"),
            "--humaneval",
            str(root / "HumanEval.jsonl"),
            "--out",
            str(root / "out"),
        ]
    )
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mbpp_splits_by_task_id_and_rows_keep_their_tests(prepared):
    out = prepared / "out"
    split_ids = {
        split: [r["task_id"] for r in _rows(out / f"mbpp_{split}.jsonl")]
        for split in ("prompt", "test", "validation", "train")
    }
    assert split_ids == {
        "prompt": ["mbpp/3"],
        "test": ["mbpp/12"],
        "validation": ["mbpp/515"],
        "train": ["mbpp/610", "mbpp/974"],
    }
    box = _rows(out / "mbpp_train.jsonl")[0]
    assert validate_row(box) is None and box["is_correct"] and box["metadata"]["dataset"] == MBPP
    assert box["metadata"]["tests"] == ["assert size(box) == 3"] and box["metadata"]["test_setup_code"] == "box = Box()"
    assert (
        box["instruction"]
        == "Write a function to get a box's size.\nYour code should pass these tests:\nassert size(box) == 3"
    )
    assert "\r" not in _rows(out / "mbpp_prompt.jsonl")[0]["output"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["mbpp_train.jsonl"]["rows"] == 2 and stats["humaneval_test.jsonl"]["problems"] == 2


def test_rows_read_back_as_the_problems_evaluation_loads(prepared):
    out = prepared / "out"
    loaded = {p.task_id: p for p in load_mbpp(prepared / "mbpp.jsonl", task_ids=None)}
    loaded.update({p.task_id: p for p in load_humaneval(prepared / "HumanEval.jsonl")})
    rows = [r for f in sorted(out.glob("*.jsonl")) for r in _rows(f)]
    assert sorted(r["task_id"] for r in rows) == sorted(loaded)
    programs = []
    for row in rows:
        problem = problem_from_row(row)
        assert problem == loaded[row["task_id"]]
        assert build_prompt(problem) == format_prompt(row["instruction"], row["input"])  # training = eval prompt
        programs.append(reference_program(problem))
    he = next(r for r in rows if r["task_id"] == "HumanEval/1")
    assert he["output"] == HUMANEVAL_RECORDS[1]["prompt"] + "    return sum(xs)\n"
    assert all(r.passed for r in run_programs(programs, workers=2, timeout_s=10)), "every reference passes"


def test_one_index_reads_every_set(prepared, tmp_path):
    out = prepared / "out"
    texts = [format_prompt(r["instruction"]) + r["output"] for f in out.glob("*.jsonl") for r in _rows(f)]
    tokenizer = SentencePieceTokenizer(train_sentencepiece(texts * 5, tmp_path / "tok", vocab_size=400))
    for path in sorted(out.glob("*.jsonl")):
        index = build_index(path, tokenizer, workers=1)
        assert index.skipped == {} and index.read_rows(range(len(index))) == _rows(path)


@pytest.mark.skipif(not (SHARED / "HumanEval.jsonl.gz").is_file(), reason=f"needs the published sets in {SHARED}")
def test_published_sets_convert_and_round_trip(tmp_path):
    files = [SHARED / f"mbpp_{s}.json" for s in ("train", "validation", "test")]
    run_script(
        [
            "scripts/prepare_mbpp_humaneval.py",
            "--mbpp",
            *map(str, files),
            "--humaneval",
            str(SHARED / "HumanEval.jsonl.gz"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    counts = {f.name: len(_rows(f)) for f in (tmp_path / "out").glob("*.jsonl")}
    assert counts == {
        "mbpp_train.jsonl": 374,
        "mbpp_validation.jsonl": 90,
        "mbpp_test.jsonl": 500,
        "humaneval_test.jsonl": 164,
    }
    loaded = {p.task_id: p for f in files for p in load_mbpp(f, task_ids=None)}
    loaded.update({p.task_id: p for p in load_humaneval(SHARED / "HumanEval.jsonl.gz")})
    for f in (tmp_path / "out").glob("*.jsonl"):
        for row in _rows(f):
            assert validate_row(row) is None and problem_from_row(row) == loaded[row["task_id"]]


# ---------------------------------------------------------------- contamination

EVAL = [
    Problem(
        task_id="mbpp/11",
        dataset=MBPP,
        reference="def remove_occ(s, ch):\n    return s.replace(ch, '')",
        text="Write a python function to remove first and last occurrence of a given character from the string.",
        test_list=("assert remove_occ('hello','l') == 'heo'",),
    ),
    Problem(
        task_id="HumanEval/7",
        dataset=HUMANEVAL,
        reference="    return [x for x in strings if substring in x]\n",
        prompt=(
            "def filter_by_substring(strings, substring):\n"
            '    """ Filter an input list of strings only for ones that contain given substring """\n'
        ),
        entry_point="filter_by_substring",
        test="def check(c):\n    assert c([], 'a') == []\n",
    ),
    Problem(
        task_id="mbpp/12",
        dataset=MBPP,
        reference="x = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]",
        text="Numbers.",
        test_list=("assert x[13] == 13",),
    ),
]


def _row(task_id: str, instruction: str, output: str) -> dict:
    return {
        "instruction": instruction,
        "input": "",
        "output": output,
        "task_id": task_id,
        "is_correct": True,
        "metadata": {"source": "t", "difficulty": 0, "has_tests": False},
    }


def _naive_overlaps(train: list[dict], problems: list[Problem], n: int, min_shared: int) -> dict[str, tuple]:
    """task_id -> (sorted eval ids, most shared), by joined-string windows and plain loops."""

    def grams(text: str) -> set[str]:
        words, word = [], ""
        for ch in text.lower() + " ":
            if ch.isalnum() or ch == "_":
                word += ch
            elif word:
                words.append(word)
                word = ""
        out = set()
        for i in range(len(words) - n + 1):
            window = words[i : i + n]
            if sum(any(c.isalpha() for c in w) for w in window) * 2 >= n:
                out.add(" ".join(window))
        return out

    eval_grams = {}
    for p in problems:
        parts = (
            [p.prompt, p.reference, p.test]
            if p.dataset == HUMANEVAL
            else [p.text, p.reference, p.test_setup_code, *p.test_list]
        )
        eval_grams[p.task_id] = grams("\n".join(parts))
    per_task: dict[str, set[str]] = {}
    for r in train:
        per_task.setdefault(r["task_id"], set()).update(
            grams(r["instruction"]) | grams(r["input"]) | grams(r["output"])
        )
    result = {}
    for task, mine in per_task.items():
        shared = {e: len(mine & g) for e, g in eval_grams.items() if len(mine & g) >= min_shared}
        if shared:
            result[task] = (sorted(shared), max(shared.values()))
    return result


def test_contamination_matches_a_naive_count_and_drops_whole_problems(tmp_path):
    rng = random.Random(0)
    filler = "given an array of integers find the answer for each query".split()
    phrase = "TO remove first and LAST occurrence of a given character, from the string!"  # 13 words
    train = [
        _row("cc/copied", f"Task: {phrase} Then print it.", "print(1)"),  # 13+ shared words
        _row("cc/copied", f"Task: {phrase} Then print it.", "print(2)"),  # same problem, second row
        _row("cc/twelve", "remove first and last occurrence of a given character from the string", "pass"),  # 12
        _row("cc/numbers", "Print numbers.", "x = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]"),  # only digits
        _row(
            "cc/solution",
            "Keep strings.",
            "def f(strings, substring):\n"
            "    # Filter an input list of strings only for ones that contain given substring\n"
            "    return []",
        ),
    ] + [_row(f"cc/{i}", " ".join(rng.choices(filler, k=30)), "print(0)") for i in range(20)]
    checker = OverlapChecker(EVAL, n=13, min_shared=1)
    for row in train:
        checker.add_row(row)
    got = {o.task_id: (o.eval_task_ids, o.shared) for o in checker.overlaps()}
    assert got == _naive_overlaps(train, EVAL, 13, 1)
    assert {task: ids for task, (ids, _) in got.items()} == {"cc/copied": ["mbpp/11"], "cc/solution": ["HumanEval/7"]}
    assert got["cc/copied"][1] == 1  # the one 13-word window of the phrase
    strict = OverlapChecker(EVAL, n=13, min_shared=3)
    for row in train:
        strict.add_row(row)
    assert {o.task_id for o in strict.overlaps()} == set(_naive_overlaps(train, EVAL, 13, 3))

    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in train[:3])
        + "{bad line\n"
        + "".join(json.dumps(r) + "\n" for r in train[3:])
    )
    he = tmp_path / "he.jsonl"
    he.write_text(
        json.dumps(
            {
                "task_id": "HumanEval/7",
                "prompt": EVAL[1].prompt,
                "entry_point": "filter_by_substring",
                "canonical_solution": EVAL[1].reference,
                "test": EVAL[1].test,
            }
        )
        + "\n"
    )
    mb = tmp_path / "mbpp.jsonl"
    mb.write_text(
        "".join(
            json.dumps(
                {
                    "task_id": int(p.task_id[5:]),
                    "text": p.text,
                    "code": p.reference,
                    "test_list": list(p.test_list),
                    "test_setup_code": "",
                }
            )
            + "\n"
            for p in (EVAL[0], EVAL[2])
        )
    )
    run_script(
        [
            "scripts/check_contamination.py",
            "--train",
            str(path),
            "--humaneval",
            str(he),
            "--mbpp",
            str(mb),
            "--mbpp-task-ids",
            "11",
            "12",
            "--report",
            str(tmp_path / "report.json"),
            "--drop-to",
            str(tmp_path / "clean"),
        ]
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert {o["task_id"] for o in report["overlaps"]} == set(got) and report["bad_lines"] == 1
    assert report["contaminated_rows"] == sum(r["task_id"] in got for r in train)
    kept = (tmp_path / "clean" / "train.jsonl").read_text().splitlines()
    assert "{bad line" in kept and len(kept) == len(train) + 1 - report["contaminated_rows"]
    assert not any(json.loads(line)["task_id"] in got for line in kept if line != "{bad line")
