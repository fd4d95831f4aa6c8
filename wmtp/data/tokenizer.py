"""SentencePiece tokenizer wrapper (LLaMA / Meta MTP tokenizers and the locally trained tiny one)."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from wmtp.errors import exception_line
from wmtp.layout import TOKENIZER_FILENAME, TOKENIZER_JSON

TOKENIZER_FILES = (TOKENIZER_FILENAME, TOKENIZER_JSON)
"""What a folder may hold, in the order a folder's is chosen: a folder with both (Llama 2's Hugging
Face folders) is read with sentencepiece, its original tokenizer."""


class Tokenizer(Protocol):
    """What the data pipeline, the recipes and evaluation use of a tokenizer (sentencepiece or
    tokenizer.json alike)."""

    path: Path
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def files(self) -> tuple[Path, ...]: ...

    @property
    def vocab_size(self) -> int: ...

    def pieces(self) -> list[str]: ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, prefix: bool = False) -> list[int]: ...

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, prefix: bool = False, num_threads: int = -1
    ) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int], *, prefix: bool = False) -> str: ...


def tokenizer_in(folder: Path) -> Path | None:
    """The tokenizer file in `folder` (tokenizer.model first), or None."""
    return next((folder / name for name in TOKENIZER_FILES if (folder / name).is_file()), None)


def find_tokenizer(folder: str | Path) -> Path | None:
    """The tokenizer file in a model folder or, failing that, its parent (a run's final/ holds one)."""
    folder = Path(folder)
    return tokenizer_in(folder) or tokenizer_in(folder.parent)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at `path`: a tokenizer.model (sentencepiece), a tokenizer.json (Hugging Face),
    or a folder holding one of them."""
    path = Path(path)
    file = tokenizer_in(path) if path.is_dir() else path
    if file is None:
        raise FileNotFoundError(f"tokenizer: no {' or '.join(TOKENIZER_FILES)} in {path}")
    if file.suffix == ".json":
        from wmtp.data.tokenizer_bpe import BPETokenizer  # the `tokenizers` library: the hf extra

        return BPETokenizer(file)
    return SentencePieceTokenizer(file)


def resolve_tokenizer_file(path: str | Path) -> Path:
    """Return the `tokenizer.model` file for `path` (the file itself or a folder holding it)."""
    path = Path(path)
    candidate = path / TOKENIZER_FILENAME if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(f"tokenizer: no sentencepiece model at {candidate}")
    return candidate


SPACE_SYMBOL = "\u2581"
"""sentencepiece's whitespace symbol "▁": spaces are encoded as it, so a literal one decodes as a space."""


class SentencePieceTokenizer:
    """Encode/decode with BOS/EOS/pad ids; text round-trips exactly.

    Meta's LLaMA tokenizer adds a dummy "▁" before every encoded string. The prompt and the
    response are encoded separately (so that the response mask is exact), so every call says where
    its text sits. ``prefix=True``: the text begins a sequence (the prompt); it is encoded with the
    model's own normaliser, dummy prefix included, as sentencepiece encodes the text on its own.
    ``prefix=False`` (the default): the text continues a sequence (the response, or anything
    appended); it is encoded by a copy of the model without the dummy prefix, so it starts with no
    extra space whatever its first characters. ``decode`` takes the flag of the encode call that
    produced its first ids. Without a dummy prefix (the tiny tokenizer) the flag changes nothing.
    A literal "▁" in the text is encoded as its UTF-8 byte pieces, so it does not read back as a space.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_tokenizer_file(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - sentencepiece's RuntimeError, protobuf's DecodeError
            size = self.path.stat().st_size
            if size == 0:
                raise ValueError(f"tokenizer {self.path} is empty (0 bytes)") from exc
            raise ValueError(
                f"tokenizer {self.path} ({size} bytes) does not load, truncated or not a "
                f"sentencepiece model? ({exception_line(exc)})"
            ) from exc
        self.adds_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        if self.adds_dummy_prefix:
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_continue = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        else:
            self._sp_continue = self._sp
        # A literal "▁" is spelt with its UTF-8 byte pieces, which decode to "▁" itself; without
        # byte fallback it is left to sentencepiece (and reads back as a space).
        self._symbol_ids = (
            [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode()]
            if proto.trainer_spec.byte_fallback
            else []
        )

    @property
    def files(self) -> tuple[Path, ...]:
        """The files that make this tokenizer (copied into every export)."""
        return (self.path,)

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

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, prefix: bool = False) -> list[int]:
        """Ids of `text`; `prefix=True` for a prompt (begins a sequence), False for a response."""
        return self.encode_batch([text], bos=bos, eos=eos, prefix=prefix)[0]

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, prefix: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encode many strings at once (sentencepiece's threaded batch path; -1: all cores).

        `prefix=True` for prompts (each begins a sequence), False for responses (see the class).
        """
        ids = self._encode(list(texts), prefix=prefix, num_threads=num_threads)
        if bos or eos:
            head = [self.bos_id] if bos else []
            tail = [self.eos_id] if eos else []
            ids = [head + x + tail for x in ids]
        return ids

    def decode(self, ids: Iterable[int], *, prefix: bool = False) -> str:
        """Text of `ids`; `prefix=True` when they begin with a non-empty `prefix=True` encoding.

        The model's own decoder drops one "▁" from the first non-control piece when the model has a
        dummy prefix (that is the prefix); the copy without it drops nothing.
        """
        sp = self._sp if prefix else self._sp_continue
        return sp.decode([int(i) for i in ids])

    def _encode(self, texts: list[str], *, prefix: bool, num_threads: int) -> list[list[int]]:
        first = self._sp if prefix else self._sp_continue
        if not self._symbol_ids:
            return first.encode(texts, num_threads=num_threads)
        # Split at each literal "▁": the first part is where the text starts, the others continue it.
        parts = [t.split(SPACE_SYMBOL) for t in texts]
        heads = first.encode([p[0] for p in parts], num_threads=num_threads)
        rest = iter(self._sp_continue.encode([s for p in parts for s in p[1:]], num_threads=num_threads))
        for ids, p in zip(heads, parts):
            for _ in p[1:]:
                ids += self._symbol_ids + next(rest)
        return heads


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
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = out_dir / TOKENIZER_FILENAME
    path.write_bytes(model.getvalue())
    return path
