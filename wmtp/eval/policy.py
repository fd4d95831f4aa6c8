"""The model an evaluation scores: a Meta folder, a Hugging Face folder (with `model.n_future_tokens`
heads), a `final/` export, or a training run folder.

A run folder (it holds the training `config.toml`) is read at its end state: `final/` when the run
finished, else the newest complete checkpoint in `checkpoints/`, whose model tensors (DCP) go onto
the base model the run started from. A critic trains only its value head: its policy is the base
model (its checkpoints hold just the value head; its final/ export is value_head.safetensors).
Every rank holds the whole model (inference is replicated); rank 0 reads the weights and
broadcasts them, as training does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tomllib
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from wmtp.data.tokenizer import TOKENIZER_FILES, Tokenizer, find_tokenizer, load_tokenizer
from wmtp.distributed.env import DistInfo
from wmtp.distributed.load import dcp_quietly, load_weights
from wmtp.layout import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    PARAMS_FILENAME,
    RUN_CONFIG,
    VALUE_HEAD_FILENAME,
    complete_steps,
    step_dir_name,
)
from wmtp.models import MTPTransformer
from wmtp.models.checkpoint import build_mtp, read_checkpoint
from wmtp.models.hf import NewHeads, is_hf_folder

DCP_MODEL_KEY = "model"
"""The checkpointer saves {"model": ..., "optim": ...}; evaluation reads the model part."""


@dataclasses.dataclass(frozen=True)
class PolicySource:
    """Where the weights come from and which tokenizer goes with them."""

    weights: Path
    """Folder with params.json and consolidated.*.pth or model.safetensors, or a Hugging Face folder."""
    tokenizer: Path
    checkpoint: Path | None = None
    """A training checkpoint (DCP) whose model tensors replace the weights' ones."""
    heads: NewHeads | None = None
    """The heads a Hugging Face folder gets (a run's model.n_future_tokens / new_heads)."""

    def describe(self) -> str:
        return str(self.checkpoint or self.weights)


def resolve_policy(path: str | Path, tokenizer: str | Path = "", heads: NewHeads | None = None) -> PolicySource:
    """What `model.path` names: a model folder, or a training run folder (its end state)."""
    folder = Path(path)
    if (folder / PARAMS_FILENAME).is_file() or is_hf_folder(folder):
        found = Path(tokenizer) if tokenizer else find_tokenizer(folder)
        if found is None:
            raise FileNotFoundError(
                f"model.path {folder}: no {' or '.join(TOKENIZER_FILES)} in it or its parent; set tokenizer.path"
            )
        return PolicySource(weights=folder, tokenizer=found, heads=heads)
    config = folder / RUN_CONFIG
    if not config.is_file():
        raise FileNotFoundError(
            f"model.path {folder}: neither a model folder ({PARAMS_FILENAME}) nor a training run folder ({RUN_CONFIG})"
        )
    if (folder / FINAL_DIR / PARAMS_FILENAME).is_file():
        return resolve_policy(folder / FINAL_DIR, tokenizer)
    run = tomllib.loads(config.read_text())
    model = run["model"]
    # The run's own heads: the same new heads its setup made (the checkpoint overwrites them anyway).
    run_heads = NewHeads(
        model.get("n_future_tokens", 0), model.get("new_heads", "copy_last"), run.get("training", {}).get("seed", 0)
    )
    base = PolicySource(
        weights=Path(model["path"]), tokenizer=Path(tokenizer or run["tokenizer"]["path"]), heads=run_heads
    )
    steps = complete_steps(folder)
    if steps:
        return dataclasses.replace(base, checkpoint=folder / CHECKPOINTS_DIR / step_dir_name(steps[-1]))
    if (folder / FINAL_DIR / VALUE_HEAD_FILENAME).is_file():
        return base
    raise FileNotFoundError(f"model.path {folder}: a run folder with neither {FINAL_DIR}/ nor a complete checkpoint")


def load_policy(
    source: PolicySource, *, info: DistInfo, dtype: torch.dtype, max_seq_len: int
) -> tuple[MTPTransformer, Tokenizer]:
    """The policy on info.device in `dtype`, in eval mode, with its tokenizer."""
    tokenizer = load_tokenizer(source.tokenizer)
    model = build_mtp(source.weights, vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len, heads=source.heads)
    load_weights(model, lambda: read_checkpoint(source.weights, model, heads=source.heads), info=info)
    if source.checkpoint is not None:
        state = {DCP_MODEL_KEY: model.state_dict()}
        # Partial: the optimizer's tensors are not read, nor model tensors the checkpoint lacks.
        with dcp_quietly():
            dcp.load(state, checkpoint_id=str(source.checkpoint), planner=DefaultLoadPlanner(allow_partial_load=True))
    return model.to(dtype).eval().requires_grad_(False), tokenizer
