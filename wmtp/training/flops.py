"""Model FLOPs of a training step and device peak rates, for MFU.

Convention (torchtitan's): a matmul with P parameters costs 2P FLOPs per token forward and 4P
backward; attention's two matmuls (scores and values) cost 4·d·L FLOPs per token forward for a
sequence of length L (d = n_heads · head_dim) and twice that backward, i.e. 12·d·L per token and
block, with no discount for the causal mask (as torchtitan counts it; FlashAttention skips about
half of that work, so MFU here is comparable with torchtitan's, not a hardware utilisation).
Recomputation (activation checkpointing, the Rho-1 loss's backward) is not counted. MTP specifics:
every token runs the trunk and each head block once; the shared output projection (6·d·V per pair)
runs only for the (position, head) pairs that have a target, as the fused loss does.
Each sequence counts with its own length (padding is not work), so the figure is honest for
batches of mixed lengths.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from wmtp.models.args import ModelArgs

PEAK_BF16_FLOPS = {
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}
"""Dense bf16 peak by GPU name fragment (datasheets)."""
FORWARD_BACKWARD = 3
"""A trained matmul runs once forward and twice backward (input and weight gradients)."""


def block_matmul_params(args: ModelArgs) -> int:
    """Matmul parameters of one transformer block (attention projections and SwiGLU)."""
    d, kv = args.dim, args.kv_heads * args.head_dim
    return 2 * d * d + 2 * d * kv + 3 * d * args.ffn_hidden_dim


def step_flops(
    args: ModelArgs, lengths: Iterable[int], *, heads: int, scored_pairs: int, backward: bool = True
) -> float:
    """FLOPs of one step over sequences of the given (unpadded) lengths.

    heads: head blocks run (n_future; 0 for a trunk-only forward). scored_pairs: (position, head)
    pairs that go through the output projection. backward=False counts a forward only (the
    critic: its frozen trunk needs no backward).
    """
    factor = FORWARD_BACKWARD if backward else 1
    blocks = args.n_trunk_layers + heads
    attn_dim = args.n_heads * args.head_dim
    total = 0.0
    for length in lengths:
        total += length * 2.0 * blocks * block_matmul_params(args)  # dense matmuls, forward
        total += length * 4.0 * blocks * attn_dim * length  # scores + values, forward
    total += scored_pairs * 2.0 * args.dim * args.vocab_size
    return factor * total


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
