"""Fused multi-head CE: Triton and torch backends against an independent float64 reference.

Without a GPU the Triton kernels run in the interpreter on CPU tensors; with one, the same tests run
the compiled kernels on CUDA tensors, plus the CUDA-only tests at the end.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # triton.jit picks the interpreter when it decorates a kernel, so this must precede the import.
    os.environ["TRITON_INTERPRET"] = "1"
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import wmtp.kernels.fused_mtp_ce as fused  # noqa: E402
import wmtp.kernels.fused_mtp_ce_triton as fused_triton  # noqa: E402
from tests.conftest import needs_cuda  # noqa: E402
from wmtp.constants import IGNORE_INDEX  # noqa: E402
from wmtp.kernels.fused_mtp_ce import chunked_mtp_ce  # noqa: E402
from wmtp.kernels.fused_mtp_ce_triton import RowBlocks, ce_rows, ce_rows_grad  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = ("triton", "torch")
FP32_TOL = 1e-5
BF16_TOL = 1e-2
CHUNK_ROWS = 40
"""Several logits chunks per call, the last one partial."""


def reference_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pair CE [N, n] in float64: materialised logits and F.cross_entropy, head by head."""
    per_head = [
        F.cross_entropy(
            hidden[:, k].double() @ weight.double().T, targets[:, k], ignore_index=IGNORE_INDEX, reduction="none"
        )
        for k in range(hidden.shape[1])
    ]
    return torch.stack(per_head, dim=1)


