"""Value learning for the critic and verifiable recipes (SPEC: "The four objectives", 2. Critic).

State t (the prefix x_0..x_t) is response-predicting when its next token x_{t+1} is a response
token (m_{t+1} = 1). The value head predicts the reward R (1 correct, 0 incorrect) from every such
state. Losses come back as sums with their counts, so the recipe divides by a count summed over all
micro-batches and ranks, like the token objectives. Responses are contiguous (prompt, response,
padding), as `wmtp.data.collate` builds them. Packed micro-batches pass `segments`: each row is then
computed on its own (`wmtp.weighting.segments`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from wmtp.weighting.segments import same_segment_ahead, to_packed, to_rows

CORRECT_THRESHOLD: float = 0.5
"""A reward (or label) above this counts as correct, so bool, 0/1 int and 0/1 float all work."""


def response_states(mask: torch.Tensor, *, segments: torch.Tensor | None = None) -> torch.Tensor:
    """States whose next token is a response token: s_t = m_{t+1} for t < L-1, s_{L-1} = False.

    mask [B, L] (response mask m_j, any dtype) -> [B, L] bool. segments (packed rows): the next
    token must be in the same row.
    """
    states = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    states[:, :-1] = mask[:, 1:].bool()
    return states if segments is None else states & same_segment_ahead(segments, 1)


def last_states(mask: torch.Tensor) -> torch.Tensor:
    """Index t* [B] (int64) of each row's last response-predicting state; -1 for a row without one.

    Its next token x_{t*+1} is the last response token (EOS with the usual template).
    """
    states = response_states(mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(states)
    return torch.where(states, positions, torch.full_like(positions, -1)).amax(dim=1)


def critic_targets(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    lam: float = 1.0,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """λ-return targets G [B, L] (fp32, no gradient): G_{t*} = R, G_t = (1-λ) V_{t+1} + λ G_{t+1}.

    values [B, L] (V_t at position t; detached here), rewards [B], mask [B, L]. λ = 1 gives the
    Monte-Carlo target G_t = R at every response-predicting state; λ = 0 bootstraps one step.
    G is 0 outside response-predicting states. segments [S, T] (packed rows): values and mask are
    [S, T], rewards [R], one per row, and each row's targets are its own.
    """
    if segments is not None:
        n_rows = rewards.shape[0]
        rows = critic_targets(
            to_rows(values.detach(), segments, n_rows), rewards, to_rows(mask.bool(), segments, n_rows), lam=lam
        )
        return to_packed(rows, segments)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"critic lambda must be in [0, 1], got {lam}")
    if values.dim() != 2 or mask.shape != values.shape or rewards.shape != values.shape[:1]:
        raise ValueError(
            f"expected values [B, L], rewards [B], mask [B, L]; got {tuple(values.shape)}, "
            f"{tuple(rewards.shape)}, {tuple(mask.shape)}"
        )
    v = values.detach().float()
    r = rewards.detach().float().to(v.device)
    states = response_states(mask)
    last = last_states(mask)
    targets = torch.zeros_like(v)
    # The recursion runs backwards in t, so loop over positions; rows stay vectorised. The last
    # position is never a response-predicting state (it has no next token), so it stays 0.
    for t in range(v.shape[1] - 2, -1, -1):
        bootstrap = (1.0 - lam) * v[:, t + 1] + lam * targets[:, t + 1]
        g = torch.where(last == t, r, bootstrap)
        targets[:, t] = torch.where(states[:, t], g, torch.zeros_like(g))
    return targets


def value_loss(
    values: torch.Tensor,
    targets: torch.Tensor,
    states: torch.Tensor,
    *,
    kind: Literal["mse", "huber"] = "mse",
    huber_delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-state loss over `states`, number of those states), differentiable in values.

    "mse": (V_t - G_t)^2. "huber": torch's Huber loss, 0.5 d^2 for |d| <= delta and
    delta (|d| - 0.5 delta) beyond (so for small errors it is half the "mse" term).
    values, targets [B, L]; states [B, L] bool (`response_states`). The sum is fp32; the count is
    an int64 tensor, ready to be all-reduced.
    """
    if values.shape != targets.shape or states.shape != values.shape:
        raise ValueError(
            f"values, targets and states must share a shape; got {tuple(values.shape)}, "
            f"{tuple(targets.shape)}, {tuple(states.shape)}"
        )
    v, target = values.float(), targets.detach().float()
    if kind == "mse":
        per_state = (v - target).square()
    elif kind == "huber":
        if huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
        per_state = F.huber_loss(v, target, reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"value loss kind must be 'mse' or 'huber', got {kind!r}")
    loss_sum = torch.where(states, per_state, torch.zeros_like(per_state)).sum()
    return loss_sum, states.sum()


def binary_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for `labels` (positive: label > CORRECT_THRESHOLD).

    Rank-based (Mann-Whitney U): tied scores share their average rank, so a tie between a positive
    and a negative counts one half. NaN when only one class is present.
    """
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both be [N], got {tuple(scores.shape)} and {tuple(labels.shape)}")
    # Host-side numpy in float64: exact ranks whatever the device (MPS has no float64).
    s = scores.detach().float().cpu().numpy().astype(np.float64)
    positive = labels.detach().float().cpu().numpy() > CORRECT_THRESHOLD
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, group, group_sizes = np.unique(s, return_inverse=True, return_counts=True)
    # 1-based ranks: a group occupying ranks a..b gets (a + b) / 2 for each member.
    group_ranks = np.cumsum(group_sizes) - (group_sizes - 1.0) / 2.0
    u = float(group_ranks[group][positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


@torch.no_grad()
def value_stats(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, *, segments: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Partial sums for the critic's logs, to be all-reduced (sums, counts) or gathered (last_*).

    Over response-predicting states: value_sum_correct / count_correct and value_sum_incorrect /
    count_incorrect (0-dim fp32, which every device supports; mean V = sum / count after the
    all-reduce). Per row: last_values [B] (V at t*), rewards [B] and last_valid [B] (bool: the row
    has a response-predicting state) for `binary_auroc` over the gathered rows where last_valid holds.
    segments (packed rows): values and mask [S, T], rewards [R], and per row means per row of R.
    """
    if segments is not None:
        n_rows = rewards.shape[0]
        return value_stats(to_rows(values, segments, n_rows), rewards, to_rows(mask.bool(), segments, n_rows))
    v = values.detach().float()
    states = response_states(mask)
    correct = (rewards.detach().float() > CORRECT_THRESHOLD).to(v.device).unsqueeze(1)
    on_correct, on_incorrect = states & correct, states & ~correct
    zero = torch.zeros_like(v)
    last = last_states(mask)
    last_values = v.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)
    return {
        "value_sum_correct": torch.where(on_correct, v, zero).sum(),
        "count_correct": on_correct.sum().float(),
        "value_sum_incorrect": torch.where(on_incorrect, v, zero).sum(),
        "count_incorrect": on_incorrect.sum().float(),
        "last_values": last_values,
        "rewards": rewards.detach().float().to(v.device),
        "last_valid": last >= 0,
    }
