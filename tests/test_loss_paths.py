"""The recipes' loss paths: gradients in the forward (6NHV) equal the recompute path (8NHV), and one
training step of each recipe does exactly the vocabulary-matmul FLOPs its path should."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import load_recipe, recipe_args
from wmtp.constants import IGNORE_INDEX
from wmtp.models import ModelArgs, MTPTransformer
from wmtp.weighting.td import td_head_weights, td_weights

aten = torch.ops.aten
ARGS = ModelArgs(dim=48, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=211, multiple_of=16, n_future_tokens=3)


def tiny_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [3, 17], targets [3, 17, 3] (prompt and padding ignored), response mask [3, 17]."""
    tokens = torch.randint(0, ARGS.vocab_size, (3, 17), generator=gen)
    mask = torch.zeros(3, 17, dtype=torch.bool)
    for row, (start, end) in enumerate([(4, 17), (6, 12), (2, 9)]):
        mask[row, start:end] = True
    labels = torch.where(mask, tokens, IGNORE_INDEX)
    padded = torch.cat([labels, torch.full((3, ARGS.n_future_tokens), IGNORE_INDEX)], dim=1)
    targets = torch.stack([padded[:, 1 + k : 18 + k] for k in range(ARGS.n_future_tokens)], dim=-1)
    return tokens, targets, mask


def loss_and_grads(model: MTPTransformer, tokens, targets, weights, reduction: str):
    model.zero_grad(set_to_none=True)
    out = model(tokens, targets=targets, pair_weights=weights, reduction=reduction, with_values=True)
    loss = out.loss if reduction == "sum" else out.ce.sum()
    (loss + 0.5 * out.values.square().mean()).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["baseline", "verifiable"])
def test_gradients_in_the_forward_equal_the_recompute_path(kind):
    gen = torch.Generator().manual_seed(3)
    model = MTPTransformer(ARGS, value_head=True)
    model.init_weights(std=0.2, generator=gen)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 0.5, generator=gen)
    tokens, targets, mask = tiny_batch(gen)
    valid = targets != IGNORE_INDEX
    counts = valid.sum(dim=(0, 1)).double()
    mean_w = valid / (ARGS.n_future_tokens * counts)
    if kind == "baseline":
        weights = mean_w
    else:
        rewards = torch.tensor([1.0, 0.0, 1.0])

        def weights(values):  # noqa: F811 - TD weights from this forward's values, as the recipe does
            w = td_weights(values.detach(), rewards, mask, beta=0.9, w_min=0.1, w_max=5.0)
            return td_head_weights(w, ARGS.n_future_tokens) * mean_w

    ref_loss, ref_grads = loss_and_grads(model, tokens, targets, weights, "none")
    loss, grads = loss_and_grads(model, tokens, targets, weights, "sum")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        # Relative to the gradient's norm: elementwise, entries near 0 only differ in rounding.
        err = float((grad - ref_grads[name]).norm() / ref_grads[name].norm())
        assert err <= 1e-6, (name, err)
    assert any(grad.abs().sum() > 0 for name, grad in grads.items() if name == "output.weight")


class VocabMatmulFlops(TorchDispatchMode):
    """2·m·k·n of every matrix product with a dimension equal to the vocabulary size."""

    PRODUCTS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm}

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.flops, self.other_dims = vocab, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.PRODUCTS:
            a, b = (args[0], args[1]) if func.overloadpacket in (aten.mm, aten.bmm) else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            if self.vocab in (m, k, n):
                self.flops += 2 * batch * m * k * n
            else:
                self.other_dims.update((m, k, n))
        return func(*args, **(kwargs or {}))


RECIPE_CASES = {
    "baseline": ("baseline_tiny.toml", {}, 6),
    "verifiable": ("verifiable_tiny.toml", {"critic.value_head": "none"}, 6),
    "rho1": ("rho1_tiny.toml", {}, 8),  # CE first, then the selection: the backward recomputes
    "critic": ("critic_tiny.toml", {"validation.path": ""}, 0),  # the heads never run
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPE_CASES))
def test_one_training_step_does_the_vocabulary_flops_of_its_path(tiny, tmp_path, name):
    config, overrides, per_pair = RECIPE_CASES[name]
    if name == "rho1":
        overrides = {"reference.path": tiny / "reference"}
    module = load_recipe(f"full_finetune_{name}")
    config_cls = next(v for k, v in vars(module).items() if k.endswith("Config") and v.__module__ == module.__name__)
    recipe_cls = next(v for v in vars(module).values() if isinstance(v, type) and hasattr(v, "train_step"))
    cfg = module.main_config(
        config_cls,
        recipe_args(
            tiny, tmp_path, config, **{"training.micro_batch_size": 3, "training.grad_accum_steps": 2, **overrides}
        ),
    )
    recipe = recipe_cls(cfg)
    recipe.setup()
    try:
        batch = recipe.loader.next_step()
        vocab, dim = recipe.model_args.vocab_size, recipe.model_args.dim
        pairs = sum(int((mb["targets"] != IGNORE_INDEX).sum()) for mb in batch)
        positions = sum(mb["tokens"].numel() for mb in batch)
        counter = VocabMatmulFlops(vocab)
        with counter:
            recipe.train_step(batch)
    finally:
        recipe.cleanup(status="FINISHED")
    assert vocab not in counter.other_dims and pairs != vocab, "ambiguous shapes: pick other batch sizes"
    expected = per_pair * pairs * dim * vocab
    if name == "rho1":
        expected += 2 * positions * dim * vocab  # the reference's logits (its hidden size is the policy's)
    assert counter.flops == expected, (counter.flops / (pairs * dim * vocab), per_pair)
