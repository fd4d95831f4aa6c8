"""Public multi-head cross-entropy API (SPEC: `wmtp.losses.mtp_cross_entropy`)."""

from __future__ import annotations

import torch

from wmtp.constants import IGNORE_INDEX
from wmtp.kernels.fused_mtp_ce import chunked_mtp_ce


def mtp_cross_entropy_with_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "none",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mtp_cross_entropy` plus the detached unweighted per-pair CE [N, n] for logging."""
    return chunked_mtp_ce(
        hidden, weight, targets, weights, ignore_index=ignore_index, reduction=reduction, backend=backend
    )


def mtp_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of every (row, head) pair against the shared output projection.

    hidden [N, n, D], weight [V, D], targets [N, n] (ignore_index where invalid), weights [N, n]
    or None (treated as constants). reduction="none": per-pair CE [N, n], 0 where ignored, times
    the weight if given; "sum": the scalar sum of that. Differentiable in hidden and weight; never
    holds more than a chunk of logits. `backend` ("auto" | "triton" | "torch", None: the process
    default from `wmtp.kernels.backend`) picks the kernel implementation.
    """
    return mtp_cross_entropy_with_ce(
        hidden, weight, targets, weights, ignore_index=ignore_index, reduction=reduction, backend=backend
    )[0]
