"""TD-error token weights of the verifiable objective: reference, PyTorch fallback and Triton kernel.

Inputs: values [B, L] (V_t, the value of the state at position t), rewards [B] (R), mask [B, L]
(m_j = 1 iff x_j is a response token, EOS included). Everything is indexed by the TARGET token
j = t + 1, the action taken in state t = j - 1:
- x_j is an action iff j >= 1 and m_j = 1;
- δ_j = R - V_{j-1} if x_j is the last response token of the row, else γ V_j - V_{j-1};
- GAE: A_j = δ_j + γλ A_{j+1} when x_{j+1} is an action too, else A_j = δ_j (a run of consecutive
  actions ends the recurrence, so the last action has A = δ);
- optional normalisation z = (A - mean) / std with a caller-kept running mean/std, else z = A;
- w_j = clamp(exp(z / β), w_min, w_max) for actions, 0 elsewhere (prompt, padding, j = 0).

Every implementation also returns the partial sums the recipe logs (over actions: count, sum and
sum of squares of A and of w, how many weights were clipped at each end, and the extremes of A and
w). Sums come first and add across micro-batches and ranks; the extremes are stored as
(-min, max) pairs so that all of them combine with a max (`merge_td_stats`). A is the raw
advantage, before normalisation: that is what a running normaliser is updated from.

Implementations:
- `td_weights_reference`: per-row Python loops in float64, written to mirror the formulas.
- `td_weights_torch`: vectorised fp32 PyTorch for CPU/MPS; GAE uses a chunked reverse scan.
- `td_weights_triton`: one program per row, one launch (see `_td_row_kernel`).
`td_weights_fused` chooses between the last two with `wmtp.kernels.backend.resolve_backend`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from wmtp.kernels.backend import accumulation_dtype, interpreting, resolve_backend, triton_available

# triton (optional on CPU/MPS installs) is imported on first use of the Triton backend, by
# `_row_kernel`, which binds these names. Importing it reads TRITON_INTERPRET once for the whole
# process, so importing this module must not do it (a test session sets the variable later).
tl = None
_compose = None
_kernel = None

# Layout of the statistics vector. The first N_SUM_STATS slots add across micro-batches and ranks;
# the rest combine with a max (minima are stored negated).
STAT_COUNT = 0
STAT_ADV_SUM = 1
STAT_ADV_SUMSQ = 2
STAT_W_SUM = 3
STAT_W_SUMSQ = 4
STAT_CLIP_LOW = 5
STAT_CLIP_HIGH = 6
N_SUM_STATS = 7
STAT_NEG_ADV_MIN = 7
STAT_ADV_MAX = 8
STAT_NEG_W_MIN = 9
STAT_W_MAX = 10
N_STATS = 11

SCAN_CHUNK = 32
"""Positions per chunk of the PyTorch GAE scan: a [chunk x chunk] transfer matrix per chunk, then a
loop over chunks (L / SCAN_CHUNK steps) instead of one step per position."""
MIN_BLOCK = 16
GPU_MAX_BLOCK = 1024
"""Positions per tile on the GPU: 8 per thread at 4 warps; longer rows loop over tiles."""
GPU_NUM_WARPS = 4
INTERPRET_MAX_BLOCK = 4096
"""The interpreter runs each tile as numpy code: few, large tiles are what make it fast."""

AdvStat = float | torch.Tensor
"""A normalisation statistic: a Python float or a 0-dim tensor (kept on device, so no sync)."""


class TDWeights(NamedTuple):
    """Token weights [B, L] (fp32; float64 from the reference) and statistics [N_STATS]."""

    weights: torch.Tensor
    stats: torch.Tensor


def empty_td_stats(device: torch.device | str = "cpu") -> torch.Tensor:
    """Statistics of no positions: zero sums, -inf extremes (the identity of `merge_td_stats`)."""
    device = torch.device(device)
    stats = torch.zeros(N_STATS, dtype=accumulation_dtype(device), device=device)
    stats[N_SUM_STATS:] = -math.inf
    return stats


def merge_td_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Statistics of the union of two sets of positions (e.g. two micro-batches)."""
    return torch.cat([a[:N_SUM_STATS] + b[:N_SUM_STATS], torch.maximum(a[N_SUM_STATS:], b[N_SUM_STATS:])])


