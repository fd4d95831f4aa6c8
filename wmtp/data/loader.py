"""One optimizer step's micro-batches for this rank: sample globally, arrange, read, tokenise, collate.

Every rank draws the same global batch of row ids from the sampler and takes its own micro-batches
of it (`wmtp.data.packing`: in the sampler's order, grouped by length or packed, the same plan on
every rank), so the global batch (and the loss) does not depend on the world size, on gradient
accumulation or on the arrangement; the sampler's state after a step is the whole data state of a
checkpoint.
Micro-batches come out on the training device: everything a recipe computes from them (counts
that are all-reduced included) lives there too, as NCCL needs.

Besides the collated tensors, a micro-batch carries per-row fields [B], explicit rather than implied
by the padding: "is_correct" (the label), "sample" (the row's draw number in the sampler's global
stream; a held-out row's index position), which seeds anything random that is per row (the
verifiable and Rho-1 controls), and "first_diff" (the sequence position of the first target token
where the row departs from its sibling, -1 when unknown; `wmtp.data.first_diff`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from wmtp.config.sections import DataConfig
from wmtp.data.collate import collate_plan, encode_rows
from wmtp.data.first_diff import NO_FIRST_DIFF, first_diff_positions
from wmtp.data.index import RowIndex, load_or_build_index
from wmtp.data.packing import SAMPLER_ORDER, BatchLayout, Plan, plan_step
from wmtp.data.samplers import (
    BalancedSampler,
    CorrectOnlySampler,
    CurriculumSampler,
    fits_max_seq_len,
)
from wmtp.data.tokenizer import Tokenizer
from wmtp.distributed.env import barrier


def build_sampler(cfg: DataConfig, index: RowIndex, *, max_seq_len: int, total_samples: int):
    if cfg.sampler == "correct_only":
        return CorrectOnlySampler(index, seed=cfg.seed, max_seq_len=max_seq_len)
    if cfg.sampler == "balanced":
        return BalancedSampler(index, seed=cfg.seed, max_seq_len=max_seq_len)
    schedule = [(row[0], list(row[1:])) for row in cfg.curriculum_schedule]
    return CurriculumSampler(
        index,
        seed=cfg.seed,
        max_seq_len=max_seq_len,
        bin_edges=cfg.curriculum_bin_edges,
        schedule=schedule,
        total_samples=total_samples,
    )


def load_index(path: str, tokenizer: Tokenizer, *, rank: int) -> RowIndex:
    """The sidecar index of `path`: rank 0 builds a missing one, the others then find it fresh."""
    if rank == 0:
        index = load_or_build_index(path, tokenizer)
    barrier()
    return index if rank == 0 else load_or_build_index(path, tokenizer)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch on `device` (from pinned memory on CUDA, so the copies overlap)."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


def read_planned(
    index: RowIndex,
    ids: np.ndarray,
    plan: list[list[tuple[int, ...]]],
    tokenizer: Tokenizer,
    *,
    n_future: int,
    device: torch.device,
    packed: bool,
    seq_len: int,
    keep: np.ndarray | None = None,
    samples: np.ndarray | None = None,
) -> list[dict[str, torch.Tensor]]:
    """One rank's micro-batches of a step: plan[m] lists the sequences of micro-batch m as positions
    in `ids` (see `wmtp.data.packing`). Only these rows are read, in one batch.

    packed: each sequence becomes one row of seq_len tokens (`collate_packed`, with "segments");
    otherwise every row is its own padded row, in the plan's order. Per-row fields (is_correct,
    lengths, keep, sample: samples[i], default ids[i]; first_diff, in the row's own positions)
    follow that row order. keep[i] = False (validation's fill-up rows) empties row i's response
    mask and unsets its first_diff, so that it has no target and counts nowhere.
    """
    positions = sorted({i for micro in plan for seq in micro for i in seq})
    rows = dict(zip(positions, index.read_rows(ids[positions])))
    examples = dict(zip(positions, encode_rows(tokenizer, [rows[i] for i in positions])))
    first_diff = dict(
        zip(positions, first_diff_positions([rows[i] for i in positions], [examples[i] for i in positions], tokenizer))
    )
    for i in positions:
        tokens, mask = examples[i]
        stored = int(index.rows["token_length"][ids[i]])
        if len(tokens) != stored:
            raise ValueError(
                f"{index.path}: row {int(ids[i])} has {len(tokens)} tokens but its index says {stored}: "
                "the index is stale (delete it to rebuild)"
            )
        if keep is not None and not keep[i]:
            examples[i] = (tokens, [0] * len(mask))
            first_diff[i] = NO_FIRST_DIFF
    batches = collate_plan(examples, plan, pad_id=tokenizer.pad_id, n_future=n_future, packed=packed, seq_len=seq_len)
    for batch, micro in zip(batches, plan):
        order = [i for seq in micro for i in seq]
        batch["is_correct"] = torch.tensor([bool(rows[i]["is_correct"]) for i in order])
        batch["sample"] = torch.as_tensor(np.asarray(ids if samples is None else samples)[order], dtype=torch.long)
        batch["first_diff"] = torch.tensor([first_diff[i] for i in order], dtype=torch.long)
        if keep is not None:
            batch["keep"] = torch.from_numpy(keep[order])
    return [to_device(batch, device) for batch in batches]


def eval_micro_batches(
    index: RowIndex,
    tokenizer: Tokenizer,
    *,
    max_seq_len: int,
    n_future: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    max_rows: int = 0,
    layout: BatchLayout = SAMPLER_ORDER,
) -> Iterator[dict[str, torch.Tensor]]:
    """Every row of `index` that fits `max_seq_len` (the first `max_rows` of them, if set), once
    across all ranks, in file order, micro_batch_size x world_size rows at a time, arranged by
    `layout` as training arranges a step (grad_accum 1: in the sampler's order, one micro-batch per rank).

    Each rank yields the same number of micro-batches (sharded models run collectives in every
    forward): the last global batch is filled up with repeats of the first row, marked
    batch["keep"] = False, whose response mask is emptied, targets ignored and first_diff unset so
    that they count nowhere.
    """
    ids = np.flatnonzero(fits_max_seq_len(index, max_seq_len))
    if max_rows:
        ids = ids[:max_rows]
    if ids.size == 0:
        return
    per_step = micro_batch_size * world_size
    n_fill = -ids.size % per_step
    padded = np.concatenate([ids, np.full(n_fill, ids[0])])
    keep = np.arange(padded.size) < ids.size
    for start in range(0, padded.size, per_step):
        step_ids = padded[start : start + per_step]
        plan = plan_step(
            index.rows["token_length"][step_ids],
            layout,
            world_size=world_size,
            micro_batch_size=micro_batch_size,
            grad_accum=1,
            seq_len=max_seq_len,
        )
        yield from read_planned(
            index,
            step_ids,
            plan[rank],
            tokenizer,
            n_future=n_future,
            device=device,
            packed=layout.packing,
            seq_len=max_seq_len,
            keep=keep[start : start + per_step],
        )


class GlobalBatchLoader:
    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int,
        n_future: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int,
        world_size: int,
        total_steps: int,
        device: torch.device,
    ) -> None:
        self.tokenizer = tokenizer
        self.device = device
        self.n_future = n_future
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.max_seq_len = max_seq_len
        self.layout = BatchLayout.from_config(cfg)
        self.index = load_index(cfg.train_path, tokenizer, rank=rank)
        self.sampler = build_sampler(
            cfg, self.index, max_seq_len=max_seq_len, total_samples=total_steps * self.global_batch
        )

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next step (the sampler's next global batch, arranged)."""
        start = self.sampler.position
        ids = self.sampler.next_ids(self.global_batch)
        return self.micro_batches(ids, samples=start + np.arange(ids.size, dtype=np.int64))

    def plan(self, ids: np.ndarray, layout: BatchLayout | None = None) -> Plan:
        """Every rank's micro-batches of the step whose rows are `ids` (see `wmtp.data.packing`)."""
        return plan_step(
            self.index.rows["token_length"][ids],
            self.layout if layout is None else layout,
            world_size=self.world_size,
            micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum_steps,
            seq_len=self.max_seq_len,
        )

    def micro_batches(
        self,
        ids: np.ndarray,
        layout: BatchLayout | None = None,
        *,
        packed: bool | None = None,
        samples: np.ndarray | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step whose rows are `ids`, arranged by `layout` (default:
        the configured one). packed=False reads a packed plan's micro-batches as padded rows (the
        same rows per micro-batch, each its own row): what packing is checked against. samples: the
        rows' draw numbers in the sampler's stream (the per-row field "sample")."""
        layout = self.layout if layout is None else layout
        return read_planned(
            self.index,
            ids,
            self.plan(ids, layout)[self.rank],
            self.tokenizer,
            n_future=self.n_future,
            device=self.device,
            packed=layout.packing if packed is None else packed,
            seq_len=self.max_seq_len,
            samples=samples,
        )

    def counts(self) -> dict[str, int]:
        """Rows in the file's index, rows skipped by reason, rows excluded as too long."""
        out = {"rows": len(self.index), "too_long": int(self.sampler.too_long)}
        out.update({f"skipped_{reason}": n for reason, n in self.index.skipped.items()})
        return out

    def summary(self) -> str:
        c = self.counts()
        skipped = sum(v for k, v in c.items() if k.startswith("skipped_"))
        return (
            f"{c['rows']} rows indexed, {skipped} bad rows skipped "
            f"({', '.join(f'{k[8:]}: {v}' for k, v in c.items() if k.startswith('skipped_')) or 'none'}), "
            f"{c['too_long']} over max_seq_len excluded; global batch {self.global_batch} rows, "
            f"micro-batches {self.layout.name}"
        )

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
