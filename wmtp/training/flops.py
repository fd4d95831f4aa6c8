"""Training FLOPs per token and device peak rates, for MFU."""

from __future__ import annotations

import torch

from wmtp.models.args import ModelArgs

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A800": 312e12,
                   "L40S": 362e12, "B200": 2250e12}
"""Dense bf16 peak by GPU name fragment (datasheets)."""


def flops_per_token(args: ModelArgs, seq_len: int, *, n_heads_used: int | None = None) -> float:
    """6 x matmul parameters on the token's path + attention score/value FLOPs (forward + backward).

    Each token runs the trunk once and every head block once; the output projection runs once per head.
    """
    heads = args.n_future_tokens if n_heads_used is None else n_heads_used
    d, f, v = args.dim, args.ffn_hidden_dim, args.vocab_size
    kv = args.kv_heads * args.head_dim
    block = d * d * 2 + d * kv * 2 + 3 * d * f
    blocks = args.n_trunk_layers + heads
    dense = blocks * block + heads * d * v
    attention = blocks * 2 * seq_len * d  # QK^T and AV, causal half of 2 x 2 x T x d
    return 6.0 * dense + 6.0 * attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
