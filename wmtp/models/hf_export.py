"""Write an MTP model as a Hugging Face folder that transformers (vLLM, lm-eval, evalplus) loads.

The folder holds the family's causal LM (config.json, model.safetensors or shards with their
index): trunk + head 0, which is exactly the model a Hugging Face import started from. What the
causal LM has no place for goes to `mtp_heads.safetensors`: the extra heads as decoder layers of
the same family (Hugging Face's names and RoPE row order, under `mtp_heads.{j}.`), the value head,
and in its metadata the MTP params.json, so reading the folder back (wmtp.models.hf: training from
it, or scripts/import_hf.py) gives back the MTP model bit for bit. README.md says what it holds.

A model imported from Hugging Face keeps its config.json (ModelArgs.hf_config): its family, RoPE
settings, token ids and context length are written back, and tie_word_embeddings stays true while
`output` still equals the embedding (it is a parameter of its own during training, see
wmtp.models.hf). A Meta-format model is written as Llama.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from wmtp.atomic import atomic_directory
from wmtp.data.tokenizer import SentencePieceTokenizer, Tokenizer
from wmtp.layout import (
    GENERATION_CONFIG,
    HEADS_FILENAME,
    HF_CONFIG,
    HF_SAFETENSORS_INDEX,
    SAFETENSORS_FILENAME,
    TOKENIZER_CONFIG,
    VALUE_HEAD_KEY,
)
from wmtp.models.args import ModelArgs
from wmtp.models.hf import FAMILIES, HEADS_PARAMS_KEY, HEADS_PREFIX, block_to_hf

MAX_SHARD_BYTES = 5 << 30
"""Shards of at most this size, as Hugging Face's own uploads are cut."""
README = "README.md"


def is_tied(args: ModelArgs, sd: Mapping[str, torch.Tensor]) -> bool:
    """Tied on export iff the imported model was tied and `output` still equals the embedding."""
    was_tied = bool((args.hf_config or {}).get("tie_word_embeddings", False))
    return was_tied and torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])


def family_of(args: ModelArgs) -> str:
    if args.hf_config is not None:
        return args.hf_config["model_type"]
    return "qwen2" if args.qkv_bias else "llama"


def hf_config(args: ModelArgs, *, tied: bool, dtype: torch.dtype, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """config.json of trunk + head 0: the imported config with the sizes set from `args`, or a Llama
    config built from a Meta model's params."""
    family = family_of(args)
    if args.hf_config is not None:
        config = copy.deepcopy(args.hf_config)
    else:
        config = {
            "architectures": [FAMILIES[family]],
            "model_type": family,
            "hidden_act": "silu",
            "max_position_embeddings": args.max_seq_len,
            "initializer_range": 0.02,
            "rope_theta": args.rope_theta,
            "use_cache": True,
        }
        if args.rope_scaling is not None:
            config["rope_scaling"] = dict(args.rope_scaling)
        if tokenizer is not None:
            config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    config.update(
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_trunk_layers + 1,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=tied,
    )
    dtype_name = str(dtype).removeprefix("torch.")
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name
    return config


def split_state_dict(
    args: ModelArgs, sd: Mapping[str, torch.Tensor], *, tied: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the causal LM's tensors, the side file's tensors) under Hugging Face's names and row order."""
    model = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(args.n_trunk_layers + 1):
        model.update(block_to_hf(sd, f"layers.{i}", f"model.layers.{i}", args))
    if not tied:
        model["lm_head.weight"] = sd["output.weight"]
    side = {}
    for j in range(args.n_future_tokens - 1):
        side.update(block_to_hf(sd, f"extra_heads.{j}", f"{HEADS_PREFIX}.{j}", args))
    if VALUE_HEAD_KEY in sd:
        side[VALUE_HEAD_KEY] = sd[VALUE_HEAD_KEY]
    return model, side


def write_shards(folder: Path, tensors: Mapping[str, torch.Tensor], *, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + the index when larger than one shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFETENSORS_FILENAME), metadata={"format": "pt"})
        return [SAFETENSORS_FILENAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / HF_SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def sentencepiece_config(tokenizer: SentencePieceTokenizer) -> dict[str, Any]:
    """tokenizer_config.json for a sentencepiece tokenizer.model (transformers' LlamaTokenizer)."""
    pieces = tokenizer.pieces()
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": pieces[tokenizer.bos_id],
        "eos_token": pieces[tokenizer.eos_id],
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": tokenizer.adds_dummy_prefix,
        "legacy": False,
    }


