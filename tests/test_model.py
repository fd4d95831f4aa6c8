"""The MTP transformer against an independent naive implementation of SPEC's formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch

from wmtp.models import ModelArgs, load_mtp, save_mtp

PARAMS = dict(
    dim=48,
    n_layers=5,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=-1,
    multiple_of=16,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=500.0,
    n_future_tokens=3,
)
VOCAB = 97


def ffn_width(dim: int, multiple_of: int, mult: float | None) -> int:
    h = int(2 * 4 * dim / 3)
    if mult is not None:
        h = int(mult * h)
    return multiple_of * math.ceil(h / multiple_of)


def random_meta_state_dict(p: dict, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors under Meta's key names, built from the shapes SPEC gives (not from the model)."""
    dim, hd = p["dim"], p["dim"] // p["n_heads"]
    kv = p["n_kv_heads"] * hd
    hidden = ffn_width(dim, p["multiple_of"], p["ffn_dim_multiplier"])
    r = lambda *s: torch.randn(*s, generator=gen) * 0.2  # noqa: E731

    def block(prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.attention.wq.weight": r(dim, dim),
            f"{prefix}.attention.wk.weight": r(kv, dim),
            f"{prefix}.attention.wv.weight": r(kv, dim),
            f"{prefix}.attention.wo.weight": r(dim, dim),
            f"{prefix}.feed_forward.w1.weight": r(hidden, dim),
            f"{prefix}.feed_forward.w2.weight": r(dim, hidden),
            f"{prefix}.feed_forward.w3.weight": r(hidden, dim),
            f"{prefix}.attention_norm.weight": 1 + r(dim),
            f"{prefix}.ffn_norm.weight": 1 + r(dim),
        }

    sd = {"tok_embeddings.weight": r(vocab, dim), "norm.weight": 1 + r(dim), "output.weight": r(vocab, dim)}
    for i in range(p["n_layers"] - p["n_future_tokens"] + 1):
        sd.update(block(f"layers.{i}"))
    for j in range(p["n_future_tokens"] - 1):
        sd.update(block(f"extra_heads.{j}"))
    return sd


