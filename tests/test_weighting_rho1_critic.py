"""Rho-1 selection and critic value math on small hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wmtp.constants import IGNORE_INDEX
from wmtp.data.collate import mtp_targets
from wmtp.weighting import rho1
from wmtp.weighting.critic import binary_auroc, critic_targets, last_states, response_states, value_loss, value_stats
from wmtp.weighting.rho1 import reference_token_ce, rho1_excess, rho1_select, rho1_selected_counts

T, F_ = True, False

# --------------------------------------------------------------------------------------- Rho-1


def two_heads(
    head1: list[float],
    valid1: list[bool] | None = None,
    head0: list[float] | None = None,
    valid0: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """excess [N, 2] and valid [N, 2] from per-head columns (all valid unless given)."""
    rows = len(head1)
    excess = torch.tensor([head0 or [0.0] * rows, head1]).T.contiguous()
    valid = torch.tensor([valid0 or [T] * rows, valid1 or [T] * rows]).T.contiguous()
    return excess, valid


def column(selection: torch.Tensor, k: int) -> list[float]:
    return selection[:, k].tolist()


def test_keeps_largest_excess_and_all_of_head0():
    excess, valid = two_heads([0.1, 0.9, 0.5, 0.3, 0.7], head0=[5.0, -1.0, 0.0, 2.0, 1.0])
    sel = rho1_select(excess, valid, ratio=0.6)  # ceil(0.6 * 5) = 3: rows 1 (0.9), 4 (0.7), 2 (0.5)
    assert column(sel, 1) == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert column(sel, 0) == [1.0] * 5
    assert sel.dtype == excess.dtype


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (0.6, [0.0, 1.0, 1.0, 0.0, 1.0]),  # ceil(3.0) = 3
        (0.5, [0.0, 1.0, 1.0, 0.0, 1.0]),  # ceil(2.5) = 3
        (0.4, [0.0, 1.0, 0.0, 0.0, 1.0]),  # ceil(2.0) = 2
        (0.21, [0.0, 1.0, 0.0, 0.0, 1.0]),  # ceil(1.05) = 2
        (1e-6, [0.0, 1.0, 0.0, 0.0, 0.0]),  # a tiny ratio still keeps one pair
        (1.0, [1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_ratio_rounding(ratio, expected):
    excess, valid = two_heads([0.1, 0.9, 0.5, 0.3, 0.7])
    assert column(rho1_select(excess, valid, ratio=ratio), 1) == expected


def test_ratio_rounding_is_exact_where_float_products_are_not():
    assert math.ceil(0.14 * 50) == 8  # the float product overshoots 7
    excess, valid = two_heads([float(50 - i) for i in range(50)])
    assert column(rho1_select(excess, valid, ratio=0.14), 1) == [1.0] * 7 + [0.0] * 43


def test_selected_counts():
    counts = torch.tensor([5.0, 5.0, 0.0, 50.0, 3.0], dtype=torch.float64)
    # head 0 keeps N_0; ceil(0.14 * 5) = 1; no valid pair keeps 0; 0.14 * 50 = 7; ceil(0.42) = 1.
    out = rho1_selected_counts(counts, ratio=0.14)
    assert out.dtype == torch.float64 and out.tolist() == [5.0, 1.0, 0.0, 7.0, 1.0]
    assert rho1_selected_counts(counts, ratio=0.14, select_head0=True).tolist() == [1.0, 1.0, 0.0, 7.0, 1.0]
    g = torch.Generator().manual_seed(2)
    excess, valid = torch.randn(40, 4, generator=g), torch.rand(40, 4, generator=g) < 0.7
    selection = rho1_select(excess, valid, ratio=0.3)
    assert selection.sum(dim=0).tolist() == rho1_selected_counts(valid.sum(dim=0), ratio=0.3).tolist()


def test_ties_go_to_the_lower_row():
    excess, valid = two_heads([0.5, 0.5, 0.5, 0.5])
    assert column(rho1_select(excess, valid, ratio=0.5), 1) == [1.0, 1.0, 0.0, 0.0]
    excess, valid = two_heads([0.2, 0.8, 0.8, 0.8, 0.1])  # ceil(0.4 * 5) = 2 of three tied 0.8
    assert column(rho1_select(excess, valid, ratio=0.4), 1) == [0.0, 1.0, 1.0, 0.0, 0.0]


def test_invalid_pairs_are_never_selected_nor_counted():
    # Prompt/padding rows 0 and 4 carry huge excess; N_1 = 3, ceil(0.6 * 3) = 2: rows 3 and 2.
    excess, valid = two_heads([100.0, 1.0, 2.0, 3.0, 1000.0], valid1=[F_, T, T, T, F_], valid0=[F_, T, T, T, T])
    sel = rho1_select(excess, valid, ratio=0.6)
    assert column(sel, 1) == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert column(sel, 0) == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_valid_pairs_rank_before_invalid_ones_even_at_minus_infinity():
    excess, valid = two_heads([-math.inf, 5.0, 0.0], valid1=[T, F_, T])
    assert column(rho1_select(excess, valid, ratio=1.0), 1) == [1.0, 0.0, 1.0]


def test_select_head0():
    excess, valid = two_heads([1.0, 2.0, 3.0, 4.0], head0=[3.0, 1.0, 2.0, 0.0])
    sel = rho1_select(excess, valid, ratio=0.5, select_head0=True)
    assert column(sel, 0) == [1.0, 0.0, 1.0, 0.0]
    assert column(sel, 1) == [0.0, 0.0, 1.0, 1.0]


def test_head_without_valid_pairs():
    excess = torch.tensor([[0.0, 1.0, 7.0], [0.0, 2.0, 8.0], [0.0, 3.0, 9.0]])
    valid = torch.tensor([[T, T, F_], [T, T, F_], [F_, T, F_]])
    sel = rho1_select(excess, valid, ratio=0.3)
    assert sel.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_is_validated(ratio):
    excess, valid = two_heads([1.0, 2.0])
    with pytest.raises(ValueError, match="ratio"):
        rho1_select(excess, valid, ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        rho1_selected_counts(valid.sum(dim=0), ratio=ratio)


def test_excess_hand_example():
    # ref r_j = j; head k at t reads r_{t+1+k}; pairs past the end are invalid.
    ce = torch.full((1, 4, 2), 10.0)
    ref = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    valid = torch.tensor([[[T, T], [T, T], [T, F_], [F_, F_]]])
    assert rho1_excess(ce, ref, valid).tolist() == [[[9.0, 8.0], [8.0, 7.0], [7.0, 0.0], [0.0, 0.0]]]


def test_excess_matches_double_loop():
    g = torch.Generator().manual_seed(0)
    batch, seq_len, n = 3, 9, 4
    labels = torch.randint(0, 50, (batch, seq_len), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 6:] = IGNORE_INDEX  # padding
    valid = mtp_targets(labels, n) != IGNORE_INDEX
    ce = torch.rand(batch, seq_len, n, generator=g) * 5
    ref = torch.rand(batch, seq_len, generator=g) * 5
    expected = torch.zeros(batch, seq_len, n)
    for b in range(batch):
        for t in range(seq_len):
            for k in range(n):
                if valid[b, t, k]:
                    expected[b, t, k] = ce[b, t, k] - ref[b, t + 1 + k]
    torch.testing.assert_close(rho1_excess(ce, ref, valid), expected)


@pytest.mark.parametrize("chunk_elements", [1, 2 * 11 * 2, rho1.REFERENCE_CHUNK_ELEMENTS])
def test_reference_token_ce_matches_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setattr(rho1, "REFERENCE_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 7), generator=g)
    tokens[1, 5] = IGNORE_INDEX
    expected = torch.zeros(2, 7)
    for j in range(1, 7):
        expected[:, j] = F.cross_entropy(logits[:, j - 1], tokens[:, j], ignore_index=IGNORE_INDEX, reduction="none")
    out = reference_token_ce(logits, tokens)
    torch.testing.assert_close(out, expected)
    assert out[1, 5] == 0.0
    out_bf16 = reference_token_ce(logits.bfloat16(), tokens)
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, expected, atol=0.05, rtol=0.02)


# -------------------------------------------------------------------------------------- Critic

# L = 6. Row 0: prompt x0-x1, response x2-x4, padding x5. Row 1: prompt x0, response x1-x2, padding.
# Row 2: prompt only.
MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
VALUES = torch.tensor([[9.0, 0.1, 0.2, 0.4, 0.6, 9.0], [0.3, 0.5, 0.8, 9.0, 9.0, 9.0], [1.0] * 6])
REWARDS = torch.tensor([1.0, 0.0, 1.0])


def test_response_and_last_states():
    assert response_states(MASK).int().tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0] * 6]
    assert last_states(MASK).tolist() == [3, 1, -1]
    longer = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])  # response reaching the end: t* = L - 2
    assert response_states(longer).int().tolist() == [[0, 0, 1, 1, 1, 1, 0]]
    assert last_states(longer).tolist() == [5]


@pytest.mark.parametrize(
    "lam, expected",
    [
        # Row 0 (R = 1): G_3 = 1, G_2 = (1-λ) 0.4 + λ G_3, G_1 = (1-λ) 0.2 + λ G_2; V_4 = 0.6 is unused.
        # Row 1 (R = 0): G_1 = 0, G_0 = (1-λ) 0.5 + λ G_1.
        (1.0, [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]),
        (0.0, [[0.0, 0.2, 0.4, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]]),
        (0.5, [[0.0, 0.45, 0.7, 1.0, 0.0, 0.0], [0.25, 0.0, 0.0, 0.0, 0.0, 0.0]]),
    ],
)
def test_critic_targets(lam, expected):
    values = VALUES.clone().requires_grad_()
    targets = critic_targets(values, REWARDS, MASK, lam=lam)
    assert not targets.requires_grad
    torch.testing.assert_close(targets, torch.tensor(expected + [[0.0] * 6]))


@pytest.mark.parametrize("lam", [-0.1, 1.1])
def test_critic_lambda_is_validated(lam):
    with pytest.raises(ValueError, match="lambda"):
        critic_targets(VALUES, REWARDS, MASK, lam=lam)


@pytest.mark.parametrize(
    "kind, delta, loss, grad",
    [
        # On states 1 and 2 the errors are -0.5 and 3.0.
        ("mse", 1.0, 0.25 + 9.0, [0.0, -1.0, 6.0, 0.0]),
        ("huber", 1.0, 0.5 * 0.25 + 1.0 * (3.0 - 0.5), [0.0, -0.5, 1.0, 0.0]),
        ("huber", 2.0, 0.5 * 0.25 + 2.0 * (3.0 - 1.0), [0.0, -0.5, 2.0, 0.0]),
    ],
)
def test_value_loss(kind, delta, loss, grad):
    values = torch.tensor([[0.0, 0.5, 3.0, 7.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    states = torch.tensor([[F_, T, T, F_]])
    loss_sum, count = value_loss(values, targets, states, kind=kind, huber_delta=delta)
    assert loss_sum.item() == pytest.approx(loss)
    assert count.item() == 2
    loss_sum.backward()
    torch.testing.assert_close(values.grad, torch.tensor([grad]))


def test_value_loss_kind_is_validated():
    with pytest.raises(ValueError, match="kind"):
        value_loss(VALUES, VALUES, MASK, kind="l1")


@pytest.mark.parametrize(
    "scores, labels, expected",
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # positive 0.35 loses to negative 0.4
        ([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1], 0.875),  # a positive/negative tie counts 1/2
        ([0.3, 0.3, 0.3], [1, 0, 1], 0.5),  # all tied
        ([0.9, 0.8, 0.1, 0.2], [T, T, F_, F_], 1.0),
        ([0.1, 0.2, 0.9, 0.8, 0.9], [1.0, 1.0, 0.0, 0.0, 1.0], (0.5 + 1.0) / 6),
    ],
)
def test_binary_auroc(scores, labels, expected):
    assert binary_auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected)


def test_binary_auroc_single_class_is_nan():
    assert math.isnan(binary_auroc(torch.tensor([0.1, 0.7]), torch.tensor([1, 1])))
    assert math.isnan(binary_auroc(torch.tensor([0.1, 0.7]), torch.tensor([0.0, 0.0])))


def test_value_stats():
    stats = value_stats(VALUES, REWARDS, MASK)
    # Correct: row 0 states 1-3 (0.1 + 0.2 + 0.4); row 2 has none. Incorrect: row 1 states 0-1.
    assert stats["value_sum_correct"].item() == pytest.approx(0.7)
    assert stats["count_correct"].item() == 3
    assert stats["value_sum_incorrect"].item() == pytest.approx(0.8)
    assert stats["count_incorrect"].item() == 2
    assert stats["last_valid"].tolist() == [T, T, F_]
    torch.testing.assert_close(stats["last_values"][:2], torch.tensor([0.4, 0.5]))
    assert stats["rewards"].tolist() == [1.0, 0.0, 1.0]
