"""A recipe's real `train_step` on a generated model and batch, without checkpoint or data files.

Shared by `test_bench_step.py` (CPU step comparison) and `bench_mfu.py` (MFU on a GPU): both time
the code the recipes run, not a copy of it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import load_recipe  # noqa: E402
from wmtp.config.sections import DistributedConfig  # noqa: E402
from wmtp.constants import IGNORE_INDEX  # noqa: E402
from wmtp.data.collate import mtp_targets  # noqa: E402
from wmtp.data.first_diff import NO_FIRST_DIFF  # noqa: E402
from wmtp.distributed.env import DistInfo  # noqa: E402
from wmtp.distributed.parallelize import parallelize  # noqa: E402
from wmtp.models import ModelArgs, MTPTransformer  # noqa: E402
from wmtp.training.lr_schedule import build_scheduler  # noqa: E402
from wmtp.training.run import build_optimizer  # noqa: E402
from wmtp.training.step import resolve_precision  # noqa: E402
from wmtp.weighting.td import AdvantageNormalizer  # noqa: E402

SCHEDULE_STEPS = 1000
"""Length of the LR schedule (the benchmarks run a few steps of it)."""


def recipe_on_model(
    recipe_name: str,
    args: ModelArgs,
    info: DistInfo,
    *,
    mesh=None,
    precision: str = "fp32",
    dist_cfg: DistributedConfig | None = None,
    seed: int = 0,
) -> tuple[Any, ModuleType]:
    """(recipe object ready for train_step, its module): a random model parallelised as the recipes do."""
    module = load_recipe(f"full_finetune_{recipe_name}")
    config_cls = next(v for k, v in vars(module).items() if k.endswith("Config") and v.__module__ == module.__name__)
    recipe_cls = next(v for v in vars(module).values() if isinstance(v, type) and hasattr(v, "train_step"))
    cfg = config_cls()
    recipe = recipe_cls(cfg)
    with torch.device("meta"):
        model = MTPTransformer(args, value_head=recipe_name in ("critic", "verifiable"))
    param_dtype, recipe.autocast = resolve_precision(precision, info)
    model = parallelize(model, dist_cfg or DistributedConfig(), mesh=mesh, device=info.device, param_dtype=param_dtype)
    model.to_empty(device=info.device)
    torch.manual_seed(seed)
    model.init_weights()
    recipe.dist, recipe.model, recipe.model_args, recipe.n_future = info, model, args, args.n_future_tokens
    recipe.optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    recipe.scheduler = build_scheduler(recipe.optimizer, warmup_steps=0, total_steps=SCHEDULE_STEPS, min_lr_ratio=0.1)
    recipe.normalizer = AdvantageNormalizer(device=info.device)
    recipe.value_model = None  # verifiable: TD weights from the policy's own value head (no critic.model)
    return recipe, module


def synthetic_batch(
    args: ModelArgs, *, batch: int, seq: int, prompt: int, device: torch.device, seed: int = 1
) -> dict[str, torch.Tensor]:
    """A micro-batch as the loader makes it: the first `prompt` tokens of each row unscored."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, prompt:] = True
    labels = torch.where(mask, tokens, IGNORE_INDEX)
    out = {
        "tokens": tokens,
        "mask": mask,
        "targets": mtp_targets(labels, args.n_future_tokens),
        "lengths": torch.full((batch,), seq),
        "is_correct": torch.arange(batch) % 2 == 0,
        "sample": torch.arange(batch),
        "first_diff": torch.full((batch,), NO_FIRST_DIFF),
    }
    return {k: v.to(device) for k, v in out.items()}


def single_device(device: torch.device) -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device, in_process_group=False)
