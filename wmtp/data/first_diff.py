"""Where a row departs from its sibling, as a token index: the per-row field "first_diff" of a batch.

A row made as one of a correct/incorrect pair (the synthetic generator's) keeps
``metadata.first_diff_char``, the first character of its output that differs from its sibling's,
and ``metadata.sibling_output``. The token-level diagnostics need the first TARGET token where the
two token sequences differ: the action where one continuation leaves the other, after a prefix
both share (so a critic's value before it is the same for both). With the sibling's text the loader
tokenises it as it does a response and compares the two, token by token. The first differing token
can start before the first differing character: sentencepiece writes "'aeiou')" as "'", "aeiou",
"')" but "'aeio')" as "'", "aeio", "')", so the sequences part at "aeiou" / "aeio" although the text
parts at "u" / "'". Without the sibling's text, only ``first_diff_char``, the token that holds that
character is taken (found by bisection on the tokenizer's own decoding of growing prefixes, so any
tokenizer that decodes a continuation works), which can be one token late in such cases. A
difference at the end of the output (the sibling goes on where this row stops) is at the EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

NO_FIRST_DIFF = -1
"""The token index of a row whose first difference is unknown (no sibling, or no such metadata)."""


class ContinuationTokenizer(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading elements `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def response_token_at_char(response_ids: Sequence[int], char: int, decode: Callable[[list[int]], str]) -> int:
    """Index i (0-based, among `response_ids`) of the first token whose decoded prefix is longer
    than `char` characters: the token that holds character `char` of the response text.
    len(response_ids) when `char` is at or past the end of the text (the EOS after the response)."""
    if char < 0:
        raise ValueError(f"char must be >= 0, got {char}")
    ids = list(response_ids)
    lo, hi = 0, len(ids)  # invariant: decode(ids[:lo]) has <= char chars; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[: mid + 1])) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


def first_diff_positions(
    rows: Sequence[Mapping[str, Any]],
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    tokenizer: ContinuationTokenizer,
) -> list[int]:
    """Per row, the sequence position j (an index into its tokens) of the first target token where it
    departs from its sibling, or NO_FIRST_DIFF. examples: the rows' (tokens, mask) as
    `wmtp.data.template.assemble` lays them out ([BOS] prompt response [EOS], mask 1 on the response
    and its EOS); the siblings' outputs are encoded in one batch, as responses are."""
    metadata = [row.get("metadata", {}) for row in rows]
    with_sibling = [i for i, meta in enumerate(metadata) if "sibling_output" in meta]
    siblings = tokenizer.encode_batch([metadata[i]["sibling_output"] for i in with_sibling]) if with_sibling else []
    sibling_ids = dict(zip(with_sibling, siblings))
    positions = []
    for i, (meta, (tokens, mask)) in enumerate(zip(metadata, examples)):
        start = list(mask).index(1)  # the first response token; the last masked token is the EOS
        response = list(tokens[start : len(mask) - 1])
        if i in sibling_ids:
            shared = common_prefix_length(response, sibling_ids[i])
            same = shared == len(response) == len(sibling_ids[i])
            positions.append(NO_FIRST_DIFF if same else start + shared)
        elif "first_diff_char" in meta:
            positions.append(start + response_token_at_char(response, int(meta["first_diff_char"]), tokenizer.decode))
        else:
            positions.append(NO_FIRST_DIFF)
    return positions
