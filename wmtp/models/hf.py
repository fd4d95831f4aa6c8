"""Hugging Face causal-LM folders as MTP models: supported families, config and weight mapping.

A folder with config.json and safetensors (one file, or shards with their index) of a supported
family (Llama 2 / CodeLlama / Llama 3.x / DeepSeek-Coder v1: model_type "llama"; Qwen2 / Qwen2.5 /
Qwen2.5-Coder: "qwen2") becomes an MTP model in Meta's layout: its L blocks give the trunk (blocks
0..L-2) and head 0 (block L-1), and n_future_tokens - 1 heads are added, copies of block L-1
("copy_last") or drawn at random ("random"), so n_layers = L + n_future_tokens - 1. The weights stay
in Hugging Face's layout on disk and are mapped when rank 0 reads them:

- RoPE. Hugging Face rotates halves (dimension i with i + hd/2); Meta's model rotates interleaved
  pairs (2i, 2i+1). The two agree once each head's q and k rows (and Qwen2's q/k biases) are
  permuted: Hugging Face row j*hd/2 + i (half j, frequency i) is Meta's row 2i + j. The model keeps
  Meta's convention, so Meta checkpoints and imported ones run the same code; the permutation is a
  pure reordering, exact both ways (export applies its inverse).
- Tied embeddings (Llama 3.2 1B/3B, small Qwen2.5): the MTP model's `output` is a parameter of
  its own, initialised to a copy of the embedding. They are untied on purpose: FSDP2 shards, DCP
  checkpoints and safetensors exports then treat two plain parameters, and the heads' output
  projection trains apart from the input embedding, as in Meta's MTP layout (the price: one
  vocabulary x dim matrix more). Export writes them tied again while they are still equal.
- Spare embedding rows (Qwen2.5: vocab_size above the tokenizer's size) are kept.

An exported folder (wmtp.models.hf_export) also holds `mtp_heads.safetensors`: its extra heads and
value head are read instead of new ones, so export and import are exact inverses.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wmtp.errors import unreadable_weights
from wmtp.layout import (
    HEADS_FILENAME,
    HF_CONFIG,
    HF_SAFETENSORS_INDEX,
    PARAMS_FILENAME,
    SAFETENSORS_FILENAME,
    VALUE_HEAD_KEY,
)
from wmtp.models.args import ModelArgs

HEADS_PARAMS_KEY = "wmtp_params"
"""The side file's metadata entry holding the MTP params.json it was exported from."""
HEADS_PREFIX = "mtp_heads"
FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""Supported model_type -> its causal-LM class."""
SUPPORTED = "llama (Llama 2, CodeLlama, Llama 3.x, DeepSeek-Coder v1), qwen2 (Qwen2, Qwen2.5, Qwen2.5-Coder)"
ROPE_TYPES = ("default", "llama3", "linear")
UNSUPPORTED_KEYS = {
    "num_experts": "mixture of experts",
    "num_local_experts": "mixture of experts",
    "moe_intermediate_size": "mixture of experts",
    "qk_norm": "q/k norms",
    "use_qk_norm": "q/k norms",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "quantization_config": "quantized weights",
}
"""Config keys that change the computation in ways the MTP model does not carry (when set)."""
NewHeadsInit = Literal["copy_last", "random"]
BLOCK_KEYS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
"""Meta's block sub-module -> Hugging Face's decoder-layer sub-module."""
ARCHITECTURE_FIELDS = (
    "n_layers", "dim", "n_heads", "kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta"
)  # fmt: skip
"""What an exported folder's stored params must share with its config.json."""
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers that older Hugging Face checkpoints store; recomputed from the config."""


class UnsupportedModelError(ValueError):
    """A Hugging Face folder of a family, or with a config key, the MTP model does not carry."""


@dataclasses.dataclass(frozen=True)
class NewHeads:
    """How a Hugging Face model gets its MTP heads."""

    n_future_tokens: int = 0
    """Heads of the MTP model; 0: an exported folder's own (mtp_heads.safetensors), else an error."""
    init: NewHeadsInit = "copy_last"
    """"copy_last": each added head starts as a copy of the last block (head 0); "random": matrices
    drawn from N(0, initializer_range), unit norms, zero biases."""
    seed: int = 0
    """Seed of the "random" draw (rank 0 draws, the weights are broadcast)."""


