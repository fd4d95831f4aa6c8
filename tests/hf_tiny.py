"""Tiny Hugging Face models and a byte-level BPE tokenizer, made in the tests by transformers and
`tokenizers` themselves (no download)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from tests.conftest import ROOT
from wmtp.data.template import format_prompt
from wmtp.data.tokenizer_bpe import train_bpe

TINY_SIZES = dict(hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
"""Llama 3.1's scaling with a tiny original context, so that test sequences run far beyond it."""
FAMILIES = {
    "llama2": ("llama", dict(rms_norm_eps=1e-5, num_key_value_heads=4)),
    "llama3.1": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "llama3.2": ("llama", dict(rope_theta=500000.0, rope_scaling={**LLAMA3_SCALING, "factor": 32.0},
                               tie_word_embeddings=True)),
    "codellama": ("llama", dict(rope_theta=1e6, num_key_value_heads=4)),
    "qwen2.5": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=True)),
}  # fmt: skip
"""Configs in the style of each family: Llama 2 (MHA), Llama 3.1 (GQA, rope scaling), Llama 3.2
(tied embeddings, scaling factor 32), CodeLlama (rope_theta 1e6), Qwen2.5 (q/k/v biases, tied)."""
SPARE_ROWS = 6
"""Embedding rows beyond the tokenizer's, as Qwen2.5 has."""


def hf_model(style: str, *, vocab_size: int, layers: int = 3, seed: int = 0, **extra) -> torch.nn.Module:
    """A random causal LM of `style` (a FAMILIES key), every weight drawn (norms and biases too, so
    that a mix-up of any of them shows in the logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, options = FAMILIES[style]
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        family
    ]
    sizes = dict(num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=64)
    config = config_class(**{**TINY_SIZES, **options, **extra}, **sizes)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def corpus(rows_file: Path, limit: int = 400) -> list[str]:
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()[:limit]]
    return [format_prompt(r["instruction"], r["input"]) + r["output"] for r in rows]


def make_hf_folder(out: Path, data: Path, *, style: str = "qwen2.5", layers: int = 4, vocab: int = 700) -> Path:
    """A tiny Hugging Face folder of `style`: a byte-level BPE tokenizer trained on the rows in
    `data` (tokenizer.json + tokenizer_config.json) and a random model with SPARE_ROWS more
    embedding rows than it has pieces, saved in several safetensors shards with their index."""
    from wmtp.data.tokenizer_bpe import BPETokenizer

    tokenizer = BPETokenizer(train_bpe(corpus(data), out, vocab_size=vocab))
    model = hf_model(style, vocab_size=tokenizer.vocab_size + SPARE_ROWS, layers=layers)
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    model.save_pretrained(out, max_shard_size="200KB")
    return out


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| over max |reference|."""
    return float((ours - reference).abs().max() / reference.abs().max())


def transformers_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the causal LM that transformers loads from `folder` (fp32)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=tokens).logits


def script(name: str):
    """scripts/<name>.py as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
