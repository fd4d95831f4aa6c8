"""Controls and token-level diagnostics (SPEC "Controls and diagnostics"): the first differing token
from data to token index, the controls' invariants, and each diagnostic against a hand computation."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from wmtp.config.sections import DataConfig
from wmtp.data.collate import encode_rows
from wmtp.data.first_diff import NO_FIRST_DIFF, response_token_at_char
from wmtp.data.index import load_or_build_index
from wmtp.data.loader import GlobalBatchLoader, read_planned
from wmtp.data.rows import validate_row
from wmtp.data.synthetic import synthetic_rows
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from wmtp.data.tokenizer_bpe import BPETokenizer, train_bpe
from wmtp.weighting.controls import (
    permute_across_batch,
    random_selection_keys,
    shuffle_within_rows,
    uniform_weights,
)
from wmtp.weighting.diagnostics import TokenDiagnostics, class_sums, pair_site_sums, site_sums, td_errors
from wmtp.weighting.rho1 import rho1_select, rho1_selected_counts

PAIRS = 150
"""Generated problems (two sibling rows each) the first-difference tests look at: every template."""


def _sentencepiece(texts: list[str], folder: Path):
    return SentencePieceTokenizer(train_sentencepiece(texts, folder, vocab_size=600))


def _byte_level_bpe(texts: list[str], folder: Path):
    return BPETokenizer(train_bpe(texts, folder, vocab_size=600))


TOKENIZER_KINDS: dict[str, Callable[[list[str], Path], object]] = {
    "sentencepiece": _sentencepiece,
    "bpe": _byte_level_bpe,
}
"""Tokenizer kinds the first difference must survive: a factory (training texts, folder) -> tokenizer
with encode_batch / decode / bos_id / eos_id / pad_id. Another kind is one more entry."""


@pytest.fixture(scope="module")
def pairs() -> list[tuple[dict, dict]]:
    rows = synthetic_rows(PAIRS, seed=5)
    return list(zip(rows[::2], rows[1::2]))


@pytest.fixture(scope="module", params=sorted(TOKENIZER_KINDS))
def tokenizer(request, pairs, tmp_path_factory):
    texts = [row["instruction"] + "\n" + row["output"] for pair in pairs for row in pair]
    return TOKENIZER_KINDS[request.param](texts, tmp_path_factory.mktemp(request.param))


def test_first_diff_char_is_where_the_siblings_first_differ(pairs):
    for correct, incorrect in pairs:
        assert correct["is_correct"] and not incorrect["is_correct"]
        opcodes = difflib.SequenceMatcher(None, correct["output"], incorrect["output"], autojunk=False).get_opcodes()
        first = next(op for op in opcodes if op[0] != "equal")
        for row in (correct, incorrect):
            assert row["metadata"]["first_diff_char"] == first[1] == first[3], row["output"]
            assert validate_row(row) is None
    bad = {**pairs[0][0], "metadata": {**pairs[0][0]["metadata"], "first_diff_char": 10_000}}
    assert validate_row(bad) == "metadata.first_diff_char is outside [0, len(output)]"


def _text_diverging_token(tokenizer, response_ids: list[int], sibling_text: str) -> int:
    """Independent of first_diff_char: the first response token after which the decoded text is no
    longer a prefix of the sibling's output (len(response_ids), the EOS, if it never stops being one)."""
    for i in range(len(response_ids)):
        if not sibling_text.startswith(tokenizer.decode(response_ids[: i + 1])):
            return i
    return len(response_ids)


