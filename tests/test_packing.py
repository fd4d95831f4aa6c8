"""Length-grouped and packed micro-batches: the plans, the packed tensors, the model's document
mask, per-row weighting, and every recipe's step equal to the padded step on the same rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.arrangements import AS_PADDED, LAYOUTS, SEQ_LEN, step_results
from tests.conftest import ROOT, TEST_ENV, load_recipe, needs_cuda, recipe_args, torchrun
from wmtp.config.sections import DataConfig, DistributedConfig, FieldRangeError
from wmtp.constants import IGNORE_INDEX
from wmtp.data.collate import PADDING_SEGMENT, collate, collate_packed, encode_rows, mtp_targets
from wmtp.data.packing import SAMPLER_ORDER, BatchLayout, first_fit_decreasing, padded_tokens, plan_step
from wmtp.data.samplers import split_global_batch
from wmtp.data.tokenizer import SentencePieceTokenizer
from wmtp.distributed.parallelize import apply_activation_checkpointing
from wmtp.models import ModelArgs, MTPTransformer
from wmtp.models.checkpoint import save_value_head
from wmtp.training.metrics import read_metrics
from wmtp.weighting.critic import critic_targets, response_states, value_stats
from wmtp.weighting.td import AdvantageNormalizer, td_head_weights, td_weights_with_stats

TOLERANCE = 1e-5
"""Relative difference allowed between a packed (or grouped) step and the padded one (fp32)."""

# ---------------------------------------------------------------- plans


def rows_of(plan_for_rank) -> list[int]:
    return [i for micro in plan_for_rank for seq in micro for i in seq]


def test_sampler_order_is_the_contiguous_split():
    lengths = np.arange(12) + 5
    for world, accum in ((1, 2), (2, 1), (2, 3)):
        n = 2 * accum * world
        plan = plan_step(lengths[:n], SAMPLER_ORDER, world_size=world, micro_batch_size=2, grad_accum=accum, seq_len=64)
        for r in range(world):
            split = split_global_batch(np.arange(n), rank=r, world_size=world, micro_batch_size=2, grad_accum=accum)
            assert [[i for seq in micro for i in seq] for micro in plan[r]] == [m.tolist() for m in split]
    with pytest.raises(FieldRangeError, match="micro_batch_tokens needs group_by_length = true or packing = true"):
        DataConfig(group_by_length=False, micro_batch_tokens=100)
    with pytest.raises(ValueError, match="needs grouping by length or packing"):
        plan_step(
            lengths, BatchLayout(micro_batch_tokens=100), world_size=1, micro_batch_size=2, grad_accum=6, seq_len=64
        )


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize(
    "layout",
    [
        BatchLayout(group_by_length=True),
        BatchLayout(group_by_length=True, micro_batch_tokens=900),
        BatchLayout(packing=True),
        BatchLayout(packing=True, micro_batch_tokens=1024),
    ],
    ids=["grouped", "grouped-budget", "packed", "packed-budget"],
)
def test_plans_take_every_row_once_and_give_every_rank_as_many_micro_batches(world, layout):
    rng = np.random.default_rng(world)
    seq_len = 512
    for micro_batch_size, accum in ((1, 1), (2, 3), (4, 2)):
        lengths = rng.integers(8, seq_len + 1, size=micro_batch_size * accum * world)
        plan = plan_step(
            lengths, layout, world_size=world, micro_batch_size=micro_batch_size, grad_accum=accum, seq_len=seq_len
        )
        assert sorted(i for r in range(world) for i in rows_of(plan[r])) == list(range(len(lengths)))
        assert len({len(p) for p in plan}) == 1 and len(plan[0]) >= 1
        for micro in (m for p in plan for m in p):
            widths = [int(lengths[list(seq)].sum()) for seq in micro]
            if layout.packing:
                assert max(widths) <= seq_len
                per_micro = layout.micro_batch_tokens // seq_len or micro_batch_size
                assert len(micro) <= per_micro
            else:
                assert all(len(seq) == 1 for seq in micro)
                if layout.micro_batch_tokens and len(micro) > 1:
                    assert len(micro) * max(widths) <= layout.micro_batch_tokens
                elif not layout.micro_batch_tokens:
                    assert len(micro) == micro_batch_size


def test_grouping_sorts_by_length_and_keeps_its_micro_batches_at_any_world_size():
    lengths = np.random.default_rng(0).integers(10, 500, size=16)
    layout = BatchLayout(group_by_length=True)
    one = plan_step(lengths, layout, world_size=1, micro_batch_size=2, grad_accum=8, seq_len=512)[0]
    two = plan_step(lengths, layout, world_size=2, micro_batch_size=2, grad_accum=4, seq_len=512)
    assert sorted(map(tuple, one)) == sorted(tuple(m) for p in two for m in p)
    order = rows_of(one)
    assert [int(lengths[i]) for i in order] == sorted(lengths.tolist(), reverse=True)
    # Grouped micro-batches pad far less than the sampler's order does (same rows).
    padded = plan_step(lengths, SAMPLER_ORDER, world_size=1, micro_batch_size=2, grad_accum=8, seq_len=512)[0]
    grouped_pad = padded_tokens(one, lengths, packed=False, seq_len=512) - lengths.sum()
    assert grouped_pad < padded_tokens(padded, lengths, packed=False, seq_len=512) - lengths.sum()


def naive_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b in bins:
            if sum(lengths[j] for j in b) + lengths[i] <= capacity:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


def test_first_fit_decreasing_matches_a_naive_one_and_packs_tightly():
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 700, size=200)
    packs = first_fit_decreasing(lengths, 1024)
    assert packs == naive_first_fit_decreasing(lengths.tolist(), 1024)
    assert len(packs) * 1024 < 1.05 * lengths.sum()  # at most 5% padding on 200 rows
    with pytest.raises(ValueError, match="exceeds the sequence length"):
        plan_step([10, 2000], BatchLayout(packing=True), world_size=1, micro_batch_size=1, grad_accum=2, seq_len=1024)


def test_packs_split_so_that_every_rank_gets_a_micro_batch():
    # Two rows that fit one sequence, two ranks: the sequence is split so each rank has one.
    plan = plan_step([10, 12], BatchLayout(packing=True), world_size=2, micro_batch_size=1, grad_accum=1, seq_len=64)
    assert [rows_of(p) for p in plan] == [[1], [0]]


# ---------------------------------------------------------------- packed tensors


def random_examples(n: int, seed: int, vocab: int = 50) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, response = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
        tokens = [1] + torch.randint(3, vocab, (prompt + response,), generator=g).tolist() + [2]
        out.append((tokens, [0] * (1 + prompt) + [1] * (response + 1)))
    return out


@pytest.mark.parametrize("n_future", [1, 4])
def test_packed_targets_are_each_rows_own(n_future):
    examples = random_examples(7, seed=n_future)
    sequences = [examples[:3], examples[3:5], examples[5:]]
    packed = collate_packed(sequences, pad_id=0, seq_len=60)
    targets = mtp_targets(packed["labels"], n_future, packed["segments"])
    padded = collate(examples, pad_id=0)
    row_targets = mtp_targets(padded["labels"], n_future)
    seg = packed["segments"]
    assert packed["lengths"].tolist() == [len(t) for t, _ in examples]
    for r, (tokens, _) in enumerate(examples):
        where = seg == r
        assert packed["tokens"][where].tolist() == tokens
        assert torch.equal(targets[where], row_targets[r, : len(tokens)])
    assert (targets[seg == PADDING_SEGMENT] == IGNORE_INDEX).all()
    assert int((targets != IGNORE_INDEX).sum()) == int((row_targets != IGNORE_INDEX).sum())
    with pytest.raises(ValueError, match="need more than 10 tokens"):
        collate_packed([examples], pad_id=0, seq_len=10)


# ---------------------------------------------------------------- the model

ARGS = ModelArgs(
    dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, n_future_tokens=3, max_seq_len=64
)


def small_model(seed: int = 0) -> MTPTransformer:
    torch.manual_seed(seed)
    model = MTPTransformer(ARGS, value_head=True)
    model.init_weights(std=0.3)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 0.5)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def packed_and_padded(n_future: int = ARGS.n_future_tokens, seq_len: int = 64):
    examples = random_examples(6, seed=11)
    sequences = [examples[:2], examples[2:5], examples[5:]]
    packed = collate_packed(sequences, pad_id=0, seq_len=seq_len)
    packed["targets"] = mtp_targets(packed["labels"], n_future, packed["segments"])
    padded = collate(examples, pad_id=0)
    padded["targets"] = mtp_targets(padded["labels"], n_future)
    return packed, padded


def loss_and_grads(model: MTPTransformer, batch: dict, **kw) -> tuple[dict, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(batch["tokens"], targets=batch["targets"], with_values=True, segments=batch.get("segments"), **kw)
    segments = batch.get("segments")
    width = batch["tokens"].shape[1]
    positions = torch.arange(width, device=batch["tokens"].device)
    real = segments >= 0 if segments is not None else positions < batch["lengths"][:, None]
    loss = out.ce.sum() + (out.values.square() * real).sum() * 0.1 + (out.hidden * real[..., None, None]).sum() * 0.01
    loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters()}


def per_row(x: torch.Tensor, segments: torch.Tensor, r: int) -> torch.Tensor:
    return x[segments == r]


@pytest.mark.parametrize("kind", ["rows", "mask"])
def test_packed_forward_and_backward_equal_each_rows_own(kind):
    """Positions restart per row and attention stays in it: hidden states, values, CE and every
    gradient of the packed forward equal the padded forward's on the same rows."""
    model = small_model()
    packed, padded = packed_and_padded()
    model.packed_attention = kind
    out_p, grads_p = loss_and_grads(model, packed)
    out_r, grads_r = loss_and_grads(model, padded)
    seg = packed["segments"]
    for r, n in enumerate(padded["lengths"].tolist()):
        for name in ("hidden", "values", "ce"):
            a, b = per_row(getattr(out_p, name), seg, r), getattr(out_r, name)[r, :n]
            assert rel(a, b) < 1e-6, (kind, name, r)
    for key, grad in grads_r.items():
        assert rel(grads_p[key], grad) < 1e-5, key
    # The sum reduction (gradients in the forward) too.
    w = (packed["targets"] != IGNORE_INDEX).float()
    w_r = (padded["targets"] != IGNORE_INDEX).float()
    loss_p = model(packed["tokens"], targets=packed["targets"], pair_weights=w, reduction="sum", segments=seg).loss
    loss_r = model(padded["tokens"], targets=padded["targets"], pair_weights=w_r, reduction="sum").loss
    assert rel(loss_p, loss_r) < 1e-6


