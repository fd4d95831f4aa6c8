"""Token-level diagnostics: where an objective's weights land (SPEC: "Controls and diagnostics").

Where labels allow, a recipe logs how its token weights (verifiable), its selection (Rho-1) or its
critic's TD errors (critic, verifiable) treat
- correct against incorrect rows: the mean over each class's response targets;
- the first differing token (the per-row field "first_diff", `wmtp.data.first_diff`) against the
  row's other response targets: the mean at that token and over the others, the share of rows whose
  value there lies below the median of the row's others, and the AUROC of a low value there within
  its row (the share of the row's other targets with a higher value, ties counting one half; its
  mean over rows).

Everything is indexed by the TARGET token j (the action x_j taken in state j - 1), as the TD
weights are: a target is a response token, EOS included (m_j = 1, j >= 1). Each function returns
partial sums in a fixed layout, to be added over micro-batches and all-reduced over ranks; the
`*_metrics` functions turn the reduced sums into means (NaN where nothing was counted). Packed
micro-batches (with "segments") are moved to their row layout first (`wmtp.weighting.segments`):
"first_diff" is a position in the row's own tokens.
"""

from __future__ import annotations

import math

import torch

from wmtp.weighting.critic import CORRECT_THRESHOLD
from wmtp.weighting.segments import to_packed, to_rows

CLASS_SUMS = ("sum_correct", "n_correct", "sum_incorrect", "n_incorrect")
SITE_SUMS = ("rows", "at_site", "sum_other", "n_other", "below_median", "auroc")
PAIR_SITE_SUMS = ("sum_site", "n_site", "sum_other", "n_other")


