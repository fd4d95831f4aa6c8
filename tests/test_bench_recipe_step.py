"""benchmarks/recipe_step.py builds a recipe without its setup: the benchmarks' recipes must still take
a real step, or the timings in benchmarks/ would stop running when a recipe gains state."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.conftest import ROOT
from wmtp.models import ModelArgs

sys.path.insert(0, str(ROOT / "benchmarks"))

from recipe_step import recipe_on_model, single_device, synthetic_batch  # noqa: E402

TINY = ModelArgs(dim=32, n_layers=3, n_heads=2, vocab_size=64, n_future_tokens=2, max_seq_len=16)


@pytest.mark.parametrize("name", ["baseline", "verifiable"])
def test_the_benchmarked_recipes_take_a_step(name):
    recipe, _ = recipe_on_model(name, TINY, single_device(torch.device("cpu")))
    before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    metrics = recipe.train_step([synthetic_batch(TINY, batch=2, seq=16, prompt=4, device=torch.device("cpu"))])
    assert math.isfinite(metrics["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in recipe.model.state_dict().items())
