"""Meta's multi-token-prediction LLaMA: a shared trunk, n_future head blocks, shared norm and output.

Parameter names follow Meta's `consolidated.00.pth` exactly, so released checkpoints load with
strict key checking. Training never materialises [B, T, n, V] logits: `forward` returns the
per-head normed hidden states and, given targets, the per-pair cross-entropy computed by the
chunked multi-head loss inside the forward (so that under FSDP the `output` weight is gathered).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from wmtp.constants import IGNORE_INDEX
from wmtp.losses.mtp_ce import mtp_cross_entropy_with_ce
from wmtp.models.args import ModelArgs
from wmtp.packed_rows import segment_positions, segment_starts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale (Meta's order of operations).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(
    head_dim: int,
    max_len: int,
    theta: float,
    device: torch.device | None = None,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim/2] of Meta's freqs_cis = polar(1, t * theta^(-2i/d)), the
    frequencies rescaled first when `scaling` says so (ModelArgs.rope_scaling)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def scaled_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """RoPE frequencies under a context-extension scaling (fp32, as Hugging Face computes them).

    "linear": every frequency divided by `factor`. "llama3" (Llama 3.1): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, those shorter than
    original / high_freq_factor kept, and the band between interpolates linearly in
    original / wavelength.
    """
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    middle = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(middle, blended, stretched)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as the complex number x[2i] + j x[2i+1].

    Real arithmetic equal to Meta's view_as_complex product; it compiles and shards without
    complex tensors. x: [B, T, H, hd]; cos/sin: [T, hd/2].
    """
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with per-token tables cos/sin [B, T, hd/2]: rows at their own positions.

    The rows are laid end to end as one sequence of B*T tokens, so the rotation is `apply_rope`'s
    own arithmetic.
    """
    return apply_rope(x.flatten(0, 1)[None], cos.flatten(0, 1), sin.flatten(0, 1)).view_as(x)


@dataclasses.dataclass(frozen=True)
class RowSpans:
    """Where the rows of a packed micro-batch lie: (sequence, start, end) of every non-padding
    segment, for attention computed row by row (`attend_rows`)."""

    spans: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, segments: torch.Tensor) -> RowSpans:
        seg = segments.cpu()
        starts = segment_starts(seg)
        spans = []
        for b in range(seg.shape[0]):
            bounds = [*torch.nonzero(starts[b]).flatten().tolist(), seg.shape[1]]
            spans += [(b, s, e) for s, e in zip(bounds, bounds[1:]) if seg[b, s] >= 0]
        return cls(tuple(spans))


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowSpans, *, enable_gqa: bool) -> torch.Tensor:
    """Block-diagonal causal attention as causal SDPA on each row's span (q, k, v [B, H, T, hd]).

    The FLOPs of the rows themselves: an explicit [T, T] mask would compute every masked-out block
    too. Padding positions get 0. Each sequence is split into its spans (one backward
    concatenation, where slicing would write a full-size gradient per row), and each row goes in
    as [1, H, L, hd] (4-D inputs take the CPU's flash kernel, 3-D ones do not).
    """
    seq_len = q.shape[2]
    spans: list[list[tuple[int, int]]] = [[] for _ in range(q.shape[0])]
    for b, start, end in rows.spans:
        spans[b].append((start, end))
    out = []
    for qb, kb, vb, row_spans in zip(q.unbind(0), k.unbind(0), v.unbind(0), spans):
        sizes, is_row, pos = [], [], 0
        for start, end in row_spans:
            if start > pos:
                sizes.append(start - pos)
                is_row.append(False)
            sizes.append(end - start)
            is_row.append(True)
            pos = end
        if pos < seq_len:
            sizes.append(seq_len - pos)
            is_row.append(False)
        pieces = [
            F.scaled_dot_product_attention(qi[None], ki[None], vi[None], is_causal=True, enable_gqa=enable_gqa)
            if row
            else qi.new_zeros(1, *qi.shape)
            for qi, ki, vi, row in zip(qb.split(sizes, 1), kb.split(sizes, 1), vb.split(sizes, 1), is_row)
        ]
        out.append(torch.cat(pieces, dim=2))
    return torch.cat(out)


_eager_attend_rows = None


def eager_attend_rows():
    """`attend_rows` kept out of torch.compile's graphs (compiled blocks break around it rather than
    recompile for every layout of rows); made on first use, as importing the compiler takes seconds."""
    global _eager_attend_rows
    if _eager_attend_rows is None:
        _eager_attend_rows = torch.compiler.disable(attend_rows)
    return _eager_attend_rows


_compiled_flex_attention = None


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, *, enable_gqa: bool
) -> torch.Tensor:
    """FlexAttention with a document BlockMask: compiled on GPUs (uncompiled it materialises every
    score), eager elsewhere (the tests run it on the CPU)."""
    global _compiled_flex_attention
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


AttentionMask = torch.Tensor | BlockMask | RowSpans
"""What the blocks attend with besides plain causal attention: a boolean mask for SDPA (cached
decoding; packed rows with packed_attention = "mask"), a FlexAttention BlockMask or the rows'
spans (packed rows)."""


@dataclasses.dataclass
class KVCache:
    """Keys/values of one block for incremental decoding: [B, n_kv_heads, max_len, head_dim].

    Slot p of row b holds the key/value of that row's token at position p. Which slots are valid is
    the caller's bookkeeping (the attention mask hides every slot after a query's position), so
    rolling a row back is just writing its next tokens at an earlier position.
    """

    k: torch.Tensor
    v: torch.Tensor

    def update(
        self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, n_kv_heads, T, head_dim] and return the slots [0, end) to attend over.

        start_pos: an int (every row's tokens start there) or the positions [B, T] of each token.
        """
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked to write up to {end}")
        if isinstance(start_pos, int):
            self.k[:, :, start_pos : start_pos + k.shape[2]] = k
            self.v[:, :, start_pos : start_pos + k.shape[2]] = v
        else:
            index = start_pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
        return self.k[:, :, :end], self.v[:, :, :end]

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of these batch rows only (a copy)."""
        return KVCache(self.k[rows], self.v[rows])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """start_pos/mask come from `MTPTransformer._cache_step` (cached inference) or, for packed
        rows, `MTPTransformer.document_mask`; without a mask attention is causal over this call's
        tokens (the training forward, or a cache filled from 0)."""
        bsz, seqlen, _ = x.shape
        rope = apply_rope if cos.dim() == 2 else apply_rope_rows
        q = rope(self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim), cos, sin)
        k = rope(self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.n_kv_heads != self.n_heads
        if cache is not None:
            k, v = cache.update(start_pos, k, v, end=seqlen if mask is None else mask.shape[-1])
        if isinstance(mask, BlockMask):
            out = flex_document_attention(q, k, v, mask, enable_gqa=gqa)
        elif isinstance(mask, RowSpans):
            out = eager_attend_rows()(q, k, v, mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclasses.dataclass
class MTPOutput:
    """What one training forward returns; fields not asked for are None. Every tensor is a fresh
    tensor, not a view of another, so a recipe may modify it in place (also under FSDP)."""

    hidden: torch.Tensor | None
    """[B, T, n_heads_used, dim]: each head's output after the shared norm."""
    ce: torch.Tensor | None
    """[B, T, n_future]: per-pair cross-entropy, 0 where ignored. reduction="none": times
    pair_weights when given, differentiable. reduction="sum": unweighted and detached (for logs)."""
    values: torch.Tensor | None
    """[B, T]: value head on norm(h_trunk) (fp32)."""
    loss: torch.Tensor | None = None
    """reduction="sum": the scalar sum of pair_weights * CE, differentiable (gradients computed in
    the forward)."""


