"""tokenizer.json tokenizers (`tokenizers`, trained here): the prompt/response boundary, index
lengths, BOS/EOS/pad from the tokenizer's own config, the prefix-adding kinds, identity checks."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tests.hf_tiny import corpus
from wmtp.data.collate import encode_rows
from wmtp.data.index import load_or_build_index
from wmtp.data.template import format_prompt, tokenize_row
from wmtp.data.tokenizer import load_tokenizer
from wmtp.data.tokenizer_bpe import BPETokenizer, train_bpe
from wmtp.layout import TOKENIZER_CONFIG
from wmtp.models.reference import check_same_tokenizer, reference_pieces

RESPONSES = [
    "    return x + 1\n",
    " x = 1",
    "\tif x:\n\t\tpass",
    "\nprint(1)",
    "▁literal ▁ symbol",
    "<|end_of_text|> written in the code",
    "s = 'é中文' + \"\\u00e9\"",
    "",
]
"""Responses that start with what a tokenizer could swallow or add: spaces, tabs, newlines, "▁",
special-token text, non-ASCII."""


@pytest.fixture(scope="module")
def bpe(tiny, tmp_path_factory) -> BPETokenizer:
    folder = tmp_path_factory.mktemp("bpe")
    return BPETokenizer(train_bpe(corpus(tiny / "data" / "train.jsonl"), folder, vocab_size=700))


def row(output: str) -> dict:
    return {"instruction": "Add one.", "input": "", "output": output, "task_id": "t", "is_correct": True,
            "metadata": {"source": "test", "difficulty": 1, "has_tests": False}}  # fmt: skip


def test_a_response_round_trips_whatever_it_starts_with(bpe):
    assert type(load_tokenizer(bpe.path.parent)) is BPETokenizer
    prompt_ids = bpe.encode(format_prompt("Add one."), prefix=True)
    for text in RESPONSES:
        tokens, mask = tokenize_row(bpe, row(text))
        response = tokens[1 + len(prompt_ids) : -1]
        assert bpe.decode(response) == text, text
        assert tokens[0] == bpe.bos_id and tokens[-1] == bpe.eos_id and tokens[1 : 1 + len(prompt_ids)] == prompt_ids
        assert mask == [0] * (1 + len(prompt_ids)) + [1] * (len(response) + 1)
    # Special-token text is text: no EOS inside a response.
    assert bpe.eos_id not in bpe.encode("<|end_of_text|>")


def test_index_lengths_equal_collated_lengths(bpe, tmp_path):
    rows = [row(text) for text in RESPONSES] + [dict(row("x"), instruction="Twice: " * 40)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = load_or_build_index(data, bpe)
    assert index.rows["token_length"].tolist() == [len(tokens) for tokens, _ in encode_rows(bpe, rows)]
    assert [len(t) for t, _ in encode_rows(bpe, rows)] == [len(tokenize_row(bpe, r)[0]) for r in rows]


def prefixed_tokenizer(kind: str, folder: Path) -> Path:
    """Tokenizers that add a leading "▁" or space to what they encode: Llama 2's tokenizer.json
    (Prepend normaliser, Strip decoder, byte fallback), a Metaspace one, a GPT-2-style byte level."""
    texts = corpus(Path(folder).parent / "rows.jsonl")
    if kind == "llama2":
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        special = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False)
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = sorted(set(string.printable + "".join(RESPONSES)))  # no byte fallback: every character
        trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tok.train_from_iterator(texts, trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / TOKENIZER_CONFIG).write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("kind", ["llama2", "metaspace", "gpt2"])
def test_tokenizers_that_add_a_prefix_keep_it_off_the_response(kind, tiny, tmp_path):
    (tmp_path / "rows.jsonl").write_text((tiny / "data" / "train.jsonl").read_text())
    path = prefixed_tokenizer(kind, tmp_path / kind)
    ours, library = BPETokenizer(path), Tokenizer.from_file(str(path))
    prompt = format_prompt("Add one.")
    assert ours.encode(prompt, prefix=True) == library.encode(prompt, add_special_tokens=False).ids
    first = library.encode("x", add_special_tokens=False).tokens[0]
    assert first != "x" and ours.decode(ours.encode("x")) == "x"  # the library adds a prefix; ours does not
    for text in [t for t in RESPONSES if "▁" not in t or kind == "gpt2"]:
        assert ours.decode(ours.encode(text)) == text, (kind, text)
    bos, eos = library.token_to_id("<s>"), library.token_to_id("</s>")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (bos, eos, eos)  # no pad token: EOS pads


def test_special_tokens_come_from_the_tokenizer_config(bpe, tmp_path):
    folder = tmp_path / "qwen_like"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(bpe.path.read_text())
    config = folder / TOKENIZER_CONFIG
    # Qwen2's: no BOS, a pad token; sequences then start with the pad token.
    config.write_text(json.dumps({"bos_token": None, "eos_token": "<|begin_of_text|>", "pad_token": "<|end_of_text|>"}))
    tok = BPETokenizer(folder)
    assert not tok.has_bos and tok.bos_id == tok.pad_id == 1 and tok.eos_id == 0
    assert [p.name for p in tok.files] == ["tokenizer.json", TOKENIZER_CONFIG]
    config.write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert BPETokenizer(folder).bos_id == BPETokenizer(folder).eos_id == 1  # neither: the EOS
    config.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match=f"no eos_token named in {TOKENIZER_CONFIG} or special_tokens_map.json"):
        BPETokenizer(folder)
    config.write_text(json.dumps({"eos_token": "<none>"}))
    with pytest.raises(ValueError, match="eos_token '<none>' is not in its vocabulary"):
        BPETokenizer(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "mod')
    with pytest.raises(ValueError, match="does not load, truncated or not a tokenizer.json"):
        BPETokenizer(folder)


def test_policy_and_reference_tokenizer_json_must_be_identical(bpe, tiny, tmp_path):
    same = tmp_path / "same"
    same.mkdir()
    for file in bpe.files:
        (same / file.name).write_bytes(file.read_bytes())
    check_same_tokenizer(bpe, reference_pieces(same), source=str(same))
    other = tmp_path / "other"
    train_bpe(corpus(tiny / "data" / "train.jsonl", limit=40), other, vocab_size=500)
    with pytest.raises(ValueError, match="Rho-1 needs identical tokenizers"):
        check_same_tokenizer(bpe, reference_pieces(other), source=str(other))
