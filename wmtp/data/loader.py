"""One optimizer step's micro-batches for this rank: sample globally, read, tokenise, collate.

Every rank draws the same global batch of row ids from the sampler and keeps its own contiguous
slice, so the global batch (and the loss) does not depend on the world size or on gradient
accumulation; the sampler's state after a step is the whole data state of a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from wmtp.config.sections import DataConfig
from wmtp.data.collate import collate, encode_rows, mtp_targets
from wmtp.data.index import RowIndex, load_or_build_index
from wmtp.data.samplers import BalancedSampler, CorrectOnlySampler, CurriculumSampler, split_global_batch
from wmtp.data.tokenizer import SentencePieceTokenizer
from wmtp.distributed.env import barrier


def build_sampler(cfg: DataConfig, index: RowIndex, *, max_seq_len: int, total_samples: int):
    if cfg.sampler == "correct_only":
        return CorrectOnlySampler(index, seed=cfg.seed, max_seq_len=max_seq_len)
    if cfg.sampler == "balanced":
        return BalancedSampler(index, seed=cfg.seed, max_seq_len=max_seq_len)
    schedule = [(row[0], list(row[1:])) for row in cfg.curriculum_schedule]
    return CurriculumSampler(index, seed=cfg.seed, max_seq_len=max_seq_len, bin_edges=cfg.curriculum_bin_edges,
                             schedule=schedule, total_samples=total_samples)


class GlobalBatchLoader:
    def __init__(self, cfg: DataConfig, tokenizer: SentencePieceTokenizer, *, max_seq_len: int, n_future: int,
                 micro_batch_size: int, grad_accum_steps: int, rank: int, world_size: int,
                 total_steps: int) -> None:
        self.tokenizer = tokenizer
        self.n_future = n_future
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        # Rank 0 builds a missing index; the others then find it fresh and only load it.
        if rank == 0:
            self.index = load_or_build_index(cfg.train_path, tokenizer)
        barrier()
        if rank != 0:
            self.index = load_or_build_index(cfg.train_path, tokenizer)
        self.sampler = build_sampler(cfg, self.index, max_seq_len=max_seq_len,
                                     total_samples=total_steps * self.global_batch)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        ids = self.sampler.next_ids(self.global_batch)
        micro = split_global_batch(ids, rank=self.rank, world_size=self.world_size,
                                   micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum_steps)
        return [self._batch(m) for m in micro]

    def _batch(self, ids) -> dict[str, torch.Tensor]:
        rows = self.index.read_rows(ids)
        batch = collate(encode_rows(self.tokenizer, rows), pad_id=self.tokenizer.pad_id)
        batch["targets"] = mtp_targets(batch["labels"], self.n_future)
        batch["is_correct"] = torch.tensor([bool(r["is_correct"]) for r in rows])
        return batch

    def counts(self) -> dict[str, int]:
        """Rows in the file's index, rows skipped by reason, rows excluded as too long."""
        out = {"rows": len(self.index), "too_long": int(self.sampler.too_long)}
        out.update({f"skipped_{reason}": n for reason, n in self.index.skipped.items()})
        return out

    def summary(self) -> str:
        c = self.counts()
        skipped = sum(v for k, v in c.items() if k.startswith("skipped_"))
        return (f"{c['rows']} rows indexed, {skipped} bad rows skipped "
                f"({', '.join(f'{k[8:]}: {v}' for k, v in c.items() if k.startswith('skipped_')) or 'none'}), "
                f"{c['too_long']} over max_seq_len excluded; global batch {self.global_batch}")

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
