"""TD token weights (verifiable objective): hand-computed cases, the three implementations against
each other, per-head alignment, statistics partial sums and the running advantage normaliser.

Without a GPU the Triton kernel runs in the interpreter on CPU tensors; with one, the same tests run
the compiled kernel on CUDA tensors, plus the CUDA-only tests at the end.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # triton reads this once, when it is first imported, so it must be set before that.
    os.environ["TRITON_INTERPRET"] = "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

from tests.conftest import needs_cuda  # noqa: E402
from wmtp.kernels.td_weights import (  # noqa: E402
    N_STATS,
    SCAN_CHUNK,
    STAT_CLIP_HIGH,
    STAT_CLIP_LOW,
    STAT_COUNT,
    _reverse_linear_scan,
    empty_td_stats,
    merge_td_stats,
    td_head_weights,
    td_weights_fused,
    td_weights_reference,
    td_weights_torch,
    td_weights_triton,
)
from wmtp.weighting import td_weights  # noqa: E402
from wmtp.weighting.td import AdvantageNormalizer, all_reduce_td_stats, td_stats, td_weights_with_stats  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
FP32_TOL = 1e-5
BF16_TOL = 1e-2
HAND_TOL = 1e-6
STATS_ATOL = 1e-4
"""Sums of A can cancel to about 0, where only an absolute bound means anything."""
WIDE = {"w_min": 1e-3, "w_max": 1e3}
"""A clamp range none of the hand-computed weights reach."""
DEFAULTS = {"beta": 0.9, "w_min": 0.1, "w_max": 5.0}
TILE = 16
"""A Triton tile size small enough that the random rows span several tiles (tests the carry)."""

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

IMPLS = {"reference": td_weights_reference, "torch": td_weights_torch, "triton": td_weights_triton}


@pytest.fixture(params=["reference", "torch", pytest.param("triton", marks=needs_triton)])
def impl(request):
    return IMPLS[request.param]


def run(impl, values, rewards, mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, stats) as float64 on the CPU, from inputs given as lists."""
    out = impl(
        torch.tensor(values, device=DEVICE),
        torch.tensor(rewards, device=DEVICE),
        torch.tensor(mask, device=DEVICE),
        **kwargs,
    )
    return out.weights.double().cpu(), out.stats.double().cpu()


def expect(got: torch.Tensor, want: list, tol: float = HAND_TOL) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)


# Row used by the hand-computed cases: BOS, one prompt token, three response tokens (the last is
# EOS), one padding token. Actions: x_2 (state 1), x_3 (state 2), x_4 (state 3, terminal).
ROW_MASK = [0, 0, 1, 1, 1, 0]
ROW_VALUES = [0.3, 0.2, 0.5, 0.1, 0.7, 0.9]
exp = math.exp


def test_delta_intermediate_and_terminal(impl):
    # δ = V_{t+1} - V_t = 0.5 - 0.2, 0.1 - 0.5; terminal δ = R - V_3 = 1 - 0.1. β = 1.
    w, _ = run(impl, [ROW_VALUES], [1.0], [ROW_MASK], beta=1.0, **WIDE)
    expect(w, [[0, 0, exp(0.3), exp(-0.4), exp(0.9), 0]])


def test_gamma_discounts_values_not_the_reward(impl):
    # δ = 0.9 * 0.5 - 0.2 = 0.25, 0.9 * 0.1 - 0.5 = -0.41; terminal 1 - 0.1 = 0.9 (no γ).
    w, _ = run(impl, [ROW_VALUES], [1.0], [ROW_MASK], beta=1.0, gamma=0.9, **WIDE)
    expect(w, [[0, 0, exp(0.25), exp(-0.41), exp(0.9), 0]])


def test_gae(impl):
    # λ = 0.5: A_4 = 0.9, A_3 = -0.4 + 0.5 * 0.9 = 0.05, A_2 = 0.3 + 0.5 * 0.05 = 0.325.
    w, _ = run(impl, [ROW_VALUES], [1.0], [ROW_MASK], beta=1.0, lam=0.5, **WIDE)
    expect(w, [[0, 0, exp(0.325), exp(0.05), exp(0.9), 0]])
    # γ = 0.9, λ = 0.5 (γλ = 0.45): A_3 = -0.41 + 0.45 * 0.9 = -0.005, A_2 = 0.25 + 0.45 * -0.005.
    w, _ = run(impl, [ROW_VALUES], [1.0], [ROW_MASK], beta=1.0, gamma=0.9, lam=0.5, **WIDE)
    expect(w, [[0, 0, exp(0.24775), exp(-0.005), exp(0.9), 0]])