def naive_logits(sd: dict[str, torch.Tensor], p: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Float64 reference: complex RoPE, explicit softmax attention with repeated KV heads."""
    sd = {k: v.double() for k, v in sd.items()}
    n_heads, n_kv, dim = p["n_heads"], p["n_kv_heads"], p["dim"]
    hd, n_future, eps = dim // n_heads, p["n_future_tokens"], p["norm_eps"]
    bsz, seqlen = tokens.shape
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd))
    freqs_cis = torch.polar(
        torch.ones(seqlen, hd // 2, dtype=torch.float64), torch.outer(torch.arange(seqlen).double(), freqs)
    )

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # [B, T, H, hd], pairs (2i, 2i+1) are one complex number
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).reshape(x.shape)

    def block(x, pre):
        h = rms(x, sd[f"{pre}.attention_norm.weight"])
        q = (h @ sd[f"{pre}.attention.wq.weight"].T).view(bsz, seqlen, n_heads, hd)
        k = (h @ sd[f"{pre}.attention.wk.weight"].T).view(bsz, seqlen, n_kv, hd)
        v = (h @ sd[f"{pre}.attention.wv.weight"].T).view(bsz, seqlen, n_kv, hd)
        q, k = rope(q), rope(k)
        rep = n_heads // n_kv
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        causal = torch.triu(torch.ones(seqlen, seqlen, dtype=torch.bool), diagonal=1)
        att = scores.masked_fill(causal, float("-inf")).softmax(-1)
        o = torch.einsum("bhts,bshd->bthd", att, v).reshape(bsz, seqlen, dim)
        x = x + o @ sd[f"{pre}.attention.wo.weight"].T
        h = rms(x, sd[f"{pre}.ffn_norm.weight"])
        a = h @ sd[f"{pre}.feed_forward.w1.weight"].T
        g = a * torch.sigmoid(a) * (h @ sd[f"{pre}.feed_forward.w3.weight"].T)
        return x + g @ sd[f"{pre}.feed_forward.w2.weight"].T

    n_layers_stored = p["n_layers"] - n_future + 1
    x = sd["tok_embeddings.weight"][tokens]
    for i in range(n_layers_stored - 1):
        x = block(x, f"layers.{i}")
    heads = [f"layers.{n_layers_stored - 1}"] + [f"extra_heads.{j}" for j in range(n_future - 1)]
    outs = [rms(block(x, pre), sd["norm.weight"]) @ sd["output.weight"].T for pre in heads]
    return torch.stack(outs, dim=2)


@pytest.fixture()
def meta_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = random_meta_state_dict(PARAMS, VOCAB, gen)
    folder = tmp_path / "meta"
    folder.mkdir()
    torch.save(sd, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(PARAMS))
    return folder, sd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_meta_checkpoint_logits_match_naive_reference(meta_checkpoint):
    folder, sd = meta_checkpoint
    model = load_mtp(folder, vocab_size=VOCAB)
    assert set(model.state_dict()) == set(sd)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = model.logits(tokens)
    assert logits.shape == (2, 11, PARAMS["n_future_tokens"], VOCAB) and logits.dtype == torch.float32
    assert rel_err(logits, naive_logits(sd, PARAMS, tokens)) <= 1e-5


def test_training_forward_returns_normed_hidden_states_consistent_with_logits(meta_checkpoint):
    folder, _ = meta_checkpoint
    model = load_mtp(folder, vocab_size=VOCAB)
    tokens = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    out = model(tokens)
    assert out.hidden.shape == (3, 9, PARAMS["n_future_tokens"], PARAMS["dim"])
    assert out.ce is None and out.values is None
    torch.testing.assert_close(model.output(out.hidden), model.logits(tokens), rtol=1e-5, atol=1e-5)


def test_kv_cache_incremental_decoding_matches_full_forward(meta_checkpoint):
    folder, _ = meta_checkpoint
    model = load_mtp(folder, vocab_size=VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    full = model.logits(tokens)
    model.setup_kv_cache(batch_size=2, max_len=16)
    parts = [model.logits(tokens[:, :5], start_pos=0)]
    parts += [model.logits(tokens[:, t : t + 1], start_pos=t) for t in range(5, 9)]
    parts.append(model.logits(tokens[:, 9:], start_pos=9))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_vocab_size_minus_one_resolved_from_tokenizer_file(tmp_path, meta_checkpoint):
    folder, _ = meta_checkpoint
    with pytest.raises(ValueError, match="vocab_size is -1"):
        load_mtp(folder)


def test_missing_and_unexpected_keys_are_named(meta_checkpoint):
    folder, sd = meta_checkpoint
    broken = dict(sd)
    del broken["extra_heads.1.feed_forward.w2.weight"]
    broken["layers.0.attention.bias"] = torch.zeros(3)
    torch.save(broken, folder / "consolidated.00.pth")
    with pytest.raises(ValueError) as e:
        load_mtp(folder, vocab_size=VOCAB)
    assert "extra_heads.1.feed_forward.w2.weight" in str(e.value)
    assert "layers.0.attention.bias" in str(e.value)


def test_shape_mismatch_is_named(meta_checkpoint):
    folder, sd = meta_checkpoint
    sd = dict(sd, **{"output.weight": torch.zeros(VOCAB + 1, PARAMS["dim"])})
    torch.save(sd, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"shape of output.weight: checkpoint \(98, 48\) != model \(97, 48\)"):
        load_mtp(folder, vocab_size=VOCAB)


@pytest.mark.parametrize("n_layers", [3, 2])
def test_n_layers_not_above_n_future_is_an_error(tmp_path, n_layers):
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "n_layers": n_layers}))
    with pytest.raises(ValueError, match="trunk would be empty"):
        load_mtp(tmp_path, vocab_size=VOCAB)


def test_safetensors_round_trip_with_value_head(tmp_path, meta_checkpoint):
    folder, _ = meta_checkpoint
    model = load_mtp(folder, vocab_size=VOCAB, value_head=True)
    assert torch.count_nonzero(model.value_head.weight) == 0
    with torch.no_grad():
        model.value_head.weight.normal_()
    args = ModelArgs.load(folder)
    args.vocab_size = VOCAB
    save_mtp(tmp_path / "st", args, model.state_dict())
    again = load_mtp(tmp_path / "st")
    assert again.value_head is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    tokens = torch.randint(0, VOCAB, (1, 7))
    out = again(tokens, with_values=True)
    expected = again.value_head(again.norm(again._run(tokens, n_heads=0, start_pos=None)[0])).squeeze(-1)
    torch.testing.assert_close(out.values, expected)


def test_ffn_width_rule():
    assert ModelArgs(dim=4096, n_layers=32, n_heads=32, n_future_tokens=4).ffn_hidden_dim == 11008
