"""A whole training step (forward, backward, clip, AdamW) of an MTP model of realistic shape for a CPU.

The model: dim 512, 8 blocks (4 trunk + 4 heads), 8 attention heads, V = 32000, fp32; one
micro-batch of 2 sequences of 512 tokens whose last 384 are the response (the scored pairs).
Cases, each in a fresh process (see harness.py):
- baseline recipe, recompute path: the step before this path existed, the model's loss with
  reduction "none" and the weights 1/(n N_k) applied after it, so the backward recomputes every
  logits chunk (8·N·D·V FLOPs of vocabulary matmuls); the table's baseline;
- baseline recipe: `BaselineRecipe.train_step` itself, gradients computed in the forward (6·N·D·V);
- verifiable recipe, recompute path / verifiable recipe: the same two for the TD-weighted step
  (`VerifiableRecipe.train_step` itself for the second), value head and value loss included;
- torchtune-style per-head chunked CE: the model's hidden states, then per head the logits of 8
  position chunks materialised, upcast to fp32 and fed to F.cross_entropy, as torchtune's
  CEWithChunkedOutputLoss does for one head, with autograd keeping the chunks' logits;
- blocks only: the same step with the vocabulary projection replaced by a fixed linear read-out of
  the heads' hidden states (no [N, V] work), the part of the step the loss does not touch;
- 6NHV floor: blocks only plus the three vocabulary matmuls of the scored pairs (logits, dH, dW) at
  full size into preallocated buffers, i.e. the step if the loss cost nothing but its matmuls.
The loss's share of a step is (step - blocks only) / step. Model FLOPs (flops.py's convention) give
each case's TFLOP/s. The recipe cases are checked against the recompute path (loss and every
gradient, relative 1e-5).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import BenchSession, Case, Settings, relative_error, run_case

SHAPE = {
    "dim": 512,
    "n_layers": 8,
    "n_heads": 8,
    "vocab": 32000,
    "n_future": 4,
    "batch": 2,
    "seq": 512,
    "prompt": int(os.environ.get("WMTP_BENCH_STEP_PROMPT", 1)),
}
"""WMTP_BENCH_STEP_PROMPT: tokens of each sequence outside the response (default 1: the BOS only, so
every later token is scored, as in plain language-model training; a long prompt lowers the loss's
share of the step)."""
TOLERANCE = 1e-5
TORCHTUNE_CHUNKS = 8
"""torchtune's CEWithChunkedOutputLoss default number of chunks."""
TABLE = (
    f"training step, dim {SHAPE['dim']}, {SHAPE['n_layers']} blocks, V {SHAPE['vocab']}, "
    f"{SHAPE['batch']} x {SHAPE['seq']} tokens ({SHAPE['seq'] - SHAPE['prompt']} response), fp32"
)


def setup_recipe(device: torch.device, recipe_name: str):
    """(recipe ready for train_step, its module, one micro-batch): the benchmark model, no files read."""
    from recipe_step import recipe_on_model, single_device, synthetic_batch

    from wmtp.models import ModelArgs

    args = ModelArgs(
        dim=SHAPE["dim"],
        n_layers=SHAPE["n_layers"],
        n_heads=SHAPE["n_heads"],
        vocab_size=SHAPE["vocab"],
        n_future_tokens=SHAPE["n_future"],
        max_seq_len=SHAPE["seq"],
    )
    recipe, module = recipe_on_model(recipe_name, args, single_device(device))
    return (
        recipe,
        module,
        synthetic_batch(args, batch=SHAPE["batch"], seq=SHAPE["seq"], prompt=SHAPE["prompt"], device=device),
    )


def _model_flops(recipe, batch) -> float:
    from wmtp.training.step import step_work

    pairs = int((batch["targets"] >= 0).sum())
    return step_work([batch], recipe.model_args, heads=recipe.n_future, scored_pairs=pairs)[1]


def _stepper(recipe, module, step: Callable[[Callable], Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    """(run, prepare): `run` does one `step(clip)` and returns (loss, gradients); `prepare` puts the
    initial weights back, untimed, so that every call computes the same loss and gradients (AdamW's
    moments carry on, as in the cases without a check: none of them pays for initialising them).

    `clip` is the recipes' clip_and_step that first keeps the gradients (references, no copy: they
    are then clipped in place, the same way on every path); the recipe module's own reference to
    clip_and_step is replaced by it.
    """
    from wmtp.training.step import clip_and_step

    weights = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    grads: list[list[torch.Tensor]] = []

    def clip(params, optimizer, scheduler, max_grad_norm):
        grads.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in recipe.model.parameters()])
        return clip_and_step(params, optimizer, scheduler, max_grad_norm)

    module.clip_and_step = clip

    def prepare() -> None:
        recipe.model.load_state_dict(weights)
        grads.clear()

    def run():
        metrics = step(clip)
        return torch.tensor(metrics["loss"]), grads[0]

    return run, prepare