def test_clamp_at_both_ends(impl):
    # β = 0.5: exp(0.6) stays, exp(-0.8) = 0.449 -> w_min 0.5, exp(1.8) = 6.05 -> w_max 2.
    w, stats = run(impl, [ROW_VALUES], [1.0], [ROW_MASK], beta=0.5, w_min=0.5, w_max=2.0)
    expect(w, [[0, 0, exp(0.6), 0.5, 2.0, 0]])
    assert stats[STAT_CLIP_LOW] == 1 and stats[STAT_CLIP_HIGH] == 1 and stats[STAT_COUNT] == 3


def test_normalisation(impl):
    # z = (A - 0.1) / 0.5 = 0.4, -1.0, 1.6; the statistics keep the raw A.
    w, stats = run(impl, [ROW_VALUES], [1.0], [ROW_MASK], beta=1.0, adv_mean=0.1, adv_std=0.5, **WIDE)
    expect(w, [[0, 0, exp(0.4), exp(-1.0), exp(1.6), 0]])
    logged = td_stats(stats)
    assert logged["td/min"] == pytest.approx(-0.4) and logged["td/max"] == pytest.approx(0.9)


def test_position_zero_has_no_weight(impl):
    # m_0 = 1, but no state predicts x_0. x_1: 0.5 - 0.2; x_2 is terminal: 1 - 0.5.
    w, _ = run(impl, [[0.2, 0.5, 0.1]], [1.0], [[1, 1, 1]], beta=1.0, **WIDE)
    expect(w, [[0, exp(0.3), exp(0.5)]])


def test_single_token_response(impl):
    # The only action is terminal: δ = R - V_1 = 0 - 0.2, and GAE has nothing to chain.
    for lam in (0.0, 0.5):
        w, _ = run(impl, [[0.3, 0.2, 0.8, 0.4]], [0.0], [[0, 0, 1, 0]], beta=1.0, lam=lam, **WIDE)
        expect(w, [[0, 0, exp(-0.2), 0]])
    # ... also when it is the last position of the row: 1 - 0.6.
    w, _ = run(impl, [[0.3, 0.6, 0.9]], [1.0], [[0, 0, 1]], beta=1.0, **WIDE)
    expect(w, [[0, 0, exp(0.4)]])


def test_two_rows_of_different_lengths(impl):
    # Row 1 (R = 0): x_1: 0.6 - 0.4 = 0.2, x_2 terminal: 0 - 0.6; then padding.
    values = [ROW_VALUES, [0.4, 0.6, 0.3, 0.0, 0.0, 0.0]]
    mask = [ROW_MASK, [0, 1, 1, 0, 0, 0]]
    w, stats = run(impl, values, [1.0, 0.0], mask, beta=1.0, **WIDE)
    expect(w, [[0, 0, exp(0.3), exp(-0.4), exp(0.9), 0], [0, exp(0.2), exp(-0.6), 0, 0, 0]])
    # A = 0.3, -0.4, 0.9, 0.2, -0.6: sum 0.4, sum of squares 1.46.
    weights = [exp(0.3), exp(-0.4), exp(0.9), exp(0.2), exp(-0.6)]
    logged = td_stats(stats)
    assert logged["td/mean"] == pytest.approx(0.4 / 5)
    assert logged["td/std"] == pytest.approx(math.sqrt(1.46 / 5 - (0.4 / 5) ** 2))
    assert (logged["td/min"], logged["td/max"]) == pytest.approx((-0.6, 0.9))
    assert logged["weight/mean"] == pytest.approx(sum(weights) / 5)
    assert (logged["weight/min"], logged["weight/max"]) == pytest.approx((exp(-0.6), exp(0.9)))
    assert logged["weight/clipped_share"] == 0


def test_row_without_response(impl):
    w, stats = run(impl, [[0.1, 0.2, 0.3]], [1.0], [[0, 0, 0]], beta=1.0, **WIDE)
    expect(w, [[0, 0, 0]])
    assert stats[STAT_COUNT] == 0
    assert all(math.isnan(v) for v in td_stats(stats).values())


