"""Verifiable objective: TD-error token weights, running advantage normalisation, logged statistics.

The math lives in `wmtp/kernels/td_weights.py`. The statistics vector it returns holds partial sums, so
the recipe merges micro-batches with `merge_td_stats`, then calls `all_reduce_td_stats` once per
optimizer step; every rank then updates its `AdvantageNormalizer` from the same numbers. Packed
micro-batches pass `segments`: the TD errors, GAE chains and rewards are then each row's own
(`wmtp.weighting.segments`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from wmtp.kernels.td_weights import (
    N_SUM_STATS,
    STAT_ADV_MAX,
    STAT_ADV_SUM,
    STAT_ADV_SUMSQ,
    STAT_CLIP_HIGH,
    STAT_CLIP_LOW,
    STAT_COUNT,
    STAT_NEG_ADV_MIN,
    STAT_NEG_W_MIN,
    STAT_W_MAX,
    STAT_W_SUM,
    STAT_W_SUMSQ,
    TDWeights,
    empty_td_stats,
    merge_td_stats,
    td_weights_fused,
)
from wmtp.kernels.td_weights import td_head_weights as _shift_to_heads
from wmtp.weighting.segments import same_segment_ahead, to_packed, to_rows

__all__ = [
    "AdvantageNormalizer",
    "TDWeights",
    "all_reduce_td_stats",
    "empty_td_stats",
    "merge_td_stats",
    "td_head_weights",
    "td_stats",
    "td_weights",
    "td_weights_with_stats",
]

DEFAULT_MOMENTUM = 0.99
DEFAULT_MIN_STD = 1e-6
"""Floor of the running std, so a batch of (nearly) equal advantages cannot divide by zero."""


def td_weights(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    w_min: float,
    w_max: float,
    gamma: float = 1.0,
    lam: float = 0.0,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token weight w_j [B, L] (fp32) of each target token x_j; 0 where m_j = 0 and at j = 0.

    values [B, L] (V_t at position t; detached here), rewards [B], mask [B, L] (m_j). segments
    [S, T] (packed rows): values and mask [S, T], rewards [R], each row weighted on its own.
    """
    if segments is not None:
        return td_weights_with_stats(
            values, rewards, mask, beta=beta, w_min=w_min, w_max=w_max, gamma=gamma, lam=lam, segments=segments
        ).weights
    return td_weights_fused(values, rewards, mask, beta=beta, w_min=w_min, w_max=w_max, gamma=gamma, lam=lam).weights


def td_weights_with_stats(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    w_min: float,
    w_max: float,
    gamma: float = 1.0,
    lam: float = 0.0,
    normalizer: AdvantageNormalizer | None = None,
    segments: torch.Tensor | None = None,
) -> TDWeights:
    """`td_weights` plus the statistics partial sums; with `normalizer`, A is normalised by its
    current running mean/std before the exp (the caller updates it afterwards from the stats).
    segments (packed rows): as in `td_weights`; the statistics are over the same actions."""
    if segments is not None:
        n_rows = rewards.shape[0]
        rows = td_weights_with_stats(
            to_rows(values.detach(), segments, n_rows),
            rewards,
            to_rows(mask.bool(), segments, n_rows),
            beta=beta,
            w_min=w_min,
            w_max=w_max,
            gamma=gamma,
            lam=lam,
            normalizer=normalizer,
        )
        return TDWeights(to_packed(rows.weights, segments), rows.stats)
    mean, std = (normalizer.mean, normalizer.std) if normalizer is not None else (None, None)
    return td_weights_fused(
        values, rewards, mask, beta=beta, w_min=w_min, w_max=w_max, gamma=gamma, lam=lam, adv_mean=mean, adv_std=std
    )


