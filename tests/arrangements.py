"""One optimizer step of a recipe on the same rows in every arrangement of its micro-batches.

`step_results` sets a recipe up on the tiny artifacts, draws one global batch from its sampler and
runs the recipe's own `train_step` on it arranged each way (`LAYOUTS`): in the sampler's order
(padded, the reference), grouped by length, packed, each with a fixed count per micro-batch and
with a token budget. Each packed plan also runs as padded rows (the same rows per micro-batch, not
packed): for Rho-1, whose selection unit is the micro-batch, that is the step a packed one equals.
Before the optimizer would step, the gradients are gathered in full and kept; the weights never
change, so every arrangement starts from the same model. Used in one process by
tests/test_packing.py and under torchrun by tests/torchrun_worker.py (the same function on every
rank: the full gradients are gathered collectively).
"""

from __future__ import annotations

from typing import Any

import torch

from tests.conftest import load_recipe
from wmtp.data.packing import BatchLayout
from wmtp.distributed.env import full_tensor

GROUPED_BUDGET_TOKENS = 300
"""About three tiny rows (~100 tokens each) per micro-batch."""
SEQ_LEN = 256
"""model.max_seq_len of these steps: two tiny rows per packed sequence, so a step has several."""
PACKED_BUDGET_TOKENS = 2 * SEQ_LEN
LAYOUTS = {
    "padded": BatchLayout(),
    "grouped": BatchLayout(group_by_length=True),
    "grouped_budget": BatchLayout(group_by_length=True, micro_batch_tokens=GROUPED_BUDGET_TOKENS),
    "packed": BatchLayout(packing=True),
    "packed_budget": BatchLayout(packing=True, micro_batch_tokens=PACKED_BUDGET_TOKENS),
}
AS_PADDED = "_as_padded"
"""Suffix of a packed plan's micro-batches read as padded rows."""


def _recipe_class(module):
    return next(
        v
        for v in vars(module).values()
        if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "train_step")
    )


def _config_class(module):
    return next(
        v for k, v in vars(module).items() if k.endswith("Config") and getattr(v, "__module__", "") == module.__name__
    )


def step_results(recipe: str, argv: list[str]) -> dict[str, dict[str, Any]]:
    """{arrangement: {"metrics": train_step's metrics, "grads": {name: full gradient}, "micro_batches":
    count on this rank, "segments": whether packed}} for one global batch of `recipe`."""
    module = load_recipe(f"full_finetune_{recipe}")
    module.destroy = lambda: None  # the caller owns the process group (torchrun runs several recipes)
    run = _recipe_class(module)(module.main_config(_config_class(module), argv))
    run.setup()
    captured: list[dict[str, torch.Tensor]] = []

    def keep_gradients(params, optimizer, scheduler, max_grad_norm) -> dict[str, float]:
        captured.append(
            {k: full_tensor(p.grad).detach().clone() for k, p in run.model.named_parameters() if p.grad is not None}
        )
        optimizer.zero_grad(set_to_none=True)
        return {}

    module.clip_and_step = keep_gradients
    results: dict[str, dict[str, Any]] = {}
    try:
        ids = run.loader.sampler.next_ids(run.loader.global_batch)
        for name, layout in LAYOUTS.items():
            for packed in (True, False) if layout.packing else (False,):
                micro = run.loader.micro_batches(ids, layout, packed=packed)
                metrics = run.train_step(micro)
                results[name if packed == layout.packing else name + AS_PADDED] = {
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    "grads": captured.pop(),
                    "micro_batches": len(micro),
                    "segments": all("segments" in mb for mb in micro),
                }
    finally:
        run.cleanup(status="FINISHED")
    return results
