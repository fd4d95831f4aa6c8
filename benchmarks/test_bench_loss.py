"""Multi-head linear cross-entropy, forward + backward: the fused loss against its alternatives.

Every case computes the summed CE of all N*n (row, head) pairs and its gradients for hidden
[N, n, D] and the output weight [V, D]; all targets are valid (no pair is dropped, the fused
path's worst case). Cases:
- eager: all heads' logits materialised at once ([N*n, V]), F.cross_entropy; the baseline and
  the reference every other case is checked against;
- eager per head: the same, one head's logits at a time;
- compile: torch.compile of the eager function;
- fused sum / fused none: `wmtp.losses.mtp_cross_entropy` with reduction "sum", and with "none"
  then .sum() (the path whose backward recomputes the logits), backend chosen automatically;
- the other backend of the fused loss: Triton under TRITON_INTERPRET on CPU (only if the
  interpreter fits the budget), the PyTorch fallback on CUDA;
- peers, called once per head, absent when not installed: Apple's cut-cross-entropy (its
  torch_compile implementation on CPU, its Triton "cce" one on CUDA) and, on CUDA only,
  liger-kernel's fused linear cross-entropy;
- matmul floor: the three matmuls the loss cannot avoid (logits, dH, dW: 6*N*n*D*V FLOPs) at full
  size into preallocated outputs, i.e. pure matmul time with no allocation.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import BenchSession, Case, Result, Settings, Unavailable, estimate_interpreted, relative_error, run_case

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BIG_SHAPE = {"rows": 8192, "dim": 4096, "vocab": 32000, "heads": 4, "dtype": "bfloat16"}
"""LLaMA-7B's output layer with 4 heads: run on CUDA only."""
PROBE_FRACTION = 16
"""The TRITON_INTERPRET probe runs the fused loss on 1/16 of the rows."""
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
"""Largest relative error (loss, and norm of each gradient's error) against eager, by dtype."""
TF32_TOLERANCE = 5e-3
"""For fp32 inputs to cut-cross-entropy's Triton kernel, whose forward matmul runs in TF32."""


