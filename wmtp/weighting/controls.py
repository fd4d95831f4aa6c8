"""Ablation controls of the weighted objectives (SPEC: "Controls and diagnostics").

A control keeps everything of a run (data, model, value loss, the number of selected pairs) but
the alignment of the weights with the tokens, so that a gain of the objective over its control is
the gain of putting the weights where they are:

- verifiable "uniform": every valid response target gets weight 1.
- verifiable "shuffled": each row's weights permuted among its own valid response targets (never
  onto prompt or padding; the row's multiset of weights is kept).
- verifiable "random": the step's weights permuted across every valid target of the global batch
  (all micro-batches, all ranks; the step's weight distribution is kept), in an order of the rows
  themselves, so that no arrangement of the micro-batches changes it.
- Rho-1 "random": per head the same number of valid pairs as the selection keeps, chosen uniformly.

Every draw is a pure function of the run's seed and the data's own coordinates (a row's draw
number in the sampler's stream, the optimizer step), never of a running generator, so a resumed
run, another world size or another gradient accumulation draws exactly the same permutations.
Draws are made with numpy on the host and moved to the batch's device. Packed micro-batches pass
`segments`: a row's draw is then made in its own row layout (`wmtp.weighting.segments`), the same
draw as in a padded micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from wmtp.distributed.env import all_gather_with_offset
from wmtp.packed_rows import segment_positions
from wmtp.weighting.diagnostics import response_targets
from wmtp.weighting.segments import to_packed, to_rows

TDControl = Literal["none", "uniform", "shuffled", "random"]
Rho1Control = Literal["none", "random"]

ROW_POSITIONS = 1 << 24
"""More positions than any row has: the stride of a row's draw number in `target_keys`."""

# Independent random streams of one seed.
_SHUFFLED_STREAM = 1
_RANDOM_STREAM = 2
_RHO1_RANDOM_STREAM = 3


def uniform_weights(mask: torch.Tensor) -> torch.Tensor:
    """Weight 1 on every valid response target (m_j = 1, j >= 1), 0 elsewhere: [B, L] fp32."""
    return response_targets(mask).float()


def row_shuffle_index(mask: torch.Tensor, samples: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Gather index [B, L] (int64, on mask's device) that permutes each row's valid response targets
    among themselves and leaves every other position where it is; row b's permutation is drawn from
    (seed, row's draw number samples[b])."""
    valid = response_targets(mask).cpu().numpy()
    index = np.broadcast_to(np.arange(valid.shape[1]), valid.shape).copy()
    for b, sample in enumerate(samples.tolist()):
        positions = np.flatnonzero(valid[b])
        order = np.random.default_rng([seed, _SHUFFLED_STREAM, sample]).permutation(positions.size)
        index[b, positions] = positions[order]
    return torch.from_numpy(index).to(mask.device)


def shuffle_within_rows(
    weights: torch.Tensor,
    mask: torch.Tensor,
    samples: torch.Tensor,
    *,
    seed: int,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """The "shuffled" control of target-aligned weights [B, L] (see `row_shuffle_index`); segments
    (packed rows): weights and mask [S, T], samples [R]."""
    if segments is None:
        return weights.gather(1, row_shuffle_index(mask, samples, seed=seed))
    n_rows = samples.shape[0]
    rows = to_rows(weights, segments, n_rows)
    shuffled = rows.gather(1, row_shuffle_index(to_rows(mask.bool(), segments, n_rows), samples, seed=seed))
    return to_packed(shuffled, segments)


def permute_across_batch(
    weights: Sequence[torch.Tensor], batches: Sequence[Mapping[str, torch.Tensor]], *, seed: int, step: int
) -> list[torch.Tensor]:
    """The "random" control of one optimizer step: target-aligned weights [B, L] of this rank's
    micro-batches (fields mask, sample and, packed, segments) permuted across every valid response
    target of the global batch.

    The permutation, drawn from (seed, step), acts on the targets ordered by (the row's draw number,
    the target's position in its row): an order of the step's rows themselves, so the world size,
    the accumulation and the arrangement of the micro-batches (grouped, packed) do not change which
    weight lands where. Collective under a process group: every rank calls it with its micro-batches.
    """
    valid = [response_targets(mb["mask"]) for mb in batches]
    local = torch.cat([w[v] for w, v in zip(weights, valid)])
    keys = torch.cat([target_keys(mb)[v] for mb, v in zip(batches, valid)])
    everything, offset = all_gather_with_offset(local)
    canonical = all_gather_with_offset(keys)[0].argsort()
    draw = torch.from_numpy(np.random.default_rng([seed, _RANDOM_STREAM, step]).permutation(everything.numel()))
    permuted_all = torch.empty_like(everything)
    permuted_all[canonical] = everything[canonical[draw.to(canonical.device)]]
    mine = permuted_all[offset : offset + local.numel()]
    out, start = [], 0
    for w, v in zip(weights, valid):
        permuted = torch.zeros_like(w)
        count = int(v.sum())
        permuted[v] = mine[start : start + count]
        out.append(permuted)
        start += count
    return out


def target_keys(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] int64: sample * ROW_POSITIONS + the token's position in its row (packed rows: from the
    row's own start), unique to a token of the step's rows whatever the micro-batch holding it."""
    segments = batch.get("segments")
    if segments is None:
        rows = batch["sample"][:, None].expand_as(batch["mask"])
        positions = torch.arange(batch["mask"].shape[1], device=rows.device).expand_as(rows)
    else:
        rows = batch["sample"][segments.clamp(min=0)]
        positions = segment_positions(segments)
    return rows.long() * ROW_POSITIONS + positions


def random_selection_keys(
    lengths: torch.Tensor,
    samples: torch.Tensor,
    *,
    width: int,
    n_heads: int,
    seed: int,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniform keys [B, width, n_heads] (fp32, on lengths' device) for Rho-1's "random" control:
    selecting the largest keys picks a uniform subset of the valid pairs. Row b's keys over its own
    lengths[b] positions come from (seed, samples[b]), whatever the batch's padding. segments [S, T]
    (packed rows; lengths and samples per row): the rows' keys laid out as the rows are, [S, T, n]."""
    if segments is not None:
        rows = random_selection_keys(lengths, samples, width=segments.shape[1], n_heads=n_heads, seed=seed)
        return to_packed(rows, segments.to(rows.device))
    keys = np.zeros((len(lengths), width, n_heads), dtype=np.float32)
    for b, (length, sample) in enumerate(zip(lengths.tolist(), samples.tolist())):
        keys[b, :length] = np.random.default_rng([seed, _RHO1_RANDOM_STREAM, sample]).random((length, n_heads))
    return torch.from_numpy(keys).to(lengths.device)
