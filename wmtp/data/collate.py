"""Tokenise a micro-batch of rows, pad (or pack) it into tensors and derive the per-head MTP targets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from wmtp.constants import IGNORE_INDEX
from wmtp.data.template import assemble, format_prompt
from wmtp.data.tokenizer import Tokenizer

Example = tuple[list[int], list[int]]
"""(tokens, response mask) of one row, as `tokenize_row` returns them."""
PADDING_SEGMENT = -1
"""Segment id of the padding tokens of a packed sequence."""


def encode_rows(tokenizer: Tokenizer, rows: Sequence[Mapping[str, Any]]) -> list[Example]:
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


def mtp_targets(labels: torch.Tensor, n_future: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head targets [B, T, n]: head k at position t predicts labels[:, t+1+k] (IGNORE_INDEX past T).

    With labels from `collate` (IGNORE_INDEX on prompt and padding), a target is valid exactly when
    t+1+k < L and m_{t+1+k} = 1. segments [B, T] (packed sequences, `collate_packed`): the row each
    token belongs to; a target in another row than its position is IGNORE_INDEX, so head k never
    predicts a token of the next row.
    """
    if n_future < 1:
        raise ValueError(f"n_future must be >= 1, got {n_future}")
    batch, seq_len = labels.shape
    padded = torch.cat([labels, labels.new_full((batch, n_future), IGNORE_INDEX)], dim=1)
    # unfold(1, n, 1)[:, s, k] = padded[:, s + k]; windows starting at s = t + 1 are the targets.
    targets = padded.unfold(1, n_future, 1)[:, 1 : seq_len + 1].contiguous()
    if segments is not None:
        ahead = torch.cat([segments, segments.new_full((batch, n_future), PADDING_SEGMENT)], dim=1)
        same_row = ahead.unfold(1, n_future, 1)[:, 1 : seq_len + 1] == segments[:, :, None]
        targets = torch.where(same_row, targets, torch.full_like(targets, IGNORE_INDEX))
    return targets


def collate_packed(sequences: Sequence[Sequence[Example]], *, pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Rows laid end to end into sequences of `seq_len` tokens (right-padded).

    sequences[s] holds the examples of packed sequence s. Returns what `collate` returns, per token
    [S, seq_len] (tokens, labels, mask), plus segments [S, seq_len] (int64: the row each token belongs
    to, numbered 0.. in order through the sequences; PADDING_SEGMENT at padding) and lengths [R] (each
    row's length, in the same row order). Each row keeps BOS first and EOS last, so its prompt and
    response mask are those of `collate`.
    """
    if not sequences or not all(sequences):
        raise ValueError("collate_packed needs at least one sequence, each of at least one example")
    tokens = torch.full((len(sequences), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), seq_len), dtype=torch.bool)
    segments = torch.full((len(sequences), seq_len), PADDING_SEGMENT, dtype=torch.long)
    lengths = []
    for s, examples in enumerate(sequences):
        offset = 0
        for row_tokens, row_mask in examples:
            n = len(row_tokens)
            if len(row_mask) != n:
                raise ValueError(f"row {len(lengths)}: {n} tokens but a mask of {len(row_mask)}")
            if offset + n > seq_len:
                raise ValueError(f"sequence {s}: its rows need more than {seq_len} tokens")
            tokens[s, offset : offset + n] = torch.tensor(row_tokens, dtype=torch.long)
            mask[s, offset : offset + n] = torch.tensor(row_mask, dtype=torch.bool)
            segments[s, offset : offset + n] = len(lengths)
            lengths.append(n)
            offset += n
    labels = torch.where(mask, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return {
        "tokens": tokens,
        "labels": labels,
        "mask": mask,
        "segments": segments,
        "lengths": torch.tensor(lengths, dtype=torch.long),
    }


def collate_plan(
    examples: Mapping[int, Example],
    micro_batches: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    n_future: int,
    packed: bool,
    seq_len: int,
) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of a plan (`wmtp.data.packing`: micro_batches[m] lists sequences of row
    keys into `examples`), with their MTP targets. packed: one row of seq_len tokens per sequence
    (`collate_packed`); otherwise each row padded on its own (`collate`), in the plan's order."""
    out = []
    for micro in micro_batches:
        if packed:
            batch = collate_packed([[examples[i] for i in seq] for seq in micro], pad_id=pad_id, seq_len=seq_len)
            batch["targets"] = mtp_targets(batch["labels"], n_future, batch["segments"])
        else:
            batch = collate([examples[i] for seq in micro for i in seq], pad_id=pad_id)
            batch["targets"] = mtp_targets(batch["labels"], n_future)
        out.append(batch)
    return out