def write_tokenizer(folder: Path, tokenizer: Tokenizer) -> None:
    for file in tokenizer.files:
        shutil.copy(file, folder / Path(file).name)
    if isinstance(tokenizer, SentencePieceTokenizer) and not (folder / TOKENIZER_CONFIG).is_file():
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(sentencepiece_config(tokenizer), indent=2) + "\n")


def readme(args: ModelArgs, family: str, *, value_head: bool) -> str:
    n, blocks = args.n_future_tokens, args.n_trunk_layers + 1
    lines = [
        f"# Multi-token-prediction model ({FAMILIES[family]} + {n - 1} extra heads)",
        "",
        f"`config.json` and the safetensors weights are a plain `{FAMILIES[family]}` of {blocks} layers: the MTP",
        f"model's trunk (layers 0..{blocks - 2}) and its head 0 (layer {blocks - 1}). "
        "`AutoModelForCausalLM.from_pretrained` loads it (and so do vLLM, lm-eval and evalplus); it predicts the "
        "next token.",
        "",
        f"`{HEADS_FILENAME}` holds what the causal LM has no place for:",
        "",
        f"- `{HEADS_PREFIX}.{{j}}.*` (j = 0..{n - 2}): head j+1, a decoder layer of this config under the "
        "decoder layer's own names (`self_attn.q_proj.weight`, `mlp.gate_proj.weight`, ...), q/k rows in "
        "Hugging Face's rotate-half order. Head k predicts the token k+1 positions ahead: it takes the hidden "
        f"state that enters layer {blocks - 1} (the trunk output, `hidden_states[{blocks - 1}]` with "
        "`output_hidden_states=True`), and its output goes through `model.norm` and `lm_head` as head 0's does.",
    ]
    if value_head:
        lines.append(
            f"- `{VALUE_HEAD_KEY}` [1, hidden_size]: the value head, applied to `model.norm` of the trunk output."
        )
    lines += [
        f"- metadata `{HEADS_PARAMS_KEY}`: the MTP model's params.json.",
        "",
        "`python scripts/import_hf.py THIS_FOLDER --out MTP_FOLDER` writes the MTP model back (bit for bit); "
        "training can also start from this folder directly (`model.path`).",
        "",
    ]
    return "\n".join(lines)


def export_hf(
    folder: str | Path,
    args: ModelArgs,
    sd: Mapping[str, torch.Tensor],
    *,
    tokenizer: Tokenizer | None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face folder of an MTP model (`sd`: its state dict, value head optional)
    atomically; dtype None keeps the tensors' own."""
    folder = Path(folder)
    tied = is_tied(args, sd)
    model, side = split_state_dict(args, sd, tied=tied)

    def stored(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    model = {k: stored(v).contiguous() for k, v in model.items()}
    side = {k: stored(v).contiguous() for k, v in side.items()}
    family = family_of(args)
    config = hf_config(args, tied=tied, dtype=model["model.embed_tokens.weight"].dtype, tokenizer=tokenizer)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        write_shards(tmp, model, max_shard_bytes=max_shard_bytes)
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        generation = {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None
        }
        (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        metadata = {"format": "pt", HEADS_PARAMS_KEY: json.dumps(args.to_dict())}
        save_file(side, str(tmp / HEADS_FILENAME), metadata=metadata)
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer)
        (tmp / README).write_text(readme(args, family, value_head=VALUE_HEAD_KEY in side))
    return folder
