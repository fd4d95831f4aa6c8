"""Alpaca prompt template and the tokenisation of one processed row into tokens + response mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wmtp.data.tokenizer import Tokenizer

PROMPT_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt up to and including "### Response:\\n"."""
    prompt = f"{PROMPT_HEADER}### Instruction:\n{instruction}\n\n"
    if input_text:
        prompt += f"### Input:\n{input_text}\n\n"
    return prompt + "### Response:\n"


def assemble(
    prompt_ids: list[int], response_ids: list[int], *, bos_id: int, eos_id: int
) -> tuple[list[int], list[int]]:
    """x = [BOS] + prompt + response + [EOS]; m_j = 1 on the response and its EOS, 0 elsewhere."""
    tokens = [bos_id, *prompt_ids, *response_ids, eos_id]
    mask = [0] * (1 + len(prompt_ids)) + [1] * (len(response_ids) + 1)
    return tokens, mask


def tokenize_row(tokenizer: Tokenizer, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """Tokens and response mask of a processed row ({instruction, input, output, ...}).

    The prompt begins the sequence (encoded with the model's dummy prefix, if any); the response
    continues it (without one), so it decodes back to exactly row["output"].
    """
    prompt_ids = tokenizer.encode(format_prompt(row["instruction"], row.get("input") or ""), prefix=True)
    response_ids = tokenizer.encode(row["output"])
    return assemble(prompt_ids, response_ids, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
