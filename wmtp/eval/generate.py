"""Batched, KV-cached generation: greedy, temperature / top-p sampling, and self-speculative decoding.

Ragged batches (right padding, per-row positions)
-------------------------------------------------
The prompts are right-padded into one [B, L_max] prefill from position 0: attention is plain causal
and a row's real tokens never see the padding after them. Row b's token at position p lives in
cache slot p of every block's `KVCache`, so each row keeps its true RoPE positions and its own
length c_b; every later forward passes the per-row start positions (`logits(start_pos=Tensor[B])`)
and the model masks the cache slots after each query's position. Padding (and, below, rejected
drafts) left in slots >= c_b is never read: a row overwrites slot c_b before any of its queries at
position >= c_b attends to it. Rows hence equal unbatched generation, up to float rounding of
batched matmuls. A row that finishes leaves the batch and the cache (`select_kv_cache_rows`), so it
stops costing.

Plain decoding
--------------
The first forward runs the prompts through the trunk and head 0 and takes each row's first token
from the logits at its last prompt position; each later forward feeds the rows' last tokens [B, 1]
at their positions. Forwards = the longest row's emitted tokens (its EOS included).

Sampling
--------
Logits / temperature, softmax; top_p keeps the smallest set of most likely tokens whose probability
reaches top_p; one token is drawn by inverse CDF from a uniform. Row i's uniforms come from its own
CPU `torch.Generator` seeded from (seed, i): a row's samples depend on the seed, its index and its
prompt only, not on the other rows, on when they finish, or on the device. Repeating a prompt in
several rows gives independent samples (pass@k); separate calls need separate seeds.

Self-speculative decoding (Stern et al. 2018, blockwise parallel decoding; Gloeckle et al. 2024, 3.2)
--------------------------------------------------------------------------------------------------
Head k at position p predicts the token at p + 1 + k. Each forward runs a block [y, d_1 .. d_{n-1}]
at positions c .. c+n-1 through the trunk and every head: y is the row's last emitted token (not yet
in the cache) and d_j its draft of the token at c + j. Head 0's argmax at block index j, g_j, is
greedy's token at c + j + 1 given the block up to j, so drafts are accepted while d_{j+1} == g_j.
With a drafts accepted the row emits d_1 .. d_a and g_a (head 0's argmax at the last accepted
position): 1 to n tokens per forward, each exactly greedy's. [g_a, heads 1..n-1's argmaxes at index
a] is the row's next block. Rollback: the row's cache length becomes c + a + 1 (y and the accepted
drafts); the rejected drafts' slots in every block's cache (trunk and each head own one) are masked
and then overwritten by the next block. The prompt's forward emits g and drafts from the last prompt
position. Rows accept different numbers of drafts, so their lengths diverge, which the per-row
positions handle as they handle ragged prompts. Plain greedy runs the trunk and head 0 on one token;
a speculative forward runs all n heads on n tokens, so the wall-clock gain is tokens per forward
times that cost ratio (close to 1 when the trunk dominates, as at 7B: 28 trunk blocks, 4 heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from wmtp.models.mtp_transformer import MTPTransformer

STOP_EOS = "eos"
"""Stop reason: the row produced EOS (not kept in its tokens)."""
STOP_LENGTH = "length"
"""Stop reason: the row reached max_new_tokens."""
PAD_ID = 0
"""Token id filling the right-padded prefill: it sits after each row's tokens, so causal attention
never lets a real token see it, and the row overwrites its cache slots before reading them."""


@dataclasses.dataclass
class Generation:
    """What `generate` returns, per prompt in input order."""

    tokens: list[list[int]]
    """New tokens of each prompt, ending before its first EOS or at max_new_tokens."""
    forwards: int
    """Model forward passes: batched calls, the prompts' prefill included."""
    stop_reasons: list[str]
    """Per prompt: STOP_EOS or STOP_LENGTH."""
    row_forwards: list[int]
    """Per prompt: the forwards it took part in (a row leaves the batch when it finishes)."""

    @property
    def new_tokens(self) -> int:
        """Total new tokens of all prompts (EOS not counted)."""
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per forward a row took part in: 1 for plain decoding (a bit less when rows end at
        EOS, which is not counted), up to n_future for speculative decoding."""
        total = sum(self.row_forwards)
        return self.new_tokens / total if total else 0.0


class _Outputs:
    """Per-prompt outputs, and the prompts still generating in the order of the batch's rows."""

    def __init__(self, n_prompts: int, *, max_new_tokens: int, eos_id: int | None) -> None:
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id
        self.tokens: list[list[int]] = [[] for _ in range(n_prompts)]
        self.reasons = [STOP_LENGTH] * n_prompts
        self.row_forwards = [0] * n_prompts
        self.active = list(range(n_prompts))
        self.forwards = 0

    def step(self, new: Sequence[Sequence[int]]) -> list[int]:
        """Record one forward's new tokens per active row; returns the batch rows that go on."""
        self.forwards += 1
        going = []
        for b, (prompt, toks) in enumerate(zip(self.active, new)):
            self.row_forwards[prompt] += 1
            if not self._extend(prompt, toks):
                going.append(b)
        self.active = [self.active[b] for b in going]
        return going

    def _extend(self, prompt: int, toks: Sequence[int]) -> bool:
        """Append up to the first EOS or the budget; True when the prompt is finished."""
        out = self.tokens[prompt]
        for t in toks:
            if t == self.eos_id:
                self.reasons[prompt] = STOP_EOS
                return True
            out.append(t)
            if len(out) == self.max_new_tokens:
                return True
        return False

    def result(self) -> Generation:
        return Generation(
            tokens=self.tokens, forwards=self.forwards, stop_reasons=self.reasons, row_forwards=self.row_forwards
        )


