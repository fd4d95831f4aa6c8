"""Per-row quantities of packed sequences: each row of a packed micro-batch is computed on its own.

A packed micro-batch lays several rows end to end in each sequence; `segments` [S, T] says which
row each token belongs to (0..R-1 through the micro-batch, negative at padding; see
`wmtp.data.collate.collate_packed`). Everything that runs along a row (the TD errors and their
GAE chain, the critic's λ-returns, the last response-predicting state, the row's reward) must not
run into the next row. The weighting functions take `segments` and move the tensors into a row
layout [R, T] (each row from position 0, the rest padding), compute there with the very code that
serves padded micro-batches, and move the results back: a packed micro-batch gets exactly what
the padded micro-batch of the same rows gets.
"""

from __future__ import annotations

import torch

from wmtp.packed_rows import segment_positions


def _row_slots(segments: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Slot of each token in a flat [n_rows * T + 1] row buffer [S * T]: row * T + its position in
    the row; padding goes to the last slot, which is dropped."""
    seq_len = segments.shape[1]
    return torch.where(segments >= 0, segments * seq_len + segment_positions(segments), n_rows * seq_len).flatten()


def to_rows(x: torch.Tensor, segments: torch.Tensor, n_rows: int, fill: float | bool = 0) -> torch.Tensor:
    """[S, T, ...] packed -> [n_rows, T, ...]: row r from position 0, `fill` after its end."""
    seq_len = segments.shape[1]
    rest = x.shape[2:]
    out = x.new_full((n_rows * seq_len + 1, *rest), fill)
    out[_row_slots(segments, n_rows)] = x.flatten(0, 1)
    return out[:-1].view(n_rows, seq_len, *rest)


def to_packed(y: torch.Tensor, segments: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """[R, T, ...] rows -> [S, T, ...] packed (inverse of `to_rows`); `fill` at padding."""
    n_rows, seq_len = y.shape[:2]
    rest = y.shape[2:]
    flat = torch.cat([y.reshape(n_rows * seq_len, *rest), y.new_full((1, *rest), fill)])
    return flat[_row_slots(segments, n_rows)].view(*segments.shape, *rest)


def same_segment_ahead(segments: torch.Tensor, steps: int) -> torch.Tensor:
    """[S, T] bool: the token `steps` (>= 1) positions ahead exists and belongs to the same segment."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ahead = torch.zeros_like(segments, dtype=torch.bool)
    if steps < segments.shape[1]:
        ahead[:, : segments.shape[1] - steps] = segments[:, steps:] == segments[:, :-steps]
    return ahead