def test_flex_document_mask_gives_the_rows_outputs():
    """FlexAttention's BlockMask (the CUDA path; forward only here: flex has no CPU backward)."""
    model = small_model()
    packed, _ = packed_and_padded()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex_attention warns that it is slow
        model.packed_attention = "rows"
        rows = model(packed["tokens"], targets=packed["targets"], with_values=True, segments=packed["segments"])
        model.packed_attention = "flex"
        flex = model(packed["tokens"], targets=packed["targets"], with_values=True, segments=packed["segments"])
    real = packed["segments"] >= 0
    for name in ("hidden", "values", "ce"):
        assert rel(getattr(flex, name)[real], getattr(rows, name)[real]) < 1e-6, name


def test_packed_rows_under_activation_checkpointing_and_per_row_logits():
    model = small_model()
    packed, padded = packed_and_padded()
    _, expected = loss_and_grads(model, packed)
    apply_activation_checkpointing(model, DistributedConfig(activation_checkpointing="full"))
    _, grads = loss_and_grads(model, packed)
    grads = {k.replace("._checkpoint_wrapped_module", ""): g for k, g in grads.items()}
    assert grads.keys() == expected.keys()
    for key, grad in expected.items():
        assert rel(grads[key], grad) < 1e-6, key
    logits = model.logits(packed["tokens"], n_heads=1, segments=packed["segments"])
    row_logits = model.logits(padded["tokens"], n_heads=1)
    for r, n in enumerate(padded["lengths"].tolist()):
        assert rel(per_row(logits, packed["segments"], r), row_logits[r, :n]) < 1e-6


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager-blocks", "compiled-blocks"])
def test_flex_document_attention_on_cuda_equals_each_rows_own(compiled):
    """The CUDA path: FlexAttention (compiled) with the document BlockMask, forward and backward, in
    eager and compiled blocks; head_dim 32 and sequences of 256 (FlexAttention's tile sizes)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, n_future_tokens=3)
    model = MTPTransformer(args, value_head=True).cuda()
    model.init_weights(std=0.1)
    packed, padded = ({k: v.cuda() for k, v in b.items()} for b in packed_and_padded(n_future=3, seq_len=256))
    _, expected = loss_and_grads(model, padded)
    if compiled:
        for block in [*model.layers, *model.extra_heads]:
            block.compile()
    _, grads = loss_and_grads(model, packed)
    assert model.packed_attention == "auto"
    for key, grad in expected.items():
        assert rel(grads[key], grad) < 1e-4, key


@pytest.mark.slow
def test_a_compiled_block_takes_packed_rows_without_recompiling_for_each_layout(tmp_path, monkeypatch):
    """The per-row attention runs between compiled graphs (a graph break), so a new layout of rows
    with the same shapes reuses the compiled code; the outputs equal eager's. (Forward only, to keep
    the compile short; tests/test_compile_float8.py compiles whole training steps.)"""
    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = small_model()
    packed, _ = packed_and_padded()
    examples = random_examples(6, seed=12)
    other = collate_packed([examples[:1], examples[1:4], examples[4:]], pad_id=0, seq_len=64)
    assert other["tokens"].shape == packed["tokens"].shape and not torch.equal(other["segments"], packed["segments"])
    with torch.no_grad():
        expected = [model(b["tokens"], with_values=True, segments=b["segments"]) for b in (packed, other)]
        model.layers[0].compile()
        compiled = model(packed["tokens"], with_values=True, segments=packed["segments"])
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = model(other["tokens"], with_values=True, segments=other["segments"])
    for got, want in zip((compiled, again), expected):
        assert rel(got.hidden, want.hidden) < 1e-5 and rel(got.values, want.values) < 1e-5


# ---------------------------------------------------------------- per-row weighting


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_td_weights_critic_targets_and_value_stats_are_per_row(lam):
    packed, padded = packed_and_padded()
    seg = packed["segments"]
    g = torch.Generator().manual_seed(5)
    values_r = torch.randn(padded["tokens"].shape, generator=g)
    values_p = torch.zeros(seg.shape)
    for r, n in enumerate(padded["lengths"].tolist()):
        values_p[seg == r] = values_r[r, :n]
    values_p[seg < 0] = 9.0  # padding's values must not reach any row
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    normalizer = AdvantageNormalizer()
    normalizer.update(td_weights_with_stats(values_r, rewards, padded["mask"], beta=0.5, w_min=0.1, w_max=5.0).stats)
    kw = dict(beta=0.5, w_min=0.1, w_max=5.0, lam=lam, normalizer=normalizer)
    td_p = td_weights_with_stats(values_p, rewards, packed["mask"], segments=seg, **kw)
    td_r = td_weights_with_stats(values_r, rewards, padded["mask"], **kw)
    torch.testing.assert_close(td_p.stats, td_r.stats, rtol=1e-6, atol=1e-6)
    heads_p = td_head_weights(td_p.weights, 3, segments=seg)
    heads_r = td_head_weights(td_r.weights, 3)
    g_p = critic_targets(values_p, rewards, packed["mask"], lam=lam, segments=seg)
    g_r = critic_targets(values_r, rewards, padded["mask"], lam=lam)
    states_p = response_states(packed["mask"], segments=seg)
    states_r = response_states(padded["mask"])
    for r, n in enumerate(padded["lengths"].tolist()):
        where = seg == r
        torch.testing.assert_close(td_p.weights[where], td_r.weights[r, :n])
        torch.testing.assert_close(heads_p[where], heads_r[r, :n])
        torch.testing.assert_close(g_p[where], g_r[r, :n])
        assert torch.equal(states_p[where], states_r[r, :n])
    assert not states_p[seg < 0].any() and (td_p.weights[seg < 0] == 0).all()
    stats_p = value_stats(values_p, rewards, packed["mask"], segments=seg)
    stats_r = value_stats(values_r, rewards, padded["mask"])
    for key, value in stats_r.items():
        torch.testing.assert_close(stats_p[key], value, msg=key)


def test_references_score_packed_rows_as_their_own(tiny):
    from wmtp.models.reference import ReferenceModel

    tokenizer = SentencePieceTokenizer(tiny / "tokenizer.model")
    rows = [json.loads(x) for x in (tiny / "data" / "train.jsonl").read_text().splitlines()[:5]]
    examples = encode_rows(tokenizer, rows)
    padded = collate(examples, pad_id=tokenizer.pad_id)
    packed = collate_packed([examples[:3], examples[3:]], pad_id=tokenizer.pad_id, seq_len=512)
    seg = packed["segments"]

    def fill(model, read, buffers_from=None):
        source = buffers_from() if buffers_from is not None else None
        model.to_empty(device="cpu")
        model.load_state_dict(read(), strict=False)
        if source is not None:
            for name, buf in source.named_buffers():
                model.get_buffer(name).copy_(buf)

    for folder in ("reference", "mtp_model"):
        ref = ReferenceModel(
            tiny / folder, kind="auto", tokenizer=tokenizer, device=torch.device("cpu"), shard=None, fill=fill
        )
        r_packed = ref.token_ce(packed["tokens"], segments=seg)
        r_rows = ref.token_ce(padded["tokens"])
        for r, n in enumerate(padded["lengths"].tolist()):
            assert rel(r_packed[seg == r], r_rows[r, :n]) < 1e-6, (folder, r)
        assert (r_packed[seg < 0] == 0).all()


# ---------------------------------------------------------------- recipes: one step, every arrangement

RECIPES = ("baseline", "critic", "verifiable", "rho1")


@pytest.fixture(scope="module")
def value_head(tiny, tmp_path_factory) -> Path:
    """A random value head, so that values, TD errors and λ-returns differ along every row."""
    dim = json.loads((tiny / "mtp_model" / "params.json").read_text())["dim"]
    weight = torch.randn(1, dim, generator=torch.Generator().manual_seed(7)) / dim**0.5
    return save_value_head(tmp_path_factory.mktemp("value_head"), weight)


def step_argv(name: str, tiny: Path, out: Path, value_head: Path, **overrides) -> list[str]:
    extra = {
        "baseline": {},
        "critic": {"critic.value_head": value_head, "critic.target": "lambda", "critic.lam": 0.5},
        "verifiable": {
            "critic.value_head": value_head,
            "td.lam": 0.5,
            "td.beta": 0.5,
            "critic.target": "lambda",
            "critic.lam": 0.5,
        },
        "rho1": {"reference.path": tiny / "reference"},
    }[name]
    common = {
        "model.max_seq_len": SEQ_LEN,
        "training.micro_batch_size": 2,
        "training.grad_accum_steps": 4,
        "validation.path": "",
    }
    return recipe_args(tiny, out, f"{name}_tiny.toml", **{**common, **extra, **overrides})


PER_RANK_METRICS = ("tokens", "flops")
"""Metrics of this rank's share of the step: the arrangement decides which rows a rank holds."""