def sample_from_logits(
    logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row of logits [B, V] by inverse CDF of the tempered, nucleus-truncated softmax
    at uniforms [B] in [0, 1); returns [B] token ids."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    if top_p < 1.0:
        # A token stays if the mass of the more likely ones is below top_p (the first always does).
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, uniforms.to(cdf)[:, None] * cdf[:, -1:], right=True)
    # Rounding can put u * total at the total: clamp to the last token with probability.
    index = torch.minimum(index, (probs > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, index)[:, 0]


def _row_uniforms(seed: int, n_rows: int, n_draws: int) -> torch.Tensor:
    """[n_rows, n_draws] uniforms, row i from a generator seeded by SeedSequence((seed, i))."""
    out = torch.empty(n_rows, n_draws)
    for i in range(n_rows):
        row_seed = int(np.random.SeedSequence((seed, i)).generate_state(1, dtype=np.uint64)[0])
        out[i] = torch.rand(n_draws, generator=torch.Generator().manual_seed(row_seed))
    return out


def _last_logits(
    model: MTPTransformer,
    seqs: Sequence[Sequence[int]],
    *,
    n_heads: int | None,
    start_pos: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Logits [B, n_heads, V] at each sequence's last token: one right-padded forward from position 0
    (filling the KV cache when start_pos is 0; the whole sequences, uncached, when None)."""
    lengths = [len(s) for s in seqs]
    tokens = torch.full((len(seqs), max(lengths)), PAD_ID, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    last = torch.tensor(lengths, device=device)[:, None] - 1
    return model.logits(tokens.to(device), start_pos=start_pos, n_heads=n_heads, token_index=last)[:, 0]


def _plain(
    model: MTPTransformer,
    prompts: list[list[int]],
    out: _Outputs,
    pick: Callable[[torch.Tensor], torch.Tensor],
    *,
    use_cache: bool,
    device: torch.device,
) -> None:
    """Greedy or sampled decoding, one token per row and forward; `pick` maps logits [B, V] of the
    active rows to their next tokens [B]."""
    if use_cache:
        model.setup_kv_cache(len(prompts), max(map(len, prompts)) + out.max_new_tokens, n_heads=1)
    logits = _last_logits(model, prompts, n_heads=1, start_pos=0 if use_cache else None, device=device)[:, 0]
    while True:
        nxt = pick(logits)
        going = out.step([[t] for t in nxt.tolist()])
        if not out.active:
            return
        if not use_cache:
            seqs = [prompts[p] + out.tokens[p] for p in out.active]
            logits = _last_logits(model, seqs, n_heads=1, start_pos=None, device=device)[:, 0]
            continue
        if len(going) < nxt.shape[0]:
            rows = torch.tensor(going, device=device)
            model.select_kv_cache_rows(rows)
            nxt = nxt[rows]
        # The token fed is the row's newest, at position len(prompt) + len(new tokens) - 1.
        starts = torch.tensor([len(prompts[p]) + len(out.tokens[p]) - 1 for p in out.active])
        logits = model.logits(nxt[:, None], start_pos=starts, n_heads=1)[:, 0, 0]


def _speculative(model: MTPTransformer, prompts: list[list[int]], out: _Outputs, *, device: torch.device) -> None:
    """Self-speculative greedy decoding (see the module docstring)."""
    n = model.n_future
    model.setup_kv_cache(len(prompts), max(map(len, prompts)) + out.max_new_tokens + n)
    # blocks[b] = [g, drafts of heads 1..n-1]: the argmax of every head at row b's last accepted token.
    blocks: list[list[int]] = _last_logits(model, prompts, n_heads=None, start_pos=0, device=device).argmax(-1).tolist()
    going = out.step([[block[0]] for block in blocks])
    while out.active:
        if len(going) < len(blocks):
            model.select_kv_cache_rows(torch.tensor(going, device=device))
            blocks = [blocks[b] for b in going]
        # The block starts with the row's newest token, at position len(prompt) + len(new tokens) - 1.
        starts = torch.tensor([len(prompts[p]) + len(out.tokens[p]) - 1 for p in out.active])
        top = model.logits(torch.tensor(blocks, device=device), start_pos=starts).argmax(-1).tolist()
        new, next_blocks = [], []
        for block, argmaxes in zip(blocks, top):  # argmaxes[j][k]: head k at block index j
            accepted = 0
            while accepted < n - 1 and block[accepted + 1] == argmaxes[accepted][0]:
                accepted += 1
            new.append(block[1 : accepted + 1] + [argmaxes[accepted][0]])
            next_blocks.append(argmaxes[accepted])
        going = out.step(new)
        blocks = next_blocks


def generate(
    model: MTPTransformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    speculative: bool = False,
    use_cache: bool = True,
) -> Generation:
    """Continue every prompt (token ids, BOS included; any lengths) in one batch.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature),
    truncated to the top_p nucleus, reproducibly per (seed, prompt index). speculative=True (greedy
    only) decodes with the MTP heads' drafts and gives exactly plain greedy's tokens in fp32.
    eos_id None never stops early. use_cache=False recomputes the whole sequences every token (a
    reference; plain decoding only). The model runs in eval mode without gradients (its training
    mode is restored) and its KV cache is cleared on return.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if speculative and temperature > 0:
        raise ValueError("generate: speculative decoding is greedy only (temperature 0)")
    if speculative and not use_cache:
        raise ValueError("generate: speculative decoding needs the KV cache (use_cache=True)")
    if seed < 0:
        raise ValueError(f"generate: seed must be >= 0, got {seed}")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        return _Outputs(0, max_new_tokens=max_new_tokens, eos_id=eos_id).result()
    vocab = model.args.vocab_size
    if any(not p or min(p) < 0 or max(p) >= vocab for p in prompts):
        raise ValueError(f"generate: every prompt needs at least one token, all in [0, {vocab})")
    device = model.output.weight.device
    # The last forward writes up to here (a speculative block reaches n - 1 past the last token).
    longest = max(map(len, prompts)) + max_new_tokens + (model.n_future if speculative else 0)
    if longest > model.rope_tables(device)[0].shape[0]:
        raise ValueError(
            f"generate: prompt + max_new_tokens needs {longest} positions; the model has "
            f"{model.rope_tables(device)[0].shape[0]}"
        )
    out = _Outputs(len(prompts), max_new_tokens=max_new_tokens, eos_id=eos_id)
    if temperature == 0:

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return logits.argmax(-1)
    else:
        uniforms = _row_uniforms(seed, len(prompts), max_new_tokens)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            # Every active row draws its uniform for the index of the token it is choosing.
            u = uniforms[out.active, [len(out.tokens[p]) for p in out.active]]
            return sample_from_logits(logits, u.to(device), temperature=temperature, top_p=top_p)

    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: tensors the model caches here (its RoPE tables) must stay
        # usable by a later training forward's autograd.
        with torch.no_grad():
            if speculative:
                _speculative(model, prompts, out, device=device)
            else:
                _plain(model, prompts, out, pick, use_cache=use_cache, device=device)
    finally:
        model.clear_kv_cache()
        model.train(was_training)
    return out.result()