def recompute_baseline_step(recipe, batch, clip: Callable) -> dict[str, float]:
    """The baseline step as it was: reduction "none", weights after the loss, recomputing backward."""
    from wmtp.losses.normalization import global_valid_pair_counts, head_mean_weights

    _, counts = global_valid_pair_counts([batch["targets"]])
    out = recipe.model(
        batch["tokens"], targets=batch["targets"], pair_weights=head_mean_weights(batch["targets"], counts)
    )
    loss = out.ce.sum()
    loss.backward()
    loss = loss.detach()
    clip(recipe.model.parameters(), recipe.optimizer, recipe.scheduler, 1.0)
    return {"loss": float(loss)}


def recompute_verifiable_step(recipe, batch, clip: Callable) -> dict[str, float]:
    """The verifiable step as it was: values and CE from one forward with reduction "none", then
    the TD weights multiply the CE and the backward recomputes the logits."""
    from wmtp.losses.normalization import global_valid_pair_counts, head_mean_weights
    from wmtp.weighting.critic import critic_targets, response_states, value_loss
    from wmtp.weighting.td import td_head_weights, td_weights_with_stats

    td = recipe.cfg.td
    targets, mask, rewards = batch["targets"], batch["mask"], batch["is_correct"].float()
    _, counts = global_valid_pair_counts([targets])
    out = recipe.model(batch["tokens"], targets=targets, with_values=True)
    weights = td_weights_with_stats(out.values.detach(), rewards, mask, beta=td.beta, w_min=td.w_min, w_max=td.w_max)
    policy = out.ce * td_head_weights(weights.weights, recipe.n_future) * head_mean_weights(targets, counts)
    states = response_states(mask)
    v_sum, _ = value_loss(out.values, critic_targets(out.values.detach(), rewards, mask), states)
    loss = policy.sum() + td.value_coef * v_sum / states.sum()
    loss.backward()
    loss = loss.detach()
    clip(recipe.model.parameters(), recipe.optimizer, recipe.scheduler, 1.0)
    return {"loss": float(loss)}


def _check(save_reference: str | None, reference: str | None) -> Callable[[Any], dict[str, float]]:
    def check(outputs) -> dict[str, float]:
        loss, grads = outputs
        if save_reference:
            torch.save([loss.cpu(), [g.cpu() for g in grads]], save_reference)
            return {}
        ref_loss, ref_grads = torch.load(reference)
        errors = {"loss": relative_error(loss, ref_loss)}
        errors["gradients"] = max(relative_error(a, e) for a, e in zip(grads, ref_grads))
        return errors

    return check


# Builders: each runs inside a worker process (see harness.worker_main).


def build_recipe_step(
    device: torch.device,
    settings: Settings,
    recipe_name: str,
    recompute: bool,
    save_reference: str | None = None,
    reference: str | None = None,
) -> Case:
    recipe, module, batch = setup_recipe(device, recipe_name)
    if recompute:
        old = recompute_baseline_step if recipe_name == "baseline" else recompute_verifiable_step
        step, label = (lambda clip: old(recipe, batch, clip)), 'reduction "none", backward recomputes (8NHV)'
    else:
        step, label = (lambda clip: recipe.train_step([batch])), f"{type(recipe).__name__}.train_step (6NHV)"
    run, prepare = _stepper(recipe, module, step)
    return Case(
        run=run,
        prepare=prepare,
        check=_check(save_reference, reference),
        tolerance=TOLERANCE,
        label=label,
        flops=_model_flops(recipe, batch),
    )


def _blocks_step(recipe, batch, extra: Callable[[torch.Tensor], None] | None = None) -> Callable[[], Any]:
    """Forward, a cheap stand-in loss on the heads' hidden states, backward, clip and AdamW."""
    from wmtp.training.step import clip_and_step

    readout = torch.randn(SHAPE["dim"], generator=torch.Generator().manual_seed(2)).to(batch["tokens"].device)

    def run():
        out = recipe.model(batch["tokens"])
        (out.hidden @ readout).mean().backward()
        if extra is not None:
            extra(out.hidden.detach())
        clip_and_step(recipe.model.parameters(), recipe.optimizer, recipe.scheduler, 1.0)
        recipe.optimizer.zero_grad(set_to_none=True)

    return run