def test_first_diff_token_survives_tokenisation(pairs, tokenizer, tmp_path):
    # The rows as generated, each again without its sibling's text (first_diff_char only), and a row
    # without either.
    only_char = [
        {**row, "metadata": {k: v for k, v in row["metadata"].items() if k != "sibling_output"}}
        for pair in pairs
        for row in pair
    ]
    no_sibling = {**pairs[0][0], "metadata": {"source": "s", "difficulty": 0, "has_tests": False}}
    rows = [row for pair in pairs for row in pair] + only_char + [no_sibling]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = load_or_build_index(path, tokenizer)
    one_micro_batch = [[(i,) for i in range(len(rows))]]
    (batch,) = read_planned(
        index,
        np.arange(len(rows)),
        one_micro_batch,
        tokenizer,
        n_future=2,
        device=torch.device("cpu"),
        packed=False,
        seq_len=4096,
    )
    n = 2 * len(pairs)
    examples = encode_rows(tokenizer, rows[:n])
    late = 0
    for i, row in enumerate(rows[:n]):
        sibling = i + 1 if i % 2 == 0 else i - 1
        (tokens, mask), (sibling_tokens, _) = examples[i], examples[sibling]
        # Independent: where the two rows' whole token sequences part.
        parting = next(j for j, (a, b) in enumerate([*zip(tokens, sibling_tokens), (None, 0)]) if a != b)
        j = int(batch["first_diff"][i])
        assert j == parting, row["output"]
        assert batch["mask"][i, j] and batch["tokens"][i, j] == tokens[j]  # a response target (or the EOS)
        start = mask.index(1)
        shared = tokenizer.decode(tokens[start:j])
        assert row["output"].startswith(shared) and rows[sibling]["output"].startswith(shared)
        assert len(shared) <= row["metadata"]["first_diff_char"]
        # Without the sibling's text: the token that holds the first differing character.
        by_char = int(batch["first_diff"][n + i])
        assert by_char == start + _text_diverging_token(tokenizer, tokens[start:-1], rows[sibling]["output"])
        assert by_char >= j  # never early: the tokens before j are text both rows share
        late += by_char != j
    if isinstance(tokenizer, SentencePieceTokenizer):
        assert late > 0  # the tokenisation parts before the text does somewhere (e.g. "aeio" / "aeiou")
    assert int(batch["first_diff"][-1]) == NO_FIRST_DIFF
    assert batch["sample"].tolist() == list(range(len(rows)))


def test_response_token_at_char_bisects_decoded_prefixes():
    pieces = ["def", " f", "(x", "):", "\n   ", " return", " x"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    text = decode(range(len(pieces)))
    for char in range(len(text) + 1):
        expected = next((i for i in range(len(pieces)) if len(decode(range(i + 1))) > char), len(pieces))
        assert response_token_at_char(list(range(len(pieces))), char, decode) == expected


def test_loader_rows_keep_their_draw_numbers_whatever_the_world_size(tmp_path, pairs, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for pair in pairs for r in pair))
    cfg = DataConfig(train_path=str(path), sampler="balanced", seed=3)
    common = dict(max_seq_len=1024, n_future=2, total_steps=4, device=torch.device("cpu"))
    single = GlobalBatchLoader(cfg, tokenizer, micro_batch_size=2, grad_accum_steps=2, rank=0, world_size=1, **common)
    ranks = [
        GlobalBatchLoader(cfg, tokenizer, micro_batch_size=2, grad_accum_steps=1, rank=r, world_size=2, **common)
        for r in range(2)
    ]
    for step in range(2):
        one = single.next_step()
        two = [loader.next_step()[0] for loader in ranks]
        for a, b in zip(one, two):
            assert a["sample"].tolist() == b["sample"].tolist()
            assert torch.equal(a["first_diff"], b["first_diff"]) and torch.equal(a["tokens"], b["tokens"])
        # Micro-batches group rows by length: every draw of the step once, in any order.
        assert sorted(torch.cat([mb["sample"] for mb in one]).tolist()) == list(range(4 * step, 4 * step + 4))


# --- controls -----------------------------------------------------------------------------------


def _batch(lengths: list[int], prompts: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, width] with a prompt, a response and padding per row, TD-like weights that are 0 off
    the response targets)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, (length, prompt) in enumerate(zip(lengths, prompts)):
        mask[b, prompt:length] = True
    weights = torch.rand(len(lengths), width, generator=gen) * 3 + 0.1
    return mask, torch.where(mask, weights, torch.zeros_like(weights))


def test_uniform_weights_are_one_on_response_targets_only():
    mask, _ = _batch([6, 9], [3, 2], 10, seed=0)
    assert torch.equal(uniform_weights(mask), mask.float())


def test_shuffled_keeps_each_rows_multiset_and_never_moves_weight_onto_prompt_or_padding():
    mask, weights = _batch([12, 9, 20, 5], [3, 5, 4, 2], 20, seed=1)
    samples = torch.tensor([40, 41, 42, 43])
    shuffled = shuffle_within_rows(weights, mask, samples, seed=7)
    assert torch.equal(shuffled[~mask], torch.zeros(int((~mask).sum())))  # prompt, padding stay empty
    for b in range(len(samples)):
        assert torch.equal(shuffled[b][mask[b]].sort().values, weights[b][mask[b]].sort().values)
    assert not torch.equal(shuffled, weights)
    # A row's permutation is a function of the seed and its draw number only.
    again = shuffle_within_rows(weights[[2, 0]], mask[[2, 0]], samples[[2, 0]], seed=7)
    assert torch.equal(again, shuffled[[2, 0]])
    assert not torch.equal(shuffle_within_rows(weights, mask, samples, seed=8), shuffled)


