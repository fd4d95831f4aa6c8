"""distributed.compile (per-block torch.compile) against eager, and float8's module selection and guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import load_recipe, recipe_args, run_script
from wmtp.models import ModelArgs, MTPTransformer
from wmtp.training.metrics import read_metrics

COMPILE_STEPS = 4
COMPILE_RTOL = 1e-6
"""Inductor fuses and reorders fp32 elementwise work and reductions (RMSNorm, SwiGLU, RoPE): the
losses differ by rounding only (measured: at most 1.5e-9 relative over four steps on a 2-core AMD
EPYC). 1e-6 leaves room for other CPUs' vector widths and none for a wrong graph (a wrong mask or
RoPE moves the loss by 1e-3 or more)."""
BLOCK_LINEARS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    common = {"training.max_steps": COMPILE_STEPS, "training.micro_batch_size": 2}
    load_recipe("full_finetune_baseline").main(recipe_args(tiny, tmp_path / "eager", "baseline_tiny.toml", **common))
    run_script(
        [
            "recipes/full_finetune_baseline.py",
            *recipe_args(
                tiny, tmp_path / "compiled", "baseline_tiny.toml", **common, **{"distributed.compile": "true"}
            ),
        ]
    )
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled) == COMPILE_STEPS
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=COMPILE_RTOL, atol=0)
    assert any((tmp_path / "inductor").rglob("*.py")), "inductor generated no code: nothing was compiled"


def test_float8_converts_exactly_the_block_linears_of_float8_shape():
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from torchao.float8.float8_linear import Float8Linear

    from wmtp.distributed.parallelize import convert_float8

    # dim 48, 4 heads of 12, 2 KV heads: wk and wv are 48 -> 24, not multiples of 16, so they stay.
    args = ModelArgs(dim=48, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, n_future_tokens=3)
    with torch.device("meta"):
        model = MTPTransformer(args, value_head=True)
    keys = set(model.state_dict())
    blocks = [f"layers.{i}" for i in range(len(model.layers))] + [f"extra_heads.{j}" for j in range(2)]
    expected = {f"{b}.{name}" for b in blocks for name in BLOCK_LINEARS if not name.endswith(("wk", "wv"))}
    converted = convert_float8(model)
    assert set(converted) == expected
    assert {n for n, m in model.named_modules() if isinstance(m, Float8Linear)} == expected
    assert type(model.output) is nn.Linear and type(model.value_head) is nn.Linear
    assert type(model.layers[0].attention.wk) is nn.Linear
    assert set(model.state_dict()) == keys  # checkpoints load and save unchanged


@pytest.mark.slow
def test_float8_without_a_float8_gpu_stops_at_setup_with_a_clear_message(tiny, tmp_path):
    out = tmp_path / "run"
    proc = run_script(
        [
            "recipes/full_finetune_baseline.py",
            *recipe_args(tiny, out, "baseline_tiny.toml", **{"distributed.float8": "true"}),
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "distributed.float8 = true needs a CUDA GPU with compute capability >= 8.9" in proc.stderr
    assert "set distributed.float8 = false" in proc.stderr
    assert not (out / "metrics.jsonl").exists()  # stopped before training started
