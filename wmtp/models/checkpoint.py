"""Read Meta `consolidated.*.pth` / safetensors MTP checkpoints (+ params.json); write safetensors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wmtp.atomic import atomic_directory
from wmtp.data.tokenizer import TOKENIZER_FILES, find_tokenizer, load_tokenizer
from wmtp.errors import unreadable_weights
from wmtp.layout import (
    HEADS_FILENAME,
    HF_CONFIG,
    PARAMS_FILENAME,
    SAFETENSORS_FILENAME,
    VALUE_HEAD_FILENAME,
    VALUE_HEAD_KEY,
)
from wmtp.models.args import ModelArgs
from wmtp.models.hf import NewHeads, folder_args, is_hf_folder, read_hf_state_dict
from wmtp.models.mtp_transformer import MTPTransformer

IGNORED_META_KEYS = ("rope.freqs",)
"""Precomputed RoPE table that some Meta releases store; it is recomputed from params instead."""


def resolve_vocab_size(args: ModelArgs, folder: Path, vocab_size: int | None) -> ModelArgs:
    """Meta's params.json may say vocab_size = -1: take it from the tokenizer, as Meta's code does.

    A model imported from Hugging Face keeps its own size, which may exceed the tokenizer's (spare
    embedding rows, as Qwen2.5 has); never the other way round.
    """
    source = folder / (HF_CONFIG if is_hf_folder(folder) else PARAMS_FILENAME)
    if vocab_size is not None:
        spare_rows = args.hf_config is not None and args.vocab_size >= vocab_size
        if args.vocab_size > 0 and args.vocab_size != vocab_size and not spare_rows:
            raise ValueError(f"{source}: vocab_size {args.vocab_size} != tokenizer's {vocab_size}")
        if not spare_rows:
            args.vocab_size = vocab_size
    if args.vocab_size > 0:
        return args
    found = find_tokenizer(folder)
    if found is not None:
        args.vocab_size = load_tokenizer(found).vocab_size
        return args
    raise ValueError(
        f"{source}: vocab_size is -1 and no {' or '.join(TOKENIZER_FILES)} was found in {folder} "
        f"or its parent; pass vocab_size= (the tokenizer's vocabulary size)"
    )


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of `model.safetensors`, else of the single `consolidated.*.pth` (memory-mapped).

    A file that does not load raises ValueError naming it (safetensors' and torch.load's own errors
    do not say which file).
    """
    st = folder / SAFETENSORS_FILENAME
    if st.is_file():
        try:
            return load_file(str(st))
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise unreadable_weights(st, exc) from exc
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"model: neither {SAFETENSORS_FILENAME} nor consolidated.*.pth in {folder}")
    if len(shards) > 1:
        raise ValueError(f"model: {len(shards)} model-parallel shards in {folder}; merge them into one first")
    try:
        sd = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - RuntimeError from the zip reader, UnpicklingError, ...
        raise unreadable_weights(shards[0], exc) from exc
    return {k: v for k, v in sd.items() if k not in IGNORED_META_KEYS}


def check_state_dict(
    model: MTPTransformer, sd: Mapping[str, torch.Tensor], *, source: str, optional: tuple[str, ...] = ()
) -> None:
    """Strict key and shape check with the offending names in the message."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected.keys() - sd.keys() if k not in optional)
    unexpected = sorted(sd.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    problems += [
        f"shape of {k}: checkpoint {tuple(sd[k].shape)} != model {tuple(shape)}"
        for k, shape in expected.items()
        if k in sd and sd[k].shape != shape
    ]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def model_args_of(folder: Path, heads: NewHeads | None = None) -> ModelArgs:
    """The params of an MTP folder (params.json) or of a Hugging Face folder (config.json; see
    wmtp.models.hf). `heads` says how many heads a Hugging Face model gets; for an MTP folder it may
    only repeat params.json's count."""
    if is_hf_folder(folder):
        return folder_args(folder, heads)
    args = ModelArgs.load(folder)
    wanted = heads.n_future_tokens if heads is not None else 0
    if wanted not in (0, args.n_future_tokens):
        raise ValueError(
            f"{folder / PARAMS_FILENAME}: n_future_tokens is {args.n_future_tokens}; model.n_future_tokens asks "
            f"{wanted} (only a Hugging Face model gets new heads)"
        )
    return args


def build_mtp(
    path: str | Path,
    *,
    vocab_size: int | None = None,
    value_head: bool = False,
    max_seq_len: int | None = None,
    heads: NewHeads | None = None,
) -> MTPTransformer:
    """The model of a checkpoint folder (its params.json, or a Hugging Face config.json with `heads`)
    on the meta device: no weights are read.

    Parallelise it, materialise it on the training device, then fill it with `read_checkpoint`'s
    tensors (the recipes do this with `wmtp.distributed.load.load_weights`: rank 0 reads).
    """
    folder = Path(path)
    args = resolve_vocab_size(model_args_of(folder, heads), folder, vocab_size)
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    with torch.device("meta"):
        return MTPTransformer(args, value_head=value_head)


