"""Tokenizer wrapper (round trip, special ids, dummy prefix) and the Alpaca template."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm

from wmtp.data.template import assemble, format_prompt, tokenize_row
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n\tdef __init__(self):\n\t\tself.items = []\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)  # even\n",
    "x = {'k': [1, 2, 3]}\nwhile x:\n    x.popitem()\n",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return SentencePieceTokenizer(train_sentencepiece(CODE, tmp_path_factory.mktemp("tok"), vocab_size=320))


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn  x ** 2   \n\n",
    "    indented = True\n",
    "  leading and trailing spaces  ",
    "unicode: é ∑ 🙂 and bytes \x01",
    "",
])
def test_code_round_trips_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_bos_eos(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece, as in LLaMA
    ids = tok.encode("x = 1", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode_batch(["a", "b c"]) == [tok.encode("a"), tok.encode("b c")]
    assert len(tok.pieces()) == tok.vocab_size == 320


def test_dummy_prefix_tokenizer_does_not_prepend_a_space(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CODE), model_writer=model, vocab_size=320,
                                   byte_fallback=True, add_dummy_prefix=True, hard_vocab_limit=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(tmp_path)
    text = "return a + b"
    assert tok.decode(tok.encode(text)) == text
    prompt, response = tok.encode_batch(["### Response:\n", text])
    assert tok.decode(prompt + response) == "### Response:\n" + text


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.model")):
        SentencePieceTokenizer(tmp_path)


def test_alpaca_template_exact_text():
    head = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nSum two ints.\n\n")
    assert format_prompt("Sum two ints.") == head + "### Response:\n"
    assert format_prompt("Sum two ints.", "1 2") == head + "### Input:\n1 2\n\n### Response:\n"


def test_tokenize_row_masks_prompt_and_keeps_response_and_eos(tok):
    row = {"instruction": "Add.", "input": "", "output": "def add(a, b):\n    return a + b\n"}
    tokens, mask = tokenize_row(tok, row)
    prompt_ids = tok.encode(format_prompt("Add."))
    response_ids = tok.encode(row["output"])
    assert tokens == [tok.bos_id, *prompt_ids, *response_ids, tok.eos_id]
    assert mask == [0] * (1 + len(prompt_ids)) + [1] * (len(response_ids) + 1)
    assert tok.decode([t for t, m in zip(tokens, mask) if m][:-1]) == row["output"]
    assert assemble([7], [8, 9], bos_id=1, eos_id=2) == ([1, 7, 8, 9, 2], [0, 0, 1, 1, 1])
