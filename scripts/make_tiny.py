"""Make the tiny artifacts for the CPU demo and the tests, all locally.

    python scripts/make_tiny.py --out artifacts/tiny

DIR/tokenizer.model          sentencepiece (byte fallback, identity normalisation) trained on the data
DIR/mtp_model/               Meta format: params.json (vocab_size -1) + consolidated.00.pth
DIR/reference/               a tiny Hugging Face LlamaForCausalLM on the same tokenizer (Rho-1)
DIR/data/{train,valid}.jsonl processed rows with correct and incorrect solutions and difficulties
DIR/data/toy_eval.json       a toy evaluation set in MBPP's format (task ids 1..N) from the synthetic
                             templates, problems a tiny model trained on these rows can partly solve

Data comes from MBPP (shared/data/mbpp_*.json) when present, with incorrect solutions made by
mutating correct ones and checking that they fail the problem's tests; otherwise from a generator.
The folder is written atomically and reused when it already exists (pass --force to rebuild).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from wmtp.atomic import atomic_directory
from wmtp.data.synthetic import synthetic_problems, synthetic_rows
from wmtp.data.template import format_prompt
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from wmtp.eval.mutants import mbpp_rows_with_incorrect
from wmtp.logs import setup_logging
from wmtp.models import ModelArgs, MTPTransformer

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_MODEL = dict(
    dim=64,
    n_layers=6,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=-1,
    multiple_of=32,
    norm_eps=1e-5,
    rope_theta=10000.0,
    n_future_tokens=4,
)
TINY_VOCAB = 1024
TOY_EVAL_PROBLEMS = 40
TOY_EVAL_SEED_OFFSET = 2
"""The toy evaluation set's seed is the data seed plus this (the validation rows use plus 1)."""


def build_rows(source: str, shared: Path, max_problems: int | None, seed: int) -> tuple[list, list, str]:
    if source == "auto":
        source = "mbpp" if (shared / "mbpp_train.json").is_file() else "synthetic"
    if source == "mbpp":
        train, stats = mbpp_rows_with_incorrect(shared / "mbpp_train.json", max_problems=max_problems, seed=seed)
        valid, _ = mbpp_rows_with_incorrect(
            shared / "mbpp_validation.json",
            max_problems=None if max_problems is None else max(8, max_problems // 4),
            seed=seed,
        )
        print(f"[tiny] MBPP: {stats}")
        return train, valid, source
    n = max_problems or 300
    return synthetic_rows(n, seed=seed), synthetic_rows(max(8, n // 5), seed=seed + 1), source


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_mtp_model(folder: Path, vocab_size: int, seed: int) -> None:
    """Random tiny MTP model saved exactly as Meta ships checkpoints (vocab_size -1 in params.json)."""
    args = ModelArgs(**{**TINY_MODEL, "vocab_size": vocab_size})
    model = MTPTransformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(TINY_MODEL, indent=2) + "\n")


def make_reference(folder: Path, tokenizer: SentencePieceTokenizer, seed: int) -> None:
    """Tiny Hugging Face causal LM on the same tokenizer (loaded with transformers offline)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/tiny"))
    parser.add_argument("--source", choices=["auto", "mbpp", "synthetic"], default="auto")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--max-problems", type=int, default=None, help="limit problems (fast tests)")
    parser.add_argument("--no-reference", action="store_true", help="skip the Hugging Face reference model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    if args.out.is_dir() and not args.force:
        print(f"[tiny] reusing {args.out} (--force rebuilds)")
        return
    t0 = time.perf_counter()
    train, valid, source = build_rows(args.source, args.shared_data, args.max_problems, args.seed)
    with atomic_directory(args.out, overwrite=True) as tmp:
        write_jsonl(tmp / "data" / "train.jsonl", train)
        write_jsonl(tmp / "data" / "valid.jsonl", valid)
        toy = synthetic_problems(TOY_EVAL_PROBLEMS, seed=args.seed + TOY_EVAL_SEED_OFFSET)
        (tmp / "data" / "toy_eval.json").write_text(json.dumps(toy, indent=1) + "\n")
        corpus = [format_prompt(r["instruction"], r["input"]) + r["output"] for r in train]
        tokenizer = SentencePieceTokenizer(train_sentencepiece(corpus, tmp, vocab_size=TINY_VOCAB))
        make_mtp_model(tmp / "mtp_model", tokenizer.vocab_size, args.seed)
        if not args.no_reference:
            make_reference(tmp / "reference", tokenizer, args.seed)
    n_bad = sum(not r["is_correct"] for r in train)
    print(
        f"[tiny] {args.out}: source {source}, train {len(train)} rows ({n_bad} incorrect), "
        f"valid {len(valid)} rows, vocab {tokenizer.vocab_size}, {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    setup_logging()
    main()
