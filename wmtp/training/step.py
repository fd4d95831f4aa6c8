"""Pieces every recipe's training step shares: precision, the optimizer step, throughput, the log line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from wmtp.distributed.env import DistInfo, full_tensor
from wmtp.models.args import ModelArgs
from wmtp.training.flops import peak_flops, step_flops


def resolve_precision(precision: str, dist: DistInfo) -> tuple[torch.dtype | None, contextlib.AbstractContextManager]:
    """(FSDP param dtype, autocast context) for training.precision.

    bf16 ("auto" on CUDA): several processes use FSDP's mixed precision (bf16 compute, fp32 master
    weights and reduction); a single device autocasts. fp32: neither.
    """
    bf16 = precision == "bf16" or (precision == "auto" and dist.device.type == "cuda")
    if not bf16:
        return None, contextlib.nullcontext()
    if dist.distributed:
        return torch.bfloat16, contextlib.nullcontext()
    return None, torch.autocast(dist.device.type, dtype=torch.bfloat16)


def clip_and_step(
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float | None,
) -> dict[str, float]:
    """Clip the global gradient norm, step optimizer and schedule; returns lr (of this step) and grad_norm."""
    out = {"lr": scheduler.get_last_lr()[0]}
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
        out["grad_norm"] = float(full_tensor(norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return out


def step_work(
    micro_batches: list[dict[str, torch.Tensor]],
    args: ModelArgs,
    *,
    heads: int,
    scored_pairs: int,
    backward: bool = True,
) -> tuple[int, float]:
    """(tokens, model FLOPs) of this rank's step; see `wmtp.training.flops.step_flops`."""
    lengths = torch.cat([mb["lengths"] for mb in micro_batches]).tolist()
    return sum(lengths), step_flops(args, lengths, heads=heads, scored_pairs=scored_pairs, backward=backward)


def throughput(tokens: int, flops: float, seconds: float, *, device: torch.device) -> dict[str, float]:
    """tokens/s and achieved TFLOP/s of this rank; on CUDA also the peak memory so far and, on GPUs
    with a known peak rate, MFU."""
    seconds = max(seconds, 1e-9)
    out = {"tokens_per_s": tokens / seconds, "step_time_s": seconds, "tflops_per_s": flops / seconds / 1e12}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    peak = peak_flops(device)
    if peak:
        out["mfu"] = flops / seconds / peak
    return out


def step_line(name: str, step: int, max_steps: int, metrics: dict[str, float], keys: Iterable[str]) -> str:
    """One console line: the step and the chosen metrics that are present."""
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
    return f"[{name}] step {step}/{max_steps} " + " ".join(parts)