def make_inputs(
    n_rows: int = 48,
    n_heads: int = 4,
    dim: int = 32,
    vocab: int = 300,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """Random inputs with ignored pairs, a fully ignored row, a head without targets, zero weights."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, n_heads, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    targets = torch.randint(0, vocab, (n_rows, n_heads), generator=g)
    targets[torch.rand(n_rows, n_heads, generator=g) < 0.3] = IGNORE_INDEX
    targets[:, 2] = IGNORE_INDEX
    targets[min(5, n_rows - 1)] = IGNORE_INDEX
    weights = torch.rand(n_rows, n_heads, generator=g) * 2
    weights[torch.rand(n_rows, n_heads, generator=g) < 0.2] = 0.0
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE), weights.to(DEVICE))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def check_against_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    backend: str,
    reduction: str,
    tol: float,
) -> None:
    """Values and gradients of chunked_mtp_ce against the float64 reference."""
    h, w = leaves(hidden, weight)
    out, ce = chunked_mtp_ce(
        h, w, targets, weights, ignore_index=IGNORE_INDEX, reduction=reduction, chunk_rows=CHUNK_ROWS, backend=backend
    )
    hd, wd = leaves(hidden.double(), weight.double())
    ref_ce = reference_ce(hd, wd, targets)
    ref = ref_ce * weights.double() if weights is not None else ref_ce
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(DEVICE)
    if reduction == "none":
        assert out.shape == targets.shape and torch.all(out[targets == IGNORE_INDEX] == 0)
        assert rel(out, ref) <= tol
        (out.double() * upstream).sum().backward()
        (ref * upstream).sum().backward()
    else:
        assert out.dim() == 0 and rel(out, ref.sum()) <= tol
        (out * 3.0).backward()
        (ref.sum() * 3.0).backward()
    active = weights != 0 if weights is not None else torch.ones_like(targets, dtype=torch.bool)
    assert rel(ce[active], ref_ce[active]) <= tol and not ce.requires_grad
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    assert rel(h.grad, hd.grad) <= tol and rel(w.grad, wd.grad) <= tol
    assert torch.all(h.grad[targets == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "blocks", [None, RowBlocks(16, 32, 3, 4), RowBlocks(16, 64, 1, 4)], ids=["heuristic", "split-v", "multi-tile"]
)
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "bf16-buffer"])
def test_row_kernels_match_float64(logits_dtype, blocks, in_place):
    """lse/CE/gradient of a [37, 300] chunk: partial row block, partial last tile, V split 3 ways."""
    g = torch.Generator().manual_seed(1)
    n_rows, vocab = 37, 300
    logits = (torch.randn(n_rows, vocab, generator=g) * 4).to(DEVICE, logits_dtype)
    targets = torch.randint(0, vocab, (n_rows,), generator=g).to(DEVICE)
    x = logits.double()
    lse_ref = torch.logsumexp(x, dim=1)
    ce_ref = lse_ref - x.gather(1, targets[:, None]).squeeze(1)
    grad_ref = torch.softmax(x, dim=1) - F.one_hot(targets, vocab)
    grad_tol = FP32_TOL if in_place and logits_dtype == torch.float32 else BF16_TOL

    lse = torch.empty(n_rows, device=DEVICE)
    ce = torch.empty_like(lse)
    ce_rows(logits, targets, lse, ce, blocks=blocks)
    assert rel(lse, lse_ref) <= FP32_TOL and rel(ce, ce_ref) <= FP32_TOL

    grad = logits.clone() if in_place else torch.empty(n_rows, vocab, dtype=torch.bfloat16, device=DEVICE)
    lse2, ce2 = torch.empty_like(lse), torch.empty_like(ce)
    ce_rows(grad if in_place else logits, targets, lse2, ce2, grad=grad, blocks=blocks)
    assert rel(ce2, ce_ref) <= FP32_TOL and rel(grad, grad_ref) <= grad_tol

    grad_known_lse = torch.empty_like(grad)
    ce_rows_grad(logits, targets, lse, grad_known_lse, blocks=blocks)
    assert rel(grad_known_lse, grad_ref) <= grad_tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("use_weights", [False, True])
def test_fp32_matches_reference(backend, reduction, use_weights):
    hidden, weight, targets, weights = make_inputs()
    check_against_reference(
        hidden, weight, targets, weights if use_weights else None, backend=backend, reduction=reduction, tol=FP32_TOL
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_bf16_inputs_match_reference(backend, reduction):
    hidden, weight, targets, weights = make_inputs(dtype=torch.bfloat16, seed=3)
    check_against_reference(hidden, weight, targets, weights, backend=backend, reduction=reduction, tol=BF16_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_single_valid_pair(backend, reduction):
    hidden, weight, targets, _ = make_inputs(n_rows=4, seed=5)
    targets.fill_(IGNORE_INDEX)
    targets[3, 1] = 7
    check_against_reference(hidden, weight, targets, None, backend=backend, reduction=reduction, tol=FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho1_weights_from_this_steps_ce(backend):
    """CE first (reduction="none", no weights), weights from it (top half per head), then backward."""
    hidden, weight, targets, _ = make_inputs(seed=7)
    valid = targets != IGNORE_INDEX
    h, w = leaves(hidden, weight)
    ce, _ = chunked_mtp_ce(h, w, targets, reduction="none", chunk_rows=CHUNK_ROWS, backend=backend)
    rho_w = torch.zeros_like(ce)
    for k in range(ce.shape[1]):
        rows = valid[:, k].nonzero().squeeze(1)
        if rows.numel():
            top = ce.detach()[rows, k].topk(max(1, rows.numel() // 2)).indices
            rho_w[rows[top], k] = 1.0
    (ce * rho_w).sum().backward()

    hd, wd = leaves(hidden.double(), weight.double())
    ref_ce = reference_ce(hd, wd, targets)
    (ref_ce * rho_w.double()).sum().backward()
    assert rel(ce, ref_ce) <= FP32_TOL
    assert rel(h.grad, hd.grad) <= FP32_TOL and rel(w.grad, wd.grad) <= FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_autocast_leaves_fp32_inputs_in_fp32(backend, reduction):
    hidden, weight, targets, weights = make_inputs(seed=11)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        check_against_reference(hidden, weight, targets, weights, backend=backend, reduction=reduction, tol=FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "mixed"])
def test_16bit_operand_matmuls(backend, reduction, weight_dtype, monkeypatch):
    """The CUDA precision policy (16-bit matmul operands, fp32 dW), also exercised on CPU."""
    monkeypatch.setattr(fused, "_tensor_core_matmuls", lambda device: True)
    hidden, weight, targets, weights = make_inputs(dtype=torch.bfloat16, seed=13)
    check_against_reference(
        hidden, weight.to(weight_dtype), targets, weights, backend=backend, reduction=reduction, tol=BF16_TOL
    )


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_backend_dispatch(backend, monkeypatch):
    calls = []
    real = fused_triton.ce_rows
    monkeypatch.setattr(fused_triton, "ce_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, targets, weights = make_inputs(seed=17)
    chunked_mtp_ce(hidden, weight, targets, weights, reduction="sum", backend=backend)
    uses_triton = backend == "triton" or (backend == "auto" and DEVICE.type == "cuda")
    assert bool(calls) == uses_triton


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_cuda_bf16_7b_like_shape(backend, reduction):
    """LLaMA-2 7B head sizes (D=4096, V=32000) on a few hundred pairs, native kernels."""
    hidden, weight, targets, weights = make_inputs(n_rows=96, dim=4096, vocab=32000, dtype=torch.bfloat16, seed=19)
    weight = weight / 8  # keeps logits in the range of a trained model's
    check_against_reference(hidden, weight, targets, weights, backend=backend, reduction=reduction, tol=BF16_TOL)


@needs_cuda
def test_cuda_heuristic_splits_the_vocabulary():
    """A chunk of few rows and a large vocabulary spreads over many programs and stays exact."""
    n_rows, vocab = 64, 128_256
    blocks = fused_triton.row_blocks(n_rows, vocab, DEVICE)
    assert blocks.block_m >= fused_triton.MIN_BLOCK_M and blocks.splits > 1
    g = torch.Generator(device=DEVICE).manual_seed(23)
    logits = torch.randn(n_rows, vocab, generator=g, device=DEVICE) * 4
    targets = torch.randint(0, vocab, (n_rows,), generator=g, device=DEVICE)
    lse = torch.empty(n_rows, device=DEVICE)
    ce = torch.empty_like(lse)
    ce_rows(logits, targets, lse, ce)
    x = logits.double()
    lse_ref = torch.logsumexp(x, dim=1)
    assert rel(lse, lse_ref) <= FP32_TOL
    assert rel(ce, lse_ref - x.gather(1, targets[:, None]).squeeze(1)) <= FP32_TOL


@needs_cuda
def test_cuda_bf16_triton_agrees_with_torch_backend():
    hidden, weight, targets, weights = make_inputs(n_rows=64, dim=1024, vocab=32000, dtype=torch.bfloat16, seed=29)
    results = []
    for backend in BACKENDS:
        h, w = leaves(hidden, weight)
        loss, _ = chunked_mtp_ce(h, w, targets, weights, reduction="sum", backend=backend)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for a, b in zip(*results):
        assert rel(a, b) <= BF16_TOL
