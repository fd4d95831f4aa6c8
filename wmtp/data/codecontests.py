"""CodeContests (``deepmind/code_contests`` parquet shards) as processed rows, streamed.

One parquet row is one problem; every Python 2 / Python 3 solution of it (correct and incorrect)
becomes one processed row (``wmtp.data.rows``)::

    {"instruction": description, "input": "", "output": solution, "task_id": problem name,
     "is_correct": bool, "metadata": {"source": "codeforces", "difficulty": 7, "has_tests": true,
     "dataset": "codecontests", "cf_rating": 1100, "language": "python3",
     "problem": problem name, "solution_id": "<name>/correct/3"}}

``task_id`` is the problem name, shared by the problem's rows (the row schema and the index's
problem table rely on that); ``metadata.solution_id`` names the row itself: problem name,
``correct`` or ``incorrect``, and the solution's position in that published list.
``metadata.source`` is the contest site (the dataset's ``source`` label, lower case) and
``metadata.difficulty`` the dataset's ``difficulty`` label id (0..28, not comparable across sites).

Each problem's tests (public, private, generated; time and memory limits; input/output file) go to
a sidecar ``<split>_tests.jsonl``, one line per problem, keyed by ``name``. With a tokenizer, the
rows' index (``wmtp.data.index``) is written as the rows are, from the lengths measured for the
token limit.

Solutions are filtered in this order, each drop counted by its reason: another language (counted
apart, not a drop), the problem has no description, the solution is empty (null or whitespace
only), it repeats an earlier solution of the same problem with the same label exactly, it is
longer than the token limit (BOS + prompt + response + EOS, measured as ``wmtp.data.index``
does). Shards are read one row group at a time, only the columns used, so memory stays bounded
by a row group whatever the shard size.
"""

from __future__ import annotations

import array
import dataclasses
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wmtp.atomic import atomic_directory, atomic_write_text
from wmtp.data.index import IndexWriter
from wmtp.data.rows import TEST_COLUMNS, make_row
from wmtp.data.template import format_prompt
from wmtp.data.tokenizer import Tokenizer

DATASET = "codecontests"
SPLITS = ("train", "valid", "test")
SHARD_PATTERN = re.compile(r"^(?P<split>train|valid|test)-\d+-of-\d+(-[^.]*)?\.parquet$")
"""Published shard names: ``train-00000-of-00039-<hash>.parquet`` (the hash is optional here)."""

PYTHON2, PYTHON3 = 1, 3
LANGUAGES: Mapping[int, str] = {PYTHON2: "python2", PYTHON3: "python3"}
"""Kept language ids (the dataset's ``PYTHON`` is Python 2) and their names in ``metadata.language``."""

SOURCE_NAMES = ("unknown_source", "codechef", "codeforces", "hackerearth", "codejam", "atcoder", "aizu")
"""``source`` ClassLabel ids 0..6 (Hugging Face numbering) as written in ``metadata.source``."""
DIFFICULTY_NAMES = (
    "UNKNOWN_DIFFICULTY",
    "EASY",
    "MEDIUM",
    "HARD",
    "HARDER",
    "HARDEST",
    "EXTERNAL",
    *"ABCDEFGHIJKLMNOPQRSTUV",
)
"""``difficulty`` ClassLabel ids 0..28; used as keys of the per-difficulty stats."""

CORRECT, INCORRECT = "correct", "incorrect"
SOLUTION_COLUMNS: Mapping[str, str] = {CORRECT: "solutions", INCORRECT: "incorrect_solutions"}

DROP_NO_DESCRIPTION = "no description"
DROP_EMPTY = "empty solution"
DROP_DUPLICATE = "duplicate solution"
DROP_TOO_LONG = "over token limit"
DROP_REASONS = (DROP_NO_DESCRIPTION, DROP_EMPTY, DROP_DUPLICATE, DROP_TOO_LONG)

DEFAULT_TOKEN_LIMIT = 2048
"""Longest kept row in tokens (the seed's processed set keeps rows of at most 2048 tokens)."""
PERCENTILES = (50, 90, 95, 99)
BATCH_ROWS = 64
"""Problems turned into Python objects at once within a row group (bounds peak memory)."""

