"""Frozen reference models for Rho-1: a Hugging Face causal LM or a Meta-format MTP model (head 0).

The reference scores x_j given x_<j (r_j, SPEC's reference CE). It runs in inference mode, in bf16
on GPU, and its tokenizer must be the policy's: vocabulary size and every piece are compared.
Like the policy it is built on the meta device, sharded by the caller's `shard` function (the
recipe passes FSDP2's; model code never imports parallelism code) and filled by `fill` with the
weights that rank 0 reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from wmtp.data.tokenizer import Tokenizer, find_tokenizer, load_tokenizer, tokenizer_in
from wmtp.layout import PARAMS_FILENAME
from wmtp.models.checkpoint import build_mtp, read_checkpoint
from wmtp.models.hf import NewHeads, is_hf_folder
from wmtp.packed_rows import segment_positions, segment_starts
from wmtp.weighting.rho1 import reference_token_ce

Shard = Callable[[nn.Module, list[nn.Module], tuple[str, ...]], None]
"""shard(model, blocks, methods): parallelise a meta-device model whose repeated blocks are
`blocks`; `methods` are entry points other than forward (they must gather parameters too)."""
Fill = Callable[..., None]
"""fill(model, read, buffers_from=None): materialise the model and load rank 0's `read()`."""


def reference_pieces(folder: Path) -> list[str]:
    """The reference's vocabulary as pieces: from its tokenizer.model or tokenizer.json, else from
    whatever tokenizer transformers finds in the folder."""
    if tokenizer_in(folder) is not None:
        return load_tokenizer(folder).pieces()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.convert_ids_to_tokens(list(range(len(tok))))


def check_same_tokenizer(policy: Tokenizer, ref_pieces: list[str], *, source: str) -> None:
    ours = policy.pieces()
    if len(ours) != len(ref_pieces):
        raise ValueError(
            f"reference tokenizer ({source}) has {len(ref_pieces)} pieces, the policy's "
            f"({policy.path}) has {len(ours)}: Rho-1 needs identical tokenizers"
        )
    for i, (a, b) in enumerate(zip(ours, ref_pieces)):
        if a != b:
            raise ValueError(
                f"reference tokenizer ({source}) differs from the policy's ({policy.path}) "
                f"at id {i}: {b!r} vs {a!r}: Rho-1 needs identical tokenizers"
            )


def _hf_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers` for Llama-like ones)."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


class ReferenceModel:
    def __init__(
        self,
        path: str | Path,
        *,
        kind: str,
        tokenizer: Tokenizer,
        device: torch.device,
        shard: Shard | None,
        fill: Fill,
    ) -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"reference.path: no folder at {folder}")
        if kind == "auto":
            kind = "mtp" if (folder / PARAMS_FILENAME).is_file() else "hf"
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if kind == "mtp":
            found = find_tokenizer(folder)
            pieces_dir = folder.parent if found is None else found.parent
            check_same_tokenizer(tokenizer, reference_pieces(pieces_dir), source=str(pieces_dir))
            one_head = NewHeads(1) if is_hf_folder(folder) else None  # a Hugging Face folder: head 0 only
            model = build_mtp(folder, vocab_size=tokenizer.vocab_size, heads=one_head).to(dtype).requires_grad_(False)
            blocks, methods = [*model.layers, *model.extra_heads], ("logits",)
            read, buffers_from = (lambda: read_checkpoint(folder, model, heads=one_head)), None
        else:
            check_same_tokenizer(tokenizer, reference_pieces(folder), source=str(folder))
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
            model.requires_grad_(False)
            blocks, methods = _hf_blocks(model), ()
            loaded: list[nn.Module] = []

            def buffers_from() -> nn.Module:
                # Rank 0 only: the one full read of the reference; its non-persistent buffers
                # (RoPE frequencies) are broadcast too.
                if not loaded:
                    loaded.append(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))
                return loaded[0]

            def read() -> dict[str, torch.Tensor]:
                return buffers_from().state_dict()

        if shard is not None:
            shard(model, blocks, methods)
        fill(model, read, buffers_from=buffers_from)
        self.kind = kind
        self.model = model.eval()

    @torch.no_grad()
    def token_ce(self, tokens: torch.Tensor, *, segments: torch.Tensor | None = None) -> torch.Tensor:
        """r [B, T]: r_j = CE of x_j given x_<j (r_0 = 0), fp32.

        segments [B, T] (packed rows, see `MTPTransformer.forward`): each row is scored on its own,
        as its own unpacked forward scores it: the MTP reference with the document mask, a Hugging
        Face one with position ids that restart at each row (transformers then masks attention to
        each row), and r = 0 at every row's first token and at padding.
        """
        if segments is None:
            if self.kind == "mtp":
                logits = self.model.logits(tokens, n_heads=1)[:, :, 0]
            else:
                logits = self.model(input_ids=tokens, use_cache=False).logits
            return reference_token_ce(logits, tokens)
        if self.kind == "mtp":
            logits = self.model.logits(tokens, n_heads=1, segments=segments)[:, :, 0]
        else:
            check_packed_rows_supported()
            logits = self.model(input_ids=tokens, position_ids=segment_positions(segments), use_cache=False).logits
        return reference_token_ce(logits, tokens).masked_fill(segment_starts(segments) | (segments < 0), 0.0)


def check_packed_rows_supported() -> None:
    """Packed rows reach a Hugging Face model as position ids that restart at each row; transformers
    turns them into a block-diagonal mask since version 4.56 (masking_utils)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        import transformers

        raise RuntimeError(
            f"data.packing with a Hugging Face reference needs a transformers that masks packed rows "
            f"(>= 4.56); this one is {transformers.__version__}: upgrade it or set data.packing = false"
        ) from None
