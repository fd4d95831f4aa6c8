"""Generation: plain, KV-cached and self-speculative greedy decoding all equal a naive loop (full
forward of the whole sequence per token, one row at a time), on a random and on a trained tiny MTP
model, batched with ragged prompts, EOS and max_new_tokens; seeded temperature / top-p sampling; the
model's per-row cache positions and rollback."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.conftest import needs_cuda
from wmtp.data.synthetic import synthetic_rows
from wmtp.eval.generate import STOP_EOS, STOP_LENGTH, generate, sample_from_logits
from wmtp.losses import mtp_cross_entropy
from wmtp.models import ModelArgs, MTPTransformer

RANDOM_ARGS = ModelArgs(
    dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16, n_future_tokens=4, max_seq_len=128
)
RANDOM_PROMPTS = [[1, 5, 7, 9, 11, 3, 8], [1, 40], [1, 2, 3, 4, 9, 11, 13, 2, 33, 50, 17, 6]]
BOS, EOS = 1, 2
"""Special ids of the character-level code vocabulary; characters start at CHAR_OFFSET."""
CHAR_OFFSET = 3
CODE_PROMPTS = ["def count_", "def add_3(x):\n", "def larger(a, b):\n"]
"""Of different lengths; count_char's greedy body is longer than CODE_MAX_NEW, the others end at EOS
after different numbers of tokens."""
CODE_MAX_NEW = 48


def random_model() -> MTPTransformer:
    model = MTPTransformer(RANDOM_ARGS)
    # A wide init: well-separated logits, so exact token equality is not at the mercy of rounding.
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    return model


def code_corpus(n_problems: int = 300, *, seed: int = 0) -> tuple[list[str], str]:
    """Correct solutions of the synthetic coding problems (short, repetitive Python), and their alphabet."""
    texts = [r["output"] for r in synthetic_rows(n_problems, seed=seed) if r["is_correct"]]
    return texts, "".join(sorted(set("".join(texts))))


def train_code_model(
    args: ModelArgs, *, steps: int, lr: float = 3e-3, batch_size: int = 16, seq_len: int = 64, seed: int = 0
) -> tuple[MTPTransformer, Callable[[str], list[int]], Callable[[list[int]], str]]:
    """A tiny MTP model trained on the code corpus, character-level (args.vocab_size is replaced):
    every head's CE (`mtp_cross_entropy`), AdamW, random windows of the BOS/EOS-delimited stream.
    Returns the model (eval mode) and its encode (BOS first) and decode functions."""
    texts, alphabet = code_corpus(seed=seed)
    ids = {c: CHAR_OFFSET + i for i, c in enumerate(alphabet)}
    stream = torch.tensor([t for text in texts for t in (BOS, *(ids[c] for c in text), EOS)])
    torch.manual_seed(seed)
    model = MTPTransformer(ModelArgs(**{**vars(args), "vocab_size": CHAR_OFFSET + len(alphabet)}))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = model.n_future
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - n, (batch_size,), generator=gen)
        window = torch.stack([stream[s : s + seq_len + n] for s in starts.tolist()])
        targets = torch.stack([window[:, 1 + k : 1 + k + seq_len] for k in range(n)], dim=-1)
        hidden = model(window[:, :seq_len]).hidden
        loss = (
            mtp_cross_entropy(hidden.flatten(0, 1), model.output.weight, targets.flatten(0, 1), reduction="sum")
            / targets.numel()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (
        model.eval(),
        lambda text: [BOS, *(ids[c] for c in text)],
        lambda tokens: "".join(alphabet[t - CHAR_OFFSET] for t in tokens),
    )


@pytest.fixture(scope="module")
def code_model() -> tuple[MTPTransformer, list[list[int]]]:
    model, encode, _ = train_code_model(RANDOM_ARGS, steps=200)
    return model, [encode(p) for p in CODE_PROMPTS]


def naive_greedy(model: MTPTransformer, prompt: list[int], *, max_new_tokens: int, eos_id: int | None) -> list[int]:
    """The reference: the whole sequence through the training-style forward for every token, head 0."""
    seq, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model.output(model(torch.tensor([seq])).hidden[0, -1, 0]).argmax())
            if token == eos_id:
                break
            new.append(token)
            seq.append(token)
    return new


def all_greedy_modes(model: MTPTransformer, prompts: list[list[int]], **kw) -> dict[str, object]:
    return {
        "cached": generate(model, prompts, **kw),
        "uncached": generate(model, prompts, use_cache=False, **kw),
        "speculative": generate(model, prompts, speculative=True, **kw),
    }


@pytest.mark.parametrize("rows", [[0], [0, 1, 2]], ids=["batch1", "batch3"])
def test_random_model_every_greedy_mode_equals_the_naive_loop(rows):
    model = random_model()
    prompts = [RANDOM_PROMPTS[r] for r in rows]
    # An EOS that row 0 produces early: it stops there while the other rows go on to the limit.
    eos = naive_greedy(model, prompts[0], max_new_tokens=6, eos_id=None)[5]
    want = [naive_greedy(model, p, max_new_tokens=20, eos_id=eos) for p in prompts]
    assert len(want[0]) <= 5
    for mode, got in all_greedy_modes(model, prompts, max_new_tokens=20, eos_id=eos).items():
        assert got.tokens == want, mode
        assert got.stop_reasons == [STOP_EOS if len(w) < 20 else STOP_LENGTH for w in want], mode
    if len(rows) == 3:
        assert STOP_LENGTH in got.stop_reasons and STOP_EOS in got.stop_reasons


@pytest.mark.parametrize("rows", [[2], [0, 1, 2]], ids=["batch1", "batch3"])
def test_trained_model_speculative_equals_greedy_and_accepts_drafts(code_model, rows):
    model, all_prompts = code_model
    prompts = [all_prompts[r] for r in rows]
    want = [naive_greedy(model, p, max_new_tokens=CODE_MAX_NEW, eos_id=EOS) for p in prompts]
    got = all_greedy_modes(model, prompts, max_new_tokens=CODE_MAX_NEW, eos_id=EOS)
    for mode, gen in got.items():
        assert gen.tokens == want, mode
    plain, spec = got["cached"], got["speculative"]
    if len(rows) == 3:  # rows ending at EOS at different times, one at the limit
        assert len({len(w) for w in want}) == 3 and STOP_LENGTH in spec.stop_reasons
        assert spec.stop_reasons.count(STOP_EOS) == 2
    # The heads draft well on this corpus: clearly more than one token per forward.
    assert spec.tokens_per_forward > 2.0, spec
    assert spec.forwards < plain.forwards / 2
    n = model.n_future
    for tokens, forwards in zip(spec.tokens, spec.row_forwards):
        # Each forward emits 1..n tokens; the last one may emit just the EOS.
        assert forwards - 1 <= len(tokens) <= n * forwards
    assert spec.forwards == max(spec.row_forwards)


def test_plain_greedy_counts_one_forward_per_token():
    model = random_model()
    free = generate(model, RANDOM_PROMPTS, max_new_tokens=7, eos_id=None)
    assert free.forwards == 7 and free.row_forwards == [7, 7, 7] and free.new_tokens == 21
    assert free.tokens_per_forward == 1.0 and free.stop_reasons == [STOP_LENGTH] * 3
    eos = free.tokens[1][2]
    stopped = generate(model, RANDOM_PROMPTS, max_new_tokens=7, eos_id=eos)
    # The prompt's forward gives token 1; a row that stops at EOS took a forward to produce it.
    steps = [len(t) + (r == STOP_EOS) for t, r in zip(stopped.tokens, stopped.stop_reasons)]
    assert stopped.row_forwards == steps and stopped.forwards == max(steps)
    assert stopped.tokens[1] == free.tokens[1][:2]


def test_ragged_cached_decoding_with_rollback_equals_full_forward():
    """The model API the generator builds on: per-row start positions, and rewriting a row's slots
    from an earlier position (rolled-back drafts) leaves no trace."""
    model = random_model()
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, RANDOM_ARGS.vocab_size, (n,), generator=gen) for n in (12, 14, 11)]
    full = [model.logits(s[None])[0] for s in seqs]
    prompt_lens, block = [4, 7, 2], 3
    model.setup_kv_cache(3, 20)
    prompts = torch.stack([torch.nn.functional.pad(s[:n], (0, 7 - n)) for s, n in zip(seqs, prompt_lens)])
    got = model.logits(prompts, start_pos=0, token_index=torch.tensor(prompt_lens)[:, None] - 1)
    for b, n in enumerate(prompt_lens):
        torch.testing.assert_close(got[b, 0], full[b][n - 1], rtol=1e-4, atol=1e-4)
    lens = list(prompt_lens)
    for _ in range(2):
        # Junk drafts first (a block that will be rolled back), then the true tokens from the same start.
        junk = torch.randint(0, RANDOM_ARGS.vocab_size, (3, block), generator=gen)
        model.logits(junk, start_pos=torch.tensor(lens))
        true = torch.stack([s[n : n + block] for s, n in zip(seqs, lens)])
        got = model.logits(true, start_pos=torch.tensor(lens))
        for b, n in enumerate(lens):
            torch.testing.assert_close(got[b], full[b][n : n + block], rtol=1e-4, atol=1e-4)
        lens = [n + block - b for b, n in enumerate(lens)]  # rows keep 3, 2 and 1 of the block
    model.clear_kv_cache()


def test_sampling_is_seeded_per_row_and_independent_of_the_batch():
    model = random_model()
    kw = dict(max_new_tokens=12, eos_id=None, temperature=1.0)
    first = generate(model, RANDOM_PROMPTS, seed=3, **kw)
    assert generate(model, RANDOM_PROMPTS, seed=3, **kw).tokens == first.tokens
    assert generate(model, RANDOM_PROMPTS, seed=4, **kw).tokens != first.tokens
    # Row 1's samples do not depend on the other rows (their prompts, lengths, or when they end).
    others = [[1, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8], RANDOM_PROMPTS[1], [1]]
    early_eos = generate(model, others, seed=3, **{**kw, "eos_id": first.tokens[0][0]})
    assert early_eos.tokens[1] == first.tokens[1]
    # Repeated prompts (pass@k) get different samples.
    repeated = generate(model, [RANDOM_PROMPTS[1]] * 2, seed=3, **kw)
    assert repeated.tokens[0] != repeated.tokens[1]
    # Sampling is not greedy at temperature 1, and a tiny nucleus is greedy.
    greedy = generate(model, RANDOM_PROMPTS, max_new_tokens=12, eos_id=None)
    assert first.tokens != greedy.tokens
    assert generate(model, RANDOM_PROMPTS, seed=3, top_p=1e-6, **kw).tokens == greedy.tokens


@pytest.mark.parametrize(
    "temperature, top_p, want",
    [
        (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
        (
            2.0,
            1.0,
            [w / sum([0.5**0.5, 0.3**0.5, 0.15**0.5, 0.05**0.5]) for w in [0.5**0.5, 0.3**0.5, 0.15**0.5, 0.05**0.5]],
        ),
        (1.0, 0.7, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # the nucleus {0, 1} reaches 0.8 >= 0.7
        (1.0, 0.5, [1.0, 0.0, 0.0, 0.0]),  # token 0 alone reaches 0.5
    ],
)
def test_sampling_frequencies_follow_the_tempered_nucleus(temperature, top_p, want):
    """Stratified uniforms make inverse-CDF frequencies equal the probabilities up to 1/N."""
    n = 4000
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # shuffled: ids 1, 3, 0, 2 in decreasing order
    logits = probs.log().expand(n, -1)
    tokens = sample_from_logits(logits, (torch.arange(n) + 0.5) / n, temperature=temperature, top_p=top_p)
    freq = torch.bincount(tokens, minlength=4).double() / n
    want_by_id = torch.tensor(want, dtype=torch.double)[torch.tensor([2, 0, 3, 1])]
    torch.testing.assert_close(freq, want_by_id, rtol=0, atol=2 / n)


def test_generate_restores_the_model_and_rejects_bad_arguments():
    model = random_model().train()
    generate(model, RANDOM_PROMPTS[:1], max_new_tokens=2, eos_id=None, speculative=True)
    assert model.training
    with pytest.raises(RuntimeError, match="no KV cache"):
        model.logits(torch.tensor([[1, 2]]), start_pos=0)
    # The training forward still has autograd (nothing the generator made is an inference tensor).
    model(torch.tensor([[1, 2, 3]])).hidden.sum().backward()
    with pytest.raises(ValueError, match="greedy only"):
        generate(model, RANDOM_PROMPTS, max_new_tokens=2, eos_id=None, temperature=0.7, speculative=True)
    with pytest.raises(ValueError, match="needs the KV cache"):
        generate(model, RANDOM_PROMPTS, max_new_tokens=2, eos_id=None, speculative=True, use_cache=False)
    with pytest.raises(ValueError, match="positions"):
        generate(model, RANDOM_PROMPTS, max_new_tokens=300, eos_id=None)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=2, eos_id=None)
    assert generate(model, [], max_new_tokens=2, eos_id=None).tokens == []


def test_bf16_model_generates_in_every_mode():
    model = random_model().to(torch.bfloat16)
    for speculative in (False, True):
        out = generate(model, RANDOM_PROMPTS, max_new_tokens=9, eos_id=None, speculative=speculative)
        assert [len(t) for t in out.tokens] == [9, 9, 9]
        assert all(0 <= t < RANDOM_ARGS.vocab_size for row in out.tokens for t in row)
    sampled = generate(model, RANDOM_PROMPTS, max_new_tokens=9, eos_id=None, temperature=0.8, top_p=0.9)
    assert [len(t) for t in sampled.tokens] == [9, 9, 9]


@needs_cuda
def test_cuda_generation_equals_cpu():
    model = random_model()
    kw = dict(max_new_tokens=16, eos_id=None)
    want = generate(model, RANDOM_PROMPTS, **kw).tokens
    sampled = generate(model, RANDOM_PROMPTS, temperature=0.9, top_p=0.95, seed=1, **kw).tokens
    model.cuda()
    assert generate(model, RANDOM_PROMPTS, **kw).tokens == want
    assert generate(model, RANDOM_PROMPTS, speculative=True, **kw).tokens == want
    assert generate(model, RANDOM_PROMPTS, temperature=0.9, top_p=0.95, seed=1, **kw).tokens == sampled
