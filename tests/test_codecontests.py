"""CodeContests converter (wmtp/data/codecontests.py, scripts/prepare_codecontests.py) on parquet
shards written here with exactly the published schema: counts, drops and stats against counts
computed independently from the generated problems."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmtp.data import index as index_module
from wmtp.data.codecontests import SchemaError, convert, iter_jsonl
from wmtp.data.index import build_index
from wmtp.data.rows import validate_row
from wmtp.data.template import format_prompt, tokenize_row
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
TOKEN_LIMIT = 160

_TESTS = pa.struct([("input", pa.list_(pa.string())), ("output", pa.list_(pa.string()))])
_SOLUTIONS = pa.struct([("language", pa.list_(pa.int64())), ("solution", pa.list_(pa.string()))])
PUBLISHED_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("description", pa.string()),
        ("public_tests", _TESTS),
        ("private_tests", _TESTS),
        ("generated_tests", _TESTS),
        ("source", pa.int64()),
        ("difficulty", pa.int64()),
        ("solutions", _SOLUTIONS),
        ("incorrect_solutions", _SOLUTIONS),
        ("cf_contest_id", pa.int64()),
        ("cf_index", pa.string()),
        ("cf_points", pa.float32()),
        ("cf_rating", pa.int32()),
        ("cf_tags", pa.list_(pa.string())),
        ("is_description_translated", pa.bool_()),
        ("untranslated_description", pa.string()),
        ("time_limit", pa.struct([("seconds", pa.int64()), ("nanos", pa.int64())])),
        ("memory_limit_bytes", pa.int64()),
        ("input_file", pa.string()),
        ("output_file", pa.string()),
    ]
)
"""The 20 published columns, in order, with the dtypes of shared/CODECONTESTS.md (ClassLabels int64)."""

SOURCES = ("unknown_source", "codechef", "codeforces", "hackerearth", "codejam", "atcoder", "aizu")
DIFFICULTIES = (
    "UNKNOWN_DIFFICULTY",
    "EASY",
    "MEDIUM",
    "HARD",
    "HARDER",
    "HARDEST",
    "EXTERNAL",
    *"ABCDEFGHIJKLMNOPQRSTUV",
)
SNIPPETS = [
    "print(input())",
    "n = int(input())\nprint(n * 2)",
    "import sys\nfor l in sys.stdin:\n\tprint(l)",
    "a, b = map(int, raw_input().split())\nprint a + b",
    "s = input()\nprint(s[::-1])",
    "print(sum(map(int, input().split())))",
    "x=1\r\nprint(x)\r\n",
    "def f(n):\n    return n\nprint(f(3))",
]
WORDS = "given an array of n integers find the maximum sum modulo query each test case print answer".split()
SPLIT_SHARDS = {"train": (3, 7, 3), "valid": (1, 6, 4), "test": (1, 5, 2)}
"""split: (shards, problems per shard, rows per row group)."""


def _solutions(rng: random.Random) -> dict | None:
    if rng.random() < 0.1:
        return None  # a null struct
    n = rng.randint(0, 9)
    langs = [rng.choice([0, 1, 2, 3, 3, 4, 1]) for _ in range(n)]
    texts = []
    for _ in range(n):
        r = rng.random()
        text = rng.choice(SNIPPETS) * (40 if r > 0.9 else 1) + (f"\n# {rng.randint(0, 3)}" if r > 0.5 else "")
        texts.append("" if r < 0.07 else " \n\t" if r < 0.12 else None if r < 0.15 else text)
    return {"language": langs, "solution": texts}


def _tests(rng: random.Random) -> dict | None:
    if rng.random() < 0.15:
        return None
    k = rng.randint(0, 3)
    return {
        "input": [f"{rng.randint(0, 99)}\n" for _ in range(k)],
        "output": [f"{rng.randint(0, 99)}\n" for _ in range(k)],
    }


def _problem(rng: random.Random, i: int) -> dict:
    r = rng.random()
    description = (
        None
        if r < 0.05
        else ""
        if r < 0.08
        else " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30 if r < 0.95 else 200)))
    )
    return {
        "name": f"{1000 + i}_{'ABCDE'[i % 5]}. Problem {i}",
        "description": description,
        "public_tests": _tests(rng),
        "private_tests": _tests(rng),
        "generated_tests": _tests(rng),
        "source": rng.randint(0, 6),
        "difficulty": rng.randint(0, 28),
        "solutions": _solutions(rng),
        "incorrect_solutions": _solutions(rng),
        "cf_contest_id": rng.randint(0, 1500),
        "cf_index": rng.choice(["", "A", "B"]),
        "cf_points": rng.choice([0.0, 500.0, None]),
        "cf_rating": rng.choice([0, 800, 1500, 3500, None]),
        "cf_tags": rng.choice([None, [], ["math", "greedy"]]),
        "is_description_translated": rng.random() < 0.1,
        "untranslated_description": rng.choice([None, "", "Дан массив"]),
        "time_limit": rng.choice([None, {"seconds": 2, "nanos": 0}, {"seconds": 1, "nanos": 500_000_000}]),
        "memory_limit_bytes": rng.choice([256 << 20, 0, None]),
        "input_file": rng.choice(["", "input.txt"]),
        "output_file": rng.choice(["", "output.txt"]),
    }


def write_shards(src: Path, seed: int = 0, schema: pa.Schema = PUBLISHED_SCHEMA) -> dict[str, list[dict]]:
    """Write the published shard layout under src/data; returns each split's problems in file order."""
    rng = random.Random(seed)
    (src / "data").mkdir(parents=True)
    problems: dict[str, list[dict]] = {}
    i = 0
    for split, (n_shards, per_shard, group_rows) in SPLIT_SHARDS.items():
        problems[split] = []
        for s in range(n_shards):
            batch = []
            for _ in range(per_shard):
                batch.append(_problem(rng, i))
                i += 1
            problems[split] += batch
            table = pa.Table.from_pylist(batch, schema=schema)
            pq.write_table(
                table, src / "data" / f"{split}-{s:05d}-of-{n_shards:05d}-abc123.parquet", row_group_size=group_rows
            )
    return problems