def make_batch(seed: int, dtype: torch.dtype = torch.float32, batch: int = 7, length: int = 150):
    """Random rows: prompt, response, right padding; plus edge rows (no response, one token,
    response up to the last position, response from position 0, a response with a gap).
    Needs batch >= 6 and length > 100."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, length, generator=g) * 1.2 - 0.1
    rewards = (torch.rand(batch, generator=g) > 0.5).float()
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(1, length // 2, (1,), generator=g))
        end = int(torch.randint(start + 1, length, (1,), generator=g))
        mask[b, start:end] = True
    mask[1] = False
    mask[2, :] = False
    mask[2, 40] = True
    mask[3, 100:] = True
    mask[4, :30] = True
    mask[5, 60:90] = True
    mask[5, 75] = False
    return values.to(DEVICE, dtype), rewards.to(DEVICE), mask.to(DEVICE)


SETTINGS = [  # seed, gamma, lam, (adv_mean, adv_std)
    (0, 1.0, 0.0, None),
    (1, 0.97, 0.0, (0.05, 0.2)),
    (2, 1.0, 0.8, None),
    (3, 0.95, 0.6, (-0.1, 0.3)),
]


def assert_agree(got, want, tol: float) -> None:
    torch.testing.assert_close(got.weights.double().cpu(), want.weights, rtol=tol, atol=0)
    torch.testing.assert_close(got.stats.double().cpu(), want.stats, rtol=FP32_TOL, atol=STATS_ATOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("seed,gamma,lam,norm", SETTINGS)
def test_implementations_agree(seed, gamma, lam, norm, dtype, tol):
    values, rewards, mask = make_batch(seed, dtype=dtype)
    kwargs = dict(DEFAULTS, gamma=gamma, lam=lam)
    if norm is not None:
        kwargs.update(adv_mean=norm[0], adv_std=norm[1])
    want = td_weights_reference(values, rewards, mask, **kwargs)
    if norm is not None:  # normalised advantages reach both clamp bounds
        assert want.stats[STAT_CLIP_LOW] > 0 and want.stats[STAT_CLIP_HIGH] > 0
    assert_agree(td_weights_torch(values, rewards, mask, **kwargs), want, tol)
    if HAS_TRITON:
        assert_agree(td_weights_triton(values, rewards, mask, **kwargs), want, tol)
        assert_agree(td_weights_triton(values, rewards, mask, **kwargs, block=TILE), want, tol)


def test_reverse_scan_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    length = 3 * SCAN_CHUNK + 5
    coef = torch.rand(4, length, generator=g)
    coef[coef < 0.2] = 0.0
    x = torch.randn(4, length, generator=g)
    want = torch.zeros(4, length + 1, dtype=torch.float64)
    for i in range(length - 1, -1, -1):
        want[:, i] = x[:, i].double() + coef[:, i].double() * want[:, i + 1]
    torch.testing.assert_close(_reverse_linear_scan(coef, x).double(), want[:, :length], rtol=FP32_TOL, atol=1e-6)


@pytest.mark.parametrize("n_future", [1, 4])
def test_head_weights_alignment(n_future):
    g = torch.Generator().manual_seed(1)
    w = torch.rand(3, 9, generator=g)
    want = torch.zeros(3, 9, n_future)
    for t in range(9):
        for k in range(n_future):
            if t + 1 + k < 9:
                want[:, t, k] = w[:, t + 1 + k]
    torch.testing.assert_close(td_head_weights(w, n_future), want, rtol=0, atol=0)


@pytest.mark.parametrize("impl_name", ["torch", pytest.param("triton", marks=needs_triton)])
def test_stats_against_direct_computation(impl_name):
    values, rewards, mask = make_batch(seed=5)
    clamp = {"beta": 0.5, "w_min": 0.2, "w_max": 3.0}  # tight enough to clip at both ends
    out = IMPLS[impl_name](values, rewards, mask, **clamp)
    # δ and the clip decision straight from the formulas, over the actions (j >= 1, m_j = 1).
    v, r, m = values.double().cpu(), rewards.double().cpu(), mask.cpu()
    deltas = []
    for b in range(v.shape[0]):
        response = m[b].nonzero().flatten().tolist()
        for j in response:
            if j >= 1:
                deltas.append(float((r[b] if j == response[-1] else v[b, j]) - v[b, j - 1]))
    a = torch.tensor(deltas, dtype=torch.float64)
    raw = a.div(clamp["beta"]).exp()
    w = raw.clamp(clamp["w_min"], clamp["w_max"])
    low, high = int((raw < clamp["w_min"]).sum()), int((raw > clamp["w_max"]).sum())
    want = {
        "td/mean": a.mean(),
        "td/std": a.std(unbiased=False),
        "td/min": a.min(),
        "td/max": a.max(),
        "weight/mean": w.mean(),
        "weight/std": w.std(unbiased=False),
        "weight/min": w.min(),
        "weight/max": w.max(),
        "weight/clipped_share": (low + high) / len(deltas),
        "weight/clipped_low_share": low / len(deltas),
        "weight/clipped_high_share": high / len(deltas),
    }
    logged = td_stats(out.stats)
    assert low > 0 and high > 0
    for key, value in want.items():
        assert logged[key] == pytest.approx(float(value), rel=FP32_TOL, abs=1e-6), key


def test_stats_merge_over_micro_batches():
    values, rewards, mask = make_batch(seed=6)
    whole = td_weights_torch(values, rewards, mask, **DEFAULTS).stats
    parts = [td_weights_torch(values[s], rewards[s], mask[s], **DEFAULTS).stats for s in (slice(0, 3), slice(3, None))]
    merged = merge_td_stats(merge_td_stats(empty_td_stats(DEVICE), parts[0]), parts[1])
    torch.testing.assert_close(merged, whole, rtol=FP32_TOL, atol=1e-9)
    assert all_reduce_td_stats(merged.clone()).equal(merged)  # no process group: unchanged


def _all_reduce_worker(rank: int, init_file: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    values, rewards, mask = make_batch(seed=7)
    rows = slice(0, 3) if rank == 0 else slice(3, None)
    stats = td_weights_torch(values.cpu()[rows], rewards.cpu()[rows], mask.cpu()[rows], **DEFAULTS).stats
    all_reduce_td_stats(stats)
    torch.save(stats, f"{results}.{rank}")
    torch.distributed.destroy_process_group()


def test_all_reduce_across_ranks(tmp_path):
    results = str(tmp_path / "stats")
    torch.multiprocessing.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    values, rewards, mask = make_batch(seed=7)
    whole = td_weights_torch(values.cpu(), rewards.cpu(), mask.cpu(), **DEFAULTS).stats
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{results}.{rank}"), whole, rtol=FP32_TOL, atol=1e-9)


def test_advantage_normalizer():
    values, rewards, mask = make_batch(seed=8)
    first = td_weights_torch(values[:4], rewards[:4], mask[:4], **DEFAULTS).stats
    second = td_weights_torch(values[4:], rewards[4:], mask[4:], **DEFAULTS).stats
    norm = AdvantageNormalizer(momentum=0.9, device=DEVICE)
    assert (norm.mean.item(), norm.std.item()) == (0.0, 1.0)  # identity until the first update

    norm.update(first)
    s1 = td_stats(first)
    assert norm.mean.item() == pytest.approx(s1["td/mean"], rel=1e-5)
    assert norm.std.item() == pytest.approx(s1["td/std"], rel=1e-5)
    norm.update(empty_td_stats(DEVICE))  # a step without response tokens changes nothing
    assert norm.mean.item() == pytest.approx(s1["td/mean"], rel=1e-5)

    norm.update(second)
    s2 = td_stats(second)
    assert norm.mean.item() == pytest.approx(0.9 * s1["td/mean"] + 0.1 * s2["td/mean"], rel=1e-5)
    assert norm.std.item() == pytest.approx(math.sqrt(0.9 * s1["td/std"] ** 2 + 0.1 * s2["td/std"] ** 2), rel=1e-5)

    restored = AdvantageNormalizer(momentum=0.9, device=DEVICE)
    restored.load_state_dict(norm.state_dict())
    assert restored.mean.equal(norm.mean) and restored.std.equal(norm.std)

    got = td_weights_with_stats(values, rewards, mask, **DEFAULTS, normalizer=norm)
    want = td_weights_reference(values, rewards, mask, **DEFAULTS, adv_mean=norm.mean.item(), adv_std=norm.std.item())
    assert_agree(got, want, FP32_TOL)


def test_public_entry_point_and_dispatch():
    values, rewards, mask = make_batch(seed=9)
    values = values.clone().requires_grad_(True)
    want = td_weights_reference(values, rewards, mask, **DEFAULTS)
    w = td_weights(values, rewards, mask, **DEFAULTS)
    assert w.shape == values.shape and w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(w.double().cpu(), want.weights, rtol=FP32_TOL, atol=0)
    backends = ["torch"] + (["triton"] if HAS_TRITON else [])
    for backend in backends:
        # Non-contiguous values, a float mask and integer rewards are accepted as they are.
        out = td_weights_fused(
            values.detach().T.contiguous().T, rewards.long(), mask.float(), **DEFAULTS, backend=backend
        )
        assert_agree(out, want, FP32_TOL)
    assert td_weights_fused(values, rewards, mask, **DEFAULTS).stats.shape == (N_STATS,)


@pytest.mark.parametrize("bad", [{"beta": 0.0}, {"w_min": 2.0, "w_max": 1.0}, {"lam": 1.5}, {"adv_mean": 0.0}])
def test_invalid_arguments(bad):
    values, rewards, mask = make_batch(seed=10)
    with pytest.raises(ValueError):
        td_weights_fused(values, rewards, mask, **{**DEFAULTS, **bad})


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("lam", [0.0, 0.9])
def test_cuda_long_rows(dtype, tol, lam):
    """Rows longer than one GPU tile; `auto` picks Triton on CUDA and matches the fallback there."""
    values, rewards, mask = make_batch(seed=11, dtype=dtype, batch=8, length=3000)
    want = td_weights_reference(values, rewards, mask, **DEFAULTS, lam=lam)
    assert_agree(td_weights_fused(values, rewards, mask, **DEFAULTS, lam=lam), want, tol)
    assert_agree(td_weights_torch(values, rewards, mask, **DEFAULTS, lam=lam), want, tol)
