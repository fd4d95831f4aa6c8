"""TD token weights (verifiable objective): the kernel against a Python loop and vectorised PyTorch.

Inputs: values [B, L] in [0, 1), rewards 0/1, and a mask with a prompt (1/8 to 1/2 of the row), a
response, then padding. Each implementation returns the weights [B, L] and the logged statistics,
both checked against `td_weights_reference` (float64 per-element loops). Cases, for lambda = 0 (TD
error) and lambda = 0.95 (GAE reverse scan):
- python loop: a reverse loop over positions, each step PyTorch ops over the batch (how the
  recurrence is usually written without a kernel); the baseline;
- torch vectorised: `td_weights_torch`;
- fused: `td_weights_fused` with the automatic backend (Triton on CUDA, `td_weights_torch` else);
- on CPU, the Triton kernel under TRITON_INTERPRET, only if the interpreter fits the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from harness import BenchSession, Case, Settings, Unavailable, estimate_interpreted, relative_error, run_case

from wmtp.kernels import td_weights as td

BETA, W_MIN, W_MAX, GAMMA = 0.9, 0.1, 5.0, 1.0
LAMBDAS = (0.0, 0.95)
PROBE_FRACTION = 8
"""The TRITON_INTERPRET probe runs on 1/8 of the rows."""
TOLERANCE = 1e-4
"""Largest relative error of the weights (norm) and of each statistic (floored at 1) in fp32."""


def _inputs(
    device: torch.device, batch: int, length: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, length, generator=g)
    rewards = (torch.rand(batch, generator=g) < 0.5).float()
    pos = torch.arange(length)
    start = torch.randint(length // 8, max(length // 2, length // 8 + 1), (batch, 1), generator=g)
    end = torch.randint(length // 2 + 1, length + 1, (batch, 1), generator=g)
    mask = (pos >= start) & (pos < end)
    return values.to(device), rewards.to(device), mask.to(device)


def td_python_loop(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    w_min: float,
    w_max: float,
    gamma: float = 1.0,
    lam: float = 0.0,
) -> td.TDWeights:
    """Weights and statistics with one reverse step per target position j (vectorised over rows)."""
    v, r, m = values.float(), rewards.float(), mask != 0
    batch, length = v.shape
    last = torch.where(m, torch.arange(length, device=v.device), -1).amax(1)
    weights = torch.zeros(batch, length, device=v.device)
    advs = torch.zeros(batch, length, device=v.device)
    exps = torch.zeros(batch, length, device=v.device)
    adv_next = torch.zeros(batch, device=v.device)
    for j in range(length - 1, 0, -1):
        action = m[:, j]
        delta = torch.where(last == j, r, gamma * v[:, j]) - v[:, j - 1]
        # adv_next is 0 when x_{j+1} is not an action, which ends the GAE recurrence.
        adv = torch.where(action, delta + gamma * lam * adv_next, 0.0)
        e = torch.exp(adv / beta)
        weights[:, j] = torch.where(action, e.clamp(w_min, w_max), 0.0)
        advs[:, j], exps[:, j] = adv, e
        adv_next = adv
    act = m.clone()
    act[:, 0] = False
    a, w, e = advs[act].double(), weights[act].double(), exps[act]
    stats = torch.empty(td.N_STATS, dtype=torch.float64, device=v.device)
    stats[td.STAT_COUNT] = a.numel()
    stats[td.STAT_ADV_SUM], stats[td.STAT_ADV_SUMSQ] = a.sum(), (a * a).sum()
    stats[td.STAT_W_SUM], stats[td.STAT_W_SUMSQ] = w.sum(), (w * w).sum()
    stats[td.STAT_CLIP_LOW], stats[td.STAT_CLIP_HIGH] = (e < w_min).sum(), (e > w_max).sum()
    stats[td.STAT_NEG_ADV_MIN], stats[td.STAT_ADV_MAX] = -a.min(), a.max()
    stats[td.STAT_NEG_W_MIN], stats[td.STAT_W_MAX] = -w.min(), w.max()
    return td.TDWeights(weights, stats)


def _stat_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |a - e| / max(1, |e|) over the statistics (counts and sums alike)."""
    a, e = actual.detach().double().cpu(), expected.double()
    err = ((a - e).abs() / e.abs().clamp(min=1.0)).max().item()
    return err if math.isfinite(err) else math.inf


def build_td(device: torch.device, settings: Settings, impl: str, lam: float, batch: int, length: int) -> Case:
    """impl: "loop" | "torch" | "fused" | "triton" (the last under TRITON_INTERPRET on CPU)."""
    from wmtp.kernels.backend import interpreting, resolve_backend

    fn = {
        "loop": td_python_loop,
        "torch": td.td_weights_torch,
        "fused": td.td_weights_fused,
        "triton": td.td_weights_triton,
    }[impl]
    kwargs = {"beta": BETA, "w_min": W_MIN, "w_max": W_MAX, "gamma": GAMMA, "lam": lam}
    label = {
        "loop": "reverse loop over L",
        "torch": "td_weights_torch",
        "fused": f"backend {resolve_backend(device)}",
        "triton": "td_weights_triton",
    }[impl]
    if impl == "triton" and device.type == "cpu":
        if not interpreting():
            raise Unavailable("the Triton kernel on CPU needs TRITON_INTERPRET=1")
        probe_rows = max(1, batch // PROBE_FRACTION)
        small = _inputs(device, probe_rows, length)
        estimate_interpreted(lambda: fn(*small, **kwargs), batch / probe_rows, settings)
        label += " (TRITON_INTERPRET)"
    values, rewards, mask = _inputs(device, batch, length)

    def check(out: td.TDWeights) -> dict[str, float]:
        ref = td.td_weights_reference(values, rewards, mask, **kwargs)
        return {"weights": relative_error(out.weights, ref.weights), "stats": _stat_error(out.stats, ref.stats)}

    # The least traffic: read values (fp32) and mask (bool), write the weights (fp32); rewards and the
    # statistics are per row. Against the device's memory bandwidth this is the kernel's efficiency.
    traffic = values.numel() * (values.element_size() + mask.element_size() + 4)
    return Case(
        run=lambda: fn(values, rewards, mask, **kwargs),
        check=check,
        tolerance=TOLERANCE,
        label=label,
        bytes_moved=traffic,
    )


@dataclass(frozen=True)
class TDBench:
    name: str
    impl: str
    env: dict[str, str] = field(default_factory=dict)
    role: str = ""


def _cases(device_type: str) -> list[TDBench]:
    cases = [
        TDBench("python loop", "loop", role="baseline"),
        TDBench("torch vectorised", "torch"),
        TDBench("fused", "fused"),
    ]
    if device_type == "cpu":
        cases.append(TDBench("triton", "triton", env={"TRITON_INTERPRET": "1"}))
    return cases


CASES = _cases(Settings.from_env().device)


@pytest.mark.parametrize("lam", LAMBDAS, ids=lambda lam: f"lam{lam}")
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_td(case: TDBench, lam: float, settings: Settings, bench: BenchSession) -> None:
    table = f"TD weights, B={settings.td_batch} L={settings.td_len} lambda={lam}, {settings.device}"
    params = {"impl": case.impl, "lam": lam, "batch": settings.td_batch, "length": settings.td_len}
    result = bench.record(
        run_case(settings, table, case.name, __file__, "build_td", params, env=case.env, role=case.role)
    )
    if result.status in ("absent", "skipped"):
        pytest.skip(f"{case.name}: {result.status}: {result.reason}")
    assert result.status == "ok", f"{case.name}: errors {result.errors} above tolerance {result.tolerance}"
