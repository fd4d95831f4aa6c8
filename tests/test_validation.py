"""[validation] during training and checkpoint.keep_best, against a naive row-by-row pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import load_recipe, recipe_args, torchrun
from wmtp.data.collate import encode_rows
from wmtp.data.tokenizer import SentencePieceTokenizer
from wmtp.models import load_mtp
from wmtp.training.metrics import read_metrics

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 1024
N_HEADS = 4


def naive_head_ce(model_dir: Path, tiny: Path, *, max_rows: int = 0, value_head: bool = False) -> list[float]:
    """Mean CE of each head over the valid pairs of every held-out row, one row at a time."""
    tokenizer = SentencePieceTokenizer(tiny / "tokenizer.model")
    model = load_mtp(
        model_dir, dtype=torch.float32, vocab_size=tokenizer.vocab_size, max_seq_len=MAX_SEQ_LEN, value_head=value_head
    )
    totals, counts = [0.0] * N_HEADS, [0] * N_HEADS
    rows = [json.loads(line) for line in (tiny / "data" / "valid.jsonl").read_text().splitlines()]
    scored = 0
    with torch.no_grad():
        for row in rows:
            tokens, mask = encode_rows(tokenizer, [row])[0]
            if len(tokens) > MAX_SEQ_LEN:
                continue
            if max_rows and scored == max_rows:
                break
            scored += 1
            log_p = model.logits(torch.tensor([tokens]))[0].double().log_softmax(-1)  # [T, n, V]
            for k in range(N_HEADS):
                # Head k at position t predicts token t+1+k, when that token is a response token.
                pairs = [(t, t + 1 + k) for t in range(len(tokens) - 1 - k) if mask[t + 1 + k]]
                for t, j in pairs:
                    totals[k] -= float(log_p[t, k, tokens[j]])
                counts[k] += len(pairs)
    return [total / count for total, count in zip(totals, counts)]


def val_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "val/loss" in r]


def baseline_args(tiny: Path, out: Path, **overrides) -> list[str]:
    return recipe_args(
        tiny,
        out,
        "baseline_tiny.toml",
        **{
            "training.max_steps": 6,
            "training.micro_batch_size": 3,
            "validation.path": tiny / "data" / "valid.jsonl",
            "validation.every": 2,
            "model.max_seq_len": MAX_SEQ_LEN,
            **overrides,
        },
    )


def test_baseline_validation_is_each_rows_ce_once_in_one_process_and_under_torchrun(tiny, tmp_path):
    # The same global batches: one process accumulates the two ranks' micro-batches.
    load_recipe("full_finetune_baseline").main(
        baseline_args(tiny, tmp_path / "one", **{"training.grad_accum_steps": 2})
    )
    torchrun("recipes/full_finetune_baseline.py", baseline_args(tiny, tmp_path / "two"))
    want = naive_head_ce(tmp_path / "one" / "final", tiny)
    for run in ("one", "two"):
        rows = val_rows(tmp_path / run)
        assert [r["step"] for r in rows] == [2, 4, 6]
        last = rows[-1]
        for k in range(N_HEADS):
            assert last[f"val/loss/head_{k}"] == pytest.approx(want[k], rel=1e-5), (run, k)
        assert last["val/loss"] == pytest.approx(sum(want) / N_HEADS, rel=1e-5)
    assert [r["val/loss"] for r in val_rows(tmp_path / "two")] == pytest.approx(
        [r["val/loss"] for r in val_rows(tmp_path / "one")], rel=1e-5
    )


def test_max_rows_scores_the_first_rows_only(tiny, tmp_path):
    load_recipe("full_finetune_baseline").main(
        baseline_args(tiny, tmp_path, **{"validation.max_rows": 5, "validation.every": 0})
    )
    want = naive_head_ce(tmp_path / "final", tiny, max_rows=5)
    last = val_rows(tmp_path)[-1]
    assert [last[f"val/loss/head_{k}"] for k in range(N_HEADS)] == pytest.approx(want, rel=1e-5)


def test_keep_best_exports_the_lowest_validation_loss(tiny, tmp_path):
    # A learning rate high enough that the loss goes up again: the best is not the last step.
    load_recipe("full_finetune_baseline").main(
        baseline_args(
            tiny,
            tmp_path,
            **{
                "checkpoint.keep_best": "val/loss",
                "validation.every": 1,
                "training.max_steps": 8,
                "optimizer.lr": 5e-2,
                "lr_scheduler.warmup_steps": 0,
            },
        )
    )
    rows = val_rows(tmp_path)
    best = min(rows, key=lambda r: r["val/loss"])
    record = json.loads((tmp_path / "best" / "best.json").read_text())
    assert record == {"metric": "val/loss", "value": best["val/loss"], "step": best["step"]}
    got = naive_head_ce(tmp_path / "best", tiny)
    assert sum(got) / N_HEADS == pytest.approx(best["val/loss"], rel=1e-5)


def test_every_recipe_logs_its_validation_metrics(tiny, tmp_path):
    valid = tiny / "data" / "valid.jsonl"
    common = {
        "training.max_steps": 2,
        "validation.path": valid,
        "validation.max_rows": 8,
        "model.max_seq_len": MAX_SEQ_LEN,
    }
    cases = {
        "verifiable": (
            {"critic.value_head": "none"},
            ["val/loss", "val/policy_loss", "val/value_loss", "val/ce/head_3", "val/weight/head_1"],
        ),
        "rho1": (
            {"reference.path": tiny / "reference"},
            ["val/loss", "val/ce/head_0", "val/excess/head_2", "val/selected/head_1"],
        ),
        "critic": ({"checkpoint.keep_best": "val/auroc"}, ["val/value_loss", "val/auroc", "val/value/correct"]),
    }
    for name, (extra, keys) in cases.items():
        out = tmp_path / name
        load_recipe(f"full_finetune_{name}").main(recipe_args(tiny, out, f"{name}_tiny.toml", **common, **extra))
        last = [r for r in read_metrics(out) if keys[0] in r][-1]
        assert all(math.isfinite(last[k]) for k in keys), (name, {k: last.get(k) for k in keys})
        if name in ("verifiable", "rho1"):  # the plain CE per head, against the final export scored row by row
            want = naive_head_ce(out / "final", tiny, max_rows=8, value_head=name == "verifiable")
            assert [last[f"val/ce/head_{k}"] for k in range(N_HEADS)] == pytest.approx(want, rel=1e-5), name
        if name == "rho1":
            assert last["val/selected/head_0"] == 1.0 and 0.55 <= last["val/selected/head_1"] <= 0.7
        if name == "critic":
            assert last["val/rows"] == 8 and (out / "best" / "value_head.safetensors").is_file()
