"""Row index, samplers, collation and MTP targets on small local files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from wmtp.constants import IGNORE_INDEX
from wmtp.data import index as index_module
from wmtp.data.collate import collate, encode_rows, mtp_targets
from wmtp.data.index import INDEX_DTYPE, TOKEN_LENGTH_MAX, RowIndex, build_index, index_paths, load_or_build_index
from wmtp.data.rows import make_row
from wmtp.data.samplers import UNIFORM_BLOCK, BalancedSampler, CorrectOnlySampler, CurriculumSampler, split_global_batch
from wmtp.data.template import format_prompt, tokenize_row
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

VOCAB = 400
WORDS = [
    "def",
    "return",
    "for",
    "in",
    "range",
    "if",
    "else",
    "print",
    "x",
    "y",
    "n",
    "+",
    "-",
    "(",
    ")",
    ":",
    "==",
    "0",
    "1",
    "42",
    "input()",
    "int",
    "list",
    "sum",
    "é",
    "→",
]


def random_row(rng: random.Random, problem: int, *, n_words: int | None = None) -> dict:
    words = n_words if n_words is not None else rng.randint(1, 60)
    return make_row(
        instruction=f"Problem {problem}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 30))),
        input_text=rng.choice(["", "3\n1 2 3"]),
        output="\n".join(" ".join(rng.choices(WORDS, k=8)) for _ in range(max(1, words // 8))),
        task_id=f"cc/{problem}",
        is_correct=rng.random() < 0.5,
        source="test",
        difficulty=rng.randint(0, 12),
    )


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    rng = random.Random(0)
    texts = [
        format_prompt(r["instruction"], r["input"]) + r["output"] for r in (random_row(rng, p) for p in range(200))
    ]
    return SentencePieceTokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("tok"), vocab_size=VOCAB))


@pytest.fixture()
def rows_file(tmp_path) -> tuple[Path, list[dict]]:
    rng = random.Random(1)
    rows = [random_row(rng, p // 3) for p in range(150)]
    return write_jsonl(tmp_path / "train.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows]), rows


def synthetic_index(n: int, *, seed: int = 0, path: str = "data/train.jsonl") -> RowIndex:
    """An in-memory index (no file) for sampler tests."""
    rng = np.random.default_rng(seed)
    rows = np.zeros(n, dtype=INDEX_DTYPE)
    rows["offset"] = np.arange(n) * 100
    rows["problem"] = np.arange(n) // 4
    rows["token_length"] = rng.integers(10, 600, n)
    rows["difficulty"] = rng.integers(0, 15, n)
    rows["is_correct"] = rng.random(n) < 0.3
    return RowIndex(
        path=Path(path),
        rows=rows,
        problems=[f"p{i}" for i in range(n // 4 + 1)],
        skipped={},
        skipped_lines={},
        source_size=0,
        source_mtime_ns=0,
    )


# ---------------------------------------------------------------- index


def test_index_reads_back_rows_and_lengths(rows_file, tokenizer):
    path, rows = rows_file
    index = build_index(path, tokenizer, block_bytes=2048)  # several blocks, prompts shared across rows
    assert len(index) == len(rows)
    assert index.read_rows(np.arange(len(rows))) == rows
    for i, row in enumerate(rows):
        assert index.rows["token_length"][i] == len(tokenize_row(tokenizer, row)[0])
        assert index.problems[index.rows["problem"][i]] == row["task_id"]
        assert bool(index.rows["is_correct"][i]) == row["is_correct"]
        assert index.rows["difficulty"][i] == row["metadata"]["difficulty"]
    assert index.skipped == {}


def test_bad_rows_skipped_and_counted(tmp_path, tokenizer):
    rng = random.Random(2)
    good = [random_row(rng, p) for p in range(5)]
    missing = {k: v for k, v in random_row(rng, 9).items() if k != "output"}
    wrong_type = {**random_row(rng, 9), "is_correct": "yes"}
    lines = [
        json.dumps(good[0]),
        "{not json",
        "",
        json.dumps(good[1]),
        json.dumps(missing),
        "   ",
        json.dumps(good[2]),
        json.dumps(wrong_type),
        '{"truncated": ',
        json.dumps(good[3]),
        "[1, 2]",
        json.dumps(good[4]),
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b"\xff\xfe not utf-8\n")
    index = build_index(path, tokenizer)
    assert index.read_rows(range(len(index))) == good
    assert index.skipped == {
        "malformed JSON": 3,
        "missing field 'output'": 1,
        "field 'is_correct' is not a bool": 1,
        "row is not an object": 1,
    }
    assert index.skipped_lines["malformed JSON"] == [2, 9, 13]
    assert index.skipped_lines["missing field 'output'"] == [5]
    assert "malformed JSON: 3 (lines 2, 9, 13)" in index.skip_summary()
    meta = json.loads(index_paths(path)[1].read_text())
    assert meta["skipped"] == index.skipped


def test_index_reused_when_fresh_and_rebuilt_when_stale(rows_file, tokenizer, monkeypatch, tmp_path):
    path, rows = rows_file
    first = load_or_build_index(path, tokenizer)
    npy, meta = index_paths(path)
    assert npy.is_file() and meta.is_file()
    assert not list(path.parent.glob("*.tmp"))

    def no_build(*args, **kwargs):
        raise AssertionError("a fresh index must be reused")

    with monkeypatch.context() as m:
        m.setattr(index_module, "build_index", no_build)
        reused = load_or_build_index(path, tokenizer)
    assert np.array_equal(reused.rows, first.rows) and reused.problems == first.problems

    extra = random_row(random.Random(3), 999)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(extra) + "\n")
    with pytest.raises(RuntimeError, match="changed after its index was built"):
        first.read_rows([0])
    rebuilt = load_or_build_index(path, tokenizer)
    assert len(rebuilt) == len(rows) + 1 and rebuilt.read_rows([len(rows)]) == [extra]

    # Same size and content but another tokenizer: the token lengths are stale too.
    other = SentencePieceTokenizer(train_sentencepiece([r["output"] for r in rows], tmp_path / "tok2", vocab_size=300))
    relengthed = load_or_build_index(path, other)
    assert relengthed.rows["token_length"][0] == len(tokenize_row(other, rows[0])[0])

    meta.write_text("{half written")
    assert len(load_or_build_index(path, tokenizer)) == len(rows) + 1


def test_read_rows_chosen_rows_of_a_larger_file(tmp_path, tokenizer):
    rng = random.Random(4)
    rows = [random_row(rng, p // 5, n_words=rng.randint(1, 300)) for p in range(3000)]
    path = write_jsonl(tmp_path / "large.jsonl", [json.dumps(r) for r in rows])
    index = build_index(path, tokenizer, workers=2)
    ids = np.array([2999, 0, 1500, 7, 7, 2048, 1])
    assert index.read_rows(ids) == [rows[i] for i in ids]
    with pytest.raises(IndexError):
        index.read_rows([3000])


def test_worker_processes_build_the_same_index_as_one_process(tmp_path, tokenizer):
    """Blocks split anywhere (even inside a line longer than a block), bad lines in several
    blocks: two worker processes give exactly the rows, problems and skips of one process."""
    rng = random.Random(6)
    lines, good, bad = [], [], 0
    for p in range(400):
        row = random_row(rng, p // 7, n_words=rng.randint(1, 200))
        lines.append(json.dumps(row))
        good.append(row["task_id"])
        if p % 37 == 5:
            lines.append(["{broken", "", json.dumps({**row, "is_correct": 1}), "[]"][p % 4])
            bad += p % 4 != 1  # a blank line is no bad row
    lines.append(json.dumps(random_row(rng, 999, n_words=3000)))  # longer than a block
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with open(path, "ab") as f:
        f.write(json.dumps(random_row(rng, 1000)).encode())  # a last line without its newline
    good += ["cc/999", "cc/1000"]
    single = build_index(path, tokenizer, workers=1, block_bytes=1 << 20)
    parallel = build_index(path, tokenizer, workers=2, block_bytes=3000)
    assert np.array_equal(single.rows, parallel.rows) and single.problems == parallel.problems
    assert single.skipped == parallel.skipped and single.skipped_lines == parallel.skipped_lines
    assert sum(single.skipped.values()) == bad > 0
    assert [r["task_id"] for r in parallel.read_rows(range(len(parallel)))] == good
    assert np.array_equal(load_or_build_index(path, tokenizer).rows, single.rows)


def test_saved_index_is_compact_and_reads_back_exactly(tmp_path):
    """9 bytes per row on disk (11 beyond 65,536 problems); offsets, lengths, labels and
    difficulties read back bit for bit, offset steps of 4 GiB and more included."""
    n = 70_000
    rng = np.random.default_rng(7)
    rows = np.zeros(n, dtype=INDEX_DTYPE)
    rows["offset"] = np.cumsum(rng.integers(1, 5000, n))
    rows["offset"][n // 2 :] += 5 << 30  # a 5 GiB step
    rows["token_length"] = rng.integers(2, TOKEN_LENGTH_MAX + 1, n)
    rows["difficulty"] = rng.integers(0, 128, n)
    rows["is_correct"] = rng.random(n) < 0.5
    for n_problems, bytes_per_row in ((13_000, 9 + 4), (n, 11 + 4)):  # + 4: the uint64 offset steps
        rows["problem"] = rng.integers(0, n_problems, n)
        columns = index_module._to_columns(rows, n_problems)
        assert sum(c.itemsize for c in columns.values()) == bytes_per_row
        assert np.array_equal(index_module._from_columns(columns), rows)


def test_index_of_a_real_sized_file_is_9_bytes_per_row(rows_file, tokenizer):
    path, rows = rows_file
    build_index(path, tokenizer)
    npz, _ = index_paths(path)
    with np.load(npz) as saved:
        assert {k: saved[k].dtype.itemsize for k in saved.files} == {
            "offset_step": 4,
            "problem": 2,
            "length_correct": 2,
            "difficulty": 1,
        }


def test_saturated_length_is_always_too_long(tmp_path, tokenizer):
    rng = random.Random(5)
    short = {**random_row(rng, 1), "is_correct": True}
    huge = {**random_row(rng, 2), "is_correct": True, "output": "é→" * 40_000}
    index = build_index(write_jsonl(tmp_path / "huge.jsonl", [json.dumps(short), json.dumps(huge)]), tokenizer)
    assert index.rows["token_length"][1] == TOKEN_LENGTH_MAX
    sampler = CorrectOnlySampler(index, seed=0, max_seq_len=10 * TOKEN_LENGTH_MAX)
    assert sampler.too_long == 1 and set(sampler.next_ids(5).tolist()) == {0}


def test_empty_file_gives_empty_index(tmp_path, tokenizer):
    index = build_index(write_jsonl(tmp_path / "empty.jsonl", ["", "oops"]), tokenizer)
    assert len(index) == 0 and index.skipped == {"malformed JSON": 1}
    with pytest.raises(ValueError, match="no correct rows with <= 512 tokens in .*empty.jsonl"):
        CorrectOnlySampler(index, seed=0, max_seq_len=512)


# ---------------------------------------------------------------- samplers


def make_samplers(index: RowIndex, seed: int) -> dict:
    return {
        "correct_only": CorrectOnlySampler(index, seed=seed, max_seq_len=400),
        "balanced": BalancedSampler(index, seed=seed, max_seq_len=400),
        "curriculum": CurriculumSampler(
            index,
            seed=seed,
            max_seq_len=400,
            bin_edges=[0, 5, 10],
            schedule=[(0.0, [1.0, 0.0, 0.0]), (0.5, [0.3, 0.7, 0.0]), (1.0, [0.2, 0.3, 0.5])],
            total_samples=900,
        ),
    }


@pytest.mark.parametrize("kind", ["correct_only", "balanced", "curriculum"])
def test_sampler_deterministic_seeded_and_resumable(kind):
    index = synthetic_index(500)
    length = 2 * UNIFORM_BLOCK + 500  # many epochs of every pool, several blocks of uniforms
    stream = make_samplers(index, 7)[kind].next_ids(length)
    assert np.array_equal(stream, make_samplers(index, 7)[kind].next_ids(length))
    assert not np.array_equal(stream, make_samplers(index, 8)[kind].next_ids(length))
    for k in [0, 1, 3, 137, 511, UNIFORM_BLOCK - 1, UNIFORM_BLOCK + 1, 2 * UNIFORM_BLOCK + 3]:
        sampler = make_samplers(index, 7)[kind]
        head = np.concatenate([sampler.next_ids(n) for n in (k // 3, k - k // 3)])
        state = json.loads(json.dumps(sampler.state_dict()))
        resumed = make_samplers(index, 7)[kind]
        resumed.load_state_dict(state)
        tail = [resumed.next_ids(n) for n in (1, 2 * UNIFORM_BLOCK, length)]
        assert np.array_equal(np.concatenate([head, *tail])[:length], stream), k


def test_sampler_state_checks_data_and_seed():
    sampler = CorrectOnlySampler(synthetic_index(500), seed=1, max_seq_len=400)
    with pytest.raises(ValueError, match="seed"):
        CorrectOnlySampler(synthetic_index(500), seed=2, max_seq_len=400).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="pool_sizes"):
        CorrectOnlySampler(synthetic_index(600), seed=1, max_seq_len=400).load_state_dict(sampler.state_dict())


def test_correct_only_epochs_and_too_long():
    index = synthetic_index(500)
    sampler = CorrectOnlySampler(index, seed=0, max_seq_len=400)
    correct, lengths = index.rows["is_correct"].astype(bool), index.rows["token_length"]
    pool = np.flatnonzero(correct & (lengths <= 400))
    assert sampler.too_long == np.count_nonzero(correct & (lengths > 400)) > 0
    ids = sampler.next_ids(2 * len(pool))
    assert np.all(correct[ids]) and np.all(lengths[ids] <= 400)
    assert sorted(ids[: len(pool)]) == sorted(pool) == sorted(ids[len(pool) :])  # whole shuffled epochs
    assert not np.array_equal(ids[: len(pool)], ids[len(pool) :])


def test_balanced_pairs():
    index = synthetic_index(500)
    sampler = BalancedSampler(index, seed=0, max_seq_len=400)
    correct, lengths = index.rows["is_correct"].astype(bool), index.rows["token_length"]
    assert sampler.too_long == np.count_nonzero(lengths > 400)
    n_correct = np.count_nonzero(correct & (lengths <= 400))
    ids = sampler.next_ids(4 * n_correct + 2)
    assert np.all(lengths[ids] <= 400)
    pairs = correct[ids].reshape(-1, 2)
    assert np.all(pairs.sum(axis=1) == 1)
    assert 0 < np.count_nonzero(pairs[:, 0]) < len(pairs)  # which class leads a pair varies
    first_epoch = ids[: 2 * n_correct]
    assert len(set(first_epoch[correct[first_epoch]].tolist())) == n_correct
    with pytest.raises(ValueError, match="no incorrect rows with <= 512 tokens in data/train.jsonl"):
        all_correct = synthetic_index(50)
        all_correct.rows["is_correct"] = 1
        BalancedSampler(all_correct, seed=0, max_seq_len=512)


def test_curriculum_follows_schedule():
    index = synthetic_index(3000)
    total = 3000
    schedule = [(0.0, [1.0, 0.0, 0.0]), (0.2, [1.0, 0.0, 0.0]), (1.0, [0.0, 0.0, 1.0])]
    sampler = CurriculumSampler(
        index, seed=3, max_seq_len=600, bin_edges=[0, 5, 10], schedule=schedule, total_samples=total
    )
    difficulty = index.rows["difficulty"]
    early = sampler.next_ids(600)  # progress < 0.2: only the first bin
    assert np.all(difficulty[early] < 5)
    middle = sampler.next_ids(1200)
    assert 0.1 < np.mean(difficulty[middle] >= 10) < 0.5  # bin 2 weight rises 0 -> 0.5
    late = sampler.next_ids(1200)  # progress 0.6..1: mostly the hardest bin, never the unweighted middle one
    assert np.mean(difficulty[late] >= 10) > 0.7
    later = difficulty[np.concatenate([middle, late])]
    assert not np.any((later >= 5) & (later < 10))
    past_end = sampler.next_ids(200)  # progress clamped to 1: only the last bin
    assert np.all(difficulty[past_end] >= 10)
    assert np.allclose(sampler.bin_weights(0.6), [0.5, 0.0, 0.5])

    with pytest.raises(ValueError, match="no weight to any non-empty"):
        CurriculumSampler(
            index, seed=0, max_seq_len=600, bin_edges=[0, 100], schedule=[(0.0, [0.0, 1.0])], total_samples=10
        )
    with pytest.raises(ValueError, match="2 weights for 3 bins"):
        CurriculumSampler(
            index, seed=0, max_seq_len=600, bin_edges=[0, 5, 10], schedule=[(0.0, [1.0, 0.0])], total_samples=10
        )


def test_split_global_batch():
    ids = np.arange(2 * 3 * 2) + 100
    for world in (1, 2):
        for accum in (1, 2):
            batch = ids[: 3 * accum * world]
            parts = [
                split_global_batch(batch, rank=r, world_size=world, micro_batch_size=3, grad_accum=accum)
                for r in range(world)
            ]
            assert all(len(p) == accum and all(len(m) == 3 for m in p) for p in parts)
            assert np.array_equal(np.concatenate([m for p in parts for m in p]), batch)
    with pytest.raises(ValueError, match="expected micro_batch_size x grad_accum x world_size"):
        split_global_batch(ids[:5], rank=0, world_size=1, micro_batch_size=3, grad_accum=2)
    with pytest.raises(ValueError, match="rank"):
        split_global_batch(ids[:6], rank=2, world_size=2, micro_batch_size=3, grad_accum=1)


# ---------------------------------------------------------------- collate and targets


def test_encode_rows_matches_tokenize_row(rows_file, tokenizer):
    _, rows = rows_file
    assert encode_rows(tokenizer, rows[:20]) == [tokenize_row(tokenizer, r) for r in rows[:20]]


def test_collate_pads_right():
    examples = [([1, 5, 6, 7, 2], [0, 0, 1, 1, 1]), ([1, 8, 2], [0, 1, 1])]
    batch = collate(examples, pad_id=0, pad_to_multiple=4)
    assert batch["tokens"].tolist() == [[1, 5, 6, 7, 2, 0, 0, 0], [1, 8, 2, 0, 0, 0, 0, 0]]
    ig = IGNORE_INDEX
    assert batch["labels"].tolist() == [[ig, ig, 6, 7, 2, ig, ig, ig], [ig, 8, 2, ig, ig, ig, ig, ig]]
    assert batch["mask"].dtype == torch.bool and batch["mask"].sum().item() == 5
    assert batch["lengths"].tolist() == [5, 3]
    assert collate(examples, pad_id=0)["tokens"].shape == (2, 5)


def naive_targets(
    tokens: list[list[int]], mask: list[list[int]], lengths: list[int], width: int, n: int
) -> list[list[list[int]]]:
    out = [[[IGNORE_INDEX] * n for _ in range(width)] for _ in tokens]
    for b in range(len(tokens)):
        for t in range(width):
            for k in range(n):
                j = t + 1 + k
                if j < lengths[b] and mask[b][j] == 1:
                    out[b][t][k] = tokens[b][j]
    return out


@pytest.mark.parametrize("n_future", [1, 2, 4])
def test_mtp_targets_match_naive_loop(n_future):
    rng = random.Random(n_future)
    examples = []
    for _ in range(5):
        prompt, response = rng.randint(1, 6), rng.randint(0, 6)
        tokens = [1] + [rng.randint(3, 99) for _ in range(prompt + response)] + [2]
        examples.append((tokens, [0] * (1 + prompt) + [1] * (response + 1)))
    batch = collate(examples, pad_id=0, pad_to_multiple=8)
    width = batch["tokens"].shape[1]
    expected = naive_targets(
        [e[0] for e in examples], [e[1] for e in examples], [len(e[0]) for e in examples], width, n_future
    )
    targets = mtp_targets(batch["labels"], n_future)
    assert targets.shape == (5, width, n_future)
    assert targets.tolist() == expected
