"""Frozen reference models for Rho-1: a Hugging Face causal LM or a Meta-format MTP model (head 0).

The reference scores x_j given x_<j (r_j, SPEC's reference CE). It runs in inference mode, in bf16
on GPU, and its tokenizer must be the policy's: vocabulary size and every piece are compared.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wmtp.data.tokenizer import TOKENIZER_FILENAME, SentencePieceTokenizer
from wmtp.models.args import PARAMS_FILENAME
from wmtp.models.checkpoint import load_mtp
from wmtp.weighting.rho1 import reference_token_ce


def reference_pieces(folder: Path) -> list[str]:
    """The reference's vocabulary as pieces, from its tokenizer.model or its Hugging Face tokenizer."""
    if (folder / TOKENIZER_FILENAME).is_file():
        return SentencePieceTokenizer(folder).pieces()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.convert_ids_to_tokens(list(range(len(tok))))


def check_same_tokenizer(policy: SentencePieceTokenizer, ref_pieces: list[str], *, source: str) -> None:
    ours = policy.pieces()
    if len(ours) != len(ref_pieces):
        raise ValueError(f"reference tokenizer ({source}) has {len(ref_pieces)} pieces, the policy's "
                         f"({policy.path}) has {len(ours)}: Rho-1 needs identical tokenizers")
    for i, (a, b) in enumerate(zip(ours, ref_pieces)):
        if a != b:
            raise ValueError(f"reference tokenizer ({source}) differs from the policy's ({policy.path}) "
                             f"at id {i}: {b!r} vs {a!r}: Rho-1 needs identical tokenizers")


class ReferenceModel:
    def __init__(self, path: str | Path, *, kind: str, tokenizer: SentencePieceTokenizer,
                 device: torch.device) -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"reference.path: no folder at {folder}")
        if kind == "auto":
            kind = "mtp" if (folder / PARAMS_FILENAME).is_file() else "hf"
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if kind == "mtp":
            pieces_dir = folder if (folder / TOKENIZER_FILENAME).is_file() else folder.parent
            check_same_tokenizer(tokenizer, reference_pieces(pieces_dir), source=str(pieces_dir))
            self.model = load_mtp(folder, device=device, dtype=dtype, vocab_size=tokenizer.vocab_size)
        else:
            check_same_tokenizer(tokenizer, reference_pieces(folder), source=str(folder))
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        self.kind = kind
        self.model.eval().requires_grad_(False)

    @torch.inference_mode()
    def token_ce(self, tokens: torch.Tensor) -> torch.Tensor:
        """r [B, T]: r_j = CE of x_j given x_<j (r_0 = 0), fp32."""
        if self.kind == "mtp":
            logits = self.model.logits(tokens, n_heads=1)[:, :, 0]
        else:
            logits = self.model(input_ids=tokens).logits
        return reference_token_ce(logits, tokens)
