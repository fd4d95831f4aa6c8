"""How one optimizer step's rows become micro-batches: in the sampler's order, grouped by length, or packed.

The rows of a step are the ones the sampler chose; an arrangement only decides which rows share a
micro-batch (and, packed, a sequence), never which rows the step trains on. Every objective sums
over the whole global batch with denominators taken before the first backward, so an arrangement
changes neither the loss nor the gradients (up to float rounding). The one exception is Rho-1,
whose selection unit is the micro-batch: grouping or packing changes which rows' pairs compete
for selection, while packing the rows of a micro-batch selects exactly what padding them does.

A plan is computed from the rows' token lengths in the sidecar index, the same on every rank
without any communication, and every rank gets the same number of micro-batches (a sharded model
runs collectives in every forward). It is a pure function of the step's rows, so resuming
mid-epoch needs nothing but the sampler's position.

Plan layout: plan[rank][micro_batch] is a list of sequences; a sequence is a tuple of positions in
the step's row array: one position each unpacked, several packed into one sequence of `seq_len`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from wmtp.config.sections import DataConfig

Plan = list[list[list[tuple[int, ...]]]]
"""plan[rank][micro_batch][sequence] = positions of the rows in the step's array of row ids."""


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """DataConfig's arrangement settings; the default is the sampler's order (each rank a contiguous
    slice of the global batch, micro-batches of micro_batch_size rows)."""

    group_by_length: bool = False
    packing: bool = False
    micro_batch_tokens: int = 0

    @classmethod
    def from_config(cls, cfg: DataConfig) -> BatchLayout:
        return cls(group_by_length=cfg.group_by_length, packing=cfg.packing, micro_batch_tokens=cfg.micro_batch_tokens)

    @property
    def name(self) -> str:
        base = "packed" if self.packing else "grouped by length" if self.group_by_length else "sampler order"
        return base + (f", {self.micro_batch_tokens} tokens per micro-batch" if self.micro_batch_tokens else "")


SAMPLER_ORDER = BatchLayout()
"""Micro-batches in the sampler's order, as before grouping existed."""


