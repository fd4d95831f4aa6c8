"""One optimizer step's micro-batches for this rank: sample globally, read, tokenise, collate.

Every rank draws the same global batch of row ids from the sampler and keeps its own contiguous
slice, so the global batch (and the loss) does not depend on the world size or on gradient
accumulation; the sampler's state after a step is the whole data state of a checkpoint.
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
from wmtp.constants import IGNORE_INDEX
from wmtp.data.collate import collate, encode_rows, mtp_targets
from wmtp.data.first_diff import NO_FIRST_DIFF, first_diff_positions
from wmtp.data.index import RowIndex, load_or_build_index
from wmtp.data.samplers import (
    BalancedSampler,
    CorrectOnlySampler,
    CurriculumSampler,
    fits_max_seq_len,
    split_global_batch,
)
from wmtp.data.tokenizer import SentencePieceTokenizer
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


def load_index(path: str, tokenizer: SentencePieceTokenizer, *, rank: int) -> RowIndex:
    """The sidecar index of `path`: rank 0 builds a missing one, the others then find it fresh."""
    if rank == 0:
        index = load_or_build_index(path, tokenizer)
    barrier()
    return index if rank == 0 else load_or_build_index(path, tokenizer)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch on `device` (from pinned memory on CUDA, so the copies overlap)."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


def read_batch(
    index: RowIndex,
    ids,
    tokenizer: SentencePieceTokenizer,
    n_future: int,
    device: torch.device,
    *,
    samples=None,
) -> dict[str, torch.Tensor]:
    """Rows `ids` of `index`, tokenised and collated, with MTP targets and the per-row fields
    (is_correct, sample: `samples` or else the ids, first_diff), on `device`."""
    rows = index.read_rows(ids)
    examples = encode_rows(tokenizer, rows)
    batch = collate(examples, pad_id=tokenizer.pad_id)
    batch["targets"] = mtp_targets(batch["labels"], n_future)
    batch["is_correct"] = torch.tensor([bool(r["is_correct"]) for r in rows])
    batch["sample"] = torch.as_tensor(np.asarray(ids if samples is None else samples), dtype=torch.long)
    batch["first_diff"] = torch.tensor(first_diff_positions(rows, examples, tokenizer), dtype=torch.long)
    return to_device(batch, device)


def eval_micro_batches(
    index: RowIndex,
    tokenizer: SentencePieceTokenizer,
    *,
    max_seq_len: int,
    n_future: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    max_rows: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Every row of `index` that fits `max_seq_len` (the first `max_rows` of them, if set), once
    across all ranks, in file order.

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
        mine = slice(start + rank * micro_batch_size, start + (rank + 1) * micro_batch_size)
        batch = read_batch(index, padded[mine], tokenizer, n_future, device)
        batch["keep"] = torch.from_numpy(keep[mine]).to(device)
        batch["mask"] &= batch["keep"][:, None]
        batch["targets"][~batch["keep"]] = IGNORE_INDEX
        batch["first_diff"][~batch["keep"]] = NO_FIRST_DIFF
        yield batch


class GlobalBatchLoader:
    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: SentencePieceTokenizer,
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
        self.index = load_index(cfg.train_path, tokenizer, rank=rank)
        self.sampler = build_sampler(
            cfg, self.index, max_seq_len=max_seq_len, total_samples=total_steps * self.global_batch
        )

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        start = self.sampler.position
        ids = self.sampler.next_ids(self.global_batch)
        split = dict(
            rank=self.rank,
            world_size=self.world_size,
            micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum_steps,
        )
        samples = split_global_batch(start + np.arange(self.global_batch, dtype=np.int64), **split)
        return [self._batch(m, s) for m, s in zip(split_global_batch(ids, **split), samples)]

    def _batch(self, ids, samples) -> dict[str, torch.Tensor]:
        return read_batch(self.index, ids, self.tokenizer, self.n_future, self.device, samples=samples)

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
            f"{c['too_long']} over max_seq_len excluded; global batch {self.global_batch}"
        )

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
