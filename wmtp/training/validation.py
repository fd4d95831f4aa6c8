"""Validation during training ([validation]) and the best export (checkpoint.keep_best).

Every recipe scores the held-out rows the same way: each rank takes its share of the rows
(`eval_micro_batches`: every row once across ranks, fill-up rows counting nowhere), sums per head
on the training device, and the sums are all-reduced; each recipe adds its own metrics (the
critic's value statistics, the verifiable recipe's weights and value loss, Rho-1's selection).
Metric names start with "val/".
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from wmtp.atomic import atomic_write_text
from wmtp.config.sections import ValidationConfig
from wmtp.constants import IGNORE_INDEX
from wmtp.data.index import RowIndex
from wmtp.data.loader import eval_micro_batches, load_index
from wmtp.data.packing import SAMPLER_ORDER, BatchLayout
from wmtp.data.samplers import fits_max_seq_len
from wmtp.data.tokenizer import Tokenizer
from wmtp.distributed.env import DistInfo, all_reduce_sum
from wmtp.kernels.backend import accumulation_dtype
from wmtp.layout import BEST_DIR

PREFIX = "val/"
BEST_RECORD = "best.json"
"""In best/: the step and the metric value of the export."""
HIGHER_IS_BETTER = ("auroc",)
"""keep_best metrics whose name ends in one of these improve upwards; every other one (losses) downwards."""


class Validation:
    """The held-out rows of one run and when they are scored."""

    def __init__(
        self,
        cfg: ValidationConfig,
        tokenizer: Tokenizer,
        *,
        info: DistInfo,
        max_seq_len: int,
        n_future: int,
        micro_batch_size: int,
        max_steps: int,
        layout: BatchLayout = SAMPLER_ORDER,
    ) -> None:
        """layout: how held-out rows become micro-batches, as training arranges its steps (the
        loader's `layout`): micro_batch_size x world size rows at a time."""
        self.cfg, self.tokenizer, self.info, self.layout = cfg, tokenizer, info, layout
        self.max_seq_len, self.n_future, self.micro_batch_size = max_seq_len, n_future, micro_batch_size
        self.max_steps = max_steps
        self.index: RowIndex | None = None
        if cfg.path:
            self.index = load_index(cfg.path, tokenizer, rank=info.rank)
            if not fits_max_seq_len(self.index, max_seq_len).any():
                raise ValueError(f"validation.path {cfg.path}: no row fits model.max_seq_len {max_seq_len}")

    def due(self, step: int) -> bool:
        """After the last step, and every validation.every steps."""
        every = self.cfg.every
        return self.index is not None and (step == self.max_steps or (every > 0 and step % every == 0))

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of the held-out micro-batches (fill-up rows have no targets and no mask)."""
        return eval_micro_batches(
            self.index,
            self.tokenizer,
            max_seq_len=self.max_seq_len,
            n_future=self.n_future,
            micro_batch_size=self.micro_batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            device=self.info.device,
            max_rows=self.cfg.max_rows,
            layout=self.layout,
        )


class HeadSums:
    """Per-head sums over the held-out rows (this rank's), all-reduced when read."""

    def __init__(self, names: tuple[str, ...], n_heads: int, device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(len(names), n_heads, dtype=accumulation_dtype(device), device=device)

    def add(self, **per_head: torch.Tensor) -> None:
        """Each named value as [B, T, n] (summed over rows and positions) or [n]."""
        for i, name in enumerate(self.names):
            value = per_head[name]
            self.sums[i] += (value.sum(dim=(0, 1)) if value.dim() == 3 else value).to(self.sums.dtype)

    def reduce(self) -> dict[str, torch.Tensor]:
        all_reduce_sum(self.sums)
        return dict(zip(self.names, self.sums))


def valid_pairs(targets: torch.Tensor) -> torch.Tensor:
    """1.0 on the (position, head) pairs that have a target."""
    return (targets != IGNORE_INDEX).float()


def per_head_means(total: torch.Tensor, count: torch.Tensor, name: str) -> dict[str, float]:
    """{val/<name>/head_k: total_k / count_k} and {val/<name>: their mean over heads}."""
    means = (total / count.clamp(min=1)).tolist()
    out = {f"{PREFIX}{name}/head_{k}": m for k, m in enumerate(means)}
    out[f"{PREFIX}{name}"] = sum(means) / len(means)
    return out


class BestExport:
    """Tracks checkpoint.keep_best's metric and says when a validation improved on the best so far.

    The best value survives a resume: it is read back from best/best.json.
    """

    def __init__(self, metric: str, output_dir: Path) -> None:
        self.metric = metric
        self.folder = output_dir / BEST_DIR
        self.higher = metric.endswith(HIGHER_IS_BETTER)
        record = self.folder / BEST_RECORD
        self.best = json.loads(record.read_text())["value"] if metric and record.is_file() else None

    def improved(self, metrics: dict[str, float]) -> bool:
        if not self.metric:
            return False
        if self.metric not in metrics:
            raise KeyError(
                f"checkpoint.keep_best: validation logs no {self.metric!r}; it logs "
                f"{sorted(k for k in metrics if k.startswith(PREFIX))}"
            )
        value = metrics[self.metric]
        if not math.isfinite(value):
            return False
        better = self.best is None or (value > self.best if self.higher else value < self.best)
        if better:
            self.best = value
        return better

    def record(self, step: int) -> None:
        """Note the step and value in the (just written) best/ export."""
        atomic_write_text(
            self.folder / BEST_RECORD,
            json.dumps({"metric": self.metric, "value": self.best, "step": step}, indent=2) + "\n",
        )
