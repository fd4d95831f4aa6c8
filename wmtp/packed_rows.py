"""Where the rows of a packed sequence lie: the geometry that the data, the model and the weighting
share.

A packed micro-batch lays rows end to end; `segments` [S, T] gives the row each token belongs to
(a run of equal ids is one row; negative ids are padding; `wmtp.data.collate.collate_packed`).
"""

from __future__ import annotations

import torch


def segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """True at each token that starts a segment (a row, or a run of padding) [S, T]."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position of every token within its segment [S, T]: 0 at each segment's first token (padding
    counts from 0 too)."""
    t = torch.arange(segments.shape[1], device=segments.device)
    return t - torch.where(segment_starts(segments), t, 0).cummax(dim=1).values
