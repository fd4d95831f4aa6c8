"""Tokenizer wrapper (round trip, special ids, dummy prefix) and the Alpaca template."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece as spm

from wmtp.data.collate import collate, encode_rows
from wmtp.data.index import build_index
from wmtp.data.rows import make_row
from wmtp.data.template import assemble, format_prompt, tokenize_row
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from wmtp.layout import TOKENIZER_FILENAME

CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n\tdef __init__(self):\n\t\tself.items = []\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)  # even\n",
    "x = {'k': [1, 2, 3]}\nwhile x:\n    x.popitem()\n",
] * 20

TAB_CODE = [
    "def f(a, b, c):\n\tx = a\n\ty = b\n\tz = c\n\tw = 7\n\tq = x\n\treturn q\n",
    "if ok:\n\tn = 1\n\tm = 2\nelse:\n\tk = 3\n",
]
"""Tab-indented lines after varied characters, so that BPE learns the whitespace piece "\\n\\t"."""

LLAMA2_CORPUS = [format_prompt("Sum two ints.") + code for code in CODE[:4] + TAB_CODE] * 20

LLAMA2_SETTINGS = dict(
    model_type="bpe",
    add_dummy_prefix=True,
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    split_by_whitespace=True,
    character_coverage=1.0,
    max_sentence_length=1 << 16,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    minloglevel=2,
)
"""Normaliser and trainer settings of Meta's Llama-2 tokenizer.model (the MTP models' tokenizer)."""

MERGING_WHITESPACE_PIECE = "\n\t"
"""A piece the old "\\n" sentinel merged with a response's leading tab, dropping it."""

RESPONSES = [
    "\treturn x\n",
    " x = 1",
    "  return x",
    "\nprint(1)",
    "\n\tpass\n",
    "\u2581x",
    "\u2581",
    "42 is the answer",
    "é ∑ 🙂 unicode",
    "",
    "a \u2581 b\u2581\u2581c",
]
"""Responses that start (or go on) with what sentencepiece may merge, strip or read as a space."""