# --- schema -------------------------------------------------------------------------------------

INT, STR = "int", "string"
_TESTS = {"input": [STR], "output": [STR]}
_SOLUTIONS = {"language": [INT], "solution": [STR]}
COLUMNS: Mapping[str, Any] = {
    "name": STR,
    "description": STR,
    "public_tests": _TESTS,
    "private_tests": _TESTS,
    "generated_tests": _TESTS,
    "source": INT,
    "difficulty": INT,
    "solutions": _SOLUTIONS,
    "incorrect_solutions": _SOLUTIONS,
    "cf_rating": INT,
    "time_limit": {"seconds": INT, "nanos": INT},
    "memory_limit_bytes": INT,
    "input_file": STR,
    "output_file": STR,
}
"""The columns read, with the types accepted: INT is any integer type, STR string or large_string,
[x] a list (or large list) of x, a dict a struct with (at least) those fields. Other published
columns are not read and not checked."""


class SchemaError(ValueError):
    """A shard lacks a needed column or has one of another type; the message names them all."""


def _type_text(expected: Any) -> str:
    if isinstance(expected, list):
        return f"list<{_type_text(expected[0])}>"
    if isinstance(expected, dict):
        return "struct<" + ", ".join(f"{k}: {_type_text(v)}" for k, v in expected.items()) + ">"
    return expected


def _type_problems(path: str, found: pa.DataType, expected: Any) -> list[str]:
    """Where `found` differs from `expected`: "<column.path>: expected <type>, found <type>"."""
    if isinstance(expected, list):
        if not (pa.types.is_list(found) or pa.types.is_large_list(found)):
            return [f"{path}: expected {_type_text(expected)}, found {found}"]
        return _type_problems(f"{path}[]", found.value_type, expected[0])
    if isinstance(expected, dict):
        if not pa.types.is_struct(found):
            return [f"{path}: expected {_type_text(expected)}, found {found}"]
        names = [found.field(i).name for i in range(found.num_fields)]
        out = []
        for name, sub in expected.items():
            if name not in names:
                out.append(f"{path}.{name}: missing (expected {_type_text(sub)})")
            else:
                out += _type_problems(f"{path}.{name}", found.field(name).type, sub)
        return out
    ok = pa.types.is_integer(found) if expected == INT else pa.types.is_string(found) or pa.types.is_large_string(found)
    return [] if ok else [f"{path}: expected {expected}, found {found}"]


def schema_problems(schema: pa.Schema) -> list[str]:
    """Every needed column that `schema` lacks or types differently (empty when it fits)."""
    out = []
    for name, expected in COLUMNS.items():
        if schema.get_field_index(name) < 0:
            out.append(f"{name}: missing (expected {_type_text(expected)})")
        else:
            out += _type_problems(name, schema.field(name).type, expected)
    return out


def check_shard(path: str | Path) -> pq.ParquetFile:
    """Open a shard and check its schema (metadata only); raises SchemaError naming file and columns."""
    try:
        shard = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: not a readable parquet file ({exc})") from exc
    problems = schema_problems(shard.schema_arrow)
    if problems:
        raise SchemaError(f"{path}: {len(problems)} column(s) missing or of another type:\n  " + "\n  ".join(problems))
    return shard


def find_shards(src: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, list[Path]]:
    """The published shards of each split in `src` (or `src/data`), sorted; every split must have one."""
    src = Path(src)
    folders = [d for d in (src, src / "data") if d.is_dir()]
    if not folders:
        raise FileNotFoundError(f"{src}: no such folder")
    found: dict[str, list[Path]] = {s: [] for s in splits}
    for folder in folders:
        for path in folder.iterdir():
            m = SHARD_PATTERN.match(path.name)
            if m and m["split"] in found and path.is_file():
                found[m["split"]].append(path)
    missing = [s for s, paths in found.items() if not paths]
    if missing:
        raise FileNotFoundError(
            f"{src}: no parquet shards for split(s) {', '.join(missing)} "
            f"(expected names like {missing[0]}-00000-of-00001-<hash>.parquet)"
        )
    return {s: sorted(paths) for s, paths in found.items()}


