"""Export a model as a Hugging Face folder: transformers' AutoModelForCausalLM (and vLLM, lm-eval,
evalplus) loads trunk + head 0 as the family's causal LM; the extra heads and the value head go to
mtp_heads.safetensors beside it, described by the folder's README.md.

    python scripts/export_hf.py outputs/baseline_a100 --out exports/baseline_hf
    python scripts/export_hf.py outputs/verifiable_a100/best --out exports/verifiable_best --dtype bfloat16
    python scripts/import_hf.py exports/baseline_hf --out models/baseline_mtp     # and back, bit for bit

RUN_OR_FOLDER is an MTP folder (params.json + model.safetensors or consolidated.*.pth: a run's
final/ or best/, Meta's checkpoints) or a training run folder: its final/, else its newest
checkpoint on the model it started from (the policy only), a critic run's base model with the
value head of its final/. A model that started from Hugging Face keeps its family and config; a
Meta-format one is written as Llama.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.data.tokenizer import load_tokenizer  # noqa: E402
from wmtp.distributed.env import init_distributed  # noqa: E402
from wmtp.eval.policy import load_policy, resolve_policy  # noqa: E402
from wmtp.layout import FINAL_DIR, PARAMS_FILENAME  # noqa: E402
from wmtp.models.args import ModelArgs  # noqa: E402
from wmtp.models.checkpoint import (  # noqa: E402
    VALUE_HEAD_FILENAME,
    VALUE_HEAD_KEY,
    read_state_dict,
    read_value_head,
    resolve_vocab_size,
)
from wmtp.models.hf_export import MAX_SHARD_BYTES, export_hf  # noqa: E402

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_of(path: Path, tokenizer: str) -> tuple[ModelArgs, dict[str, torch.Tensor], Path]:
    """(params, state dict, tokenizer file) of what RUN_OR_FOLDER names."""
    source = resolve_policy(path, tokenizer)
    if source.checkpoint is None and (source.weights / PARAMS_FILENAME).is_file():
        vocab = load_tokenizer(source.tokenizer).vocab_size
        args = resolve_vocab_size(ModelArgs.load(source.weights), source.weights, vocab)
        sd = read_state_dict(source.weights)  # memory-mapped: streamed into the export as stored
    else:
        model, _ = load_policy(source, info=init_distributed("cpu"), dtype=torch.float32, max_seq_len=2)
        args, sd = model.args, model.state_dict()
    critic_head = path / FINAL_DIR / VALUE_HEAD_FILENAME
    if critic_head.is_file() and VALUE_HEAD_KEY not in sd:
        sd[VALUE_HEAD_KEY] = read_value_head(critic_head, dim=args.dim)
    return args, sd, source.tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, metavar="RUN_OR_FOLDER")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="auto: as stored (exact)")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model / tokenizer.json (default: the model's)")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 2**30)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        model_args, sd, tokenizer = model_of(args.source, args.tokenizer)
        out = export_hf(
            args.out,
            model_args,
            sd,
            tokenizer=load_tokenizer(tokenizer),
            dtype=DTYPES[args.dtype],
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        sys.exit(f"error: {exc}")
    print(f"exported {args.source} -> {out}")


if __name__ == "__main__":
    main()
