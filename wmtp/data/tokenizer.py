"""SentencePiece tokenizer wrapper (LLaMA / Meta MTP tokenizers and the locally trained tiny one)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

TOKENIZER_FILENAME = "tokenizer.model"


def resolve_tokenizer_file(path: str | Path) -> Path:
    """Return the `tokenizer.model` file for `path` (the file itself or a folder holding it)."""
    path = Path(path)
    candidate = path / TOKENIZER_FILENAME if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(f"tokenizer: no sentencepiece model at {candidate}")
    return candidate


class SentencePieceTokenizer:
    """Encode/decode with BOS/EOS/pad ids; `encode` never inserts a dummy-prefix space.

    Meta's LLaMA tokenizer adds a dummy "▁" before every encoded string. The prompt and the
    response are encoded separately (so that the response mask is exact), and a response that
    follows "### Response:\\n" must not start with an extra space, so for such models text is
    encoded after a newline sentinel whose tokens are then dropped (as torchtune does).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_tokenizer_file(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        self._dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        self._sentinel = "\n"
        self._sentinel_ids = self._sp.encode(self._sentinel) if self._dummy_prefix else []

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Id written at padded positions (always masked); LLaMA has no pad piece, so EOS stands in."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        """Encode many strings at once (sentencepiece's threaded batch path; -1: all cores)."""
        if self._dummy_prefix:
            ids = self._sp.encode([self._sentinel + t for t in texts], num_threads=num_threads)
            cut = len(self._sentinel_ids)
            ids = [x[cut:] for x in ids]
        else:
            ids = self._sp.encode(list(texts), num_threads=num_threads)
        if bos or eos:
            head = [self.bos_id] if bos else []
            tail = [self.eos_id] if eos else []
            ids = [head + x + tail for x in ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512) -> Path:
    """Train a byte-fallback BPE tokenizer that round-trips code exactly; returns tokenizer.model.

    Identity normalisation, no dummy prefix, whitespace kept (runs of spaces are pieces), digits
    split; LLaMA's special ids (unk 0, bos 1, eos 2, no pad).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=1.0,
        max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = out_dir / TOKENIZER_FILENAME
    path.write_bytes(model.getvalue())
    return path