def is_hf_folder(folder: str | Path) -> bool:
    """A Hugging Face model folder: config.json and no params.json (an MTP folder may hold both)."""
    folder = Path(folder)
    return (folder / HF_CONFIG).is_file() and not (folder / PARAMS_FILENAME).is_file()


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / HF_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def rope_settings(config: Mapping[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """(theta, rope type, its parameters) from transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    source = params if params.get("rope_type") or params.get("type") else scaling
    kind = source.get("rope_type") or source.get("type") or "default"
    return theta, kind, dict(source)


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """Why this config.json cannot become an MTP model ([] when it can), each a line naming the
    family or the key."""
    family = config.get("model_type")
    arch = ", ".join(config.get("architectures") or []) or "no architectures"
    if family not in FAMILIES:
        return [f"model family {family!r} ({arch}) is not supported; supported: {SUPPORTED}"]
    problems = []
    if config.get("architectures") and config["architectures"] != [FAMILIES[family]]:
        problems.append(f"architectures {config['architectures']} is not {FAMILIES[family]}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or hidden % heads:
        problems.append(f"hidden_size {hidden!r} is not a multiple of num_attention_heads {heads!r}")
    elif config.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads ({hidden // heads})")
    if family == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        problems.append("attention_bias / mlp_bias = true is not supported (Llama without biases only)")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
        problems.append("sliding-window attention (use_sliding_window / layer_types) is not supported")
    for key, what in UNSUPPORTED_KEYS.items():
        if config.get(key):
            problems.append(f"{key} ({what}) is not supported")
    _, kind, rope = rope_settings(config)
    if kind not in ROPE_TYPES:
        problems.append(f"RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        problems.append("partial_rotary_factor != 1 is not supported")
    if not isinstance(config.get("num_hidden_layers"), int) or config["num_hidden_layers"] < 2:
        problems.append(f"num_hidden_layers {config.get('num_hidden_layers')!r}: needs >= 2 (a trunk and head 0)")
    return [f"{family}: {p}" for p in problems]


def check_config(config: Mapping[str, Any], *, source: str) -> None:
    problems = config_problems(config)
    if problems:
        raise UnsupportedModelError(f"{source}: " + "; ".join(problems))


def _rope_scaling(config: Mapping[str, Any]) -> dict[str, Any] | None:
    _, kind, rope = rope_settings(config)
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(rope["factor"])}
    return {
        "rope_type": "llama3",
        "factor": float(rope["factor"]),
        "low_freq_factor": float(rope["low_freq_factor"]),
        "high_freq_factor": float(rope["high_freq_factor"]),
        "original_max_position_embeddings": int(
            rope.get("original_max_position_embeddings", config.get("max_position_embeddings"))
        ),
    }


def model_args(config: dict[str, Any], *, n_future_tokens: int, source: str) -> ModelArgs:
    """The MTP model of a supported config.json: its L blocks + n_future_tokens - 1 new heads."""
    check_config(config, source=source)
    if n_future_tokens < 1:
        raise ValueError(
            f"{source}: a Hugging Face model needs model.n_future_tokens >= 1 (its MTP heads), got {n_future_tokens}"
        )
    theta, _, _ = rope_settings(config)
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"] + n_future_tokens - 1,
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        ffn_dim=config["intermediate_size"],
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        n_future_tokens=n_future_tokens,
        qkv_bias=config["model_type"] == "qwen2",
        rope_scaling=_rope_scaling(config),
        hf_config=config,
    )


def folder_args(folder: str | Path, heads: NewHeads | None) -> ModelArgs:
    """The MTP model of a Hugging Face folder: an exported one's own params (its side file), else
    config.json's blocks with `heads.n_future_tokens` heads."""
    folder = Path(folder)
    config = read_config(folder)
    source = str(folder / HF_CONFIG)
    wanted = heads.n_future_tokens if heads is not None else 0
    stored = _stored_params(folder)
    if stored is None:
        return model_args(config, n_future_tokens=wanted, source=source)
    args = ModelArgs.from_dict(stored, source=str(folder / HEADS_FILENAME))
    if wanted not in (0, args.n_future_tokens):
        raise ValueError(
            f"{folder / HEADS_FILENAME}: holds {args.n_future_tokens} heads; model.n_future_tokens asks {wanted}"
        )
    derived = model_args(config, n_future_tokens=args.n_future_tokens, source=source)
    differ = [f for f in ARCHITECTURE_FIELDS if getattr(derived, f) != getattr(args, f)]
    if differ:
        raise ValueError(f"{folder / HEADS_FILENAME}: its params differ from {HF_CONFIG} in {differ}")
    return args


def _stored_params(folder: Path) -> dict[str, Any] | None:
    path = folder / HEADS_FILENAME
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if HEADS_PARAMS_KEY not in meta:
        raise ValueError(f"{path}: no {HEADS_PARAMS_KEY!r} in its metadata (not written by the exporter?)")
    return json.loads(meta[HEADS_PARAMS_KEY])


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: the shards its index names, else model.safetensors."""
    folder = Path(folder)
    index = folder / HF_SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SAFETENSORS_FILENAME).is_file():
        return [folder / SAFETENSORS_FILENAME]
    raise FileNotFoundError(
        f"model: no {SAFETENSORS_FILENAME} or {HF_SAFETENSORS_INDEX} in {folder} (pytorch_model*.bin is not read: "
        f"save the model with safetensors)"
    )


# --------------------------------------------------------------------------------------------
# RoPE row order


def rotate_half_to_interleaved(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's q/k rows (or biases) -> Meta's: per head, row j*hd/2 + i -> row 2i + j."""
    hd = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, hd // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def interleaved_to_rotate_half(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse: Meta's q/k rows -> Hugging Face's (transformers' own Llama conversion)."""
    hd = rows.shape[0] // n_heads
    return rows.reshape(n_heads, hd // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _rope_heads(args: ModelArgs, meta_sub: str) -> int | None:
    """Heads whose RoPE rows a block tensor holds: q's and k's rows (weight and bias) carry RoPE's
    pairing and are permuted between the conventions; None for the others."""
    return {"attention.wq": args.n_heads, "attention.wk": args.kv_heads}.get(meta_sub)


def block_to_meta(
    hf: Mapping[str, torch.Tensor], hf_prefix: str, meta_prefix: str, args: ModelArgs
) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors under Meta's names, q/k rows permuted; consumed keys are listed
    in the returned dict only (the caller checks for leftovers)."""
    out = {}
    for meta_sub, hf_sub in BLOCK_KEYS.items():
        for kind in ("weight", "bias"):
            key = f"{hf_prefix}.{hf_sub}.{kind}"
            if key not in hf:
                continue
            tensor = hf[key]
            heads = _rope_heads(args, meta_sub)
            out[f"{meta_prefix}.{meta_sub}.{kind}"] = (
                rotate_half_to_interleaved(tensor, heads).contiguous() if heads else tensor
            )
    return out


def block_to_hf(
    sd: Mapping[str, torch.Tensor], meta_prefix: str, hf_prefix: str, args: ModelArgs
) -> dict[str, torch.Tensor]:
    """The inverse of `block_to_meta`."""
    out = {}
    for meta_sub, hf_sub in BLOCK_KEYS.items():
        for kind in ("weight", "bias"):
            key = f"{meta_prefix}.{meta_sub}.{kind}"
            if key not in sd:
                continue
            heads = _rope_heads(args, meta_sub)
            tensor = sd[key]
            out[f"{hf_prefix}.{hf_sub}.{kind}"] = (
                interleaved_to_rotate_half(tensor, heads).contiguous() if heads else tensor
            )
    return out


# --------------------------------------------------------------------------------------------
# Reading


def _read_files(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise unreadable_weights(path, exc) from exc
    return {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}


def read_hf_state_dict(folder: str | Path, args: ModelArgs, heads: NewHeads | None) -> dict[str, torch.Tensor]:
    """The MTP state dict (Meta's names and RoPE rows) of a Hugging Face folder: its blocks, then the
    exported heads (mtp_heads.safetensors) or new ones as `heads` says. Keys the mapping does not
    know stay under their Hugging Face names, so the caller's key check names them."""
    folder = Path(folder)
    hf = _read_files(weight_files(folder))
    n_blocks = args.n_trunk_layers + 1
    sd = {"tok_embeddings.weight": hf.pop("model.embed_tokens.weight", None)}
    sd["norm.weight"] = hf.pop("model.norm.weight", None)
    for i in range(n_blocks):
        block = block_to_meta(hf, f"model.layers.{i}", f"layers.{i}", args)
        sd.update(block)
        for key in [k for k in hf if k.startswith(f"model.layers.{i}.")]:
            if _is_mapped(key, f"model.layers.{i}"):
                del hf[key]
    # The folder's own flag: an export of a trained model may be untied where its params say tied.
    tied = read_config(folder).get("tie_word_embeddings", False)
    lm_head = hf.pop("lm_head.weight", None)
    # Tied: Hugging Face uses the embedding as lm_head whatever else is stored; untied here (module doc).
    sd["output.weight"] = sd["tok_embeddings.weight"] if tied else lm_head
    sd.update(hf)  # leftovers: the key check reports them
    if (folder / HEADS_FILENAME).is_file():
        sd.update(_read_side_file(folder / HEADS_FILENAME, args))
    else:
        sd.update(new_heads(sd, args, heads or NewHeads(args.n_future_tokens)))
    return {k: v for k, v in sd.items() if v is not None}


def _is_mapped(key: str, hf_prefix: str) -> bool:
    sub = key[len(hf_prefix) + 1 :].rsplit(".", 1)[0]
    return sub in BLOCK_KEYS.values()


def _read_side_file(path: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    try:
        side = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise unreadable_weights(path, exc) from exc
    out = {}
    for j in range(args.n_future_tokens - 1):
        out.update(block_to_meta(side, f"{HEADS_PREFIX}.{j}", f"extra_heads.{j}", args))
    if VALUE_HEAD_KEY in side:
        out[VALUE_HEAD_KEY] = side[VALUE_HEAD_KEY]
    known = {k for j in range(args.n_future_tokens - 1) for k in side if k.startswith(f"{HEADS_PREFIX}.{j}.")}
    unknown = sorted(set(side) - known - {VALUE_HEAD_KEY})
    if unknown:
        raise ValueError(f"{path}: unexpected keys {unknown}")
    return out


def new_heads(sd: Mapping[str, torch.Tensor], args: ModelArgs, heads: NewHeads) -> dict[str, torch.Tensor]:
    """extra_heads.{j}.* for j < n_future - 1: the last block's tensors themselves ("copy_last":
    the load copies them into each head), or a fresh draw ("random")."""
    last = f"layers.{args.n_trunk_layers}."
    block = {k[len(last) :]: v for k, v in sd.items() if k.startswith(last)}
    if heads.init not in ("copy_last", "random"):
        raise ValueError(f"model.new_heads must be 'copy_last' or 'random', got {heads.init!r}")
    std = float((args.hf_config or {}).get("initializer_range", 0.02))
    gen = torch.Generator().manual_seed(heads.seed)
    out = {}
    for j in range(args.n_future_tokens - 1):
        for sub, tensor in block.items():
            if heads.init == "copy_last":
                out[f"extra_heads.{j}.{sub}"] = tensor
            elif sub.endswith("norm.weight"):
                out[f"extra_heads.{j}.{sub}"] = torch.ones_like(tensor)
            elif sub.endswith("bias"):
                out[f"extra_heads.{j}.{sub}"] = torch.zeros_like(tensor)
            else:
                drawn = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                out[f"extra_heads.{j}.{sub}"] = drawn.to(tensor.dtype)
    return out
