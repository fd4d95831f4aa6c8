"""Tokenise a micro-batch of rows, pad it into tensors and derive the per-head MTP targets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from wmtp.constants import IGNORE_INDEX
from wmtp.data.template import assemble, format_prompt
from wmtp.data.tokenizer import SentencePieceTokenizer

Example = tuple[list[int], list[int]]
"""(tokens, response mask) of one row, as `tokenize_row` returns them."""


def encode_rows(tokenizer: SentencePieceTokenizer, rows: Sequence[Mapping[str, Any]]) -> list[Example]:
    """`tokenize_row` for many rows with two batched encode calls (prompts, then responses)."""
    prompt_ids = tokenizer.encode_batch(
        [format_prompt(r["instruction"], r.get("input") or "") for r in rows], prefix=True
    )
    response_ids = tokenizer.encode_batch([r["output"] for r in rows])
    return [assemble(p, r, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id) for p, r in zip(prompt_ids, response_ids)]


def collate(examples: Sequence[Example], *, pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Returns tokens [B, T] (pad_id at padding), labels [B, T] (the token where the response mask is
    1, IGNORE_INDEX elsewhere), mask [B, T] bool (response mask) and lengths [B] (unpadded lengths).
    T is the longest example rounded up to a multiple of `pad_to_multiple`.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    lengths = [len(tokens) for tokens, _ in examples]
    width = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, (row_tokens, row_mask) in enumerate(examples):
        if len(row_mask) != len(row_tokens):
            raise ValueError(f"example {i}: {len(row_tokens)} tokens but a mask of {len(row_mask)}")
        tokens[i, : len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
        mask[i, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
    labels = torch.where(mask, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return {"tokens": tokens, "labels": labels, "mask": mask, "lengths": torch.tensor(lengths, dtype=torch.long)}


def mtp_targets(labels: torch.Tensor, n_future: int) -> torch.Tensor:
    """Per-head targets [B, T, n]: head k at position t predicts labels[:, t+1+k] (IGNORE_INDEX past T).

    With labels from `collate` (IGNORE_INDEX on prompt and padding), a target is valid exactly when
    t+1+k < L and m_{t+1+k} = 1.
    """
    if n_future < 1:
        raise ValueError(f"n_future must be >= 1, got {n_future}")
    batch, seq_len = labels.shape
    padded = torch.cat([labels, labels.new_full((batch, n_future), IGNORE_INDEX)], dim=1)
    # unfold(1, n, 1)[:, s, k] = padded[:, s + k]; windows starting at s = t + 1 are the targets.
    return padded.unfold(1, n_future, 1)[:, 1 : seq_len + 1].contiguous()
