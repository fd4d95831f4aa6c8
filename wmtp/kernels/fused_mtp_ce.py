"""Multi-head linear cross-entropy without materialising all-head logits.

hidden [N, n, D] (per-head hidden states; any leading dims in place of N), weight [V, D] (the
shared `output`), targets [N, n] (ignore_index where a pair has no target), optional per-pair
weights [N, n]. The N*n pairs are flattened into rows that all share `weight`, so one fp32 dW
accumulator serves every head.

Rows are processed in chunks of logits [C, V]: a matmul, then the row-wise part (log-sum-exp, CE
and, when needed, the gradient G = softmax - onehot written over the chunk), then
dH_chunk = s * (G @ W) and dW += G^T @ (s * H_chunk) for the per-row scale s (weight times upstream
gradient). Scaling the [C, D] operands rather than G saves a pass over the [C, V] chunk. The
row-wise part runs as a Triton kernel (`kernels/fused_mtp_ce_triton.py`) or as PyTorch ops, chosen
by `wmtp.kernels.backend.resolve_backend`.

Matmul precision: on CUDA the operands keep their 16-bit dtype (tensor cores); logits come out in
fp32 and dW is accumulated in fp32 where the running torch can do that (see `_fp32_out_matmuls`).
Elsewhere everything is upcast to fp32. Autocast is disabled inside, so only the input dtypes
decide this.

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

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wmtp.kernels.backend import resolve_backend

DEFAULT_IGNORE_INDEX = -100
LOGITS_CHUNK_ELEMENTS = 1 << 25
"""Logits elements held at once (128 MiB in fp32): chunk rows = this // V. Chunks of ~1000 rows
keep the three matmuls near their full-size speed on CPU (at V=32000 and D=256, 128-row chunks
run the whole loss ~15% slower, 512-row ones ~5%)."""

RowStats = Callable[..., None]
"""(logits, targets, lse, ce, *, grad=None): fill lse and ce; with grad, also write
softmax - onehot into grad (which may be the logits)."""
RowGrad = Callable[..., None]
"""(logits, targets, lse, grad): write softmax - onehot into grad, lse known."""


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows else max(1, LOGITS_CHUNK_ELEMENTS // vocab)


def _active_pairs(targets: torch.Tensor, weights: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Bool mask (targets' shape) of the pairs that need a logits row: a target and a nonzero weight."""
    keep = targets != ignore_index
    if weights is not None:
        keep &= weights != 0
    return keep


def _torch_ce_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ce: torch.Tensor,
    *,
    grad: torch.Tensor | None = None,
) -> None:
    # fp32 logits are overwritten (the chunk is dead after this): log_softmax in place is one fused
    # pass per row, and the CPU and CUDA kernels finish a row's max and sum before writing it.
    x = logits.float()
    picked = x.gather(1, targets[:, None]).squeeze(1)
    torch.log_softmax(x, dim=1, out=x)
    log_p = x.gather(1, targets[:, None]).squeeze(1)
    torch.neg(log_p, out=ce)
    torch.sub(picked, log_p, out=lse)
    if grad is not None:
        _softmax_minus_onehot(x.exp_(), targets, grad)


def _torch_ce_rows_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> None:
    probs = logits.float()
    _softmax_minus_onehot(torch.exp_(probs.sub_(lse[:, None])), targets, grad)