def plan_step(
    lengths: Sequence[int] | np.ndarray,
    layout: BatchLayout,
    *,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    seq_len: int,
) -> Plan:
    """Every rank's micro-batches of one step whose rows have these token lengths.

    Sampler order: rank r takes its contiguous slice, grad_accum micro-batches of micro_batch_size
    rows (as before grouping existed). Grouped: the rows sorted by length (longest first, ties in
    sampler order) and cut into micro-batches of micro_batch_size rows, or, with a token budget,
    as many rows as fit in it once padded to the micro-batch's longest. Packed: first-fit
    decreasing into sequences of seq_len tokens, micro_batch_size sequences per micro-batch or as
    many as the budget holds. Micro-batches are dealt to the ranks in turn; grouped with a fixed
    row count the set of micro-batches is the same at every world size.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    for name, value in (("world_size", world_size), ("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if len(lengths) < world_size:
        raise ValueError(f"a step of {len(lengths)} rows cannot give each of {world_size} ranks a row")
    if np.any(lengths > seq_len):
        raise ValueError(f"a row of {int(lengths.max())} tokens exceeds the sequence length {seq_len}")
    if layout.packing:
        per_micro = max(1, layout.micro_batch_tokens // seq_len) if layout.micro_batch_tokens else micro_batch_size
        micro = _split_packs(first_fit_decreasing(lengths, seq_len), lengths, per_micro, world_size)
    elif layout.group_by_length:
        order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
        micro = (
            _budget_groups(order, lengths, layout.micro_batch_tokens, world_size)
            if layout.micro_batch_tokens
            else [[(i,) for i in order[s : s + micro_batch_size]] for s in range(0, len(order), micro_batch_size)]
        )
    else:
        if layout.micro_batch_tokens:
            raise ValueError("a token budget per micro-batch needs grouping by length or packing")
        if len(lengths) != micro_batch_size * grad_accum * world_size:
            raise ValueError(
                f"a step of {len(lengths)} rows is not micro_batch_size x grad_accum x world_size = "
                f"{micro_batch_size} x {grad_accum} x {world_size}"
            )
        per_rank = micro_batch_size * grad_accum
        return [
            [
                [(i,) for i in range(r * per_rank + m * micro_batch_size, r * per_rank + (m + 1) * micro_batch_size)]
                for m in range(grad_accum)
            ]
            for r in range(world_size)
        ]
    return deal(micro, world_size)


def deal(micro_batches: list[list[tuple[int, ...]]], world_size: int) -> Plan:
    """Micro-batch j to rank j % world_size: ranks take turns down the list (longest first), so
    each gets a share of long and short ones. The count must divide evenly."""
    if len(micro_batches) % world_size:
        raise ValueError(f"{len(micro_batches)} micro-batches do not divide among {world_size} ranks")
    return [micro_batches[r::world_size] for r in range(world_size)]


def _budget_groups(order: list[int], lengths: np.ndarray, budget: int, world_size: int) -> list[list[tuple[int, ...]]]:
    """Rows sorted longest first, cut where the next row would make the micro-batch exceed `budget`
    tokens padded to its first (longest) row; at least one row each. Then the micro-batch with the
    most rows is halved until the count divides among the ranks."""
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    _split_until_divisible(groups, world_size)
    return [[(i,) for i in g] for g in groups]


def _split_until_divisible(groups: list[list[int]], world_size: int, minimum: int = 0) -> None:
    """Halve the group with the most members (the first of them) until there are at least `minimum`
    groups and their count is a multiple of world_size. Terminates because there are at least
    world_size members: single-member groups number the members."""
    while len(groups) % world_size or len(groups) < minimum:
        k = max(range(len(groups)), key=lambda j: (len(groups[j]), -j))
        if len(groups[k]) < 2:
            raise ValueError(f"cannot split {len(groups)} groups for {world_size} ranks")
        half = (len(groups[k]) + 1) // 2
        groups[k : k + 1] = [groups[k][:half], groups[k][half:]]


def first_fit_decreasing(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Rows packed into sequences of at most seq_len tokens: longest first (ties in sampler order),
    each into the first sequence with room, a new one when none has. Deterministic."""
    packs: list[list[int]] = []
    room = np.empty(0, dtype=np.int64)
    for i in sorted(range(len(lengths)), key=lambda j: (-int(lengths[j]), j)):
        n = int(lengths[i])
        fits = np.flatnonzero(room >= n)
        if fits.size:
            packs[fits[0]].append(i)
            room[fits[0]] -= n
        else:
            packs.append([i])
            room = np.append(room, seq_len - n)
    return packs


def _split_packs(
    packs: list[list[int]], lengths: np.ndarray, per_micro: int, world_size: int
) -> list[list[tuple[int, ...]]]:
    """Packed sequences into micro-batches of at most `per_micro` sequences, the same number on
    every rank: enough micro-batches for the sequences, rounded up to a multiple of the world size;
    packs are halved (the one with most rows first) when there are fewer sequences than
    micro-batches. Consecutive sequences share a micro-batch, as evenly as possible."""
    n_micro = -(-len(packs) // per_micro)
    n_micro = -(-n_micro // world_size) * world_size
    _split_until_divisible(packs, 1, minimum=n_micro)
    base, extra = divmod(len(packs), n_micro)
    micro, start = [], 0
    for j in range(n_micro):
        size = base + (j < extra)
        micro.append([tuple(p) for p in packs[start : start + size]])
        start += size
    return micro


def padded_tokens(
    plan_for_rank: list[list[tuple[int, ...]]], lengths: np.ndarray, *, packed: bool, seq_len: int
) -> int:
    """Tokens this rank's micro-batches hold, padding included: rows padded to each micro-batch's
    longest row, or (packed) seq_len per sequence."""
    total = 0
    for micro in plan_for_rank:
        if packed:
            total += len(micro) * seq_len
        else:
            rows = [i for seq in micro for i in seq]
            total += len(rows) * int(max(lengths[i] for i in rows))
    return total