def expected_output(problems: list[dict], tokenizer: SentencePieceTokenizer | None, limit: int):
    """Rows (as tuples), drops, other-language count and kept / measured lengths, computed directly."""
    rows, drops, other, kept_lengths, measured = [], Counter(), 0, [], []
    for p in problems:
        description = p["description"] or ""
        tested = any((p[c] or {}).get("input") for c in ("public_tests", "private_tests", "generated_tests"))
        for label, column in (("correct", "solutions"), ("incorrect", "incorrect_solutions")):
            sols = p[column] or {"language": [], "solution": []}
            seen = set()
            for k, (lang, text) in enumerate(zip(sols["language"], sols["solution"])):
                if lang not in (1, 3):
                    other += 1
                    continue
                if not description.strip():
                    drops["no description"] += 1
                    continue
                if text is None or not text.strip():
                    drops["empty solution"] += 1
                    continue
                if text in seen:
                    drops["duplicate solution"] += 1
                    continue
                seen.add(text)
                if tokenizer is not None:
                    n = len(tokenize_row(tokenizer, {"instruction": description, "input": "", "output": text})[0])
                    measured.append(n)
                    if n > limit:
                        drops["over token limit"] += 1
                        continue
                    kept_lengths.append(n)
                rows.append(
                    (
                        p["name"],
                        f"{p['name']}/{label}/{k}",
                        label == "correct",
                        text,
                        "python2" if lang == 1 else "python3",
                        SOURCES[p["source"]],
                        DIFFICULTIES[p["difficulty"]],
                        p["cf_rating"] or 0,
                        tested,
                        description,
                    )
                )
    return rows, drops, other, kept_lengths, measured


def _as_tuple(row: dict) -> tuple:
    m = row["metadata"]
    return (
        row["task_id"],
        m["solution_id"],
        row["is_correct"],
        row["output"],
        m["language"],
        m["source"],
        DIFFICULTIES[m["difficulty"]],
        m["cf_rating"],
        m["has_tests"],
        row["instruction"],
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, list[dict]], SentencePieceTokenizer]:
    root = tmp_path_factory.mktemp("cc")
    problems = write_shards(root / "src")
    corpus = SNIPPETS * 20 + [" ".join(WORDS)] * 20 + [format_prompt("x")] * 5
    tokenizer = SentencePieceTokenizer(train_sentencepiece(corpus, root / "tok", vocab_size=400))
    return root, problems, tokenizer