def test_random_keeps_the_steps_weight_distribution():
    batches = [_batch([12, 9], [3, 5], 14, seed=2), _batch([20, 7], [4, 2], 20, seed=3)]
    masks, weights = [m for m, _ in batches], [w for _, w in batches]
    fields = [{"mask": m, "sample": torch.tensor(s)} for m, s in zip(masks, ([10, 11], [12, 13]))]
    permuted = permute_across_batch(weights, fields, seed=1, step=5)
    before = torch.cat([w[m] for w, m in zip(weights, masks)])
    after = torch.cat([w[m] for w, m in zip(permuted, masks)])
    assert torch.equal(after.sort().values, before.sort().values) and not torch.equal(after, before)
    for w, m in zip(permuted, masks):
        assert torch.equal(w[~m], torch.zeros(int((~m).sum())))
    # Across micro-batches: weights change rows, not only positions.
    assert any(not torch.equal(p[m].sort().values, w[m].sort().values) for p, w, m in zip(permuted, weights, masks))
    assert all(torch.equal(a, b) for a, b in zip(permute_across_batch(weights, fields, seed=1, step=5), permuted))
    assert not torch.equal(permute_across_batch(weights, fields, seed=1, step=6)[0], permuted[0])


def test_random_gives_each_row_the_same_weights_however_the_micro_batches_hold_the_rows():
    """The same four rows in two micro-batches, then in the other order with rows swapped within and
    one row padded wider: every row (known by its draw number) gets the same permuted weights."""
    (m1, w1), (m2, w2) = _batch([12, 9], [3, 5], 14, seed=2), _batch([20, 7], [4, 2], 20, seed=3)
    fields = [{"mask": m1, "sample": torch.tensor([10, 11])}, {"mask": m2, "sample": torch.tensor([12, 13])}]
    first = permute_across_batch([w1, w2], fields, seed=4, step=2)
    pad = lambda x: torch.cat([x, x.new_zeros(x.shape[0], 6)], dim=1)  # noqa: E731
    reordered = [
        {"mask": m2[[1, 0]], "sample": torch.tensor([13, 12])},
        {"mask": pad(m1[[1, 0]]), "sample": torch.tensor([11, 10])},
    ]
    again = permute_across_batch([w2[[1, 0]], pad(w1[[1, 0]])], reordered, seed=4, step=2)
    assert torch.equal(again[0], first[1][[1, 0]])
    assert torch.equal(again[1][:, :14], first[0][[1, 0]]) and not again[1][:, 14:].any()


def test_rho1_random_selects_as_many_valid_pairs_per_head_whatever_the_padding():
    lengths, samples, n = torch.tensor([9, 14, 6]), torch.tensor([3, 4, 5]), 3
    keys = random_selection_keys(lengths, samples, width=14, n_heads=n, seed=2)
    wider = random_selection_keys(lengths, samples, width=30, n_heads=n, seed=2)
    assert torch.equal(wider[:, :14], keys) and torch.equal(wider[:, 14:], torch.zeros(3, 16, n))
    valid = torch.zeros(3, 14, n, dtype=torch.bool)
    for b, length in enumerate(lengths.tolist()):
        valid[b, 2 : length - 1] = True
    select = rho1_select(keys.reshape(-1, n), valid.reshape(-1, n), ratio=0.4, select_head0=False)
    counts = rho1_selected_counts(valid.reshape(-1, n).sum(0), ratio=0.4)
    assert torch.equal(select.sum(0), counts.float()) and not select[~valid.reshape(-1, n)].any()


# --- diagnostics --------------------------------------------------------------------------------


def _rank_stats(site_value: float, others: list[float]) -> tuple[bool, float]:
    """Below the median of the others (numpy's median), and P(other > site) + 0.5 P(other = site)."""
    below = site_value < float(np.median(others))
    return below, sum((o > site_value) + 0.5 * (o == site_value) for o in others) / len(others)


