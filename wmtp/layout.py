"""The names of the files and folders a model folder and a run folder hold, defined once.

A model folder: ``params.json`` + ``model.safetensors`` (or Meta's ``consolidated.*.pth``) +
``tokenizer.model``, and a critic's ``value_head.safetensors``. A run folder (``training.output_dir``):
``config.toml``, ``metrics.jsonl``, ``checkpoints/step_NNNNNN/`` (with ``trainer_state.json``),
``final/`` and ``best/`` (model folders), ``report.png``, and the embedded MLflow store
(``mlflow.db``, artifacts in ``mlartifacts/``).
"""

from __future__ import annotations

import re
from pathlib import Path

PARAMS_FILENAME = "params.json"
SAFETENSORS_FILENAME = "model.safetensors"
VALUE_HEAD_FILENAME = "value_head.safetensors"
"""A critic run's export: just the value head, next to an unchanged base model."""
VALUE_HEAD_KEY = "value_head.weight"
"""The value head's tensor, in value_head.safetensors and in a Hugging Face export's heads file."""
TOKENIZER_FILENAME = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
"""A Hugging Face tokenizer (byte-level BPE or other), read with the `tokenizers` library."""
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
"""Where a Hugging Face tokenizer names its BOS/EOS/pad tokens (tokenizer_config.json first)."""
HF_CONFIG = "config.json"
"""A Hugging Face model folder's config."""
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
"""Which safetensors shard holds each tensor of a sharded Hugging Face checkpoint."""
GENERATION_CONFIG = "generation_config.json"
HEADS_FILENAME = "mtp_heads.safetensors"
"""In a Hugging Face export: the extra MTP heads (and the value head) that the family's CausalLM lacks."""

RUN_CONFIG = "config.toml"
"""A training run folder's resolved config: evaluation takes such a folder as model.path."""
METRICS_FILE = "metrics.jsonl"
REPORT_NAME = "report.png"
FINAL_DIR = "final"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
"""In each checkpoint folder, written last: step, sampler and scheduler state."""
STEP_DIR = re.compile(r"^step_(\d{6,})$")
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"


def step_dir_name(step: int) -> str:
    """The checkpoint folder of ``step``: step_000010."""
    return f"step_{step:06d}"


def complete_steps(run_dir: str | Path) -> list[int]:
    """Steps of a run folder's complete checkpoints (not `.tmp`, not moved aside), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(
        int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()
    )