def test_published_schema_has_the_20_columns() -> None:
    assert len(PUBLISHED_SCHEMA) == 20


def test_counts_drops_and_stats_match_an_independent_count(dataset, tmp_path) -> None:
    root, problems, tokenizer = dataset
    report = convert(
        root / "src", tmp_path / "out", tokenizer=tokenizer, token_limit=TOKEN_LIMIT, progress=False, num_threads=1
    )
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == report
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{s}{x}" for s in SPLIT_SHARDS for x in (".jsonl", "_tests.jsonl", ".jsonl.index.npz", ".jsonl.index.json")]
        + ["stats.json"]
    )
    for split, probs in problems.items():
        rows, drops, other, kept, measured = expected_output(probs, tokenizer, TOKEN_LIMIT)
        out_rows = list(iter_jsonl(tmp_path / "out" / f"{split}.jsonl"))
        assert all(validate_row(r) is None for r in out_rows)
        assert all(r["input"] == "" and r["metadata"]["dataset"] == "codecontests" for r in out_rows)
        # Exact rows in order: is_correct, language filter, drops, metadata.
        assert [_as_tuple(r) for r in out_rows] == rows
        st = report["splits"][split]
        assert st["shards"] == SPLIT_SHARDS[split][0] and st["problems"] == len(probs)
        assert st["rows"] == len(rows)
        assert st["correct"] == sum(r[2] for r in rows) and st["incorrect"] == sum(not r[2] for r in rows)
        assert st["other_language"] == other
        assert st["dropped"] == {
            k: drops.get(k, 0) for k in ("no description", "empty solution", "duplicate solution", "over token limit")
        }
        assert st["per_language"] == dict(Counter(r[4] for r in rows))
        assert st["per_source"] == dict(Counter(r[5] for r in rows))
        assert st["per_difficulty"] == dict(Counter(r[6] for r in rows))
        assert st["problems_with_rows"] == len({r[0] for r in rows})
        assert st["duplicate_problem_names"] == 0
        for key, lengths in (("token_length_kept", kept), ("token_length_measured", measured)):
            a = np.array(lengths)
            assert st[key] == {
                "p50": float(np.percentile(a, 50)),
                "p90": float(np.percentile(a, 90)),
                "p95": float(np.percentile(a, 95)),
                "p99": float(np.percentile(a, 99)),
                "min": float(a.min()),
                "max": float(a.max()),
                "mean": float(a.mean()),
            }
        # The converter's index is the one a build from the file makes (kept rows are all within the limit).
        path = tmp_path / "out" / f"{split}.jsonl"
        written = index_module._load_fresh(path, index_module.tokenizer_sha256(tokenizer))
        index = build_index(path, tokenizer, workers=1)
        assert index.skipped == {} and index.rows["token_length"].tolist() == kept
        assert written is not None and np.array_equal(written.rows, index.rows) and written.problems == index.problems
        # The tests sidecar: one record per problem, in order, nulls as empty lists / None.
        tests = list(iter_jsonl(tmp_path / "out" / f"{split}_tests.jsonl"))
        assert [t["name"] for t in tests] == [p["name"] for p in probs]
        for t, p in zip(tests, probs):
            for c in ("public_tests", "private_tests", "generated_tests"):
                assert t[c] == (p[c] or {"input": [], "output": []})
            tl = p["time_limit"]
            assert t["time_limit_s"] == (None if tl is None else tl["seconds"] + tl["nanos"] / 1e9)
            assert t["memory_limit_bytes"] == p["memory_limit_bytes"]
            assert (t["input_file"], t["output_file"]) == (p["input_file"], p["output_file"])
    # The generator exercised every drop reason and filter somewhere.
    total = Counter()
    for st in report["splits"].values():
        total.update(st["dropped"])
        total["other"] += st["other_language"]
        total["incorrect"] += st["incorrect"]
        total["correct"] += st["correct"]
    assert all(
        total[k] > 0
        for k in (
            "no description",
            "empty solution",
            "duplicate solution",
            "over token limit",
            "other",
            "incorrect",
            "correct",
        )
    ), total


