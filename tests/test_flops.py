"""Model FLOPs for MFU: hand-counted for a small model, and torchtitan's formula for a plain step."""

from __future__ import annotations

import torch
from torch import nn

from wmtp.models import ModelArgs, MTPTransformer
from wmtp.training.flops import step_flops
from wmtp.training.step import throughput

# dim 64, 4 query heads of 16, 2 KV heads, FFN 192 (int(2*4*64/3) = 170 -> 192), 2 trunk + 4 head blocks.
ARGS = ModelArgs(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=32, n_future_tokens=4)


def test_step_flops_by_hand():
    block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 192  # wq, wo; wk, wv; w1, w2, w3 = 49,152
    lengths, pairs = [10, 20], 25
    forward = (
        30 * 2 * 6 * block  # every token through 6 blocks
        + 6 * 4 * 64 * (10 * 10 + 20 * 20)  # QK^T and AV: 4 d L per token and block, per sequence
        + pairs * 2 * 64 * 1024
    )  # the output projection, scored pairs only
    assert step_flops(ARGS, lengths, heads=4, scored_pairs=pairs) == 3 * forward
    trunk_forward = 30 * 2 * 2 * block + 2 * 4 * 64 * (100 + 400)  # the critic: frozen trunk, no heads
    assert step_flops(ARGS, lengths, heads=0, scored_pairs=0, backward=False) == trunk_forward


def test_step_flops_equal_torchtitans_formula_for_one_full_sequence():
    """torchtitan: 6 (N - N_embedding) + 12 l h q t per token, with every token's every head scored.

    N counts the real model's matmul parameters (norm weights are no matmul and are left out)."""
    with torch.device("meta"):
        model = MTPTransformer(ARGS)
    matmul = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "output")
    seq = 37
    layers = ARGS.n_trunk_layers + ARGS.n_future_tokens
    per_token = (
        6 * (matmul + ARGS.n_future_tokens * model.output.weight.numel())
        + 12 * layers * ARGS.n_heads * ARGS.head_dim * seq
    )
    got = step_flops(ARGS, [seq], heads=ARGS.n_future_tokens, scored_pairs=seq * ARGS.n_future_tokens)
    assert got == per_token * seq


def test_throughput_reports_mfu_only_where_the_peak_is_known():
    out = throughput(1000, 2e12, 2.0, device=torch.device("cpu"))
    assert out == {"tokens_per_s": 500.0, "step_time_s": 2.0, "tflops_per_s": 1.0}