def _softmax_minus_onehot(probs: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> None:
    probs[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
    if grad is not probs:
        grad.copy_(probs)


def _check_target_range(tgt: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # The Triton kernels would read out of bounds and the torch ops fail with an index error deep
    # in a chunk: name the problem here instead (one device sync; the `nonzero` of the active
    # pairs already has one).
    if tgt.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(tgt)).tolist()
    if low < 0 or high >= vocab:
        raise ValueError(
            f"targets must lie in [0, {vocab}) or equal ignore_index ({ignore_index}); "
            f"found values from {low} to {high}"
        )


def _row_ops(backend: str) -> tuple[RowStats, RowGrad]:
    """The row-wise implementation for a resolved backend ("triton" or "torch")."""
    if backend == "triton":
        # Imported on demand: triton is optional on CPU/MPS installs.
        from wmtp.kernels.fused_mtp_ce_triton import ce_rows, ce_rows_grad

        return ce_rows, ce_rows_grad
    return _torch_ce_rows, _torch_ce_rows_grad


def _tensor_core_matmuls(device: torch.device) -> bool:
    """Whether the matmuls keep 16-bit operands (CUDA) rather than upcasting them to fp32."""
    return device.type == "cuda"


@functools.cache
def _fp32_out_matmuls(device_type: str) -> tuple[bool, bool]:
    """(mm with out_dtype=float32 works, addmm into an fp32 accumulator with out=self works).

    For 16-bit operands on CUDA, `torch.mm(..., out_dtype=torch.float32)` exists from torch 2.8 and
    an fp32 `self`/`out` for `torch.addmm(..., out_dtype=torch.float32)` from 2.10; older builds and
    other devices raise, so this is probed once on a tiny product (whose result is checked too).
    """
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
    acc = torch.zeros(2, 2, dtype=torch.float32, device=device_type)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False, False
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):
        return True, False
    return True, bool(acc.eq(2).all())


@dataclass(frozen=True)
class _Plan:
    """How one call runs: row-wise ops, rows per chunk, matmul operand dtype and fp32-output support."""

    stats: RowStats
    grad: RowGrad
    chunk: int
    mm_dtype: torch.dtype
    fp32_mm: bool
    fp32_addmm: bool

    @property
    def fp32_logits(self) -> bool:
        """16-bit operands whose logits come out in fp32."""
        return self.fp32_mm and self.mm_dtype.itemsize < 4

    def logits(self, h: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Logits chunk h @ w^T, into `out` (a buffer reused across chunks) unless fp32_logits."""
        if self.fp32_logits:
            return torch.mm(h, w.T, out_dtype=torch.float32)
        return torch.mm(h, w.T, out=out)

    def add_grad_weight(self, grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
        """grad_w (fp32) += g^T @ h."""
        if g.dtype == grad_w.dtype:
            grad_w.addmm_(g.T, h)
        elif self.fp32_addmm:
            torch.addmm(grad_w, g.T, h, out_dtype=torch.float32, out=grad_w)
        elif self.fp32_mm:
            grad_w.add_(torch.mm(g.T, h, out_dtype=torch.float32))
        else:
            # Older torch: the chunk's product is rounded to 16 bits, the running sum stays fp32.
            grad_w.add_(g.T @ h)


def _plan(hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: int | None, backend: str | None) -> _Plan:
    stats, grad = _row_ops(resolve_backend(hidden.device, backend))
    chunk = _chunk_rows(weight.shape[0], chunk_rows)
    if not _tensor_core_matmuls(hidden.device):
        return _Plan(stats, grad, chunk, torch.float32, False, False)
    # Mixed inputs (16-bit activations from an autocast trunk, an fp32 `output` parameter) use the
    # narrower dtype, as autocast would for the model's own projection.
    mm_dtype = hidden.dtype if hidden.dtype.itemsize <= weight.dtype.itemsize else weight.dtype
    return _Plan(stats, grad, chunk, mm_dtype, *_fp32_out_matmuls(hidden.device.type))


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _run_chunks(
    plan: _Plan,
    h_rows: torch.Tensor,
    weight: torch.Tensor,
    tgt: torch.Tensor,
    lse: torch.Tensor,
    ce: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pass over the logits chunks of the active rows.

    With `ce`, fill `lse` and `ce`; without, `lse` is known. With `scale`, also return
    (grad_h in the matmul dtype, grad_w in fp32 or wider) of sum(scale * ce); else (None, None).
    """
    w = weight.to(plan.mm_dtype)
    n_rows, vocab = h_rows.shape[0], w.shape[0]
    chunk = min(plan.chunk, n_rows)
    # One buffer for every chunk's logits (16-bit operands with fp32 logits: for the gradient,
    # which goes straight into 16-bit for the two gradient matmuls); the CPU allocator would
    # otherwise map and zero fresh pages for each chunk.
    buf = (
        torch.empty(chunk, vocab, dtype=plan.mm_dtype, device=w.device)
        if scale is not None or not plan.fp32_logits
        else None
    )
    grad_h = grad_w = None
    if scale is not None:
        grad_h = torch.empty(h_rows.shape, dtype=plan.mm_dtype, device=h_rows.device)
        grad_w = torch.zeros(w.shape, dtype=torch.promote_types(plan.mm_dtype, torch.float32), device=w.device)
    for s in range(0, n_rows, chunk):
        rows = slice(s, s + chunk)
        h = h_rows[rows].to(plan.mm_dtype)
        g = None if buf is None else buf[: h.shape[0]]
        logits = plan.logits(h, w, out=g)
        if ce is not None:
            plan.stats(logits, tgt[rows], lse[rows], ce[rows], grad=None if scale is None else g)
        else:
            plan.grad(logits, tgt[rows], lse[rows], g)
        if scale is not None:
            row_scale = scale[rows, None]
            torch.mm(g, w, out=grad_h[rows]).mul_(row_scale)
            plan.add_grad_weight(grad_w, g, (h * row_scale).to(plan.mm_dtype))
    return grad_h, grad_w


class _ChunkedMTPCE(torch.autograd.Function):
    """reduction="none" path: returns per-row CE of the active rows (fp32)."""

    @staticmethod
    def forward(ctx, h_rows: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, plan: _Plan) -> torch.Tensor:
        lse = torch.empty(h_rows.shape[0], dtype=torch.float32, device=h_rows.device)
        ce = torch.empty_like(lse)
        with _no_autocast(h_rows.device):
            _run_chunks(plan, h_rows, weight, tgt, lse, ce=ce)
        ctx.save_for_backward(h_rows, weight, tgt, lse)
        ctx.plan = plan
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        h_rows, weight, tgt, lse = ctx.saved_tensors
        with _no_autocast(h_rows.device):
            grad_h, grad_w = _run_chunks(ctx.plan, h_rows, weight, tgt, lse, scale=grad_ce.float().contiguous())
        return grad_h.to(h_rows.dtype), grad_w.to(weight.dtype), None, None


class _FusedSumMTPCE(torch.autograd.Function):
    """reduction="sum" path: gradients computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(
        ctx,
        h_rows: torch.Tensor,
        weight: torch.Tensor,
        tgt: torch.Tensor,
        row_w: torch.Tensor,
        plan: _Plan,
        need_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.empty(h_rows.shape[0], dtype=torch.float32, device=h_rows.device)
        ce = torch.empty_like(lse)
        with _no_autocast(h_rows.device):
            grad_h, grad_w = _run_chunks(plan, h_rows, weight, tgt, lse, ce=ce, scale=row_w if need_grad else None)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_rows.dtype, weight.dtype)
        ctx.backward_done = False
        ctx.mark_non_differentiable(ce)
        return (ce * row_w).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce: torch.Tensor):
        # The saved gradients are scaled in place (a [V, D] and an [N, D] allocation fewer), so a
        # second backward through the same graph (retain_graph=True) would be wrong: refuse it.
        if ctx.backward_done:
            raise RuntimeError("mtp_cross_entropy(reduction='sum') supports one backward per forward")
        ctx.backward_done = True
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h.mul_(grad_loss).to(h_dtype), grad_w.mul_(grad_loss).to(w_dtype), None, None, None, None)


def chunked_mtp_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduction: str = "none",
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused multi-head linear cross-entropy, chunked over the active (row, head) pairs.

    hidden [..., n, D], targets and weights [..., n] (any leading dims, e.g. [N] or [B, T]).
    Returns (out, ce): out is [..., n] weighted CE for reduction "none" or the scalar weighted sum
    for "sum"; ce [..., n] is the unweighted per-pair CE, detached (0 where ignored), for logging.
    Both [..., n] results are fresh tensors, not views, so a caller may modify them in place.
    `backend` ("auto" | "triton" | "torch", None: process default) picks the row-wise
    implementation, see `wmtp.kernels.backend`.
    """
    dim = hidden.shape[-1]
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., n, D], got {tuple(hidden.shape)}")
    if weight.shape[1] != dim:
        raise ValueError(f"hidden dim {dim} does not match output weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != {tuple(hidden.shape[:-1])}")
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != targets shape {tuple(targets.shape)}")
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    plan = _plan(hidden, weight, chunk_rows, backend)
    keep = _active_pairs(targets, weights, ignore_index)
    rows = keep.reshape(-1).nonzero().squeeze(1)
    h_rows = hidden.reshape(-1, dim).index_select(0, rows)
    tgt = targets.reshape(-1).index_select(0, rows)
    _check_target_range(tgt, weight.shape[0], ignore_index)
    row_w = (
        weights.reshape(-1).index_select(0, rows).float()
        if weights is not None
        else torch.ones(rows.shape[0], dtype=torch.float32, device=hidden.device)
    )
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if reduction == "sum":
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        loss, ce_rows = _FusedSumMTPCE.apply(h_rows, weight, tgt, row_w, plan, need_grad)
        return loss, zeros.masked_scatter(keep, ce_rows)
    ce_rows = _ChunkedMTPCE.apply(h_rows, weight, tgt, plan)
    return zeros.masked_scatter(keep, ce_rows * row_w), zeros.masked_scatter(keep, ce_rows.detach())


def reference_mtp_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
) -> torch.Tensor:
    """Materialised float64 per-pair weighted CE [N, n] (0 where ignored): the test oracle."""
    logits = torch.einsum("nkd,vd->nkv", hidden.double(), weight.double())
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, safe[..., None]).squeeze(-1)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    return ce * weights.double() if weights is not None else ce