PROMPT = format_prompt("Sum two ints.", "1 2")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(train_sentencepiece(CODE, tmp_path_factory.mktemp("tok"), vocab_size=320))


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory) -> SentencePieceTokenizer:
    """A small tokenizer trained with Llama-2's settings; it must have the pieces the tests rely on."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LLAMA2_CORPUS), model_writer=model, vocab_size=400, **LLAMA2_SETTINGS
    )
    path = tmp_path_factory.mktemp("llama2_tok") / TOKENIZER_FILENAME
    path.write_bytes(model.getvalue())
    tokenizer = SentencePieceTokenizer(path)
    assert {MERGING_WHITESPACE_PIECE, "\u2581Below"} <= set(tokenizer.pieces())
    return tokenizer


@pytest.fixture(params=["tok", "llama_tok"])
def any_tok(request) -> SentencePieceTokenizer:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\treturn  x ** 2   \n\n",
        "    indented = True\n",
        "  leading and trailing spaces  ",
        "unicode: é ∑ 🙂 and bytes \x01",
        "",
    ],
)
def test_code_round_trips_exactly(any_tok, text):
    assert any_tok.decode(any_tok.encode(text)) == text
    assert any_tok.decode(any_tok.encode(text, prefix=True), prefix=True) == text


def test_tokenizer_without_dummy_prefix_encodes_as_sentencepiece_does(tok):
    plain = spm.SentencePieceProcessor(model_file=str(tok.path))
    for text in [PROMPT, *RESPONSES[:5], CODE[1]]:
        ids = plain.encode(text)
        assert tok.encode(text) == tok.encode(text, prefix=True) == ids
        assert tok.decode(ids) == tok.decode(ids, prefix=True) == plain.decode(ids) == text


def test_special_ids_and_bos_eos(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece, as in LLaMA
    ids = tok.encode("x = 1", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode_batch(["a", "b c"]) == [tok.encode("a"), tok.encode("b c")]
    assert len(tok.pieces()) == tok.vocab_size == 320


@pytest.mark.parametrize("prefix", [False, True])
def test_encode_batch_matches_encode(any_tok, prefix):
    texts = [PROMPT, *RESPONSES]
    assert any_tok.encode_batch(texts, bos=True, eos=True, prefix=prefix, num_threads=2) == [
        any_tok.encode(t, bos=True, eos=True, prefix=prefix) for t in texts
    ]


def test_prompt_starts_with_the_dummy_prefix_as_sentencepiece_encodes_it(llama_tok):
    prompt_ids = llama_tok.encode(PROMPT, prefix=True)
    assert llama_tok.pieces()[prompt_ids[0]] == "\u2581Below"
    assert prompt_ids == spm.SentencePieceProcessor(model_file=str(llama_tok.path)).encode(PROMPT)
    assert llama_tok.decode(prompt_ids, prefix=True) == PROMPT


@pytest.mark.parametrize("response", RESPONSES)
def test_response_round_trips_alone_and_after_the_prompt(any_tok, response):
    prompt_ids, response_ids = any_tok.encode(PROMPT, prefix=True), any_tok.encode(response)
    assert any_tok.decode(response_ids) == response
    assert any_tok.decode(prompt_ids + response_ids, prefix=True) == PROMPT + response
    tokens, _ = assemble(prompt_ids, response_ids, bos_id=any_tok.bos_id, eos_id=any_tok.eos_id)
    assert any_tok.decode(tokens, prefix=True) == PROMPT + response  # BOS/EOS decode to nothing


def test_dummy_prefix_tokenizer_does_not_prepend_a_space(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CODE),
        model_writer=model,
        vocab_size=320,
        byte_fallback=True,
        add_dummy_prefix=True,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
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
    head = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSum two ints.\n\n"
    )
    assert format_prompt("Sum two ints.") == head + "### Response:\n"
    assert format_prompt("Sum two ints.", "1 2") == head + "### Input:\n1 2\n\n### Response:\n"


def alpaca_rows() -> list[dict]:
    """Rows with every response of RESPONSES; some share a problem (one prompt), one prompt has "▁"."""
    instructions = ["Add.", "Sum two ints.", "Print \u2581 twice."]
    return [
        make_row(
            instruction=instructions[i % 3],
            input_text="1 2" if i % 2 else "",
            output=output,
            task_id=f"t{i % 3}",
            is_correct=True,
            source="test",
            difficulty=1,
        )
        for i, output in enumerate(RESPONSES)
    ]


def test_tokenize_row_and_encode_rows_agree_and_mask_the_response_and_eos(any_tok):
    rows = alpaca_rows()
    examples = encode_rows(any_tok, rows)
    assert examples == [tokenize_row(any_tok, row) for row in rows]
    for row, (tokens, mask) in zip(rows, examples):
        prompt = format_prompt(row["instruction"], row["input"])
        prompt_ids, response_ids = any_tok.encode(prompt, prefix=True), any_tok.encode(row["output"])
        assert tokens == [any_tok.bos_id, *prompt_ids, *response_ids, any_tok.eos_id]
        assert mask == [0] * (1 + len(prompt_ids)) + [1] * (len(response_ids) + 1)
        assert any_tok.decode([t for t, m in zip(tokens, mask) if m][:-1]) == row["output"]
        assert any_tok.decode([t for t, m in zip(tokens, mask) if not m], prefix=True) == prompt
    assert assemble([7], [8, 9], bos_id=1, eos_id=2) == ([1, 7, 8, 9, 2], [0, 0, 1, 1, 1])


def test_index_token_lengths_equal_collated_lengths(llama_tok, tmp_path):
    rows = [row for row in alpaca_rows() if "\u2581" not in row["instruction"]]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    index = build_index(path, llama_tok, block_bytes=256)  # several blocks, prompts shared within them
    collated = collate(encode_rows(llama_tok, rows), pad_id=llama_tok.pad_id)["lengths"].tolist()
    plain = spm.SentencePieceProcessor(model_file=str(llama_tok.path))
    expected = [
        2 + len(plain.encode(format_prompt(row["instruction"], row["input"]))) + len(llama_tok.encode(row["output"]))
        for row in rows
    ]  # BOS, EOS
    assert index.rows["token_length"].tolist() == collated == expected