def response_targets(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the target tokens x_j with m_j = 1 and j >= 1 (every response token, EOS included)."""
    valid = mask.bool().clone()
    valid[:, 0] = False
    return valid


def td_errors(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """δ_j [B, L] (fp32, detached) of each target token, 0 elsewhere: γ V_j - V_{j-1}, or R - V_{j-1}
    for the row's last response token (the verifiable objective's TD error, before any GAE).
    segments [S, T] (packed rows; rewards [R]): each row's own δ, in the packed layout."""
    if segments is not None:
        n_rows = rewards.shape[0]
        rows = td_errors(
            to_rows(values.detach(), segments, n_rows), rewards, to_rows(mask.bool(), segments, n_rows), gamma=gamma
        )
        return to_packed(rows, segments)
    v = values.detach().float()
    valid = response_targets(mask)
    positions = torch.arange(v.shape[1], device=v.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
    before = torch.cat([v[:, :1], v[:, :-1]], dim=1)  # V_{j-1} at j (j = 0 is never a target)
    after = torch.where(positions == last, rewards.detach().float().to(v.device)[:, None], gamma * v)
    return torch.where(valid, after - before, torch.zeros_like(v))


def class_sums(scores: torch.Tensor, valid: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """CLASS_SUMS [4] (fp32): sum and count of `scores` [B, L] over the `valid` targets of correct rows,
    then of incorrect rows (correct [B]: labels, rewards or bools)."""
    s = scores.detach().float()
    row_correct = (correct.float() > CORRECT_THRESHOLD).to(s.device)[:, None]
    on_correct, on_incorrect = valid & row_correct, valid & ~row_correct
    zero = torch.zeros_like(s)
    return torch.stack(
        [
            torch.where(on_correct, s, zero).sum(),
            on_correct.sum().float(),
            torch.where(on_incorrect, s, zero).sum(),
            on_incorrect.sum().float(),
        ]
    )


def site_sums(scores: torch.Tensor, valid: torch.Tensor, site: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """SITE_SUMS [6] (fp32) over the rows where `rows` [B] holds and the site (first_diff [B], a target
    position or -1) is a valid target with at least one other valid target in its row:
    rows counted; sum of the score at the site; sum and count of the scores at the other valid targets;
    rows whose site score is below the median of their others (the mean of the two middle values for
    an even count); and the sum over rows of P(other > site) + 0.5 P(other = site) among the row's others.
    """
    s = scores.detach().float()
    batch, length = s.shape
    positions = torch.arange(length, device=s.device)
    at = site.to(s.device).clamp(min=0)[:, None]
    is_site = (positions[None, :] == site.to(s.device)[:, None]) & valid
    other = valid & ~is_site
    n_other = other.sum(dim=1)
    use = rows.to(s.device).bool() & is_site.any(dim=1) & (n_other > 0)
    other = other & use[:, None]
    at_site = s.gather(1, at).squeeze(1)

    ordered = torch.where(other, s, torch.full_like(s, math.inf)).sort(dim=1).values
    lo = ((n_other - 1).clamp(min=0) // 2)[:, None]
    hi = (n_other // 2).clamp(max=length - 1)[:, None]
    median = 0.5 * (ordered.gather(1, lo) + ordered.gather(1, hi)).squeeze(1)
    higher = (other & (s > at_site[:, None])).sum(dim=1).float()
    ties = (other & (s == at_site[:, None])).sum(dim=1).float()
    auroc = (higher + 0.5 * ties) / n_other.clamp(min=1).float()
    zero = torch.zeros_like(at_site)
    return torch.stack(
        [
            use.sum().float(),
            torch.where(use, at_site, zero).sum(),
            torch.where(other, s, torch.zeros_like(s)).sum(),
            other.sum().float(),
            (use & (at_site < median)).sum().float(),
            torch.where(use, auroc, zero).sum(),
        ]
    )


def pair_site_sums(scores: torch.Tensor, valid: torch.Tensor, site: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """PAIR_SITE_SUMS [4] (fp32) of per-pair `scores` [B, T, n] (e.g. Rho-1's 0/1 selection): sum and
    count over the valid pairs (t, k) of the chosen `heads` [n] (bool) whose target t + 1 + k is the
    row's site, then over the other valid pairs of those heads in rows that have a site."""
    s = scores.detach().float()
    _, length, n_heads = s.shape
    target = torch.arange(length, device=s.device)[:, None] + 1 + torch.arange(n_heads, device=s.device)[None, :]
    site = site.to(s.device)
    chosen = valid & heads.to(s.device).bool()[None, None, :] & (site >= 0)[:, None, None]
    at_site = chosen & (target[None] == site[:, None, None])
    other = chosen & ~at_site
    zero = torch.zeros_like(s)
    return torch.stack(
        [
            torch.where(at_site, s, zero).sum(),
            at_site.sum().float(),
            torch.where(other, s, zero).sum(),
            other.sum().float(),
        ]
    )


def in_rows(batch: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A micro-batch's [B, T, ...] tensor `x` in its row layout: itself, or a packed one's rows
    [R, T, ...] (each from position 0, zero / False after its end)."""
    segments = batch.get("segments")
    return x if segments is None else to_rows(x, segments, batch["is_correct"].shape[0])


def _ratio(total: float, count: float) -> float:
    return total / count if count > 0 else math.nan


def class_metrics(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """{prefix/correct, prefix/incorrect}: the means of CLASS_SUMS."""
    s = sums.tolist()
    return {f"{prefix}/correct": _ratio(s[0], s[1]), f"{prefix}/incorrect": _ratio(s[2], s[3])}


def site_metrics(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """{prefix/first_diff, /other, /below_median, /auroc, /rows} from SITE_SUMS."""
    rows, at_site, sum_other, n_other, below, auroc = sums.tolist()
    return {
        f"{prefix}/first_diff": _ratio(at_site, rows),
        f"{prefix}/other": _ratio(sum_other, n_other),
        f"{prefix}/below_median": _ratio(below, rows),
        f"{prefix}/auroc": _ratio(auroc, rows),
        f"{prefix}/rows": rows,
    }


def pair_site_metrics(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """{prefix/first_diff, prefix/other} from PAIR_SITE_SUMS."""
    s = sums.tolist()
    return {f"{prefix}/first_diff": _ratio(s[0], s[1]), f"{prefix}/other": _ratio(s[2], s[3])}


class TokenDiagnostics:
    """The diagnostics of one optimizer step (or one validation pass): partial sums added per
    micro-batch, all-reduced once over ranks by `metrics`, which returns them as means named
    ``{prefix}diag/<quantity>/<statistic>``:

    - weight (`add_weights`, the token weights a step trains with): correct, incorrect (class means);
      first_diff, other, below_median, auroc, rows (incorrect rows' first differing token against
      their other targets: a weighting that does its job puts a LOW weight there); first_diff_correct
      (the weight at the same place in correct rows, where the correct text departs from the bug).
    - td (`add_td`, the critic's TD errors): the same statistics of δ but the class means (a value drop
      is a negative δ).
    - selected, excess (`add_selection`, Rho-1): the selected share and the mean excess at the pairs
      whose target is the row's first differing token, and at the other pairs of the selected heads.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self._sums: dict[str, torch.Tensor] = {}

    def _add(self, key: str, sums: torch.Tensor) -> None:
        sums = sums.to(self.dtype)
        self._sums[key] = self._sums[key] + sums if key in self._sums else sums

    def _add_target_scores(self, name: str, scores: torch.Tensor, batch: dict, *, by_class: bool) -> None:
        scores, mask = in_rows(batch, scores), in_rows(batch, batch["mask"].bool())
        valid = response_targets(mask)
        correct = batch["is_correct"].bool()
        if by_class:
            self._add(f"{name}:class", class_sums(scores, valid, correct))
        self._add(f"{name}:site", site_sums(scores, valid, batch["first_diff"], ~correct))
        self._add(f"{name}:site_correct", site_sums(scores, valid, batch["first_diff"], correct))

    def add_weights(self, weights: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Target-aligned token weights w_j [B, L] of a micro-batch (fields mask, is_correct, first_diff)."""
        self._add_target_scores("weight", weights, batch, by_class=True)

    def add_td(self, deltas: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Target-aligned TD errors δ_j [B, L] (`td_errors`) of a micro-batch (no class means: a row's
        δ add up to R - V at its start)."""
        self._add_target_scores("td", deltas, batch, by_class=False)

    def add_selection(
        self, selection: torch.Tensor, excess: torch.Tensor, valid: torch.Tensor, heads: torch.Tensor, batch: dict
    ) -> None:
        """Rho-1's 0/1 selection and excess [B, T, n] over the valid pairs of the selected `heads` [n]."""
        valid = in_rows(batch, valid)
        self._add("selected", pair_site_sums(in_rows(batch, selection), valid, batch["first_diff"], heads))
        self._add("excess", pair_site_sums(in_rows(batch, excess), valid, batch["first_diff"], heads))

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """All-reduce the sums over ranks (collective: every rank calls it) and name their means."""
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        flat = torch.cat([self._sums[k].to(self.device) for k in keys])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        parts = dict(zip(keys, flat.split([self._sums[k].numel() for k in keys])))
        out: dict[str, float] = {}
        for key, sums in parts.items():
            name, _, kind = key.partition(":")
            base = f"{prefix}diag/{name}"
            if kind == "class":
                out.update(class_metrics(sums, base))
            elif kind == "site":
                out.update(site_metrics(sums, base))
            elif kind == "site_correct":
                out[f"{base}/first_diff_correct"] = site_metrics(sums, base)[f"{base}/first_diff"]
            else:
                out.update(pair_site_metrics(sums, base))
        return out
