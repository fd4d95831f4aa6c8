"""What differs off the CPU: no float64 on devices without it (MPS), fp32 RoPE under bf16 weights,
and training outputs that a forked recipe may modify in place under FSDP."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import wmtp.kernels.backend as backend
from tests.conftest import load_recipe, recipe_args
from wmtp.distributed.parallelize import shard
from wmtp.models import ModelArgs, MTPTransformer, load_mtp
from wmtp.models.mtp_transformer import rope_tables

ARGS = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16, n_future_tokens=2, max_seq_len=64)


class NoFloat64OnDevice(TorchDispatchMode):
    """Fails at the first op that makes a float64 tensor on a device type without float64."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float64
                and t.device.type in backend.NO_FLOAT64_DEVICE_TYPES
            ):
                raise AssertionError(f"{func} made a float64 tensor on {t.device}")
        return out


def test_the_float64_guard_fails_where_float64_appears(monkeypatch):
    monkeypatch.setattr(backend, "NO_FLOAT64_DEVICE_TYPES", {"mps", "cpu"})
    with pytest.raises(AssertionError, match="float64 tensor on cpu"), NoFloat64OnDevice():
        torch.ones(2).double()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["baseline", "critic", "verifiable", "rho1"])
def test_no_recipe_makes_a_float64_tensor_where_the_device_has_none(tiny, tmp_path, monkeypatch, name):
    """As MPS would see it: the CPU is declared a device without float64, and a whole run (setup,
    steps with TD statistics and Rho-1 counts, held-out evaluation, export) must not make one; rows
    packed (per-row weighting of packed sequences)."""
    monkeypatch.setattr(backend, "NO_FLOAT64_DEVICE_TYPES", {"mps", "cpu"})
    extra = {
        "baseline": {},
        "critic": {"validation.every": 1, "validation.max_rows": 0},
        "verifiable": {"critic.value_head": "none", "td.normalize": "true"},
        "rho1": {"reference.path": tiny / "reference"},
    }[name]
    args = recipe_args(
        tiny,
        tmp_path,
        f"{name}_tiny.toml",
        **{
            "training.max_steps": 2,
            "validation.path": tiny / "data" / "valid.jsonl",
            "validation.max_rows": 8,
            "data.packing": "true",
            "model.max_seq_len": 256,
            **extra,
        },
    )
    with NoFloat64OnDevice():
        load_recipe(f"full_finetune_{name}").main(args)


def test_rope_tables_stay_fp32_when_the_weights_are_bf16(tiny):
    model = load_mtp(tiny / "mtp_model", dtype=torch.bfloat16)
    assert model.output.weight.dtype == torch.bfloat16
    cos, sin = model.rope_tables(torch.device("cpu"))
    want_cos, want_sin = rope_tables(model.args.head_dim, model.args.max_seq_len * 2, model.args.rope_theta)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    model.to(torch.bfloat16)  # a second cast leaves them alone too
    assert model.rope_tables(torch.device("cpu"))[0].dtype == torch.float32
    assert torch.isfinite(model.logits(torch.tensor([[1, 5, 7, 9]]))).all()


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_model() -> MTPTransformer:
    torch.manual_seed(0)
    model = MTPTransformer(ARGS, value_head=True)
    model.init_weights(std=0.3)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 0.5)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    shard(model, [*model.layers, *model.extra_heads], mesh=mesh, param_dtype=None, reshard_after_forward=True)
    return model


def test_training_outputs_are_not_views_and_take_in_place_edits_under_fsdp(one_rank_group):
    model = sharded_model()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=gen)
    targets = torch.randint(0, ARGS.vocab_size, (2, 9, 2), generator=gen)

    def grads(in_place: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # FSDP2 warns when a module returns a view
            out = model(tokens, targets=targets, with_values=True)
        for t in (out.hidden, out.ce, out.values):
            assert t._base is None
        if in_place:
            out.ce.mul_(2.0)
            out.values.add_(1.0)
            out.hidden.mul_(0.5)
            ce, values, hidden = out.ce, out.values, out.hidden
        else:
            ce, values, hidden = out.ce * 2.0, out.values + 1.0, out.hidden * 0.5
        (ce.sum() + values.square().sum() + hidden.sum()).backward()
        return {k: p.grad.full_tensor().clone() for k, p in model.named_parameters()}

    expected, edited = grads(in_place=False), grads(in_place=True)
    for key in expected:
        torch.testing.assert_close(edited[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    out = model(tokens, targets=targets, pair_weights=torch.ones(2, 9, 2), reduction="sum")
    assert out.ce._base is None and out.loss.dim() == 0
