"""Sharded training checkpoints (DCP) with atomic completion, resume and keep-last-k.

Layout: <output_dir>/checkpoints/step_000010/ holds the DCP shards of model + optimizer and
`trainer_state.json` (step, sampler, scheduler). Every rank writes into `step_000010.tmp/`; rank 0
renames it only after all ranks finished, so a directory without `.tmp` is always complete.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from wmtp.atomic import TMP_SUFFIX, atomic_write_text
from wmtp.distributed.env import barrier, broadcast_object

STEP_DIR = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.json"


class Checkpointer:
    def __init__(self, output_dir: str | Path, *, keep_last: int, is_main: bool,
                 trainable_only: bool = False) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.is_main = is_main
        # A recipe that freezes most of the model (the critic) saves only what it trains.
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir()
                 if (m := STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
        return sorted(steps)

    def latest(self) -> Path | None:
        steps = broadcast_object(self.complete_steps() if self.is_main else None)
        return self.root / f"step_{steps[-1]:06d}" if steps else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:06d}"
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        with dcp_quietly():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        barrier()
        if self.is_main:
            atomic_write_text(tmp / TRAINER_STATE, json.dumps({"step": step, **trainer_state}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer in place; return the trainer state (step, sampler, ...)."""
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        state = {"model": model_sd, "optim": optim_sd}
        with dcp_quietly():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.options)
        return json.loads((path / TRAINER_STATE).read_text())

    def _prune(self) -> None:
        for step in self.complete_steps()[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.root / f"step_{step:06d}", ignore_errors=True)


@contextlib.contextmanager
def dcp_quietly() -> Iterator[None]:
    """DCP warns on every save/load without a process group that it assumes one process: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 state dict on CPU (gathered on every rank; only rank 0 needs to write it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
