"""Sidecar index of a processed JSONL file: where each valid row starts and what samplers need.

The index is built in one streaming pass (the file is never held in memory) and saved next to the
data as ``<file>.index.npy`` (one 16-byte record per valid row) and ``<file>.index.json`` (format
version, the source file's size and mtime, the tokenizer's sha256, the task_id table and the counts
of skipped rows). Samplers choose rows from the array alone; ``RowIndex.read_rows`` then seeks to
the chosen rows' byte offsets, so training reads only the rows it uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np

from wmtp.data.rows import validate_row
from wmtp.data.template import format_prompt
from wmtp.data.tokenizer import SentencePieceTokenizer

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 2
"""Bumped when token lengths change for the same file and tokenizer (2: prompts keep the dummy prefix)."""
INDEX_SUFFIX = ".index.npy"
META_SUFFIX = ".index.json"

INDEX_DTYPE = np.dtype([
    ("offset", np.int64),        # byte offset of the row's line in the JSONL
    ("problem", np.int32),       # position of the row's task_id in RowIndex.problems
    ("token_length", np.uint16), # BOS + prompt + response + EOS, saturated at TOKEN_LENGTH_MAX
    ("difficulty", np.int8),     # metadata.difficulty, saturated at DIFFICULTY_MAX
    ("is_correct", np.uint8),
])
"""16 bytes per row: 3.7M CodeContests rows make a ~60 MB index."""

TOKEN_LENGTH_MAX = int(np.iinfo(np.uint16).max)
"""Saturation value of `token_length`: a row stored with it has at least that many tokens and is
treated as too long by every sampler (no training context comes near 64K tokens)."""

DIFFICULTY_MAX = int(np.iinfo(np.int8).max)
"""Saturation value of `difficulty` (CodeContests difficulties are 0..28)."""

MALFORMED_JSON = "malformed JSON"
SKIPPED_LINES_KEPT = 5
"""Line numbers kept per skip reason, for the log message."""

DEFAULT_CHUNK_ROWS = 8192
"""Rows parsed and tokenised per batch; peak build memory grows with it (a chunk's token ids)."""

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
        """The parsed rows at index positions `ids` (in that order), reading only those lines."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.rows)):
            raise IndexError(f"row ids must be in [0, {len(self.rows)}), got {ids.min()}..{ids.max()}")
        offsets = self.rows["offset"][ids]
        parsed: dict[int, dict[str, Any]] = {}
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != (self.source_size, self.source_mtime_ns):
                raise RuntimeError(f"{self.path} changed after its index was built; "
                                   f"reload the index (load_or_build_index) to rebuild it")
            # Ascending offsets: forward seeks only, and a row drawn twice is read once.
            for offset in np.unique(offsets).tolist():
                f.seek(offset)
                parsed[offset] = json.loads(f.readline())
        return [parsed[o] for o in offsets.tolist()]

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
    """(`<jsonl>.index.npy`, `<jsonl>.index.json`)."""
    jsonl_path = Path(jsonl_path)
    return (jsonl_path.with_name(jsonl_path.name + INDEX_SUFFIX),
            jsonl_path.with_name(jsonl_path.name + META_SUFFIX))


def tokenizer_sha256(tokenizer: SentencePieceTokenizer) -> str:
    digest = hashlib.sha256()
    with open(tokenizer.path, "rb") as f:
        for block in iter(lambda: f.read(TOKENIZER_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _available_cores() -> int:
    # sched_getaffinity honours CPU pinning (Linux only); elsewhere count every core.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _lines(f: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, line) for every line of a binary file."""
    offset = 0
    for number, line in enumerate(f, start=1):
        yield number, offset, line
        offset += len(line)


class _ChunkBuilder:
    """Accumulates a chunk of valid rows, then tokenises it in two batched calls."""

    def __init__(self, tokenizer: SentencePieceTokenizer, num_threads: int) -> None:
        self.tokenizer, self.num_threads = tokenizer, num_threads
        self.offsets: list[int] = []
        self.problems: list[int] = []
        self.difficulties: list[int] = []
        self.correct: list[bool] = []
        self.prompt_slots: list[int] = []
        self.prompts: dict[str, int] = {}  # rows of one problem share a prompt: tokenise it once
        self.outputs: list[str] = []

    def add(self, offset: int, row: dict[str, Any], problem: int) -> None:
        self.offsets.append(offset)
        self.problems.append(problem)
        self.difficulties.append(min(row["metadata"]["difficulty"], DIFFICULTY_MAX))
        self.correct.append(row["is_correct"])
        prompt = format_prompt(row["instruction"], row["input"])
        self.prompt_slots.append(self.prompts.setdefault(prompt, len(self.prompts)))
        self.outputs.append(row["output"])

    def __len__(self) -> int:
        return len(self.offsets)

    def finish(self) -> np.ndarray:
        encode = self.tokenizer.encode_batch
        # As `tokenize_row` encodes them: prompts begin the sequence, outputs continue it.
        prompt_lengths = np.array([len(x) for x in encode(list(self.prompts), prefix=True,
                                                          num_threads=self.num_threads)], dtype=np.int64)
        output_lengths = np.array([len(x) for x in encode(self.outputs, num_threads=self.num_threads)],
                                  dtype=np.int64)
        lengths = 2 + prompt_lengths[np.array(self.prompt_slots, dtype=np.int64)] + output_lengths  # BOS, EOS
        chunk = np.empty(len(self), dtype=INDEX_DTYPE)
        chunk["offset"] = self.offsets
        chunk["problem"] = self.problems
        chunk["token_length"] = np.minimum(lengths, TOKEN_LENGTH_MAX)
        chunk["difficulty"] = self.difficulties
        chunk["is_correct"] = self.correct
        return chunk


def build_index(jsonl_path: str | Path, tokenizer: SentencePieceTokenizer, *,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, num_threads: int = 0) -> RowIndex:
    """Index `jsonl_path` in one streaming pass and save the sidecar files atomically.

    Blank lines are ignored; malformed JSON and rows that fail `validate_row` are skipped and
    counted by reason. `num_threads`: tokeniser threads, 0 for every core this process may use.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    # An explicit count: sentencepiece reads 0 as a single thread.
    num_threads = num_threads if num_threads > 0 else _available_cores()
    jsonl_path = Path(jsonl_path)
    problem_ids: dict[str, int] = {}
    skipped: dict[str, int] = {}
    skipped_lines: dict[str, list[int]] = {}
    chunks: list[np.ndarray] = []
    builder = _ChunkBuilder(tokenizer, num_threads)

    def skip(reason: str, number: int) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        kept = skipped_lines.setdefault(reason, [])
        if len(kept) < SKIPPED_LINES_KEPT:
            kept.append(number)

    with open(jsonl_path, "rb") as f:
        # Stats of the version being read: a file rewritten meanwhile makes the index stale.
        st = os.fstat(f.fileno())
        for number, offset, line in _lines(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # includes invalid UTF-8
                skip(MALFORMED_JSON, number)
                continue
            reason = validate_row(row)
            if reason is not None:
                skip(reason, number)
                continue
            builder.add(offset, row, problem_ids.setdefault(row["task_id"], len(problem_ids)))
            if len(builder) >= chunk_rows:
                chunks.append(builder.finish())
                builder = _ChunkBuilder(tokenizer, num_threads)
    if len(builder):
        chunks.append(builder.finish())
    rows = np.concatenate(chunks) if chunks else np.empty(0, dtype=INDEX_DTYPE)
    del chunks  # the index is held once from here on

    index = RowIndex(path=jsonl_path, rows=rows, problems=list(problem_ids), skipped=skipped,
                     skipped_lines=skipped_lines, source_size=st.st_size, source_mtime_ns=st.st_mtime_ns)
    _save(index, tokenizer_sha256(tokenizer))
    if skipped:
        logger.warning("%s: skipped %d bad rows: %s", jsonl_path, sum(skipped.values()), index.skip_summary())
    return index


def load_or_build_index(jsonl_path: str | Path, tokenizer: SentencePieceTokenizer, *,
                        num_threads: int = 0) -> RowIndex:
    """The saved index of `jsonl_path` if it matches the file and tokenizer, else a rebuilt one."""
    jsonl_path = Path(jsonl_path)
    index = _load_fresh(jsonl_path, tokenizer_sha256(tokenizer))
    if index is None:
        logger.info("%s: building the row index", jsonl_path)
        return build_index(jsonl_path, tokenizer, num_threads=num_threads)
    if index.skipped:
        logger.warning("%s: %d bad rows were skipped when indexing: %s", jsonl_path,
                       sum(index.skipped.values()), index.skip_summary())
    return index


def _load_fresh(jsonl_path: Path, tokenizer_hash: str) -> RowIndex | None:
    npy_path, meta_path = index_paths(jsonl_path)
    try:
        meta = json.loads(meta_path.read_text())
        st = jsonl_path.stat()
        if (not isinstance(meta, dict)
                or meta.get("format_version") != INDEX_FORMAT_VERSION
                or meta.get("source_size") != st.st_size
                or meta.get("source_mtime_ns") != st.st_mtime_ns
                or meta.get("tokenizer_sha256") != tokenizer_hash):
            return None
        rows = np.load(npy_path, allow_pickle=False)
        if rows.dtype != INDEX_DTYPE or len(rows) != meta["num_rows"]:
            return None
        return RowIndex(path=jsonl_path, rows=rows, problems=meta["problems"], skipped=meta["skipped"],
                        skipped_lines=meta["skipped_lines"], source_size=st.st_size,
                        source_mtime_ns=st.st_mtime_ns)
    except (OSError, ValueError, KeyError):  # missing, half-written or foreign files: rebuild
        return None


def _save(index: RowIndex, tokenizer_hash: str) -> None:
    """Write the array, then the metadata (which vouches for it), each via temp file + rename."""
    npy_path, meta_path = index_paths(index.path)
    _atomic_write(npy_path, lambda f: np.save(f, index.rows, allow_pickle=False))
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
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta).encode()))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    # A unique temp name per writer: ranks that index the same file at once never share a temp file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
