"""Rho-1 token selection (SPEC: "The four objectives", 4. Rho-1).

The reference model scores every target token once (`reference_token_ce`); the excess of the
policy's CE over that score is computed per (position, head) pair (`rho1_excess`); and per head the
pairs with the largest excess are kept (`rho1_select`). Head 0 keeps all of its valid pairs unless
asked otherwise. Selection carries no gradient: it is a 0/1 weight on this step's CE.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F

from wmtp.constants import IGNORE_INDEX

RATIO_MAX_DENOMINATOR: int = 10**6
"""`ratio` is read as the nearest fraction with at most this denominator, so the selected count
ceil(ratio * N_k) is exact integer arithmetic: 0.14 * 50 gives 7, where float rounding gives 8."""

REFERENCE_CHUNK_ELEMENTS: int = 2**26
"""Largest number of logits `reference_token_ce` upcasts to fp32 at once (256 MiB)."""


def rho1_selected_counts(counts: torch.Tensor, *, ratio: float, select_head0: bool = False) -> torch.Tensor:
    """Pairs `rho1_select` keeps per head, from the valid-pair counts N_k [n] of one micro-batch.

    ceil(ratio * N_k), at least 1 when N_k > 0 and 0 when N_k = 0; head 0 keeps N_0 unless
    `select_head0`. Summed over micro-batches and ranks this is the global denominator
    sum_t s_{t,k}, known before any backward. Returns counts' dtype (integer-valued).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"rho1 ratio must be in (0, 1], got {ratio}")
    n_valid = counts.long()
    fraction = Fraction(ratio).limit_denominator(RATIO_MAX_DENOMINATOR)
    keep = (n_valid * fraction.numerator + fraction.denominator - 1) // fraction.denominator
    keep = torch.minimum(keep.clamp(min=1), n_valid)  # a tiny ratio still keeps one pair; none if N_k = 0
    if not select_head0:
        keep[0] = n_valid[0]
    return keep.to(counts.dtype)


def rho1_select(excess: torch.Tensor, valid: torch.Tensor, *, ratio: float, select_head0: bool = False) -> torch.Tensor:
    """0/1 selection [N, n] of the pairs whose excess is among the largest of their head.

    For each head k >= 1 (and head 0 when `select_head0`), the ceil(ratio * N_k) valid pairs with
    the largest excess get 1 and every other pair 0, N_k being the number of valid pairs of head k
    in `excess` (`rho1_selected_counts` gives the numbers). Without `select_head0`, head 0 keeps all
    of its valid pairs. Invalid pairs are never selected and never counted. Ties are broken by row:
    among equal excess the lower row index wins. A NaN excess on a valid pair sorts as the largest.

    excess [N, n] float, valid [N, n] bool. Returns a tensor of excess's dtype, without gradient.
    """
    if excess.dim() != 2 or valid.shape != excess.shape:
        raise ValueError(f"excess and valid must both be [N, n], got {tuple(excess.shape)} and {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask, got {valid.dtype}")
    n_rows, n_heads = excess.shape

    keep = rho1_selected_counts(valid.sum(dim=0), ratio=ratio, select_head0=select_head0)

    # Two stable sorts give a lexicographic order (valid first, then excess descending, then row):
    # valid pairs then fill the first N_k ranks of each column whatever their excess (even -inf).
    by_excess = torch.sort(excess.detach(), dim=0, descending=True, stable=True).indices
    valid_sorted = valid.gather(0, by_excess).to(torch.uint8)
    order = by_excess.gather(0, torch.sort(valid_sorted, dim=0, descending=True, stable=True).indices)

    ranks = torch.arange(n_rows, device=excess.device).unsqueeze(1).expand(n_rows, n_heads)
    chosen_in_order = (ranks < keep.unsqueeze(0)).to(excess.dtype)
    return torch.zeros_like(excess).scatter_(0, order, chosen_in_order)


def rho1_excess(ce: torch.Tensor, ref_ce: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Excess e_{t,k} = CE_{t,k} - r_{t+1+k} [B, T, n] (fp32, detached; 0 where not `valid`).

    ce [B, T, n]: the policy's per-pair CE (head k at position t predicts x_{t+1+k}).
    ref_ce [B, T]: r_j, the reference CE of x_j itself (aligned to the target index j, as
    `reference_token_ce` returns it); each head reads it shifted by 1 + k.
    valid [B, T, n] bool: pairs with a valid target (targets != IGNORE_INDEX).
    """
    if ce.dim() != 3 or valid.shape != ce.shape or ref_ce.shape != ce.shape[:2]:
        raise ValueError(
            f"expected ce [B, T, n], ref_ce [B, T], valid [B, T, n]; got {tuple(ce.shape)}, "
            f"{tuple(ref_ce.shape)}, {tuple(valid.shape)}"
        )
    batch, seq_len, n_heads = ce.shape
    ref = ref_ce.detach().float()
    padded = torch.cat([ref, ref.new_zeros(batch, n_heads)], dim=1)
    # unfold(1, n, 1)[:, s, k] = padded[:, s + k]; windows starting at s = t + 1 hold r_{t+1+k}.
    ref_per_head = padded.unfold(1, n_heads, 1)[:, 1 : seq_len + 1]
    excess = ce.detach().float() - ref_per_head
    return torch.where(valid, excess, torch.zeros_like(excess))


@torch.no_grad()
def reference_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """r_j = -log softmax(logits[:, j-1])[tokens[:, j]] for j >= 1 and r_0 = 0: [B, T] fp32.

    logits [B, T, V] from a causal LM (position j-1 predicts token j), any float dtype; tokens
    [B, T]. Positions whose token is IGNORE_INDEX get 0, so collate's labels may be passed. The
    logits are upcast to fp32 a chunk of positions at a time, at most REFERENCE_CHUNK_ELEMENTS
    logits per chunk (and at least one position), so the fp32 copy never spans the whole batch.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and tokens [B, T]; got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    batch, seq_len, vocab = logits.shape
    out = torch.zeros(batch, seq_len, dtype=torch.float32, device=logits.device)
    chunk = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, batch * vocab))
    for start in range(1, seq_len, chunk):
        end = min(seq_len, start + chunk)
        pred = logits[:, start - 1 : end - 1].float().reshape(-1, vocab)
        ce = F.cross_entropy(pred, tokens[:, start:end].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
        out[:, start:end] = ce.view(batch, end - start)
    return out