def test_without_a_tokenizer_nothing_is_dropped_for_length(dataset, tmp_path) -> None:
    root, problems, _ = dataset
    report = convert(root / "src", tmp_path / "out", splits=("valid",), progress=False)
    rows, drops, _, _, _ = expected_output(problems["valid"], None, TOKEN_LIMIT)
    st = report["splits"]["valid"]
    assert st["rows"] == len(rows) and st["dropped"]["over token limit"] == 0
    assert st["token_length_kept"] is None and report["settings"]["token_limit"] is None
    assert not (tmp_path / "out" / "train.jsonl").exists()


@pytest.mark.parametrize(
    "column, new_type, named",
    [
        ("cf_rating", pa.string(), "cf_rating: expected int, found string"),
        (
            "solutions",
            pa.struct([("language", pa.list_(pa.string())), ("solution", pa.list_(pa.string()))]),
            "solutions.language[]: expected int, found string",
        ),
        ("time_limit", pa.int64(), "time_limit: expected struct<seconds: int, nanos: int>, found int64"),
    ],
)
def test_a_column_of_another_type_is_refused_by_name(tmp_path, column, new_type, named) -> None:
    rng = random.Random(1)
    (tmp_path / "src").mkdir()
    good = [_problem(rng, i) for i in range(3)]
    pq.write_table(
        pa.Table.from_pylist(good, schema=PUBLISHED_SCHEMA), tmp_path / "src" / "train-00000-of-00002.parquet"
    )
    bad = pa.Table.from_pylist([_problem(rng, 9)], schema=PUBLISHED_SCHEMA).drop_columns([column])
    bad = bad.add_column(PUBLISHED_SCHEMA.get_field_index(column), pa.field(column, new_type), pa.nulls(1, new_type))
    pq.write_table(bad, tmp_path / "src" / "train-00001-of-00002.parquet")
    with pytest.raises(SchemaError) as info:
        convert(tmp_path / "src", tmp_path / "out", splits=("train",), progress=False)
    assert "train-00001-of-00002.parquet" in str(info.value) and named in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_missing_columns_are_all_named(tmp_path) -> None:
    (tmp_path / "src").mkdir()
    table = pa.Table.from_pylist([_problem(random.Random(2), 0)], schema=PUBLISHED_SCHEMA)
    pq.write_table(table.drop_columns(["description", "output_file"]), tmp_path / "src" / "test-00000-of-00001.parquet")
    with pytest.raises(SchemaError, match=r"(?s)description: missing.*output_file: missing"):
        convert(tmp_path / "src", tmp_path / "out", splits=("test",), progress=False)


def test_cli_converts_and_refuses_by_name(dataset, tmp_path) -> None:
    root, problems, tokenizer = dataset
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "prepare_codecontests.py"),
        "--src",
        str(root / "src"),
        "--out",
        str(tmp_path / "out"),
        "--tokenizer",
        str(tokenizer.path),
        "--token-limit",
        str(TOKEN_LIMIT),
        "--no-progress",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    n_train = len(expected_output(problems["train"], tokenizer, TOKEN_LIMIT)[0])
    assert "rows" in proc.stdout and str(n_train) in proc.stdout and "dropped: over token limit" in proc.stdout
    assert sum(1 for _ in iter_jsonl(tmp_path / "out" / "train.jsonl")) == n_train
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    table = pa.Table.from_pylist([_problem(random.Random(3), 0)], schema=PUBLISHED_SCHEMA)
    table = table.set_column(table.schema.get_field_index("difficulty"), "difficulty", pa.array(["EASY"]))
    pq.write_table(table, bad / "valid-00000-of-00001.parquet")
    proc = subprocess.run(
        [*cmd[:3], str(bad), "--out", str(tmp_path / "out2"), "--splits", "valid"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "difficulty: expected int, found string" in proc.stderr
    assert "valid-00000-of-00001.parquet" in proc.stderr