def _inputs(device: torch.device, shape: dict[str, Any], rows: int | None = None, seed: int = 0) -> Inputs:
    """hidden [N, n, D] ~ N(0, 1), weight [V, D] ~ N(0, 1/D) (unit-scale logits), random targets."""
    g = torch.Generator().manual_seed(seed)
    n_rows, dim, vocab, heads = rows or shape["rows"], shape["dim"], shape["vocab"], shape["heads"]
    dtype = getattr(torch, shape["dtype"])
    hidden = torch.randn(n_rows, heads, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / dim**0.5
    targets = torch.randint(0, vocab, (n_rows, heads), generator=g)
    return (hidden.to(device, dtype).requires_grad_(), weight.to(device, dtype).requires_grad_(), targets.to(device))


def _flops(shape: dict[str, Any]) -> float:
    """6 * N * D * V per head: the logits, dH and dW matmuls."""
    return 6.0 * shape["rows"] * shape["heads"] * shape["dim"] * shape["vocab"]


def _loss_case(
    device: torch.device,
    shape: dict[str, Any],
    loss_fn: LossFn,
    label: str,
    reference: str | None = None,
    save_reference: str | None = None,
    tolerance: float | None = None,
) -> Case:
    """A case computing loss_fn and its gradients; checked against (or saved as) the reference."""
    hidden, weight, targets = _inputs(device, shape)

    def run() -> Inputs:
        loss = loss_fn(hidden, weight, targets)
        d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
        return loss.detach(), d_hidden, d_weight

    def check(outputs: Inputs) -> dict[str, float]:
        if save_reference:
            torch.save([t.cpu() for t in outputs], save_reference)
            return {}
        expected = torch.load(reference)
        return {name: relative_error(a, e) for name, a, e in zip(("loss", "d_hidden", "d_weight"), outputs, expected)}

    return Case(run=run, check=check, tolerance=tolerance or TOLERANCE[hidden.dtype], label=label, flops=_flops(shape))


def _eager(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    return F.cross_entropy(logits.float(), targets.reshape(-1), reduction="sum")


def _eager_per_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return sum(
        F.cross_entropy((hidden[:, k] @ weight.T).float(), targets[:, k], reduction="sum")
        for k in range(hidden.shape[1])
    )


def _fused(reduction: str, backend: str | None) -> LossFn:
    from wmtp.losses import mtp_cross_entropy

    def loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = mtp_cross_entropy(hidden, weight, targets, reduction=reduction, backend=backend)
        return out if reduction == "sum" else out.sum()

    return loss


# Builders: each runs inside a worker process (see harness.worker_main).


def build_eager(device: torch.device, settings: Settings, shape: dict[str, Any], save_reference: str) -> Case:
    return _loss_case(device, shape, _eager, "materialised [N*n, V]", save_reference=save_reference)


def build_eager_per_head(device: torch.device, settings: Settings, shape: dict[str, Any], reference: str) -> Case:
    return _loss_case(device, shape, _eager_per_head, "materialised [N, V] per head", reference)


def build_compiled(device: torch.device, settings: Settings, shape: dict[str, Any], reference: str) -> Case:
    return _loss_case(device, shape, torch.compile(_eager), "torch.compile(eager)", reference)


def build_fused(
    device: torch.device,
    settings: Settings,
    shape: dict[str, Any],
    reference: str,
    reduction: str,
    backend: str | None = None,
) -> Case:
    from wmtp.kernels.backend import interpreting, resolve_backend

    resolved = resolve_backend(device, backend)
    if device.type == "cpu" and resolved == "triton":
        if not interpreting():
            raise Unavailable("the Triton backend on CPU needs TRITON_INTERPRET=1")
        probe_rows = max(1, shape["rows"] // PROBE_FRACTION)
        small = _inputs(device, shape, rows=probe_rows)
        loss_fn = _fused(reduction, backend)
        estimate_interpreted(
            lambda: torch.autograd.grad(loss_fn(*small), small[:2]), shape["rows"] / probe_rows, settings
        )
        resolved += " (TRITON_INTERPRET)"
    return _loss_case(device, shape, _fused(reduction, backend), f"backend {resolved}", reference)


def build_cce(device: torch.device, settings: Settings, shape: dict[str, Any], reference: str) -> Case:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        raise Unavailable("cut-cross-entropy is not installed (pip install -e '.[bench]')")
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device.type == "cuda" else "torch_compile"

    def loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(
            linear_cross_entropy(hidden[:, k], weight, targets[:, k], reduction="sum", impl=impl)
            for k in range(hidden.shape[1])
        )

    tolerance = TF32_TOLERANCE if impl == "cce" and shape["dtype"] == "float32" else None
    return _loss_case(device, shape, loss, f"impl {impl}, once per head", reference, tolerance=tolerance)


def build_liger(device: torch.device, settings: Settings, shape: dict[str, Any], reference: str) -> Case:
    if device.type != "cuda":
        raise Unavailable("liger-kernel runs on CUDA only")
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("liger-kernel is not installed (pip install -e '.[bench]')")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(
            liger_fused_linear_cross_entropy(hidden[:, k], weight, targets[:, k], reduction="sum")
            for k in range(hidden.shape[1])
        )

    return _loss_case(device, shape, loss, "fused linear CE, once per head", reference)


def build_floor(device: torch.device, settings: Settings, shape: dict[str, Any]) -> Case:
    hidden, weight, _ = _inputs(device, shape)
    h = hidden.detach().reshape(-1, shape["dim"])
    w = weight.detach()
    # The logits buffer doubles as the [N*n, V] gradient operand of dH and dW.
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=device)
    d_hidden, d_weight = torch.empty_like(h), torch.empty_like(w)

    def run() -> None:
        torch.mm(h, w.T, out=logits)
        torch.mm(logits, w, out=d_hidden)
        torch.mm(logits.T, h, out=d_weight)

    return Case(run=run, label="logits, dH, dW matmuls", flops=_flops(shape))


@dataclass(frozen=True)
class LossBench:
    """One row of the loss table: which builder, with what, in what environment."""

    name: str
    builder: str
    params: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    role: str = ""
    uses_reference: bool = True


EAGER = LossBench("eager", "build_eager", role="baseline", uses_reference=False)


def _cases(device_type: str) -> list[LossBench]:
    if device_type == "cuda":
        other = LossBench("fused sum, torch fallback", "build_fused", {"reduction": "sum", "backend": "torch"})
    else:
        other = LossBench(
            "fused sum, triton", "build_fused", {"reduction": "sum", "backend": "triton"}, env={"TRITON_INTERPRET": "1"}
        )
    return [
        EAGER,
        LossBench("eager per head", "build_eager_per_head"),
        LossBench("compile", "build_compiled"),
        LossBench("fused sum", "build_fused", {"reduction": "sum"}),
        LossBench("fused none", "build_fused", {"reduction": "none"}),
        other,
        LossBench("cut-cross-entropy", "build_cce"),
        LossBench("liger-kernel", "build_liger"),
        LossBench("matmul floor", "build_floor", role="floor", uses_reference=False),
    ]


def _shapes() -> list[dict[str, Any]]:
    settings = Settings.from_env()
    shapes = [
        {
            "rows": settings.rows,
            "dim": settings.dim,
            "vocab": settings.vocab,
            "heads": settings.heads,
            "dtype": settings.dtype,
        }
    ]
    if settings.device == "cuda" and settings.big_shape and BIG_SHAPE not in shapes:
        shapes.append(BIG_SHAPE)
    return shapes


def _shape_id(shape: dict[str, Any]) -> str:
    return f"N{shape['rows']}-D{shape['dim']}-V{shape['vocab']}-n{shape['heads']}-{shape['dtype']}"


CASES = _cases(Settings.from_env().device)


@pytest.fixture(scope="module", params=_shapes(), ids=_shape_id)
def shape(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.param


def _table(shape: dict[str, Any], settings: Settings) -> str:
    return (
        f"loss fwd+bwd, N={shape['rows']} D={shape['dim']} V={shape['vocab']} n={shape['heads']} "
        f"{shape['dtype']}, {settings.device}"
    )


@pytest.fixture(scope="module")
def eager(shape: dict[str, Any], settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, str]:
    """The eager case's result and the file of its outputs (the other cases' reference)."""
    ref = str(tmp_path_factory.mktemp("loss") / "eager.pt")
    result = run_case(
        settings,
        _table(shape, settings),
        EAGER.name,
        __file__,
        EAGER.builder,
        {"shape": shape, "save_reference": ref},
        role=EAGER.role,
    )
    return result, ref


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-").replace(",", "") for c in CASES])
def test_loss(
    case: LossBench, shape: dict[str, Any], settings: Settings, bench: BenchSession, eager: tuple[Result, str]
) -> None:
    eager_result, reference = eager
    if case.role == "baseline":
        result = eager_result
    else:
        params = {"shape": shape, **case.params}
        if case.uses_reference:
            params["reference"] = reference
        result = run_case(
            settings, _table(shape, settings), case.name, __file__, case.builder, params, env=case.env, role=case.role
        )
    bench.record(result)
    if result.status in ("absent", "skipped"):
        pytest.skip(f"{case.name}: {result.status}: {result.reason}")
    assert result.status == "ok", f"{case.name}: errors {result.errors} above tolerance {result.tolerance}"