def build_blocks_only(device: torch.device, settings: Settings) -> Case:
    recipe, _, batch = setup_recipe(device, "baseline")
    return Case(run=_blocks_step(recipe, batch), label="no vocabulary projection", flops=None)


def build_floor(device: torch.device, settings: Settings) -> Case:
    recipe, _, batch = setup_recipe(device, "baseline")
    weight = recipe.model.output.weight.detach()
    pairs = int((batch["targets"] >= 0).sum())
    logits = torch.empty(pairs, SHAPE["vocab"], device=device)
    d_hidden, d_weight = torch.empty(pairs, SHAPE["dim"], device=device), torch.empty_like(weight)

    def vocab_matmuls(hidden: torch.Tensor) -> None:
        h = hidden.reshape(-1, SHAPE["dim"])[:pairs]
        torch.mm(h, weight.T, out=logits)
        torch.mm(logits, weight, out=d_hidden)
        torch.mm(logits.T, h, out=d_weight)

    return Case(
        run=_blocks_step(recipe, batch, vocab_matmuls),
        label="blocks + logits, dH, dW matmuls",
        flops=_model_flops(recipe, batch),
    )


def build_torchtune(device: torch.device, settings: Settings) -> Case:
    from wmtp.constants import IGNORE_INDEX
    from wmtp.training.step import clip_and_step

    recipe, _, batch = setup_recipe(device, "baseline")
    targets = batch["targets"]
    counts = (targets != IGNORE_INDEX).sum(dim=(0, 1))

    def run():
        out = recipe.model(batch["tokens"])
        loss = 0.0
        for k in range(recipe.n_future):
            hidden_chunks = out.hidden[:, :, k].chunk(TORCHTUNE_CHUNKS, dim=1)
            target_chunks = targets[:, :, k].chunk(TORCHTUNE_CHUNKS, dim=1)
            head = sum(
                F.cross_entropy(
                    F.linear(h, recipe.model.output.weight).float().flatten(0, 1),
                    t.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                for h, t in zip(hidden_chunks, target_chunks)
            )
            loss = loss + head / (recipe.n_future * counts[k])
        loss.backward()
        clip_and_step(recipe.model.parameters(), recipe.optimizer, recipe.scheduler, 1.0)
        recipe.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return Case(
        run=run, label=f"per head, {TORCHTUNE_CHUNKS} position chunks, fp32 upcast", flops=_model_flops(recipe, batch)
    )


@dataclasses.dataclass(frozen=True)
class StepBench:
    name: str
    builder: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    role: str = ""


CASES = [
    StepBench(
        "baseline recipe, recompute path",
        "build_recipe_step",
        {"recipe_name": "baseline", "recompute": True},
        role="baseline",
    ),
    StepBench("baseline recipe", "build_recipe_step", {"recipe_name": "baseline", "recompute": False}),
    StepBench(
        "verifiable recipe, recompute path", "build_recipe_step", {"recipe_name": "verifiable", "recompute": True}
    ),
    StepBench("verifiable recipe", "build_recipe_step", {"recipe_name": "verifiable", "recompute": False}),
    StepBench("torchtune-style chunked CE", "build_torchtune"),
    StepBench("blocks only", "build_blocks_only"),
    StepBench("6NHV floor", "build_floor", role="floor"),
]
REFERENCES = {"baseline": "baseline recipe, recompute path", "verifiable": "verifiable recipe, recompute path"}


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("step")
    return {name: str(folder / f"{name}.pt") for name in REFERENCES}


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-").replace(",", "") for c in CASES])
def test_step(case: StepBench, settings: Settings, bench: BenchSession, references: dict[str, str]) -> None:
    params = dict(case.params)
    if case.builder == "build_recipe_step":
        key = "save_reference" if params["recompute"] else "reference"
        params[key] = references[params["recipe_name"]]
    result = run_case(settings, TABLE, case.name, __file__, case.builder, params, role=case.role)
    bench.record(result)
    assert result.status == "ok", f"{case.name}: errors {result.errors} above tolerance {result.tolerance}"