def test_site_and_class_diagnostics_equal_a_hand_computation():
    # Rows (targets are the masked positions j >= 1): a site with an odd and an even number of others,
    # a tie with the site, a site on a non-target (not counted), no site, and a correct row.
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 0, 0],
            [0, 1, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    w = torch.tensor(
        [
            [0, 0, 0.5, 0.9, 1.0, 3.0, 1.8],
            [0, 1.0, 0.2, 1.0, 4.0, 0.3, 1.0],
            [0, 0, 0, 0.7, 0.9, 0, 0],
            [0, 0.4, 0.8, 1.6, 0, 0, 0],
            [0, 0, 1.5, 0.1, 2.5, 0, 0],
        ]
    )
    correct = torch.tensor([False, False, False, False, True])
    first_diff = torch.tensor([3, 1, 1, -1, 3])
    valid = mask.clone()
    valid[:, 0] = False

    got = class_sums(w, valid, correct)
    assert got.tolist() == pytest.approx([1.5 + 0.1 + 2.5, 3, float(w[:4].sum()), int(mask[:4].sum())])

    # Incorrect rows 0 (four others: an even count) and 1 (five, two tied with the site) count; row 2's
    # site is a prompt token and row 3 has none.
    sums = site_sums(w, valid, first_diff, ~correct)
    b0, a0 = _rank_stats(0.9, [0.5, 1.0, 3.0, 1.8])
    b1, a1 = _rank_stats(1.0, [0.2, 1.0, 4.0, 0.3, 1.0])
    assert (b0, a0, b1, a1) == (True, 0.75, False, pytest.approx((1 + 0.5 * 2) / 5))
    assert sums.tolist() == pytest.approx([2, 1.9, 6.3 + 6.5, 9, 1, a0 + a1])

    diag = TokenDiagnostics("cpu")
    diag.add_weights(w, {"mask": mask, "is_correct": correct, "first_diff": first_diff})
    metrics = diag.metrics()
    assert metrics["diag/weight/first_diff"] == pytest.approx(0.95)
    assert metrics["diag/weight/other"] == pytest.approx(12.8 / 9)
    assert metrics["diag/weight/below_median"] == pytest.approx(0.5)
    assert metrics["diag/weight/auroc"] == pytest.approx((a0 + a1) / 2)
    assert metrics["diag/weight/first_diff_correct"] == pytest.approx(0.1)
    assert metrics["diag/weight/correct"] == pytest.approx(4.1 / 3)
    assert metrics["diag/weight/rows"] == 2


def test_td_errors_and_rho1_site_shares_equal_a_hand_computation():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    values = torch.tensor([[0.5, 0.4, 0.6, 0.1, 0.9, 0.3], [0.2, 0.3, 0.5, 0.5, 0.4, 0.8]])
    rewards = torch.tensor([0.0, 1.0])
    deltas = td_errors(values, rewards, mask, gamma=0.9)
    expected = torch.zeros(2, 6)
    for b in range(2):
        targets = [j for j in range(1, 6) if mask[b, j]]
        for j in targets:
            after = rewards[b] if j == targets[-1] else 0.9 * values[b, j]
            expected[b, j] = after - values[b, j - 1]
    torch.testing.assert_close(deltas, expected)

    # Rho-1: pairs (t, k) whose target t + 1 + k is the row's site, heads 1 and 2 only.
    select = torch.zeros(2, 6, 3)
    valid = torch.zeros(2, 6, 3, dtype=torch.bool)
    valid[0, 1:4] = True
    valid[1, :5] = True
    select[0, 1, 1] = select[0, 0, 2] = select[0, 2, 2] = 1  # row 0, site 3: (1, 1) and (0, 2) predict it
    select[1, 2, 0] = 1
    sums = pair_site_sums(select, valid, torch.tensor([3, -1]), torch.tensor([False, True, True]))
    # Row 0's valid pairs of heads 1-2: (1..3, 1), (1..3, 2); at the site: (1, 1); (0, 2) is not valid.
    assert sums.tolist() == [1.0, 1.0, 1.0, 5.0]


def test_diagnostics_are_nan_without_rows_to_count():
    diag = TokenDiagnostics("cpu")
    mask = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    diag.add_td(
        torch.zeros(1, 3), {"mask": mask, "is_correct": torch.tensor([False]), "first_diff": torch.tensor([-1])}
    )
    metrics = diag.metrics()
    assert math.isnan(metrics["diag/td/first_diff"]) and metrics["diag/td/rows"] == 0
    assert "diag/td/correct" not in metrics
