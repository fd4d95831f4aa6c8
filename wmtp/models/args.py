"""Model hyper-parameters as stored in Meta's `params.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from wmtp.layout import PARAMS_FILENAME

ROPE_SCALING_TYPES = ("llama3", "linear")
"""RoPE frequency scalings the model computes (Llama 3.1's, and linear position interpolation)."""


@dataclasses.dataclass
class ModelArgs:
    """The keys of Meta's MTP `params.json` (7B_1T_4: dim 4096, 32 layers, 4 future tokens)."""

    dim: int = 4096
    """Model width."""
    n_layers: int = 32
    """Total transformer blocks: trunk blocks plus one block per prediction head."""
    n_heads: int = 32
    """Attention heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means n_heads."""
    vocab_size: int = -1
    """Vocabulary size; -1 means take it from the tokenizer."""
    multiple_of: int = 256
    """FFN width is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Optional multiplier applied to the FFN width before rounding."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    n_future_tokens: int = 1
    """Prediction heads: head k predicts the token k+1 positions ahead."""
    max_seq_len: int = 4096
    """Longest sequence the RoPE table covers (not in Meta's file; an inference/training setting)."""
    # Models imported from Hugging Face (wmtp.models.hf) also have these; Meta's files never do, and
    # at their defaults they stay out of params.json.
    ffn_dim: int | None = None
    """FFN width given directly (Hugging Face's intermediate_size); None: Meta's rule above."""
    qkv_bias: bool = False
    """The q/k/v projections have biases (Qwen2)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama 3.1 / 3.2) or {"rope_type": "linear", "factor"}; None:
    plain RoPE."""
    hf_config: dict[str, Any] | None = None
    """The Hugging Face config.json the model was imported from: export writes it back (with the
    sizes of trunk + head 0), and its embeddings may have more rows than the tokenizer has pieces."""

    def __post_init__(self) -> None:
        if self.n_future_tokens < 1:
            raise ValueError(f"params: n_future_tokens must be >= 1, got {self.n_future_tokens}")
        if self.n_layers <= self.n_future_tokens:
            raise ValueError(
                f"params: n_layers ({self.n_layers}) must be greater than n_future_tokens "
                f"({self.n_future_tokens}): the shared trunk would be empty"
            )
        if self.dim % self.n_heads:
            raise ValueError(f"params: dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"params: n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.kv_heads})")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"params: rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported "
                f"(supported: {', '.join(ROPE_SCALING_TYPES)})"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """ffn_dim when given, else Meta's rule: int(2 * 4 * dim / 3), times the multiplier, rounded up
        to multiple_of."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def n_trunk_layers(self) -> int:
        return self.n_layers - self.n_future_tokens

    @classmethod
    def from_dict(cls, params: dict[str, Any], *, source: str = PARAMS_FILENAME) -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}")
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        return cls(**params)

    @classmethod
    def load(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if path.is_dir():
            path = path / PARAMS_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"model: no {PARAMS_FILENAME} at {path}")
        try:
            params = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(params, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The params.json form (Meta's keys; max_seq_len is kept out as Meta's files do, and so is
        qkv_bias when false)."""
        out = dataclasses.asdict(self)
        out.pop("max_seq_len")
        if not self.qkv_bias:
            out.pop("qkv_bias")
        return {k: v for k, v in out.items() if v is not None}