def td_head_weights(weights: torch.Tensor, n_future: int, *, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Target-aligned weights [B, L] -> per-head weights [B, L, n]: pair (t, k) gets w_{t+1+k}, 0 past
    the end and (with segments, packed rows) when x_{t+1+k} belongs to another row."""
    heads = _shift_to_heads(weights, n_future)
    if segments is None:
        return heads
    same_row = torch.stack([same_segment_ahead(segments, k + 1) for k in range(n_future)], dim=-1)
    return heads * same_row


def all_reduce_td_stats(stats: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Combine statistics across ranks in place (sums with SUM, extremes with MAX); returns `stats`."""
    if dist.is_available() and dist.is_initialized():
        # Two collectives on contiguous slices of one buffer; the minima are stored negated.
        dist.all_reduce(stats[:N_SUM_STATS], op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(stats[N_SUM_STATS:], op=dist.ReduceOp.MAX, group=group)
    return stats


def _mean_std(total: float, total_sq: float, count: float) -> tuple[float, float]:
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


def td_stats(stats: torch.Tensor) -> dict[str, float]:
    """The logged distribution of A (td/*) and of the weights (weight/*) from partial sums.

    Std is the population std. With no response tokens every value is NaN.
    """
    s = stats.tolist()
    count = s[STAT_COUNT]
    keys = (
        "td/mean",
        "td/std",
        "td/min",
        "td/max",
        "weight/mean",
        "weight/std",
        "weight/min",
        "weight/max",
        "weight/clipped_share",
        "weight/clipped_low_share",
        "weight/clipped_high_share",
    )
    if count == 0:
        return dict.fromkeys(keys, math.nan)
    adv_mean, adv_std = _mean_std(s[STAT_ADV_SUM], s[STAT_ADV_SUMSQ], count)
    w_mean, w_std = _mean_std(s[STAT_W_SUM], s[STAT_W_SUMSQ], count)
    values = (
        adv_mean,
        adv_std,
        -s[STAT_NEG_ADV_MIN],
        s[STAT_ADV_MAX],
        w_mean,
        w_std,
        -s[STAT_NEG_W_MIN],
        s[STAT_W_MAX],
        (s[STAT_CLIP_LOW] + s[STAT_CLIP_HIGH]) / count,
        s[STAT_CLIP_LOW] / count,
        s[STAT_CLIP_HIGH] / count,
    )
    return dict(zip(keys, values))


class AdvantageNormalizer:
    """Running (EMA) mean and std of the advantage A, updated from all-reduced partial sums.

    The first batch with response tokens sets the state directly; later ones blend in with weight
    1 - momentum. Until then mean = 0 and std = 1, so normalising changes nothing. State stays on
    `device` as fp32 tensors and updates are tensor ops, so training never waits on the host.
    """

    def __init__(
        self, momentum: float = DEFAULT_MOMENTUM, min_std: float = DEFAULT_MIN_STD, device: torch.device | str = "cpu"
    ) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.min_std = min_std
        self._mean = torch.zeros((), device=device)
        self._var = torch.ones((), device=device)
        self._initialised = torch.zeros((), dtype=torch.bool, device=device)

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def std(self) -> torch.Tensor:
        return self._var.sqrt().clamp_min(self.min_std)

    def update(self, stats: torch.Tensor) -> None:
        """Blend in one step's statistics (merged over micro-batches and all-reduced over ranks)."""
        stats = stats.to(self._mean.device)
        count = stats[STAT_COUNT]
        seen = count > 0
        n = count.clamp_min(1)
        batch_mean = stats[STAT_ADV_SUM] / n
        batch_var = (stats[STAT_ADV_SUMSQ] / n - batch_mean * batch_mean).clamp_min(0)
        keep = torch.where(self._initialised, self.momentum, 0.0)
        new_mean = keep * self._mean + (1 - keep) * batch_mean.float()
        new_var = keep * self._var + (1 - keep) * batch_var.float()
        self._mean = torch.where(seen, new_mean, self._mean)
        self._var = torch.where(seen, new_var, self._var)
        self._initialised = self._initialised | seen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self._mean.clone(), "var": self._var.clone(), "initialised": self._initialised.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self._mean.device
        self._mean = state["mean"].to(device, torch.float32).reshape(())
        self._var = state["var"].to(device, torch.float32).reshape(())
        self._initialised = state["initialised"].to(device, torch.bool).reshape(())