def iter_problems(shard: pq.ParquetFile) -> Iterator[dict[str, Any]]:
    """The shard's problems as dicts of the needed columns, one row group (in slices) at a time."""
    for group in range(shard.num_row_groups):
        table = shard.read_row_group(group, columns=list(COLUMNS))
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            yield from batch.to_pylist()
        del table


# --- rows ---------------------------------------------------------------------------------------


def _label(names: Sequence[str], value: int | None) -> str:
    value = value or 0
    return names[value] if 0 <= value < len(names) else str(value)


def _tests(value: Mapping[str, Any] | None) -> dict[str, list[str]]:
    value = value or {}
    return {"input": list(value.get("input") or []), "output": list(value.get("output") or [])}


def tests_record(problem: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar line of a problem: its tests, limits and I/O files, keyed by ``name``."""
    limit = problem.get("time_limit")
    seconds = None if limit is None else (limit.get("seconds") or 0) + (limit.get("nanos") or 0) / 1e9
    return {
        "name": problem["name"],
        **{c: _tests(problem.get(c)) for c in TEST_COLUMNS},
        "time_limit_s": seconds,
        "memory_limit_bytes": problem.get("memory_limit_bytes"),
        "input_file": problem.get("input_file") or "",
        "output_file": problem.get("output_file") or "",
    }


def has_tests(problem: Mapping[str, Any]) -> bool:
    return any(_tests(problem.get(c))["input"] for c in TEST_COLUMNS)


def solution_id(name: str, label: str, position: int) -> str:
    """Identifier of one solution: problem name / correct|incorrect / position in that list."""
    return f"{name}/{label}/{position}"


@dataclasses.dataclass
class Candidate:
    """A solution that passed every filter but the token limit."""

    row: dict[str, Any]
    language: str


def problem_candidates(problem: Mapping[str, Any], where: str = "") -> tuple[list[Candidate], dict[str, int], int]:
    """(rows before the length filter, drops by reason, solutions in other languages) of a problem.

    Raises ValueError (naming `where` and the problem) when a solutions struct has lists of
    different lengths.
    """
    name = problem["name"]
    if name is None:
        raise ValueError(f"{where}: a problem has a null name")
    description = problem.get("description") or ""
    drops = dict.fromkeys(DROP_REASONS, 0)
    other = 0
    out: list[Candidate] = []
    common = dict(
        source=_label(SOURCE_NAMES, problem.get("source")),
        difficulty=int(problem.get("difficulty") or 0),
        dataset=DATASET,
        cf_rating=int(problem.get("cf_rating") or 0),
        problem=name,
    )
    tested = has_tests(problem)
    for label, column in SOLUTION_COLUMNS.items():
        value = problem.get(column) or {}
        languages, solutions = value.get("language") or [], value.get("solution") or []
        if len(languages) != len(solutions):
            raise ValueError(
                f"{where}: problem {name!r}: {column} has {len(languages)} languages but {len(solutions)} solutions"
            )
        seen: set[str] = set()
        for position, (language, text) in enumerate(zip(languages, solutions)):
            if language not in LANGUAGES:
                other += 1
            elif not description.strip():
                drops[DROP_NO_DESCRIPTION] += 1
            elif text is None or not text.strip():
                drops[DROP_EMPTY] += 1
            elif text in seen:
                drops[DROP_DUPLICATE] += 1
            else:
                seen.add(text)
                # Tests live in the sidecar: make_row applies the `has_tests` given here last.
                row = make_row(
                    instruction=description,
                    output=text,
                    task_id=name,
                    is_correct=label == CORRECT,
                    tests=(),
                    has_tests=tested,
                    language=LANGUAGES[language],
                    solution_id=solution_id(name, label, position),
                    **common,
                )
                out.append(Candidate(row, LANGUAGES[language]))
    return out, drops, other


class TokenMeter:
    """Token lengths of rows as the index measures them: BOS + prompt + response + EOS."""

    def __init__(self, tokenizer: Tokenizer, num_threads: int = -1) -> None:
        self.tokenizer, self.num_threads = tokenizer, num_threads

    def lengths(self, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        prompts: dict[str, int] = {}
        slots = [prompts.setdefault(format_prompt(r["instruction"], r["input"]), len(prompts)) for r in rows]
        encode = self.tokenizer.encode_batch
        prompt_lengths = [len(x) for x in encode(list(prompts), prefix=True, num_threads=self.num_threads)]
        output_lengths = [len(x) for x in encode([r["output"] for r in rows], num_threads=self.num_threads)]
        return [2 + prompt_lengths[s] + n for s, n in zip(slots, output_lengths)]


# --- stats --------------------------------------------------------------------------------------


def _percentiles(values: array.array) -> dict[str, float] | None:
    if not len(values):
        return None
    a = np.asarray(values, dtype=np.int64)
    out = {f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}
    out["min"], out["max"], out["mean"] = float(a.min()), float(a.max()), float(a.mean())
    return out


@dataclasses.dataclass
class SplitStats:
    """Counts of one split; `kept_lengths` / `measured_lengths` are token lengths (int32)."""

    shards: int = 0
    problems: int = 0
    problems_with_rows: int = 0
    rows: int = 0
    correct: int = 0
    incorrect: int = 0
    other_language: int = 0
    per_difficulty: dict[str, int] = dataclasses.field(default_factory=dict)
    per_source: dict[str, int] = dataclasses.field(default_factory=dict)
    per_language: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    duplicate_problem_names: int = 0
    kept_lengths: array.array = dataclasses.field(default_factory=lambda: array.array("i"))
    measured_lengths: array.array = dataclasses.field(default_factory=lambda: array.array("i"))

    def add_row(self, row: Mapping[str, Any], language: str) -> None:
        meta = row["metadata"]
        self.rows += 1
        self.correct += row["is_correct"]
        self.incorrect += not row["is_correct"]
        for table, key in (
            (self.per_difficulty, _label(DIFFICULTY_NAMES, meta["difficulty"])),
            (self.per_source, meta["source"]),
            (self.per_language, language),
        ):
            table[key] = table.get(key, 0) + 1

    def to_json(self, measured: bool) -> dict[str, Any]:
        """The split's entry in stats.json (token lengths only when they were measured)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.endswith("_lengths")}
        out["token_length_kept"] = _percentiles(self.kept_lengths) if measured else None
        out["token_length_measured"] = _percentiles(self.measured_lengths) if measured else None
        return out


# --- conversion ---------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def convert_shard(
    shard: pq.ParquetFile,
    where: str,
    stats: SplitStats,
    rows_out: BinaryIO,
    tests_out: TextIO,
    meter: TokenMeter | None,
    token_limit: int,
    seen_names: set[str],
    index: IndexWriter | None = None,
) -> None:
    """Append one shard's rows and test records to the open files, counting into `stats` (and
    indexing the rows into `index`, which needs `meter`'s lengths)."""
    stats.shards += 1
    pending: list[Candidate] = []

    def flush() -> None:
        lengths = meter.lengths([c.row for c in pending]) if meter is not None else [None] * len(pending)
        rows, lines, kept = [], [], []
        for candidate, n in zip(pending, lengths):
            if n is not None:
                stats.measured_lengths.append(n)
                if n > token_limit:
                    stats.dropped[DROP_TOO_LONG] += 1
                    continue
                stats.kept_lengths.append(n)
            line = _dumps(candidate.row).encode()
            rows_out.write(line)
            rows.append(candidate.row)
            lines.append(line)
            kept.append(n)
            stats.add_row(candidate.row, candidate.language)
        if index is not None and rows:
            index.add(rows, lines, kept)
        pending.clear()

    for problem in iter_problems(shard):
        candidates, drops, other = problem_candidates(problem, where)
        name = problem["name"]
        stats.problems += 1
        if name in seen_names:
            stats.duplicate_problem_names += 1
        seen_names.add(name)
        tests_out.write(_dumps(tests_record(problem)))
        stats.other_language += other
        for reason, n in drops.items():
            stats.dropped[reason] += n
        before = stats.rows
        pending += candidates
        flush()  # per problem: a problem's prompt is tokenised once, and rows stay in order
        stats.problems_with_rows += stats.rows > before


