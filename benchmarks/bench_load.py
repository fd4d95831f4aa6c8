"""Checkpoint loading under torchrun: peak RSS per rank and setup time of a recipe, large vs tiny model.

    python benchmarks/bench_load.py                       # ~348M parameters (1.39 GB fp32), 2 ranks
    python benchmarks/bench_load.py --dim 512 --layers 8  # smaller, quicker
    python benchmarks/bench_load.py --hf --layers 19      # a Hugging Face Llama folder, 4 heads added

Makes (once, under --work) a Meta-format checkpoint (params.json + consolidated.00.pth) of random
weights with vocabulary 32,000, a sentencepiece tokenizer of that size (the tiny tokenizer with
unused pieces appended, so that a real 32,000-piece model loads) and the tiny training data. Then
it runs the baseline recipe's `setup()` under `torchrun --nproc_per_node=RANKS` twice, with this
model and with the tiny one, each rank in `benchmarks/load_worker.py`, which records its peak
resident set (ru_maxrss) and the setup time, and checks that the loaded parameters equal a
single-process `load_mtp` bit for bit. Printed: per rank, peak RSS above the tiny-model run (what
the checkpoint costs that rank) as MB and as a share of the checkpoint file, and setup time.

With --hf the large checkpoint is a Hugging Face folder instead, made by transformers: a random
LlamaForCausalLM of --layers layers, fp32, in safetensors shards of at most 300 MB with their
index; the recipe reads it as model.path with model.n_future_tokens = 4 (3 heads added, copies of
the last block), so the trained model has --layers + 3 blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from sentencepiece import sentencepiece_model_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import cpu_model  # noqa: E402

from wmtp.models import ModelArgs, MTPTransformer  # noqa: E402

VOCAB = 32000
WORKER = Path(__file__).resolve().with_name("load_worker.py")
TINY_MAX_PROBLEMS = 40
N_FUTURE = 4
HF_SHARD_SIZE = "300MB"


def padded_tokenizer(src: Path, dst: Path, vocab: int) -> None:
    """`src` with unused pieces appended up to `vocab` pieces (no text ever encodes to them)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(src.read_bytes())
    low = min(p.score for p in proto.pieces) - 1.0
    for i in range(len(proto.pieces), vocab):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"<unused_{i}>", low
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(proto.SerializeToString())


def make_checkpoint(folder: Path, *, dim: int, layers: int, heads: int, seed: int = 0) -> int:
    """Random Meta-format MTP checkpoint; returns the .pth size in bytes."""
    pth = folder / "consolidated.00.pth"
    params = dict(
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        vocab_size=-1,
        multiple_of=256,
        norm_eps=1e-5,
        rope_theta=10000.0,
        n_future_tokens=4,
    )
    if not pth.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        model = MTPTransformer(ModelArgs(**{**params, "vocab_size": VOCAB}))
        model.init_weights(generator=torch.Generator().manual_seed(seed))
        torch.save(model.state_dict(), folder / "tmp.pth")
        (folder / "tmp.pth").rename(pth)
        (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return pth.stat().st_size


def make_hf_checkpoint(folder: Path, *, dim: int, layers: int, heads: int, seed: int = 0) -> int:
    """Random Hugging Face Llama folder (fp32 safetensors shards + index); returns the shards' size in bytes."""
    if not (folder / "model.safetensors.index.json").is_file():
        # transformers imports Hugging Face's `kernels` package, which the checkout's kernels/ folder
        # would shadow while the repository root is on sys.path.
        saved = sys.path[:]
        sys.path[:] = [p for p in saved if Path(p or ".").resolve() != ROOT]
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        finally:
            sys.path[:] = saved
        ffn = ModelArgs(dim=dim, n_layers=2, n_heads=heads, multiple_of=256).ffn_hidden_dim  # Llama 2's rule
        config = LlamaConfig(
            hidden_size=dim,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            vocab_size=VOCAB,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        )
        torch.manual_seed(seed)
        tmp = folder.with_name(folder.name + ".tmp")
        LlamaForCausalLM(config).save_pretrained(tmp, max_shard_size=HF_SHARD_SIZE)
        tmp.rename(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_ranks(model: Path, tokenizer: Path, data: Path, out: Path, ranks: int, *extra: str) -> list[dict]:
    """The worker under torchrun; one JSON result per rank."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        str(WORKER),
        str(out),
        "--config",
        str(ROOT / "configs" / "baseline_tiny.toml"),
        "--model.path",
        str(model),
        "--tokenizer.path",
        str(tokenizer),
        "--data.train_path",
        str(data),
        "--training.output_dir",
        str(out / "run"),
        "--metrics.mlflow",
        "false",
        "--metrics.progress_bar",
        "false",
        "--training.precision",
        "fp32",
        "--training.device",
        "cpu",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wmtp_bench_load")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hf", action="store_true", help="a Hugging Face Llama folder (sharded safetensors)")
    args = parser.parse_args()

    tiny = args.work / "tiny"
    subprocess.run(
        [
            sys.executable,
            "scripts/make_tiny.py",
            "--out",
            str(tiny),
            "--source",
            "synthetic",
            "--max-problems",
            str(TINY_MAX_PROBLEMS),
            "--no-reference",
        ],
        cwd=ROOT,
        check=True,
    )
    tokenizer = args.work / "tokenizer32k" / "tokenizer.model"
    padded_tokenizer(tiny / "tokenizer.model", tokenizer, VOCAB)
    if args.hf:
        large = args.work / f"hf_llama_d{args.dim}_l{args.layers}"
        size = make_hf_checkpoint(large, dim=args.dim, layers=args.layers, heads=args.heads)
        model_layers, extra = args.layers + N_FUTURE - 1, ["--model.n_future_tokens", str(N_FUTURE)]
    else:
        large = args.work / f"mtp_d{args.dim}_l{args.layers}"
        size = make_checkpoint(large, dim=args.dim, layers=args.layers, heads=args.heads)
        model_layers, extra = args.layers, []
    with torch.device("meta"):
        n_params = sum(
            p.numel()
            for p in MTPTransformer(
                ModelArgs(
                    dim=args.dim,
                    n_layers=model_layers,
                    n_heads=args.heads,
                    vocab_size=VOCAB,
                    multiple_of=256,
                    n_future_tokens=N_FUTURE,
                )
            ).parameters()
        )

    data = tiny / "data" / "train.jsonl"
    small = run_ranks(tiny / "mtp_model", tiny / "tokenizer.model", data, args.work / "run_tiny", args.ranks)
    big = run_ranks(large, tokenizer, data, args.work / "run_large", args.ranks, *extra)
    print(
        f"\n{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {args.ranks} ranks; "
        f"checkpoint {large.name}: {size / 1e6:,.0f} MB, a model of ~{n_params / 1e6:.0f}M parameters"
    )
    print(
        "| rank | peak RSS, tiny model | peak RSS, large model | above tiny | share of checkpoint | "
        "setup time | equal to one-process load |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for s, b in zip(small, big):
        extra = (b["peak_rss_mb"] - s["peak_rss_mb"]) * 1e6
        print(
            f"| {b['rank']} | {s['peak_rss_mb']:,.0f} MB | {b['peak_rss_mb']:,.0f} MB | {extra / 1e6:,.0f} MB | "
            f"{extra / size:.2f}x | {b['setup_s']:.1f} s | {b.get('bitwise_equal', '-')} |"
        )


if __name__ == "__main__":
    main()
