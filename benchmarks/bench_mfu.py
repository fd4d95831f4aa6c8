"""MFU of a ~1B-parameter MTP training step, the baseline recipe's own `train_step`, eager or compiled.

    torchrun --standalone --nproc_per_node=1 benchmarks/bench_mfu.py --out mfu.json [--compile]
    torchrun --standalone --nproc_per_node=1 benchmarks/bench_mfu.py --out mfu.json --dry-run   # CPU, tiny

The model (dim 2048, 16 blocks = 12 trunk + 4 heads, 16 heads, V 32000: 0.95B parameters) is built
on the meta device and sharded with FSDP2 over the process group, bf16 compute with fp32 master
weights, as the recipes run under torchrun; the batch is 4 x 2048 tokens, all but the first scored.
Model FLOPs follow `wmtp.training.flops` (torchtitan's convention). MFU = FLOPs / time / the GPU's
dense bf16 peak. Writes {"params", "tokens_per_s", "tflops_per_s", "mfu", "step_s", "peak_memory_gib"}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_step import recipe_on_model, synthetic_batch  # noqa: E402

from wmtp.config.sections import DistributedConfig  # noqa: E402
from wmtp.distributed.env import destroy, init_distributed  # noqa: E402
from wmtp.distributed.parallelize import build_mesh  # noqa: E402
from wmtp.models import ModelArgs  # noqa: E402
from wmtp.training.flops import peak_flops  # noqa: E402
from wmtp.training.step import step_work  # noqa: E402

ONE_B = dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, n_future_tokens=4, max_seq_len=2048)
ONE_B_BATCH = dict(batch=4, seq=2048)
TINY = dict(dim=64, n_layers=6, n_heads=4, vocab_size=1024, n_future_tokens=4, max_seq_len=64)
TINY_BATCH = dict(batch=2, seq=64)
WARMUP, TIMED = 3, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (distributed.compile)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU, one timed step")
    opts = parser.parse_args()
    if opts.compile:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(opts.out.parent / "inductor"))

    info = init_distributed("cpu" if opts.dry_run else "cuda")
    args = ModelArgs(**(TINY if opts.dry_run else ONE_B))
    shape = TINY_BATCH if opts.dry_run else ONE_B_BATCH
    recipe, _ = recipe_on_model(
        "baseline",
        args,
        info,
        mesh=build_mesh(info, 1),
        precision="fp32" if opts.dry_run else "bf16",
        dist_cfg=DistributedConfig(compile=opts.compile),
    )
    batch = synthetic_batch(args, **shape, prompt=1, device=info.device)
    tokens, flops = step_work(
        [batch], args, heads=args.n_future_tokens, scored_pairs=int((batch["targets"] >= 0).sum())
    )

    def step() -> float:
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        recipe.train_step([batch])
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(1 if opts.dry_run else WARMUP):
        step()
    times = [step() for _ in range(1 if opts.dry_run else TIMED)]
    seconds = statistics.median(times)
    peak = peak_flops(info.device)
    result = {
        "compile": opts.compile,
        "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
        "params": sum(p.numel() for p in recipe.model.parameters()),
        "tokens": tokens,
        "flops": flops,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else None,
    }
    if info.is_main:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
    destroy()


if __name__ == "__main__":
    main()
