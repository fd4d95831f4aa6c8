"""Multi-head linear cross-entropy without materialising all-head logits.

hidden [N, n, D] (per-head hidden states), weight [V, D] (the shared `output`), targets [N, n]
(ignore_index where a pair has no target), optional per-pair weights [N, n]. The N*n pairs are
flattened into rows that all share `weight`, so one fp32 dW accumulator serves every head.

Two autograd paths:
- reduction="none": per-pair CE [N, n] (times weights); the forward keeps only the per-row
  log-sum-exp and the backward recomputes each logits chunk (the per-pair upstream gradient is
  unknown until then; Rho-1 computes its weights from this CE).
- reduction="sum": sum of weights * CE; weights are known, so the gradients are computed chunk by
  chunk in the forward (one logits matmul fewer) and the backward only scales them.
Rows that are ignored or have weight 0 are dropped before any matmul.

`reference_mtp_ce` materialises all logits in float64 and is what the tests compare against.
"""

from __future__ import annotations

import torch

DEFAULT_IGNORE_INDEX = -100
LOGITS_CHUNK_ELEMENTS = 1 << 23
"""Logits elements held at once (32 MiB in fp32): chunk rows = this // V."""


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows else max(1, LOGITS_CHUNK_ELEMENTS // vocab)


def _active_rows(targets: torch.Tensor, weights: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    keep = targets.reshape(-1) != ignore_index
    if weights is not None:
        keep &= weights.reshape(-1) != 0
    return keep.nonzero().squeeze(1)


def _lse_and_target_logit(h: torch.Tensor, w32: torch.Tensor, tgt: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = h.float() @ w32.T
    return logits, logits.gather(1, tgt[:, None]).squeeze(1)


class _ChunkedMTPCE(torch.autograd.Function):
    """reduction="none" path: returns per-row CE of the active rows (fp32)."""

    @staticmethod
    def forward(ctx, h_rows: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, chunk: int) -> torch.Tensor:
        w32 = weight.float()
        lse = torch.empty(h_rows.shape[0], dtype=torch.float32, device=h_rows.device)
        ce = torch.empty_like(lse)
        for s in range(0, h_rows.shape[0], chunk):
            logits, picked = _lse_and_target_logit(h_rows[s:s + chunk], w32, tgt[s:s + chunk])
            lse[s:s + chunk] = torch.logsumexp(logits, dim=1)
            ce[s:s + chunk] = lse[s:s + chunk] - picked
        ctx.save_for_backward(h_rows, weight, tgt, lse)
        ctx.chunk = chunk
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        h_rows, weight, tgt, lse = ctx.saved_tensors
        w32 = weight.float()
        grad_h = torch.empty(h_rows.shape, dtype=torch.float32, device=h_rows.device)
        grad_w = torch.zeros_like(w32)
        for s in range(0, h_rows.shape[0], ctx.chunk):
            h32 = h_rows[s:s + ctx.chunk].float()
            grad_h[s:s + ctx.chunk] = _grad_from_logits(
                h32 @ w32.T, lse[s:s + ctx.chunk], tgt[s:s + ctx.chunk], grad_ce[s:s + ctx.chunk],
                h32, w32, grad_w)
        return grad_h.to(h_rows.dtype), grad_w.to(weight.dtype), None, None


def _grad_from_logits(logits: torch.Tensor, lse: torch.Tensor, tgt: torch.Tensor, scale: torch.Tensor,
                      h32: torch.Tensor, w32: torch.Tensor, grad_w: torch.Tensor) -> torch.Tensor:
    """Turn a logits chunk (in place) into scale * (softmax - onehot); add its dW, return its dH."""
    probs = torch.exp_(logits.sub_(lse[:, None]))
    probs[torch.arange(tgt.shape[0], device=tgt.device), tgt] -= 1.0
    probs.mul_(scale[:, None])
    grad_w.addmm_(probs.T, h32)
    return probs @ w32


class _FusedSumMTPCE(torch.autograd.Function):
    """reduction="sum" path: gradients computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, h_rows: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, row_w: torch.Tensor,
                chunk: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w32 = weight.float()
        ce = torch.empty(h_rows.shape[0], dtype=torch.float32, device=h_rows.device)
        grad_h = torch.empty(h_rows.shape, dtype=torch.float32, device=h_rows.device) if need_grad else None
        grad_w = torch.zeros_like(w32) if need_grad else None
        for s in range(0, h_rows.shape[0], chunk):
            h32, t = h_rows[s:s + chunk].float(), tgt[s:s + chunk]
            logits, picked = _lse_and_target_logit(h32, w32, t)
            lse = torch.logsumexp(logits, dim=1)
            ce[s:s + chunk] = lse - picked
            if need_grad:
                grad_h[s:s + chunk] = _grad_from_logits(logits, lse, t, row_w[s:s + chunk], h32, w32, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_rows.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce)
        return (ce * row_w).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h.mul(grad_loss).to(h_dtype), grad_w.mul(grad_loss).to(w_dtype),
                None, None, None, None)


def chunked_mtp_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor | None = None, *, ignore_index: int = DEFAULT_IGNORE_INDEX,
                   reduction: str = "none", chunk_rows: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked PyTorch implementation (CPU/MPS, and CUDA without Triton).

    Returns (out, ce): out is [N, n] weighted CE for reduction "none" or the scalar weighted sum
    for "sum"; ce [N, n] is the unweighted per-pair CE, detached (0 where ignored), for logging.
    """
    n_rows, n_heads, dim = hidden.shape
    if weight.shape[1] != dim:
        raise ValueError(f"hidden dim {dim} does not match output weight {tuple(weight.shape)}")
    if targets.shape != (n_rows, n_heads):
        raise ValueError(f"targets shape {tuple(targets.shape)} != {(n_rows, n_heads)}")
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != targets shape {tuple(targets.shape)}")
    chunk = _chunk_rows(weight.shape[0], chunk_rows)
    rows = _active_rows(targets, weights, ignore_index)
    h_rows = hidden.reshape(-1, dim).index_select(0, rows)
    tgt = targets.reshape(-1).index_select(0, rows)
    row_w = (weights.reshape(-1).index_select(0, rows).float() if weights is not None
             else torch.ones(rows.shape[0], dtype=torch.float32, device=hidden.device))
    full = torch.zeros(n_rows * n_heads, dtype=torch.float32, device=hidden.device)
    if reduction == "sum":
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        loss, ce_rows = _FusedSumMTPCE.apply(h_rows, weight, tgt, row_w, chunk, need_grad)
        return loss, full.index_copy(0, rows, ce_rows).view(n_rows, n_heads)
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    ce_rows = _ChunkedMTPCE.apply(h_rows, weight, tgt, chunk)
    out = full.index_copy(0, rows, ce_rows * row_w).view(n_rows, n_heads)
    return out, full.index_copy(0, rows, ce_rows.detach()).view(n_rows, n_heads)


def reference_mtp_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     weights: torch.Tensor | None = None, *, ignore_index: int = DEFAULT_IGNORE_INDEX
                     ) -> torch.Tensor:
    """Materialised float64 per-pair weighted CE [N, n] (0 where ignored): the test oracle."""
    logits = torch.einsum("nkd,vd->nkv", hidden.double(), weight.double())
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, safe[..., None]).squeeze(-1)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    return ce * weights.double() if weights is not None else ce