def read_checkpoint(
    path: str | Path,
    model: MTPTransformer,
    *,
    value_head_path: str | Path | None = None,
    heads: NewHeads | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors for `model` (memory-mapped, as stored), checked against its keys and shapes.

    A Hugging Face folder's tensors are mapped to the MTP model (wmtp.models.hf), with new heads made
    as `heads` says; several keys may then hold one tensor (the load copies each into its parameter).
    A stored value head is dropped when the model has none. A model with a value head gets the one
    in `value_head_path` (a critic run's value_head.safetensors) if given, else the stored one, else
    zeros.
    """
    folder = Path(path)
    sd = read_hf_state_dict(folder, model.args, heads) if is_hf_folder(folder) else read_state_dict(folder)
    if model.value_head is None:
        sd.pop(VALUE_HEAD_KEY, None)
    check_state_dict(model, sd, source=str(folder), optional=(VALUE_HEAD_KEY,))
    if model.value_head is not None:
        if value_head_path:
            sd[VALUE_HEAD_KEY] = read_value_head(value_head_path, dim=model.args.dim)
        elif VALUE_HEAD_KEY not in sd:
            sd[VALUE_HEAD_KEY] = torch.zeros(1, model.args.dim)
    return sd


def load_mtp(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
    value_head: bool | None = None,
    max_seq_len: int | None = None,
    heads: NewHeads | None = None,
) -> MTPTransformer:
    """Load an MTP model from a folder with params.json and consolidated.*.pth or model.safetensors,
    or from a Hugging Face folder (`heads`: how many heads it gets, and how the new ones start).

    value_head: None builds one iff the checkpoint has `value_head.weight`; True always builds one
    (zero-initialised when the checkpoint has none); False ignores a stored one.
    """
    folder = Path(path)
    kw = dict(vocab_size=vocab_size, max_seq_len=max_seq_len, heads=heads)
    model = build_mtp(folder, value_head=bool(value_head), **kw)
    if value_head is None and has_stored_value_head(folder):
        model = build_mtp(folder, value_head=True, **kw)
    sd = read_checkpoint(folder, model, heads=heads)
    model.load_state_dict(distinct_tensors(sd), strict=True, assign=True)
    return model.to(device=device or "cpu", dtype=dtype)


def has_stored_value_head(folder: Path) -> bool:
    if is_hf_folder(folder):
        side = folder / HEADS_FILENAME
        return side.is_file() and VALUE_HEAD_KEY in safe_keys(side)
    return VALUE_HEAD_KEY in read_state_dict(folder)


def safe_keys(path: Path) -> set[str]:
    """The tensor names of a safetensors file (its header only)."""
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def distinct_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with a copy for every key whose tensor an earlier key already holds (a Hugging Face
    model's heads made by copy_last, its tied embedding): parameters assigned from it share nothing,
    and safetensors can save it."""
    seen: set[int] = set()
    out = {}
    for key, tensor in sd.items():
        ptr = tensor.data_ptr() if tensor.numel() else None
        out[key] = tensor.clone() if ptr in seen else tensor
        if ptr is not None:
            seen.add(ptr)
    return out


def save_mtp(
    folder: str | Path,
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    *,
    overwrite: bool = True,
    extra_files: tuple[Path, ...] = (),
) -> Path:
    """Write params.json + model.safetensors (+ copies of extra_files) into `folder` atomically."""
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        (tmp / PARAMS_FILENAME).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        save_file(tensors, str(tmp / SAFETENSORS_FILENAME), metadata={"format": "pt"})
        for extra in extra_files:
            shutil.copy(extra, tmp / Path(extra).name)
    return folder


def save_value_head(folder: str | Path, weight: torch.Tensor) -> Path:
    """Write folder/value_head.safetensors (key value_head.weight) atomically; returns the file."""
    folder = Path(folder)
    with atomic_directory(folder, overwrite=True) as tmp:
        save_file({VALUE_HEAD_KEY: weight.detach().float().cpu().contiguous()}, str(tmp / VALUE_HEAD_FILENAME))
    return folder / VALUE_HEAD_FILENAME


def read_value_head(path: str | Path, *, dim: int) -> torch.Tensor:
    """value_head.weight [1, dim] from a critic run's value_head.safetensors, checked."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise unreadable_weights(Path(path), exc) from exc
    if set(tensors) != {VALUE_HEAD_KEY}:
        raise ValueError(f"{path}: expected exactly the key {VALUE_HEAD_KEY!r}, found {sorted(tensors)}")
    weight = tensors[VALUE_HEAD_KEY]
    if weight.shape != (1, dim):
        raise ValueError(f"{path}: {VALUE_HEAD_KEY} has shape {tuple(weight.shape)}, the model needs {(1, dim)}")
    return weight


def load_value_head(model: MTPTransformer, path: str | Path) -> None:
    """Copy value_head.weight from a critic run's value_head.safetensors into an unsharded model."""
    if model.value_head is None:
        raise ValueError(f"{path}: the model has no value head to load it into")
    with torch.no_grad():
        model.value_head.weight.copy_(read_value_head(path, dim=model.args.dim))
