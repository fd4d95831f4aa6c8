"""The controls in the recipes: uniform weights without a value loss are the baseline, and the random
controls draw the same under two gloo ranks with accumulation and after a resume; a critic with its
own trunk (critic.trunk = "own") and the verifiable weights made from it (critic.model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import load_recipe, recipe_args, torchrun
from wmtp.models import load_mtp
from wmtp.training.metrics import read_metrics
from wmtp.weighting import td_weights

pytestmark = pytest.mark.slow

CONTROLS = {
    "verifiable": ("verifiable_tiny.toml", {"td.control": "random", "critic.value_head": "none"}),
    "rho1": ("rho1_tiny.toml", {"rho1.control": "random"}),
}


def test_uniform_control_without_value_loss_is_the_baseline_step(tiny, tmp_path):
    baseline, verifiable = load_recipe("full_finetune_baseline"), load_recipe("full_finetune_verifiable")
    common = {"data.sampler": "balanced", "training.max_steps": 2}
    b = baseline.BaselineRecipe(
        baseline.main_config(baseline.BaselineConfig, recipe_args(tiny, tmp_path / "b", "baseline_tiny.toml", **common))
    )
    v_args = {**common, "critic.value_head": "none", "td.control": "uniform", "td.value_coef": 0}
    v = verifiable.VerifiableRecipe(
        verifiable.main_config(
            verifiable.VerifiableRecipeConfig, recipe_args(tiny, tmp_path / "v", "verifiable_tiny.toml", **v_args)
        )
    )
    b.setup()
    v.setup()
    try:
        batches = v.loader.next_step()
        assert not all(mb["is_correct"].all() for mb in batches)  # incorrect rows too: weights would differ
        from_baseline, from_verifiable = b.train_step(batches), v.train_step(batches)
        after_b, after_v = b.model.state_dict(), v.model.state_dict()
    finally:
        b.cleanup(status="FINISHED")
        v.cleanup(status="FINISHED")
    for key in ["loss", *(f"loss/head_{k}" for k in range(4))]:
        assert from_verifiable[key] == pytest.approx(from_baseline[key], rel=1e-6), key
    assert from_verifiable["weight/head_0"] == pytest.approx(1.0)
    assert from_verifiable["diag/weight/first_diff"] == from_verifiable["diag/weight/other"] == 1.0
    for key, value in after_b.items():
        torch.testing.assert_close(after_v[key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", list(CONTROLS))
def test_random_controls_hold_under_two_ranks_with_accumulation_and_after_a_resume(tiny, tmp_path, name):
    config, control = CONTROLS[name]
    common = {"training.max_steps": 4, "training.micro_batch_size": 2, **control}
    if name == "rho1":
        common["reference.path"] = tiny / "mtp_model"  # an MTP reference (head 0): no transformers import

    def args(out: Path, **extra) -> list[str]:
        return recipe_args(tiny, out, config, **common, **extra)

    # One process accumulating two micro-batches, stopped after step 2 and resumed ...
    main = load_recipe(f"full_finetune_{name}").main
    main(args(tmp_path / "single", **{"training.grad_accum_steps": 2, "training.stop_at_step": 2}))
    main(args(tmp_path / "single", **{"training.grad_accum_steps": 2}))
    # ... against two ranks with one micro-batch each, uninterrupted.
    torchrun(f"recipes/full_finetune_{name}.py", args(tmp_path / "fsdp"))
    single, fsdp = ([r for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("single", "fsdp"))
    assert [r["step"] for r in single] == [r["step"] for r in fsdp] == [1, 2, 3, 4]
    keys = ["loss", "diag/weight/first_diff"] if name == "verifiable" else ["loss", "diag/selected/first_diff"]
    for key in keys:
        one, two = (torch.tensor([r[key] for r in rows]) for rows in (single, fsdp))
        torch.testing.assert_close(one, two, rtol=1e-5, atol=0, equal_nan=True, msg=key)


def test_a_critic_with_its_own_trunk_trains_it_and_makes_the_verifiable_weights(tiny, tmp_path):
    critic = load_recipe("full_finetune_critic")
    cfg = critic.main_config(
        critic.CriticRecipeConfig,
        recipe_args(
            tiny,
            tmp_path / "critic",
            "critic_tiny.toml",
            **{"training.max_steps": 3, "critic.trunk": "own", "validation.path": tiny / "data" / "valid.jsonl"},
        ),
    )
    run = critic.CriticRecipe(cfg)
    run.setup()
    try:
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        run.train()
        after = run.model.state_dict()
    finally:
        run.cleanup(status="FINISHED")
    n_trunk = run.model.args.n_trunk_layers
    for key, value in before.items():
        block = int(key.split(".")[1]) if key.startswith("layers.") else None
        trains = key.startswith(("tok_embeddings.", "norm.", "value_head.")) or (block is not None and block < n_trunk)
        assert torch.equal(after[key], value) != trains, key  # heads and output bitwise unchanged
    value_model = tmp_path / "critic" / "final"
    assert {p.name for p in value_model.iterdir()} == {"params.json", "model.safetensors", "tokenizer.model"}

    verifiable = load_recipe("full_finetune_verifiable")
    v_args = {"critic.model": value_model, "critic.value_head": "none", "training.max_steps": 1}
    v = verifiable.VerifiableRecipe(
        verifiable.main_config(
            verifiable.VerifiableRecipeConfig, recipe_args(tiny, tmp_path / "v", "verifiable_tiny.toml", **v_args)
        )
    )
    v.setup()
    try:
        batches = v.loader.next_step()
        planned = v.planned_weights(batches)
        metrics = v.train_step(batches)
    finally:
        v.cleanup(status="FINISHED")
    assert v.model.value_head is None
    reference = load_mtp(value_model, dtype=torch.float32)
    td = v.cfg.td
    for mb, (weights, used, _) in zip(batches, planned):
        with torch.no_grad():
            values = reference(mb["tokens"], with_values=True, with_heads=False).values
        expected = td_weights(
            values, mb["is_correct"].float(), mb["mask"], beta=td.beta, w_min=td.w_min, w_max=td.w_max
        )
        torch.testing.assert_close(weights.weights, expected)
        assert torch.equal(used, weights.weights)  # no control
    assert math.isfinite(metrics["value_loss"]) and math.isfinite(metrics["diag/td/other"])
