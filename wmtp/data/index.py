"""Sidecar index of a processed JSONL file: where each valid row starts and what samplers need.

The index is built in one streaming read of the file (never held in memory): blocks of whole
lines go to worker processes that parse, validate and tokenise them, and the main process merges
their results in file order. It is saved next to the data as ``<file>.index.npz`` (compact columns,
9 bytes per row, 11 with more than 65,536 problems) and ``<file>.index.json`` (format version, the
source file's size and mtime, the tokenizer's sha256, the task_id table and the counts of skipped
rows). In memory ``RowIndex.rows`` holds one 16-byte record per valid row. Samplers choose rows
from the array alone; ``RowIndex.read_rows`` then seeks to the chosen rows' byte offsets, so
training reads only the rows it uses.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from wmtp.atomic import atomic_write
from wmtp.data.rows import validate_row
from wmtp.data.template import format_prompt
from wmtp.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 3
"""Bumped when the saved index changes for the same file and tokenizer (3: compact columns)."""
INDEX_SUFFIX = ".index.npz"
META_SUFFIX = ".index.json"

INDEX_DTYPE = np.dtype(
    [
        ("offset", np.int64),  # byte offset of the row's line in the JSONL
        ("problem", np.int32),  # position of the row's task_id in RowIndex.problems
        ("token_length", np.uint16),  # BOS + prompt + response + EOS, saturated at TOKEN_LENGTH_MAX
        ("difficulty", np.int8),  # metadata.difficulty, saturated at DIFFICULTY_MAX
        ("is_correct", np.uint8),
    ]
)
"""The in-memory record of a row (16 bytes); on disk the columns are narrower (`_to_columns`)."""

CORRECT_BIT = 15
"""On disk, is_correct is the top bit of the 16-bit token length column."""
TOKEN_LENGTH_MAX = (1 << CORRECT_BIT) - 1
"""Saturation value of `token_length` (32,767): a row stored with it has at least that many tokens
and is treated as too long by every sampler (no training context comes near 32K tokens)."""

DIFFICULTY_MAX = int(np.iinfo(np.int8).max)
"""Saturation value of `difficulty` (CodeContests difficulties are 0..28)."""

COLUMNS = ("offset_step", "problem", "length_correct", "difficulty")
"""Saved columns: the offset minus the previous row's (uint32, uint64 if a step needs it), the
problem (uint16, uint32 beyond 65,536 problems), token length | is_correct << 15 (uint16) and the
difficulty (int8)."""

MALFORMED_JSON = "malformed JSON"
SKIPPED_LINES_KEPT = 5
"""Line numbers kept per skip reason, for the log message."""

DEFAULT_BLOCK_BYTES = 4 << 20
"""Bytes of whole lines parsed and tokenised per task; peak memory grows with it times the workers."""
BLOCKS_IN_FLIGHT_PER_WORKER = 2
"""Blocks handed out ahead per worker: enough to keep workers busy, few enough to bound memory."""
PARALLEL_MIN_BYTES = 32 << 20
"""Smaller files are indexed in this process (``workers=0``): starting workers would cost more."""

READ_THREADS = 16
"""Positioned reads in flight when many rows are read: a disk (or network file system) serves
them in parallel."""
PARALLEL_READ_MIN_ROWS = 64
"""Fewer rows are read one after the other (a training step's micro-batch)."""

TOKENIZER_HASH_BLOCK = 1 << 20


@dataclasses.dataclass
class RowIndex:
    """The index of one JSONL file; `rows[i]` describes the i-th valid row of the file."""

    path: Path
    rows: np.ndarray
    problems: list[str]
    skipped: dict[str, int]
    skipped_lines: dict[str, list[int]]
    source_size: int
    source_mtime_ns: int

    def __len__(self) -> int:
        return len(self.rows)

    def read_rows(self, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """The parsed rows at index positions `ids` (in that order), reading only those lines.

        A row is read with one positioned read, its size known from the next row's offset; many
        rows are read by READ_THREADS threads at once, so that a cold disk serves them in parallel.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.rows)):
            raise IndexError(f"row ids must be in [0, {len(self.rows)}), got {ids.min()}..{ids.max()}")
        unique, where = np.unique(ids, return_inverse=True)  # a row drawn twice is read once
        offsets = self.rows["offset"]
        starts = offsets[unique].tolist()
        ends = np.append(offsets[1:], self.source_size)[unique].tolist()
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != (self.source_size, self.source_mtime_ns):
                raise RuntimeError(
                    f"{self.path} changed after its index was built; "
                    f"reload the index (load_or_build_index) to rebuild it"
                )
            fd = f.fileno()

            def read(span: tuple[int, int]) -> bytes:
                data = os.pread(fd, span[1] - span[0], span[0])
                end = data.find(b"\n")  # lines the index skipped may follow the row
                return data if end < 0 else data[:end]

            spans = list(zip(starts, ends))
            if len(spans) >= PARALLEL_READ_MIN_ROWS:
                with ThreadPoolExecutor(READ_THREADS) as pool:
                    lines = list(pool.map(read, spans))
            else:
                lines = [read(span) for span in spans]
        parsed = [json.loads(line) for line in lines]
        return [parsed[i] for i in where.tolist()]

    def skip_summary(self) -> str:
        """One line naming each skip reason with its count and first line numbers."""
        parts = []
        for reason, count in sorted(self.skipped.items()):
            lines = [str(n) for n in self.skipped_lines.get(reason, [])]
            if count > len(lines):
                lines.append("...")
            parts.append(f"{reason}: {count} (lines {', '.join(lines)})")
        return "; ".join(parts)


def index_paths(jsonl_path: str | Path) -> tuple[Path, Path]:
    """(`<jsonl>.index.npz`, `<jsonl>.index.json`)."""
    jsonl_path = Path(jsonl_path)
    return (jsonl_path.with_name(jsonl_path.name + INDEX_SUFFIX), jsonl_path.with_name(jsonl_path.name + META_SUFFIX))


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256()
    with open(tokenizer.path, "rb") as f:
        for block in iter(lambda: f.read(TOKENIZER_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def available_cores() -> int:
    """Cores this process may use (CPU pinning honoured on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- one block of lines ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Block:
    """What one block of lines contributes to the index, in line order."""

    offsets: np.ndarray
    lengths: np.ndarray
    difficulties: np.ndarray
    correct: np.ndarray
    task_runs: list[str]
    """task_id of each run of consecutive valid rows that share one (rows are grouped by problem)."""
    run_lengths: list[int]
    skipped: dict[str, int]
    skipped_lines: dict[str, list[int]]


def _block_of(
    rows: Sequence[dict[str, Any]],
    offsets: Sequence[int],
    lengths: np.ndarray,
    *,
    skipped: dict[str, int] | None = None,
    skipped_lines: dict[str, list[int]] | None = None,
) -> _Block:
    """The block of valid `rows` starting at byte `offsets`, of `lengths` tokens, in file order."""
    task_runs: list[str] = []
    run_lengths: list[int] = []
    for row in rows:
        if task_runs and task_runs[-1] == row["task_id"]:
            run_lengths[-1] += 1
        else:
            task_runs.append(row["task_id"])
            run_lengths.append(1)
    return _Block(
        offsets=np.array(offsets, dtype=np.int64),
        lengths=np.asarray(lengths, dtype=np.int64).reshape(-1),
        difficulties=np.array([min(r["metadata"]["difficulty"], DIFFICULTY_MAX) for r in rows], dtype=np.int64),
        correct=np.array([r["is_correct"] for r in rows], dtype=bool),
        task_runs=task_runs,
        run_lengths=run_lengths,
        skipped=skipped or {},
        skipped_lines=skipped_lines or {},
    )


def _index_block(tokenizer: Tokenizer, data: bytes, offset: int, first_line: int, num_threads: int) -> _Block:
    """Parse, validate and measure the lines of `data`, which starts at byte `offset` of the file
    on line `first_line`; only whole lines (the last may lack its newline)."""
    rows: list[dict[str, Any]] = []
    offsets: list[int] = []
    prompts: dict[str, int] = {}  # rows of one problem share a prompt: tokenise it once
    prompt_slots: list[int] = []
    skipped: dict[str, int] = {}
    skipped_lines: dict[str, list[int]] = {}
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the block's final newline
    for number, line in enumerate(lines, start=first_line):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # includes invalid UTF-8
            reason = MALFORMED_JSON
        else:
            reason = validate_row(row)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            kept = skipped_lines.setdefault(reason, [])
            if len(kept) < SKIPPED_LINES_KEPT:
                kept.append(number)
            continue
        rows.append(row)
        offsets.append(start)
        prompt_slots.append(prompts.setdefault(format_prompt(row["instruction"], row["input"]), len(prompts)))
    encode = tokenizer.encode_batch
    # As `tokenize_row` encodes them: prompts begin the sequence, outputs continue it.
    prompt_lengths = np.array(
        [len(x) for x in encode(list(prompts), prefix=True, num_threads=num_threads)], dtype=np.int64
    )
    output_lengths = np.array(
        [len(x) for x in encode([r["output"] for r in rows], num_threads=num_threads)], dtype=np.int64
    )
    lengths = 2 + prompt_lengths[np.array(prompt_slots, dtype=np.int64)] + output_lengths  # BOS, EOS
    return _block_of(rows, offsets, lengths, skipped=skipped, skipped_lines=skipped_lines)


def _read_blocks(f: BinaryIO, block_bytes: int) -> Iterator[tuple[bytes, int, int]]:
    """(whole lines, byte offset, first line number) of a binary file, about `block_bytes` each."""
    offset, line = 0, 1
    pending: list[bytes] = []  # reads since the last newline: joined once, whatever a line's length
    while True:
        data = f.read(block_bytes)
        if not data:
            if pending:
                yield b"".join(pending), offset, line
            return
        cut = data.rfind(b"\n") + 1
        if not cut:  # no line ends in this read: read on
            pending.append(data)
            continue
        block = b"".join([*pending, data[:cut]])
        pending = [data[cut:]] if cut < len(data) else []
        yield block, offset, line
        offset += len(block)
        line += block.count(b"\n")


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _worker_block(data: bytes, offset: int, first_line: int) -> _Block:
    # One tokeniser thread per worker: the workers are the parallelism.
    return _index_block(_worker_tokenizer, data, offset, first_line, 1)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork where there is one (Linux), as torch's DataLoader does: a fresh interpreter (spawn)
    # would re-import the launching script (a recipe imports torch) in every worker.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _blocks_in_parallel(f: BinaryIO, tokenizer: Tokenizer, workers: int, block_bytes: int) -> Iterator[_Block]:
    """Every block's result in file order, computed by `workers` processes, a bounded number ahead."""
    with _pool_context().Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        pending: collections.deque = collections.deque()
        for args in _read_blocks(f, block_bytes):
            pending.append(pool.apply_async(_worker_block, args))
            if len(pending) >= BLOCKS_IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --- build, save, load ----------------------------------------------------------------------------


def _worker_count(workers: int, size: int) -> int:
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        return available_cores() if size >= PARALLEL_MIN_BYTES else 1
    return workers


class _Merger:
    """Joins blocks' results, in file order, into one index."""

    def __init__(self) -> None:
        self.problem_ids: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.skipped_lines: dict[str, list[int]] = {}
        self.parts: list[np.ndarray] = []

    def add(self, block: _Block) -> None:
        for reason, n in block.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
            kept = self.skipped_lines.setdefault(reason, [])
            kept.extend(block.skipped_lines[reason][: SKIPPED_LINES_KEPT - len(kept)])
        runs = [self.problem_ids.setdefault(t, len(self.problem_ids)) for t in block.task_runs]
        part = np.empty(len(block.offsets), dtype=INDEX_DTYPE)
        part["offset"] = block.offsets
        part["problem"] = np.repeat(np.array(runs, dtype=np.int64), block.run_lengths)
        part["token_length"] = np.minimum(block.lengths, TOKEN_LENGTH_MAX)
        part["difficulty"] = block.difficulties
        part["is_correct"] = block.correct
        self.parts.append(part)

    def finish(self, path: Path, st: os.stat_result, tokenizer: Tokenizer) -> RowIndex:
        """The index (saved beside `path`), for the file version `st`."""
        rows = np.concatenate(self.parts) if self.parts else np.empty(0, dtype=INDEX_DTYPE)
        self.parts = []  # the index is held once from here on
        index = RowIndex(
            path=path,
            rows=rows,
            problems=list(self.problem_ids),
            skipped=self.skipped,
            skipped_lines=self.skipped_lines,
            source_size=st.st_size,
            source_mtime_ns=st.st_mtime_ns,
        )
        _save(index, tokenizer_sha256(tokenizer))
        if self.skipped:
            log.warning("%s: skipped %d bad rows: %s", path, sum(self.skipped.values()), index.skip_summary())
        return index


def build_index(
    jsonl_path: str | Path,
    tokenizer: Tokenizer,
    *,
    workers: int = 0,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> RowIndex:
    """Index `jsonl_path` in one streaming read and save the sidecar files atomically.

    Blank lines are ignored; malformed JSON and rows that fail `validate_row` are skipped and
    counted by reason. `workers`: processes that parse and tokenise (0: one per core for files of
    at least PARALLEL_MIN_BYTES, else this process; 1: this process, the tokeniser using every core).
    """
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    jsonl_path = Path(jsonl_path)
    merger = _Merger()
    with open(jsonl_path, "rb") as f:
        # Stats of the version being read: a file rewritten meanwhile makes the index stale.
        st = os.fstat(f.fileno())
        workers = _worker_count(workers, st.st_size)
        if workers > 1:
            blocks = _blocks_in_parallel(f, tokenizer, workers, block_bytes)
        else:
            threads = available_cores()  # an explicit count: sentencepiece reads 0 as one thread
            blocks = (_index_block(tokenizer, *args, threads) for args in _read_blocks(f, block_bytes))
        for block in blocks:
            merger.add(block)
    return merger.finish(jsonl_path, st, tokenizer)


class IndexWriter:
    """The index of a JSONL file built while the file is written, by a converter that knows each
    row's token length (as ``build_index`` measures it): no second read or tokenisation."""

    def __init__(self, jsonl_path: str | Path) -> None:
        self.path = Path(jsonl_path)
        self.offset = 0
        self._merger = _Merger()

    def add(self, rows: Sequence[dict[str, Any]], lines: Sequence[bytes], lengths: Sequence[int]) -> None:
        """Valid rows written as `lines` (each with its newline), in file order, after the previous ones."""
        sizes = np.array([len(line) for line in lines], dtype=np.int64)
        offsets = self.offset + np.cumsum(sizes) - sizes
        self.offset += int(sizes.sum())
        self._merger.add(_block_of(rows, offsets, np.array(lengths, dtype=np.int64)))

    def save(self, tokenizer: Tokenizer) -> RowIndex:
        """Save the index once the file is complete and closed (its size must match what was added)."""
        st = self.path.stat()
        if st.st_size != self.offset:
            raise RuntimeError(f"{self.path} has {st.st_size} bytes but its index describes {self.offset}")
        return self._merger.finish(self.path, st, tokenizer)


def load_or_build_index(jsonl_path: str | Path, tokenizer: Tokenizer, *, workers: int = 0) -> RowIndex:
    """The saved index of `jsonl_path` if it matches the file and tokenizer, else a rebuilt one."""
    jsonl_path = Path(jsonl_path)
    index = _load_fresh(jsonl_path, tokenizer_sha256(tokenizer))
    if index is None:
        log.info("%s: building the row index", jsonl_path)
        return build_index(jsonl_path, tokenizer, workers=workers)
    if index.skipped:
        log.warning(
            "%s: %d bad rows were skipped when indexing: %s",
            jsonl_path,
            sum(index.skipped.values()),
            index.skip_summary(),
        )
    return index


def _smallest_unsigned(values: np.ndarray, *candidates: type) -> np.ndarray:
    top = int(values.max()) if values.size else 0
    for dtype in candidates:
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    raise ValueError(f"value {top} does not fit in {candidates[-1].__name__}")


def _to_columns(rows: np.ndarray, n_problems: int) -> dict[str, np.ndarray]:
    """The saved columns of in-memory rows (see COLUMNS)."""
    steps = np.diff(rows["offset"], prepend=0)
    length_correct = rows["token_length"].astype(np.uint16) | (rows["is_correct"].astype(np.uint16) << CORRECT_BIT)
    return {
        "offset_step": _smallest_unsigned(steps, np.uint32, np.uint64),
        "problem": rows["problem"].astype(np.uint16 if n_problems <= 1 << 16 else np.uint32),
        "length_correct": length_correct,
        "difficulty": rows["difficulty"].astype(np.int8),
    }


def _from_columns(columns: dict[str, np.ndarray]) -> np.ndarray:
    n = len(columns["offset_step"])
    if any(len(c) != n for c in columns.values()):
        raise ValueError("index columns differ in length")
    rows = np.empty(n, dtype=INDEX_DTYPE)
    rows["offset"] = np.cumsum(columns["offset_step"], dtype=np.int64)
    rows["problem"] = columns["problem"]
    rows["token_length"] = columns["length_correct"] & TOKEN_LENGTH_MAX
    rows["difficulty"] = columns["difficulty"]
    rows["is_correct"] = columns["length_correct"] >> CORRECT_BIT
    return rows


def _load_fresh(jsonl_path: Path, tokenizer_hash: str) -> RowIndex | None:
    npz_path, meta_path = index_paths(jsonl_path)
    try:
        meta = json.loads(meta_path.read_text())
        st = jsonl_path.stat()
        if (
            not isinstance(meta, dict)
            or meta.get("format_version") != INDEX_FORMAT_VERSION
            or meta.get("source_size") != st.st_size
            or meta.get("source_mtime_ns") != st.st_mtime_ns
            or meta.get("tokenizer_sha256") != tokenizer_hash
        ):
            return None
        with np.load(npz_path, allow_pickle=False) as saved:
            rows = _from_columns({name: saved[name] for name in COLUMNS})
        if len(rows) != meta["num_rows"]:
            return None
        return RowIndex(
            path=jsonl_path,
            rows=rows,
            problems=meta["problems"],
            skipped=meta["skipped"],
            skipped_lines=meta["skipped_lines"],
            source_size=st.st_size,
            source_mtime_ns=st.st_mtime_ns,
        )
    except (OSError, ValueError, KeyError, EOFError):  # missing, half-written or foreign files: rebuild
        return None


def _save(index: RowIndex, tokenizer_hash: str) -> None:
    """Write the columns, then the metadata (which vouches for them), each atomically (ranks that
    index the same file at once never share a temporary file)."""
    npz_path, meta_path = index_paths(index.path)
    columns = _to_columns(index.rows, len(index.problems))
    atomic_write(npz_path, lambda f: np.savez(f, **columns))
    meta = {
        "format_version": INDEX_FORMAT_VERSION,
        "source_size": index.source_size,
        "source_mtime_ns": index.source_mtime_ns,
        "tokenizer_sha256": tokenizer_hash,
        "num_rows": len(index.rows),
        "skipped": index.skipped,
        "skipped_lines": index.skipped_lines,
        "problems": index.problems,
    }
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta).encode()))