def assert_same_step(actual: dict, expected: dict, what: str, *, ranks: int = 1) -> None:
    assert actual["metrics"].keys() == expected["metrics"].keys(), what
    for key, want in expected["metrics"].items():
        if ranks > 1 and key in PER_RANK_METRICS:
            continue
        got = actual["metrics"][key]
        assert (np.isnan(got) and np.isnan(want)) or abs(got - want) <= TOLERANCE * abs(want) + 1e-7, (what, key)
    assert actual["grads"].keys() == expected["grads"].keys() and expected["grads"], what
    for key, grad in expected["grads"].items():
        assert rel(actual["grads"][key], grad) <= TOLERANCE, (what, key, rel(actual["grads"][key], grad))


CONTROLS = {
    "verifiable shuffled": ("verifiable", {"td.control": "shuffled"}),
    "verifiable random": ("verifiable", {"td.control": "random"}),
    "rho1 random": ("rho1", {"rho1.control": "random"}),
}
"""The ablation controls, each a recipe with its option: drawn per row (shuffled), over the step's
rows (random: a permutation of the global batch's targets), or per micro-batch (Rho-1's
selection)."""
PER_MICRO_BATCH = ("rho1", "rho1 random")
"""Steps whose result depends on which rows share a micro-batch and in what order: held to the
padded micro-batches of the same plan."""