def td_head_weights(weights: torch.Tensor, n_future: int) -> torch.Tensor:
    """Target-aligned weights [B, L] -> per-head weights [B, L, n]: pair (t, k) gets w_{t+1+k}.

    Pairs whose target lies past the end get 0 (as do prompt and padding targets, whose w is 0).
    """
    padded = F.pad(weights, (0, n_future))
    # Window s of `padded` holds w_s .. w_{s+n-1}; position t needs the one starting at s = t + 1.
    return padded.unfold(1, n_future, 1)[:, 1:]


def _check_args(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    w_min: float,
    w_max: float,
    lam: float,
    adv_mean: AdvStat | None,
    adv_std: AdvStat | None,
) -> None:
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"values and mask must both be [B, L], got {tuple(values.shape)} and {tuple(mask.shape)}")
    if rewards.shape != values.shape[:1]:
        raise ValueError(f"rewards must be [B] = [{values.shape[0]}], got {tuple(rewards.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= w_min <= w_max:
        raise ValueError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")
    if not 0 <= lam <= 1:
        raise ValueError(f"GAE lambda must be in [0, 1], got {lam}")
    if (adv_mean is None) != (adv_std is None):
        raise ValueError("adv_mean and adv_std must be given together")


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf  # clamped to w_max like the fp32 implementations' inf


def td_weights_reference(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    w_min: float,
    w_max: float,
    gamma: float = 1.0,
    lam: float = 0.0,
    adv_mean: AdvStat | None = None,
    adv_std: AdvStat | None = None,
) -> TDWeights:
    """Plain per-row loops in float64 (results on the CPU); the tests' ground truth."""
    _check_args(values, rewards, mask, beta, w_min, w_max, lam, adv_mean, adv_std)
    batch, seq_len = values.shape
    vals = values.detach().double().cpu().tolist()
    masks = (mask != 0).cpu().tolist()
    rews = rewards.detach().double().cpu().tolist()
    mean = None if adv_mean is None else float(adv_mean)
    std = None if adv_std is None else float(adv_std)

    weights = [[0.0] * seq_len for _ in range(batch)]
    advs, exps, ws = [], [], []
    for b in range(batch):
        v, m = vals[b], masks[b]
        response = [j for j in range(seq_len) if m[j]]
        if not response:
            continue
        last = response[-1]
        adv_next = 0.0  # A_{j+1}, or 0 when x_{j+1} is not an action
        for j in range(seq_len - 1, 0, -1):
            if not m[j]:
                adv_next = 0.0
                continue
            delta = rews[b] - v[j - 1] if j == last else gamma * v[j] - v[j - 1]
            adv = delta + gamma * lam * adv_next
            adv_next = adv
            z = adv if mean is None else (adv - mean) / std
            e = _exp(z / beta)
            w = min(max(e, w_min), w_max)
            weights[b][j] = w
            advs.append(adv)
            exps.append(e)
            ws.append(w)

    stats = [0.0] * N_STATS
    stats[STAT_COUNT] = len(advs)
    stats[STAT_ADV_SUM] = sum(advs)
    stats[STAT_ADV_SUMSQ] = sum(a * a for a in advs)
    stats[STAT_W_SUM] = sum(ws)
    stats[STAT_W_SUMSQ] = sum(w * w for w in ws)
    stats[STAT_CLIP_LOW] = sum(e < w_min for e in exps)
    stats[STAT_CLIP_HIGH] = sum(e > w_max for e in exps)
    stats[STAT_NEG_ADV_MIN] = -min(advs, default=math.inf)
    stats[STAT_ADV_MAX] = max(advs, default=-math.inf)
    stats[STAT_NEG_W_MIN] = -min(ws, default=math.inf)
    stats[STAT_W_MAX] = max(ws, default=-math.inf)
    return TDWeights(
        torch.tensor(weights, dtype=torch.float64).reshape(batch, seq_len), torch.tensor(stats, dtype=torch.float64)
    )


def _reverse_linear_scan(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y_i = x_i + coef_i * y_{i+1} along dim 1 (y = 0 past the end), for [B, T] inputs.

    Within a chunk of K positions, y_i = sum_{s>=i} (coef_i ... coef_{s-1}) x_s + (coef_i ...
    coef_{K-1}) y_next, with the products built by a masked cumprod (no division, so zeros and
    underflow are harmless); a loop over chunks, from the end, supplies y_next.
    """
    batch, length = x.shape
    k = SCAN_CHUNK
    n_chunks = -(-length // k)
    pad = n_chunks * k - length
    c = F.pad(coef, (0, pad)).view(batch, n_chunks, 1, k)
    d = F.pad(x, (0, pad)).view(batch, n_chunks, k, 1)
    upper = torch.ones(k, k, dtype=torch.bool, device=x.device).triu()
    # prods[i, u] = coef_i ... coef_u for u >= i, 1 for u < i.
    prods = torch.where(upper, c, 1.0).cumprod(-1)
    # transfer[i, s] = coef_i ... coef_{s-1}: 1 on the diagonal, 0 below it.
    transfer = torch.where(upper, F.pad(prods[..., :-1], (1, 0), value=1.0), 0.0)
    local = (transfer @ d).squeeze(-1)
    link = prods[..., -1]
    out = torch.empty_like(local)
    y_next = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for chunk in range(n_chunks - 1, -1, -1):
        out[:, chunk] = local[:, chunk] + link[:, chunk] * y_next[:, None]
        y_next = out[:, chunk, 0]
    return out.reshape(batch, n_chunks * k)[:, :length]


def _torch_stats(
    adv: torch.Tensor, exp: torch.Tensor, w: torch.Tensor, action: torch.Tensor, w_min: float, w_max: float
) -> torch.Tensor:
    """Statistics over the action positions, without boolean indexing (no host sync)."""
    dtype = accumulation_dtype(adv.device)
    a = torch.where(action, adv, 0.0).to(dtype)
    wd = w.to(dtype)
    neg_inf = torch.tensor(-math.inf, device=adv.device)
    sums = [
        action.sum(),
        a.sum(),
        (a * a).sum(),
        wd.sum(),
        (wd * wd).sum(),
        (action & (exp < w_min)).sum(),
        (action & (exp > w_max)).sum(),
    ]
    extremes = [
        torch.where(action, -adv, neg_inf).amax(),
        torch.where(action, adv, neg_inf).amax(),
        torch.where(action, -w, neg_inf).amax(),
        torch.where(action, w, neg_inf).amax(),
    ]
    return torch.stack([s.to(dtype) for s in sums + extremes])


def td_weights_torch(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    w_min: float,
    w_max: float,
    gamma: float = 1.0,
    lam: float = 0.0,
    adv_mean: AdvStat | None = None,
    adv_std: AdvStat | None = None,
) -> TDWeights:
    """Vectorised fp32 PyTorch (CPU/MPS fallback): no Python loop over positions when lam == 0."""
    _check_args(values, rewards, mask, beta, w_min, w_max, lam, adv_mean, adv_std)
    batch, seq_len = values.shape
    device = values.device
    if batch == 0 or seq_len < 2:
        return TDWeights(torch.zeros(batch, seq_len, device=device), empty_td_stats(device))
    v = values.detach().float()
    r = rewards.detach().float()
    m = mask != 0
    pos = torch.arange(seq_len, device=device)
    last = torch.where(m, pos, -1).amax(1, keepdim=True)

    # Column i below is target j = i + 1, taken in state t = i.
    action = m[:, 1:]
    terminal = pos[1:] == last
    target = torch.where(terminal, r[:, None], gamma * v[:, 1:])
    adv = torch.where(action, target - v[:, :-1], 0.0)
    if lam > 0:
        # Every action carries γλ A_{j+1}: A is 0 wherever x_{j+1} is no action (and past the end),
        # and non-actions get coefficient 0, so they stay 0 and runs of actions never chain.
        adv = _reverse_linear_scan(action.float() * (gamma * lam), adv)

    z = adv
    if adv_mean is not None:
        mean = torch.as_tensor(adv_mean, dtype=torch.float32, device=device)
        std = torch.as_tensor(adv_std, dtype=torch.float32, device=device)
        z = (adv - mean) / std
    exp = torch.exp(z / beta)
    w = torch.where(action, exp.clamp(w_min, w_max), 0.0)
    stats = _torch_stats(adv, exp, w, action, w_min, w_max)
    return TDWeights(F.pad(w, (1, 0)), stats)


# Triton kernel sources: plain functions, decorated by `_row_kernel` on first use.


def _compose_fn(later_c, later_d, c, d):
    """Compose A -> c A + d (earlier position) after A -> later_c A + later_d (later positions)."""
    return c * later_c, c * later_d + d


def _td_row_kernel(
    values_ptr,
    stride_v,
    rewards_ptr,
    mask_ptr,
    stride_m,
    norm_ptr,
    w_ptr,
    stride_w,
    stats_ptr,
    seq_len,
    gamma,
    gamma_lam,
    beta,
    w_min,
    w_max,
    USE_GAE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: tiles of BLOCK target positions from the end of the row to its start.

    Lanes run backwards inside a tile too, so position order is descending throughout: the GAE
    recurrence A_j = c_j A_{j+1} + δ_j becomes a forward associative scan over affine maps,
    carried into the next tile by one scalar (A at the lowest position of the previous tile).
    The first response token met (the last of the row) is the terminal one, so the row's last
    response index is a running max and needs no separate pass.
    """
    row = tl.program_id(0).to(tl.int64)
    v_row = values_ptr + row * stride_v
    m_row = mask_ptr + row * stride_m
    w_row = w_ptr + row * stride_w
    reward = tl.load(rewards_ptr + row).to(tl.float32)
    if NORMALIZE:
        adv_mean = tl.load(norm_ptr)
        adv_std = tl.load(norm_ptr + 1)

    lanes = tl.arange(0, BLOCK)
    last = -1
    carry = 0.0
    count = tl.zeros([BLOCK], tl.float32)
    adv_sum = tl.zeros([BLOCK], tl.float32)
    adv_sumsq = tl.zeros([BLOCK], tl.float32)
    w_sum = tl.zeros([BLOCK], tl.float32)
    w_sumsq = tl.zeros([BLOCK], tl.float32)
    clip_low = tl.zeros([BLOCK], tl.float32)
    clip_high = tl.zeros([BLOCK], tl.float32)
    adv_min = tl.full([BLOCK], float("inf"), tl.float32)
    adv_max = tl.full([BLOCK], float("-inf"), tl.float32)
    w_lo = tl.full([BLOCK], float("inf"), tl.float32)
    w_hi = tl.full([BLOCK], float("-inf"), tl.float32)

    n_tiles = tl.cdiv(seq_len, BLOCK)
    for i in range(0, n_tiles):
        j = (n_tiles - i) * BLOCK - 1 - lanes
        in_row = j < seq_len
        m = tl.load(m_row + j, mask=in_row, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(m, j, -1), axis=0))
        action = m & (j >= 1)
        terminal = j == last
        v_state = tl.load(v_row + j - 1, mask=action, other=0.0).to(tl.float32)
        v_next = tl.load(v_row + j, mask=action & ~terminal, other=0.0).to(tl.float32)
        adv = tl.where(action, tl.where(terminal, reward, gamma * v_next) - v_state, 0.0)
        if USE_GAE:
            # As in `td_weights_torch`: non-actions get coefficient 0 and so stay at A = 0.
            coef = tl.where(action, gamma_lam, 0.0)
            scan_c, scan_d = tl.associative_scan((coef, adv), 0, _compose)
            adv = scan_d + scan_c * carry
            carry = tl.sum(tl.where(lanes == BLOCK - 1, adv, 0.0), axis=0)

        z = adv
        if NORMALIZE:
            z = (adv - adv_mean) / adv_std
        e = tl.exp(z / beta)
        w = tl.where(action, tl.minimum(tl.maximum(e, w_min), w_max), 0.0)
        tl.store(w_row + j, w, mask=in_row)

        count += action.to(tl.float32)
        adv_sum += adv
        adv_sumsq += adv * adv
        w_sum += w
        w_sumsq += w * w
        clip_low += (action & (e < w_min)).to(tl.float32)
        clip_high += (action & (e > w_max)).to(tl.float32)
        adv_min = tl.minimum(adv_min, tl.where(action, adv, float("inf")))
        adv_max = tl.maximum(adv_max, tl.where(action, adv, float("-inf")))
        w_lo = tl.minimum(w_lo, tl.where(action, w, float("inf")))
        w_hi = tl.maximum(w_hi, tl.where(action, w, float("-inf")))

    # Slots in the order of the STAT_* constants (kernels cannot read plain Python globals).
    out = stats_ptr + row * 11
    tl.store(out + 0, tl.sum(count, axis=0))
    tl.store(out + 1, tl.sum(adv_sum, axis=0))
    tl.store(out + 2, tl.sum(adv_sumsq, axis=0))
    tl.store(out + 3, tl.sum(w_sum, axis=0))
    tl.store(out + 4, tl.sum(w_sumsq, axis=0))
    tl.store(out + 5, tl.sum(clip_low, axis=0))
    tl.store(out + 6, tl.sum(clip_high, axis=0))
    tl.store(out + 7, -tl.min(adv_min, axis=0))
    tl.store(out + 8, tl.max(adv_max, axis=0))
    tl.store(out + 9, -tl.min(w_lo, axis=0))
    tl.store(out + 10, tl.max(w_hi, axis=0))


def _row_kernel():
    """The jitted `_td_row_kernel`, built (with triton imported) on first use."""
    global tl, _compose, _kernel
    if _kernel is None:
        if not triton_available():
            raise RuntimeError("the Triton TD-weights kernel needs triton")
        import triton as triton_module
        import triton.language as language

        # The kernel sources look these names up in this module's globals when they are compiled
        # (or interpreted), so they are bound before decorating.
        tl = language
        _compose = triton_module.jit(_compose_fn)
        _kernel = triton_module.jit(_td_row_kernel)
    return _kernel


def _block_size(seq_len: int, device: torch.device) -> int:
    cap = GPU_MAX_BLOCK if device.type == "cuda" and not interpreting() else INTERPRET_MAX_BLOCK
    return max(MIN_BLOCK, min(cap, 1 << (seq_len - 1).bit_length()))


def td_weights_triton(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    w_min: float,
    w_max: float,
    gamma: float = 1.0,
    lam: float = 0.0,
    adv_mean: AdvStat | None = None,
    adv_std: AdvStat | None = None,
    block: int | None = None,
) -> TDWeights:
    """The Triton kernel: one program per row, one launch, then a [B, N_STATS] -> [N_STATS] reduction.

    `block` (a power of two) overrides the tile size, e.g. to exercise the carry between tiles.
    """
    _check_args(values, rewards, mask, beta, w_min, w_max, lam, adv_mean, adv_std)
    batch, seq_len = values.shape
    device = values.device
    if batch == 0 or seq_len == 0:
        return TDWeights(torch.zeros(batch, seq_len, device=device), empty_td_stats(device))
    values = values.detach()
    if values.stride(1) != 1:
        values = values.contiguous()
    # Bytes, not bool: one element per position whatever the mask's dtype.
    mask_bytes = (mask != 0).contiguous().view(torch.uint8)
    rewards = rewards.detach().contiguous()
    weights = torch.empty(batch, seq_len, dtype=torch.float32, device=device)
    row_stats = torch.empty(batch, N_STATS, dtype=torch.float32, device=device)
    normalize = adv_mean is not None
    norm = (
        torch.stack(
            [
                torch.as_tensor(adv_mean, dtype=torch.float32, device=device).reshape(()),
                torch.as_tensor(adv_std, dtype=torch.float32, device=device).reshape(()),
            ]
        )
        if normalize
        else weights
    )  # any pointer: NORMALIZE=False never reads it
    _row_kernel()[(batch,)](
        values,
        values.stride(0),
        rewards,
        mask_bytes,
        mask_bytes.stride(0),
        norm,
        weights,
        weights.stride(0),
        row_stats,
        seq_len,
        float(gamma),
        float(gamma * lam),
        float(beta),
        float(w_min),
        float(w_max),
        USE_GAE=lam > 0,
        NORMALIZE=normalize,
        BLOCK=block or _block_size(seq_len, device),
        num_warps=GPU_NUM_WARPS,
    )
    dtype = accumulation_dtype(device)
    stats = torch.cat([row_stats[:, :N_SUM_STATS].to(dtype).sum(0), row_stats[:, N_SUM_STATS:].amax(0).to(dtype)])
    return TDWeights(weights, stats)


def td_weights_fused(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    w_min: float,
    w_max: float,
    gamma: float = 1.0,
    lam: float = 0.0,
    adv_mean: AdvStat | None = None,
    adv_std: AdvStat | None = None,
    backend: str | None = None,
) -> TDWeights:
    """Token weights [B, L] (fp32) and statistics [N_STATS] from the Triton or the PyTorch backend.

    Values are detached: no gradient flows through the weights.
    """
    impl = td_weights_triton if resolve_backend(values.device, backend) == "triton" else td_weights_torch
    return impl(
        values,
        rewards,
        mask,
        beta=beta,
        w_min=w_min,
        w_max=w_max,
        gamma=gamma,
        lam=lam,
        adv_mean=adv_mean,
        adv_std=adv_std,
    )