def convert(
    src: str | Path,
    out: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    token_limit: int = DEFAULT_TOKEN_LIMIT,
    splits: Sequence[str] = SPLITS,
    overwrite: bool = False,
    progress: bool | None = None,
    num_threads: int = -1,
) -> dict[str, Any]:
    """Convert the shards in `src` into `out`/{split}.jsonl, {split}_tests.jsonl and stats.json.

    Every shard's schema is checked before anything is converted. With a tokenizer each split's
    sidecar row index is written too, from the lengths measured for the token limit. Without one no
    row is dropped for its length, no token lengths are reported and no index is written (the first
    training run builds it). `out` is written atomically
    (`overwrite` replaces an existing folder). `progress`: a tqdm bar over shards (None: only on a
    terminal). Returns the stats written to stats.json.
    """
    from tqdm import tqdm

    shards = find_shards(src, splits)
    opened = {s: [(p, check_shard(p)) for p in paths] for s, paths in shards.items()}
    meter = TokenMeter(tokenizer, num_threads) if tokenizer is not None else None
    stats = {s: SplitStats() for s in splits}
    total = sum(len(v) for v in opened.values())
    with (
        atomic_directory(out, overwrite=overwrite) as tmp,
        tqdm(total=total, unit="shard", disable=None if progress is None else not progress) as bar,
    ):
        for split, items in opened.items():
            seen: set[str] = set()
            index = IndexWriter(tmp / f"{split}.jsonl") if meter is not None else None
            with (
                open(tmp / f"{split}.jsonl", "wb") as rows_out,
                open(tmp / f"{split}_tests.jsonl", "w", encoding="utf-8") as tests_out,
            ):
                for path, shard in items:
                    bar.set_description(f"{split} {path.name}")
                    convert_shard(shard, str(path), stats[split], rows_out, tests_out, meter, token_limit, seen, index)
                    bar.update(1)
            if index is not None:
                index.save(tokenizer)
        report = {
            "settings": {
                "src": str(src),
                "token_limit": token_limit if meter else None,
                "tokenizer": str(tokenizer.path) if tokenizer else None,
                "languages": {str(k): v for k, v in LANGUAGES.items()},
                "splits": list(splits),
            },
            "splits": {s: st.to_json(measured=meter is not None) for s, st in stats.items()},
        }
        atomic_write_text(tmp / "stats.json", json.dumps(report, indent=1) + "\n")
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """The stats as a plain-text table, a column per split."""
    splits = report["splits"]
    names = list(splits)
    lines: list[tuple[str, list[Any]]] = []

    def add(label: str, get) -> None:
        lines.append((label, [get(splits[s]) for s in names]))

    for key in (
        "shards",
        "problems",
        "problems_with_rows",
        "rows",
        "correct",
        "incorrect",
        "other_language",
        "duplicate_problem_names",
    ):
        add(key.replace("_", " "), lambda st, k=key: st[k])
    for reason in DROP_REASONS:
        add(f"dropped: {reason}", lambda st, r=reason: st["dropped"][r])
    for table in ("per_language", "per_source", "per_difficulty"):
        keys = sorted(
            {k for st in splits.values() for k in st[table]},
            key=lambda k: (DIFFICULTY_NAMES.index(k) if k in DIFFICULTY_NAMES else len(DIFFICULTY_NAMES), k),
        )
        for k in keys:
            add(f"{table.split('_')[1]}: {k}", lambda st, t=table, k=k: st[t].get(k, 0))
    measured = any(st["token_length_kept"] is not None for st in splits.values())
    for p in [f"p{p}" for p in PERCENTILES] + ["max"] if measured else []:
        add(
            f"tokens {p}",
            lambda st, p=p: "-" if st["token_length_kept"] is None else f"{st['token_length_kept'][p]:.0f}",
        )
    width = max(len(label) for label, _ in lines)
    cols = [max(len(n), *(len(str(v[i])) for _, v in lines)) for i, n in enumerate(names)]
    text = [" " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, cols))]
    text += [
        label.ljust(width) + "  " + "  ".join(str(v).rjust(w) for v, w in zip(values, cols)) for label, values in lines
    ]
    return "\n".join(text)


def iter_jsonl(path: str | Path) -> Iterable[dict[str, Any]]:
    """The objects of a JSONL file written by `convert` (for checks and tests)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