PairWeights = torch.Tensor | Callable[[torch.Tensor | None], torch.Tensor]
"""Per-pair loss weights [B, T, n_future], or a function of this forward's values [B, T] (None
without with_values) returning them: weights that depend on the values (the verifiable recipe's TD
weights) are then known before the heads' loss, which can compute its gradients in the forward."""


PACKED_ATTENTION = ("auto", "flex", "rows", "mask")
"""How packed rows attend only within themselves: "flex" (FlexAttention's document BlockMask,
compiled: only the blocks on the diagonal are computed), "rows" (causal SDPA on each row's span),
"mask" (SDPA with an explicit boolean [T, T] block-diagonal causal mask: every block computed);
"auto": flex on CUDA, rows elsewhere."""


class MTPTransformer(nn.Module):
    """Trunk = layers[:-1]; head 0 = layers[-1]; head j > 0 = extra_heads[j-1]."""

    packed_attention: str = "auto"
    """One of PACKED_ATTENTION; set on an instance to choose."""

    def __init__(self, args: ModelArgs, *, value_head: bool = False) -> None:
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("model: vocab_size must be resolved (from the tokenizer) before building the model")
        self.args = args
        self.n_future = args.n_future_tokens
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_trunk_layers + 1))
        self.extra_heads = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_future_tokens - 1))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.value_head = nn.Linear(args.dim, 1, bias=False) if value_head else None
        self._caches: list[KVCache] | None = None
        # RoPE tables per device, fp32 whatever the parameters' dtype: kept out of the module's
        # buffers so that `model.to(torch.bfloat16)`, FSDP and meta-device init never touch them.
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin [2 * max_seq_len, head_dim / 2] on `device` (computed once per device)."""
        device = torch.device(device)
        if device not in self._rope:
            self._rope[device] = rope_tables(
                self.args.head_dim, self.args.max_seq_len * 2, self.args.rope_theta, device, self.args.rope_scaling
            )
        return self._rope[device]

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fresh initialisation for models trained from scratch (the tiny artifacts): N(0, std)
        matrices, unit norms, a zero value head."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.startswith("value_head"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    @property
    def trunk(self) -> nn.ModuleList:
        return self.layers[:-1]

    @property
    def heads(self) -> list[TransformerBlock]:
        return [self.layers[-1], *self.extra_heads]

    def document_mask(self, segments: torch.Tensor) -> AttentionMask:
        """What every block of a forward over packed rows attends with (see PACKED_ATTENTION)."""
        kind = self.packed_attention
        if kind not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention must be one of {PACKED_ATTENTION}, got {kind!r}")
        if kind == "auto":
            kind = "flex" if segments.device.type == "cuda" else "rows"
        if kind == "rows":
            eager_attend_rows()  # made here, outside any compiled block
            return RowSpans.of(segments)
        batch, seqlen = segments.shape
        if kind == "flex":

            def same_row_causal(b, h, q, kv):
                return (segments[b, q] == segments[b, kv]) & (q >= kv)

            return create_block_mask(same_row_causal, batch, None, seqlen, seqlen, device=segments.device)
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=segments.device).tril()
        return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]

    def _run(
        self,
        tokens: torch.Tensor,
        *,
        n_heads: int,
        start_pos: int | torch.Tensor | None,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Trunk output and the un-normed outputs of the first `n_heads` heads.

        start_pos None: the training forward (causal, no cache); with segments [B, T] (packed rows,
        see `forward`) positions restart at each row and attention stays within it. Otherwise the
        tokens continue the cached sequences, see `logits`.
        """
        if start_pos is None:
            seqlen = tokens.shape[1]
            cos, sin = self.rope_tables(tokens.device)
            if seqlen > cos.shape[0]:
                raise ValueError(f"sequence of {seqlen} tokens exceeds the RoPE table ({cos.shape[0]})")
            if segments is None:
                caches, cos, sin, pos, mask = None, cos[:seqlen], sin[:seqlen], 0, None
            else:
                if segments.shape != tokens.shape:
                    raise ValueError(f"segments {tuple(segments.shape)} must match tokens {tuple(tokens.shape)}")
                positions = segment_positions(segments)
                caches, cos, sin, pos, mask = None, cos[positions], sin[positions], 0, self.document_mask(segments)
        else:
            if segments is not None:
                raise ValueError("segments (packed rows) are for the training forward, not cached decoding")
            caches = self._caches
            if caches is None:
                raise RuntimeError("start_pos given but no KV cache: call setup_kv_cache first")
            if len(self.trunk) + n_heads > len(caches):
                raise ValueError(f"the KV cache covers {len(caches) - len(self.trunk)} heads; {n_heads} asked")
            cos, sin, pos, mask = self._cache_step(tokens, start_pos)
        h = self.tok_embeddings(tokens)
        blocks = [*self.trunk, *self.heads]
        for i, layer in enumerate(self.trunk):
            h = layer(h, cos, sin, caches[i] if caches else None, pos, mask)
        n_trunk = len(self.trunk)
        outs = [
            blocks[n_trunk + j](h, cos, sin, caches[n_trunk + j] if caches else None, pos, mask) for j in range(n_heads)
        ]
        return h, outs

    def _cache_step(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor, torch.Tensor | None]:
        """RoPE tables, write positions and attention mask of one cached forward, shared by every
        block: (cos, sin, pos, mask). pos is start_pos itself (an int) or the positions [B, T] of
        every token; mask [.., T, end] lets a query at position p see cache slots 0..p (None: a
        forward from position 0, plain causal attention)."""
        bsz, seqlen = tokens.shape
        device = tokens.device
        cos, sin = self.rope_tables(device)
        if isinstance(start_pos, int):
            end = start_pos + seqlen
        elif start_pos.shape != (bsz,):
            raise ValueError(f"start_pos must be an int or a tensor [{bsz}], got shape {tuple(start_pos.shape)}")
        else:
            end = int(start_pos.max()) + seqlen  # from a CPU tensor: no device synchronisation
        if end > cos.shape[0]:
            raise ValueError(f"sequence of {end} tokens exceeds the RoPE table ({cos.shape[0]})")
        if isinstance(start_pos, int):
            if start_pos == 0:
                return cos[:seqlen], sin[:seqlen], 0, None
            pos, positions = start_pos, torch.arange(start_pos, end, device=device)  # [T], shared
        else:
            # [B, T]: each row's RoPE positions, and the cache slots its keys/values go to.
            pos = positions = start_pos.to(device=device, dtype=torch.long)[:, None] + torch.arange(
                seqlen, device=device
            )
        mask = torch.arange(end, device=device) <= positions[..., None]
        # A shared mask is [T, end]; per-row ones [B, T, end] broadcast over heads as [B, 1, T, end].
        return cos[positions], sin[positions], pos, mask if mask.dim() == 2 else mask[:, None]

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        pair_weights: PairWeights | None = None,
        reduction: Literal["none", "sum"] = "none",
        with_values: bool = False,
        with_heads: bool = True,
        segments: torch.Tensor | None = None,
    ) -> MTPOutput:
        """Training forward.

        tokens [B, T]; targets [B, T, n_future] (IGNORE_INDEX where invalid) computes the per-pair
        CE with the chunked multi-head loss, weighted by pair_weights (a tensor, or a function of
        the values, see `PairWeights`). reduction="none" returns the weighted per-pair CE (the
        backward recomputes the logits: for weights that depend on this CE, as Rho-1's do);
        "sum" returns their sum as `loss` with the gradients computed in the forward (one
        vocabulary matmul fewer) and the unweighted CE for logging.
        with_heads=False runs the trunk only (critic training needs just the values).
        segments [B, T] (packed rows, `wmtp.data.collate.collate_packed`): the row each token belongs
        to (negative: padding); each row gets positions from 0 and attends only within itself, so
        every output equals the row's own unpacked forward (targets must not cross rows either:
        `mtp_targets` with the segments).
        """
        h_trunk, outs = self._run(tokens, n_heads=self.n_future if with_heads else 0, start_pos=None, segments=segments)
        hidden = self.norm(torch.stack(outs, dim=2)) if outs else None
        values = self.values(h_trunk) if with_values else None
        ce = loss = None
        if targets is not None:
            if hidden is None:
                raise ValueError("targets given with with_heads=False")
            weights = pair_weights(values) if callable(pair_weights) else pair_weights
            out, unweighted = mtp_cross_entropy_with_ce(
                hidden, self.output.weight, targets, weights, ignore_index=IGNORE_INDEX, reduction=reduction
            )
            ce, loss = (unweighted, out) if reduction == "sum" else (out, None)
        return MTPOutput(hidden=hidden, ce=ce, values=values, loss=loss)

    def values(self, h_trunk: torch.Tensor) -> torch.Tensor:
        if self.value_head is None:
            raise RuntimeError("this model has no value head (build it with value_head=True)")
        # A sum over the size-1 dim rather than a squeeze: exact, and a fresh fp32 tensor, not a view.
        return self.value_head(self.norm(h_trunk)).sum(-1, dtype=torch.float32)

    @torch.no_grad()
    def logits(
        self,
        tokens: torch.Tensor,
        *,
        start_pos: int | torch.Tensor | None = None,
        n_heads: int | None = None,
        token_index: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T, n_heads, V] fp32 logits of every head (inference helper; materialises logits).

        With start_pos (after setup_kv_cache) the tokens continue the cached sequences: an int
        (every row's tokens start at that position) or a tensor [B] of each row's start (ragged
        rows; pass it on the CPU to spare a device synchronisation). token_index [B, K] keeps only
        those tokens of each row before the output projection (e.g. each prompt's last token):
        [B, K, n_heads, V]. segments: packed rows, as in `forward` (no cache).
        """
        n_heads = self.n_future if n_heads is None else n_heads
        _, outs = self._run(tokens, n_heads=n_heads, start_pos=start_pos, segments=segments)
        hidden = torch.stack(outs, dim=2)
        if token_index is not None:
            hidden = hidden.gather(1, token_index.to(hidden.device)[:, :, None, None].expand(-1, -1, *hidden.shape[2:]))
        return self.output(self.norm(hidden)).float()

    def setup_kv_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None, n_heads: int | None = None
    ) -> None:
        """Allocate a KV cache for every trunk block and the first n_heads heads (default: all)."""
        weight = self.output.weight
        shape = (batch_size, self.args.kv_heads, max_len, self.args.head_dim)
        kw = dict(dtype=dtype or weight.dtype, device=weight.device)
        n_blocks = len(self.trunk) + (self.n_future if n_heads is None else n_heads)
        self._caches = [KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in range(n_blocks)]

    def select_kv_cache_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows of the KV cache, in this order (e.g. drop finished sequences)."""
        if self._caches is None:
            raise RuntimeError("no KV cache: call setup_kv_cache first")
        self._caches = [cache.select(rows) for cache in self._caches]

    def clear_kv_cache(self) -> None:
        self._caches = None
