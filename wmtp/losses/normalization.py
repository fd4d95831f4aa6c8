"""Global-batch denominators (SPEC: sums run over all micro-batches and ranks of one step).

Counts are taken from every micro-batch's targets before the first backward and summed over
ranks, so gradient accumulation and world size never change the objective.
"""

from __future__ import annotations

import torch

from wmtp.constants import IGNORE_INDEX
from wmtp.distributed.env import all_reduce_sum
from wmtp.kernels.backend import accumulation_dtype


def valid_pair_counts(targets: torch.Tensor) -> torch.Tensor:
    """Valid (t, k) pairs per head of one micro-batch: targets [B, T, n] -> [n] (float64; float32 on
    MPS), on the targets' device."""
    return (targets != IGNORE_INDEX).sum(dim=(0, 1)).to(accumulation_dtype(targets.device))


def global_valid_pair_counts(micro_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's valid pairs per head, N_k over the whole global batch: all micro-batches, all ranks)."""
    local = sum(valid_pair_counts(t) for t in micro_targets)
    return local, all_reduce_sum(local.clone())


def head_mean_weights(targets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Pair weights 1 / (n N_k) on valid pairs, so sum(w * CE) = (1/n) sum_k sum_t CE_{t,k} / N_k.

    A head with no valid pair in the global batch contributes 0.
    """
    n = targets.shape[-1]
    inv = torch.where(counts > 0, 1.0 / (n * counts.clamp(min=1)), torch.zeros_like(counts))
    return (targets != IGNORE_INDEX).to(inv.dtype) * inv.to(targets.device)
