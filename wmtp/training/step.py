"""Pieces every recipe's training step shares: precision, the optimizer step, throughput, the log line."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from wmtp.distributed.env import DistInfo, full_tensor
from wmtp.models.args import ModelArgs
from wmtp.training.flops import flops_per_token, peak_flops


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


def clip_and_step(params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float | None) -> dict[str, float]:
    """Clip the global gradient norm, step optimizer and schedule; returns lr (of this step) and grad_norm."""
    out = {"lr": scheduler.get_last_lr()[0]}
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm)
        out["grad_norm"] = float(full_tensor(norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return out


def throughput(tokens: int, seconds: float, *, args: ModelArgs, seq_len: int, device: torch.device,
               n_heads_used: int | None = None) -> dict[str, float]:
    """tokens/s of this rank and, on GPUs with a known peak, MFU."""
    tok_s = tokens / max(seconds, 1e-9)
    out = {"tokens_per_s": tok_s, "step_time_s": seconds}
    peak = peak_flops(device)
    if peak:
        out["mfu"] = tok_s * flops_per_token(args, seq_len, n_heads_used=n_heads_used) / peak
    return out


def step_line(name: str, step: int, max_steps: int, metrics: dict[str, float], keys: Iterable[str]) -> str:
    """One console line: the step and the chosen metrics that are present."""
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
    return f"[{name}] step {step}/{max_steps} " + " ".join(parts)