def same_as(name: str, arrangement: str) -> str:
    """The step `arrangement` must equal: padded in the sampler's order, or for a step that depends
    on the micro-batches (`PER_MICRO_BATCH`) the padded micro-batches of the same plan."""
    if name not in PER_MICRO_BATCH:
        return "padded"
    return arrangement + AS_PADDED if LAYOUTS[arrangement].packing else arrangement


def check_arrangements(name: str, results: dict, reference: dict | None = None) -> None:
    """Every arrangement against its padded step; with `reference` (the one-process results of the
    same rows) results are from 2 ranks, and also checked against it."""
    ranks = 1 if reference is None else 2
    for arrangement in LAYOUTS:
        assert results[arrangement]["segments"] == LAYOUTS[arrangement].packing, arrangement
        expected = results[same_as(name, arrangement)]
        assert_same_step(results[arrangement], expected, f"{name} {arrangement}", ranks=ranks)
        if reference is not None and same_as(name, arrangement) == "padded":
            what = f"{name} {arrangement} vs one process"
            assert_same_step(results[arrangement], reference["padded"], what, ranks=ranks)
    # The plans differ: packing holds the step in fewer micro-batches than padding does.
    assert results["packed"]["micro_batches"] < results["padded"]["micro_batches"]


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory, value_head) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("arrangements")
    return {name: step_results(name, step_argv(name, tiny, root / name, value_head)) for name in RECIPES}


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_grouped_and_packed_steps_equal_the_padded_step(one_process, name):
    check_arrangements(name, one_process[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", CONTROLS)
def test_controls_grouped_and_packed_equal_their_padded_step(tiny, tmp_path, value_head, name):
    recipe, option = CONTROLS[name]
    check_arrangements(name, step_results(recipe, step_argv(recipe, tiny, tmp_path, value_head, **option)))


@pytest.mark.slow
def test_two_ranks_with_accumulation_under_the_device_guard(one_process, tiny, tmp_path, value_head):
    """2 gloo ranks x 2 micro-batches of 2 rows (the one-process step's 8 rows): every arrangement
    under the guard that refuses host tensors in collectives, equal to its padded step and (the
    same micro-batches) to the one-process step."""
    runs = [
        {"recipe": name, "argv": step_argv(name, tiny, tmp_path / name, value_head, **{"training.grad_accum_steps": 2})}
        for name in RECIPES
    ]
    spec = {"guard": True, "arrangements": runs, "out": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec, default=str))
    torchrun("tests/torchrun_worker.py", [str(tmp_path / "spec.json")])
    results = torch.load(tmp_path / "arrangements.pt")
    for name in RECIPES:
        check_arrangements(name, results[name], one_process[name])


@pytest.mark.slow
def test_packed_run_killed_and_resumed_continues_exactly(tiny, tmp_path):
    """kill -9 after the step-2 checkpoint; the restarted run resumes mid-epoch from it and every
    step's loss equals the uninterrupted run's (the sampler's position is the whole data state)."""
    args = {"data.packing": "true", "model.max_seq_len": SEQ_LEN, "training.max_steps": 6, "checkpoint.save_every": 2}
    full = tmp_path / "full"
    load_recipe("full_finetune_baseline").main(recipe_args(tiny, full, "baseline_tiny.toml", **args))
    out = tmp_path / "killed"
    cmd = [sys.executable, "recipes/full_finetune_baseline.py", *recipe_args(tiny, out, "baseline_tiny.toml", **args)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **TEST_ENV}, start_new_session=True, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step_000002").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its step-2 checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    load_recipe("full_finetune_baseline").main(recipe_args(tiny, out, "baseline_tiny.toml", **args))
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    expected = {r["step"]: r["loss"] for r in read_metrics(full) if "loss" in r}
    assert losses == expected and sorted(losses) == list(range(1, 7))
