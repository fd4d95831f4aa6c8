"""Triton kernels for the row-wise part of the fused multi-head cross-entropy.

On a logits chunk [C, V] (fp32 or 16-bit, row-major) with targets [C]: per-row log-sum-exp and
CE (fp32) and, on request, softmax - onehot written into a gradient buffer (the logits themselves,
or a buffer of another dtype such as the 16-bit matmul operand). The matmuls around it, and the
per-row scale of the gradient, stay in PyTorch (`kernels/fused_mtp_ce.py`).

Two kernels, each over a grid of (row blocks of BLOCK_M rows) x (column splits):
1. `_partial_lse_kernel`: every program walks its share of the columns in [BLOCK_M, BLOCK_V]
   tiles with an online max/sum and stores a partial (max, sum) per row; the program whose columns
   hold a row's target also stores the target logit. Splitting V keeps a GPU busy although a chunk
   has only a few hundred rows (a few dozen row blocks for ~130 SMs).
2. `_finish_kernel`: merges the partials into lse and CE and, with a gradient, rewrites its share of
   the columns. Reading the target logit in kernel 1 is what makes in-place gradients safe: by the
   time any column is overwritten every target logit has been read.
With the log-sum-exp known (the backward of reduction="none"), only kernel 2 runs.

Values are upcast to fp32 right after `tl.load` (the CPU interpreter computes 16-bit arithmetic
incorrectly, and fp32 is what the reduction needs anyway). No block pointers and no multi-config
autotune, so the same code runs under `TRITON_INTERPRET=1`; block sizes come from `row_blocks`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from wmtp.kernels.backend import interpreting

MIN_BLOCK_M = 16
"""Rows per tile (the GPU's choice, the least anywhere): small row blocks and column splits give a
chunk of a few hundred rows enough programs."""
GPU_TILE_ELEMENTS = 8192
"""Elements of one [BLOCK_M, BLOCK_V] tile on the GPU (64 fp32 values per thread at 4 warps)."""
GPU_NUM_WARPS = 4
"""ptxas gives either kernel 130-220 registers per thread at this tile (sm_90, triton 3.3-3.9): 4
warps leave room for two or three resident programs per SM, 8 warps for one."""
PROGRAMS_PER_SM = 4
"""Column splits are added until the grid has about this many programs per SM."""
MIN_TILES_PER_SPLIT = 4
"""A split walks at least this many tiles, so the merge of partials stays negligible."""
INTERPRET_MAX_BLOCK_M = 64
INTERPRET_TILE_ELEMENTS = 1 << 16
"""The interpreter runs each program as numpy code: few, large tiles are what make it fast."""

MASKED_LOGIT: tl.constexpr = tl.constexpr(-3.0e38)
"""Stands for masked-off logits: finite, so max/exp of fully masked (padding) rows give no NaN."""


@dataclass(frozen=True)
class RowBlocks:
    """Launch shape: BLOCK_M rows x BLOCK_V columns per tile, `splits` programs along V per row block."""

    block_m: int
    block_v: int
    splits: int
    num_warps: int


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def row_blocks(n_rows: int, n_cols: int, device: torch.device) -> RowBlocks:
    """Block sizes for a [n_rows, n_cols] chunk on `device` (a heuristic: autotune needs a driver)."""
    if device.type != "cuda" or interpreting():
        block_m = max(MIN_BLOCK_M, min(INTERPRET_MAX_BLOCK_M, triton.next_power_of_2(n_rows)))
        block_v = min(triton.next_power_of_2(n_cols), INTERPRET_TILE_ELEMENTS // block_m)
        return RowBlocks(block_m, block_v, splits=1, num_warps=GPU_NUM_WARPS)
    block_m = MIN_BLOCK_M
    block_v = min(triton.next_power_of_2(n_cols), GPU_TILE_ELEMENTS // block_m)
    row_block_count = triton.cdiv(n_rows, block_m)
    index = device.index if device.index is not None else torch.cuda.current_device()
    wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(index), row_block_count)
    splits = max(1, min(wanted, triton.cdiv(triton.cdiv(n_cols, block_v), MIN_TILES_PER_SPLIT)))
    return RowBlocks(block_m, block_v, splits, GPU_NUM_WARPS)


def _columns_per_split(n_cols: int, blocks: RowBlocks) -> tuple[int, int]:
    """(columns per split, a whole number of tiles; splits actually needed, none left empty)."""
    tiles_per_split = triton.cdiv(triton.cdiv(n_cols, blocks.block_v), blocks.splits)
    cols = tiles_per_split * blocks.block_v
    return cols, triton.cdiv(n_cols, cols)


@triton.jit
def _partial_lse_kernel(
    logits_ptr,
    stride_row,
    tgt_ptr,
    tgt_logit_ptr,
    part_max_ptr,
    part_sum_ptr,
    n_rows,
    n_cols,
    cols_per_split,
    rows_padded,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_base = logits_ptr + rows.to(tl.int64) * stride_row
    start = pid_v * cols_per_split
    end = tl.minimum(start + cols_per_split, n_cols)

    run_max = tl.full([BLOCK_M], MASKED_LOGIT, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(start, end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < end)[None, :]
        x = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x, MASKED_LOGIT)
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        run_max = new_max
    # Padded buffers: every row of the block is stored, so the merge needs no row mask.
    tl.store(part_max_ptr + pid_v * rows_padded + rows, run_max)
    tl.store(part_sum_ptr + pid_v * rows_padded + rows, run_sum)

    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    mine = row_ok & (tgt >= start) & (tgt < end)
    picked = tl.load(row_base + tgt, mask=mine, other=0.0).to(tl.float32)
    tl.store(tgt_logit_ptr + rows, picked, mask=mine)


@triton.jit
def _finish_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad,
    tgt_ptr,
    lse_ptr,
    ce_ptr,
    part_max_ptr,
    part_sum_ptr,
    n_rows,
    n_cols,
    cols_per_split,
    rows_padded,
    n_splits,
    FROM_PARTIALS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows

    if FROM_PARTIALS:
        lse_max = tl.full([BLOCK_M], MASKED_LOGIT, tl.float32)
        lse_sum = tl.zeros([BLOCK_M], tl.float32)
        for j in range(0, n_splits):
            part_max = tl.load(part_max_ptr + j * rows_padded + rows)
            part_sum = tl.load(part_sum_ptr + j * rows_padded + rows)
            new_max = tl.maximum(lse_max, part_max)
            lse_sum = lse_sum * tl.exp(lse_max - new_max) + part_sum * tl.exp(part_max - new_max)
            lse_max = new_max
        # Padding rows get lse 0 (not about -3e38), so their masked gradient lanes cannot overflow.
        lse = tl.where(row_ok, lse_max + tl.log(lse_sum), 0.0)
        if pid_v == 0:
            # ce_ptr holds the target logit stored by _partial_lse_kernel.
            picked = tl.load(ce_ptr + rows, mask=row_ok, other=0.0)
            tl.store(lse_ptr + rows, lse, mask=row_ok)
            tl.store(ce_ptr + rows, lse - picked, mask=row_ok)
    else:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)

    if WRITE_GRAD:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        row_base = logits_ptr + rows.to(tl.int64) * stride_row
        grad_base = grad_ptr + rows.to(tl.int64) * stride_grad
        start = pid_v * cols_per_split
        end = tl.minimum(start + cols_per_split, n_cols)
        for v0 in range(start, end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < end)[None, :]
            x = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            prob = tl.exp(x - lse[:, None])
            prob = tl.where(cols[None, :] == tgt[:, None], prob - 1.0, prob)
            tl.store(grad_base[:, None] + cols[None, :], prob.to(grad_ptr.dtype.element_ty), mask=mask)


def _check_chunk(logits: torch.Tensor, grad: torch.Tensor | None) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits chunk must be a 2-D tensor with contiguous rows")
    if grad is not None and (grad.shape != logits.shape or grad.stride(1) != 1):
        raise ValueError(
            f"grad buffer {tuple(grad.shape)} must match logits {tuple(logits.shape)} with contiguous rows"
        )


def ce_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ce: torch.Tensor,
    *,
    grad: torch.Tensor | None = None,
    blocks: RowBlocks | None = None,
) -> None:
    """Fill lse [C] and ce [C] (fp32, contiguous) from logits [C, V].

    With `grad` [C, V] (may be `logits` itself), also write softmax - onehot(targets) into `grad`
    in its dtype.
    """
    _check_chunk(logits, grad)
    n_rows, n_cols = logits.shape
    blocks = blocks or row_blocks(n_rows, n_cols, logits.device)
    cols_per_split, splits = _columns_per_split(n_cols, blocks)
    row_block_count = triton.cdiv(n_rows, blocks.block_m)
    rows_padded = row_block_count * blocks.block_m
    partials = torch.empty(2, splits, rows_padded, dtype=torch.float32, device=logits.device)
    _partial_lse_kernel[(row_block_count, splits)](
        logits,
        logits.stride(0),
        targets,
        ce,
        partials[0],
        partials[1],
        n_rows,
        n_cols,
        cols_per_split,
        rows_padded,
        BLOCK_M=blocks.block_m,
        BLOCK_V=blocks.block_v,
        num_warps=blocks.num_warps,
    )
    write_grad = grad is not None
    _finish_kernel[(row_block_count, splits if write_grad else 1)](
        logits,
        logits.stride(0),
        grad if write_grad else logits,
        grad.stride(0) if write_grad else 0,
        targets,
        lse,
        ce,
        partials[0],
        partials[1],
        n_rows,
        n_cols,
        cols_per_split,
        rows_padded,
        splits,
        FROM_PARTIALS=True,
        WRITE_GRAD=write_grad,
        BLOCK_M=blocks.block_m,
        BLOCK_V=blocks.block_v,
        num_warps=blocks.num_warps,
    )


def ce_rows_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    blocks: RowBlocks | None = None,
) -> None:
    """Write softmax - onehot(targets) into `grad` given the per-row log-sum-exp `lse`."""
    _check_chunk(logits, grad)
    n_rows, n_cols = logits.shape
    blocks = blocks or row_blocks(n_rows, n_cols, logits.device)
    cols_per_split, splits = _columns_per_split(n_cols, blocks)
    _finish_kernel[(triton.cdiv(n_rows, blocks.block_m), splits)](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        targets,
        lse,
        lse,
        lse,
        lse,
        n_rows,
        n_cols,
        cols_per_split,
        0,
        splits,
        FROM_PARTIALS=False,
        WRITE_GRAD=True,
        BLOCK_M=blocks.block_m,
        BLOCK_V=blocks.block_v,
        num_warps=blocks.num_warps,
    )
