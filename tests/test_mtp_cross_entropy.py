"""wmtp.losses.mtp_cross_entropy (chunked PyTorch path) against a float64 per-head reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wmtp.constants import IGNORE_INDEX
from wmtp.losses import mtp_cross_entropy, mtp_cross_entropy_with_ce


def naive(hidden, weight, targets, weights):
    """Per head, F.cross_entropy in float64 on materialised logits."""
    per_head = []
    for k in range(hidden.shape[1]):
        logits = hidden[:, k].double() @ weight.double().T
        ce = F.cross_entropy(logits, targets[:, k], ignore_index=IGNORE_INDEX, reduction="none")
        per_head.append(ce)
    ce = torch.stack(per_head, dim=1)
    return ce * weights.double() if weights is not None else ce


def make_inputs(n_rows=53, n_heads=4, dim=24, vocab=131, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, n_heads, dim, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, vocab, (n_rows, n_heads), generator=g)
    targets[torch.rand(n_rows, n_heads, generator=g) < 0.3] = IGNORE_INDEX
    targets[:, 2] = IGNORE_INDEX  # a head with no valid pair
    targets[min(5, n_rows - 1)] = IGNORE_INDEX  # a fully ignored row
    weights = torch.rand(n_rows, n_heads, generator=g) * 2
    weights[torch.rand(n_rows, n_heads, generator=g) < 0.2] = 0.0  # zero weights
    return hidden, weight, targets, weights


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_values_and_gradients_fp32(use_weights, reduction):
    hidden, weight, targets, weights = make_inputs()
    weights = weights if use_weights else None
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = mtp_cross_entropy(h, w, targets, weights, reduction=reduction)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = naive(hd, wd, targets, weights)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    if reduction == "none":
        assert out.shape == targets.shape
        assert torch.all(out[targets == IGNORE_INDEX] == 0)
        assert rel(out, ref) <= 1e-5
        (out.double() * upstream).sum().backward()
        (ref * upstream).sum().backward()
    else:
        assert out.dim() == 0
        assert rel(out, ref.sum()) <= 1e-5
        (out * 3.0).backward()
        (ref.sum() * 3.0).backward()
    assert rel(h.grad, hd.grad) <= 1e-5
    assert rel(w.grad, wd.grad) <= 1e-5
    assert torch.all(h.grad[:, 2] == 0)  # the head without targets gets no gradient


def test_bf16_inputs_within_1e2():
    hidden, weight, targets, weights = make_inputs(dtype=torch.bfloat16, seed=3)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = mtp_cross_entropy(h, w, targets, weights, reduction="sum")
    out.backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = naive(hd, wd, targets, weights).sum()
    ref.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert rel(out, ref) <= 1e-2
    assert rel(h.grad, hd.grad) <= 1e-2 and rel(w.grad, wd.grad) <= 1e-2


def test_chunking_does_not_change_the_result():
    from wmtp.kernels.fused_mtp_ce import chunked_mtp_ce

    hidden, weight, targets, weights = make_inputs(vocab=257)
    small, _ = chunked_mtp_ce(hidden, weight, targets, weights, reduction="none", chunk_rows=7)
    large, _ = chunked_mtp_ce(hidden, weight, targets, weights, reduction="none", chunk_rows=10_000)
    torch.testing.assert_close(small, large, rtol=1e-6, atol=1e-6)


def test_with_ce_returns_unweighted_detached_ce():
    hidden, weight, targets, weights = make_inputs()
    out, ce = mtp_cross_entropy_with_ce(hidden.requires_grad_(), weight, targets, weights, reduction="sum")
    assert not ce.requires_grad
    keep = weights != 0
    assert rel(ce[keep], naive(hidden.detach(), weight, targets, None)[keep]) <= 1e-5


def test_single_valid_pair_and_shape_errors():
    hidden, weight, targets, _ = make_inputs(n_rows=4)
    targets.fill_(IGNORE_INDEX)
    targets[3, 1] = 7
    out = mtp_cross_entropy(hidden, weight, targets, reduction="sum")
    assert rel(out, naive(hidden, weight, targets, None).sum()) <= 1e-6
    with pytest.raises(ValueError, match="targets shape"):
        mtp_cross_entropy(hidden, weight, targets[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        mtp_cross_entropy(hidden, weight, targets, reduction="mean")


@pytest.mark.parametrize("bad", [-1, "vocab"], ids=["negative", "vocab-size"])
def test_out_of_range_target_is_named(bad):
    hidden, weight, targets, _ = make_inputs(n_rows=4)
    targets[2, 0] = weight.shape[0] if bad == "vocab" else bad
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {weight.shape[0]}\)"):
        mtp_cross_entropy(hidden, weight, targets)


def test_leading_dims_give_the_flat_result_and_fresh_tensors():
    hidden, weight, targets, weights = make_inputs(n_rows=12)
    flat = mtp_cross_entropy(hidden, weight, targets, weights)
    shaped = mtp_cross_entropy(hidden.view(3, 4, 4, -1), weight, targets.view(3, 4, 4), weights.view(3, 4, 4))
    assert shaped.shape == (3, 4, 4) and shaped._base is None
    torch.testing.assert_close(shaped.reshape(12, 4), flat, rtol=0, atol=0)


def test_sum_path_refuses_a_second_backward():
    """Its backward scales the gradients computed in the forward in place: a second one would be wrong."""
    hidden, weight, targets, _ = make_inputs()
    h = hidden.clone().requires_grad_()
    loss = mtp_cross_entropy(h, weight, targets, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
