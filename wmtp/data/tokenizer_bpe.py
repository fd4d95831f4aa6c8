"""Hugging Face `tokenizer.json` tokenizers (the `tokenizers` library, not transformers).

Byte-level BPE (Llama 3, Qwen2, DeepSeek-Coder) and sentencepiece-style BPE (Llama 2's
tokenizer.json) alike, with the interface of `SentencePieceTokenizer`: the prompt begins a sequence
(`prefix=True`: the tokenizer's own pipeline, a prepended "▁" or space included), the response
continues it (`prefix=False`: a copy of the pipeline that prepends nothing), so a response decodes
back to exactly its text whatever it starts with. Special tokens written in the text are encoded as
text (a "<|endoftext|>" inside a solution is not an EOS), as sentencepiece does.

BOS, EOS and pad are the tokenizer's own, named in tokenizer_config.json (else
special_tokens_map.json) beside tokenizer.json. A tokenizer without a BOS token (Qwen2's) starts
sequences with its pad token, else its EOS ("<|endoftext|>": the separator that precedes every
document of its pretraining stream), so that every sequence begins with a start token as the
token alignment (SPEC) has it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from wmtp.errors import exception_line
from wmtp.layout import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_JSON

SPECIAL_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
"""Where BOS/EOS/pad are named, first one first."""
TRAINED_BOS, TRAINED_EOS = "<|begin_of_text|>", "<|end_of_text|>"
"""Special tokens of `train_bpe`'s tokenizers (Llama 3's names)."""


def _without_prefix(node: Any) -> Any:
    """The pipeline `node` (a normalizer, pre-tokenizer or decoder spec) that adds and strips no
    leading "▁" or space: Prepend normalizers dropped, Metaspace's prepend_scheme "never",
    ByteLevel's add_prefix_space false, Llama 2's Strip(start=1) decoder dropped."""
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Sequence":
        key = next((k for k in ("normalizers", "pretokenizers", "decoders") if k in node), None)
        if key is None:
            return node
        kept = [_without_prefix(n) for n in node[key] if not _adds_prefix(n)]
        return {**node, key: kept}
    if kind == "Metaspace":
        never = {**node, "prepend_scheme": "never"}
        return {**never, "add_prefix_space": False} if "add_prefix_space" in node else never
    if kind == "ByteLevel" and node.get("add_prefix_space"):
        return {**node, "add_prefix_space": False}
    return node


def _adds_prefix(node: Any) -> bool:
    """A Prepend normalizer, or the decoder step that strips what it prepended."""
    if not isinstance(node, dict):
        return False
    return node.get("type") == "Prepend" or (node.get("type") == "Strip" and node.get("start", 0) > 0)


def continuation_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer.json `spec` for text that continues a sequence (see `_without_prefix`)."""
    out = copy.deepcopy(spec)
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        node = out.get(part)
        out[part] = None if _adds_prefix(node) else _without_prefix(node)
    return out


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...} or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(folder: Path) -> dict[str, str | None]:
    """{"bos_token", "eos_token", "pad_token"} named by the tokenizer's config files in `folder`."""
    found: dict[str, str | None] = {"bos_token": None, "eos_token": None, "pad_token": None}
    for name in reversed(SPECIAL_FILES):  # tokenizer_config.json last: it wins
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer config {path} does not read ({exception_line(exc)})") from None
        for key in found:
            if key in config:
                found[key] = _token_name(config[key])
    return found


class BPETokenizer:
    """A tokenizer.json tokenizer with `SentencePieceTokenizer`'s interface (see the module)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / TOKENIZER_JSON if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer: no {TOKENIZER_JSON} at {self.path}")
        size = self.path.stat().st_size
        if size == 0:
            raise ValueError(f"tokenizer {self.path} is empty (0 bytes)")
        try:
            text = self.path.read_text()
            spec = json.loads(text)
            self._tok = Tokenizer.from_str(text)
            self._continue = Tokenizer.from_str(json.dumps(continuation_spec(spec)))
        except Exception as exc:  # noqa: BLE001 - JSONDecodeError, the library's Exception
            raise ValueError(
                f"tokenizer {self.path} ({size} bytes) does not load, truncated or not a tokenizer.json? "
                f"({exception_line(exc)})"
            ) from exc
        for tok in (self._tok, self._continue):
            tok.encode_special_tokens = True
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        special = read_special_tokens(self.path.parent)
        if special["eos_token"] is None:
            raise ValueError(f"tokenizer {self.path}: no eos_token named in {' or '.join(SPECIAL_FILES)} beside it")
        self.eos_id = self._id_of(special["eos_token"], "eos_token")
        self.pad_id = self._id_of(special["pad_token"], "pad_token") if special["pad_token"] else self.eos_id
        self.has_bos = special["bos_token"] is not None
        self.bos_id = self._id_of(special["bos_token"], "bos_token") if self.has_bos else self.pad_id

    def _id_of(self, token: str, key: str) -> int:
        if token not in self._vocab:
            raise ValueError(f"tokenizer {self.path}: {key} {token!r} is not in its vocabulary")
        return self._vocab[token]

    @property
    def files(self) -> tuple[Path, ...]:
        """The files that make this tokenizer (copied into every export)."""
        return (self.path, *(p for p in (self.path.parent / n for n in SPECIAL_FILES) if p.is_file()))

    @property
    def vocab_size(self) -> int:
        """Ids 0 .. vocab_size - 1 (added tokens included)."""
        return max(self._vocab.values()) + 1

    def pieces(self) -> list[str]:
        """Every id's token string ("" for an id the tokenizer leaves unused)."""
        by_id = [""] * self.vocab_size
        for token, i in self._vocab.items():
            by_id[i] = token
        return by_id

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, prefix: bool = False) -> list[int]:
        """Ids of `text`; `prefix=True` for a prompt (begins a sequence), False for a response."""
        return self.encode_batch([text], bos=bos, eos=eos, prefix=prefix, num_threads=1)[0]

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, prefix: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encode many strings; num_threads 1 encodes them one by one (no thread pool: index workers
        are forked processes), otherwise the library's own parallel batch."""
        tok = self._tok if prefix else self._continue
        texts = list(texts)
        if num_threads == 1:
            ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
        else:
            ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        if bos or eos:
            head = [self.bos_id] if bos else []
            tail = [self.eos_id] if eos else []
            ids = [head + x + tail for x in ids]
        return ids

    def decode(self, ids: Iterable[int], *, prefix: bool = False) -> str:
        """Text of `ids`; `prefix=True` when they begin with a `prefix=True` encoding."""
        tok = self._tok if prefix else self._continue
        return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def train_bpe(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer as Llama 3's is built (no normaliser, no prefix space, digits
    split, <|begin_of_text|> / <|end_of_text|>); writes tokenizer.json and tokenizer_config.json,
    returns tokenizer.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_BOS, TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    path = out_dir / TOKENIZER_JSON
    tok.save(str(path))
    config = {"bos_token": TRAINED_BOS, "eos_token": TRAINED_EOS, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path
