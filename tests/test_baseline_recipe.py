"""The baseline recipe end to end on the tiny artifacts: training, exact resume, FSDP2 equivalence."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from tests.conftest import load_recipe, recipe_args, run_script, torchrun
from wmtp.models import load_mtp
from wmtp.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def base_args(tiny: Path, out: Path, **overrides) -> list[str]:
    return recipe_args(tiny, out, "baseline_tiny.toml", **overrides)


def train(tiny: Path, out: Path, **overrides) -> list[dict]:
    load_recipe("full_finetune_baseline").main(base_args(tiny, out, **overrides))
    return [r for r in read_metrics(out) if "loss" in r]


def losses(rows: list[dict], steps: range | None = None) -> list[float]:
    return [r["loss"] for r in rows if steps is None or r["step"] in steps]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    return out, train(tiny, out, **{"metrics.mlflow": "true"})


def test_loss_decreases_over_30_steps_and_final_export_loads(uninterrupted, tiny):
    out, rows = uninterrupted
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = losses(rows)[:5], losses(rows)[-5:]
    assert all(torch.isfinite(torch.tensor(losses(rows))))
    assert sum(last) / 5 < 0.8 * sum(first) / 5
    for k in range(4):
        assert rows[-1][f"loss/head_{k}"] < rows[0][f"loss/head_{k}"]
    model = load_mtp(out / "final")  # vocab from final/tokenizer.model via params
    assert model.n_future == 4
    # The embedded MLflow store holds the run with every step's loss.
    db = sqlite3.connect(out / "mlflow.db")
    n = db.execute("select count(*) from metrics where key = 'loss'").fetchone()[0]
    assert n == 30


def test_stop_after_10_and_resume_reproduces_steps_11_to_20_exactly(uninterrupted, tiny, tmp_path):
    _, full = uninterrupted
    out = tmp_path / "resumed"
    first = train(tiny, out, **{"training.stop_at_step": 10})
    assert [r["step"] for r in first] == list(range(1, 11))
    assert (out / "checkpoints" / "step_000010" / "trainer_state.json").is_file()
    assert not (out / "final").exists()
    resumed = train(tiny, out, **{"training.stop_at_step": 20})
    assert losses(resumed, range(11, 21)) == losses(full, range(11, 21))
    assert losses(resumed, range(1, 11)) == losses(full, range(1, 11))


def test_batch_4_equals_batch_2_with_accumulation_2(uninterrupted, tiny, tmp_path):
    _, full = uninterrupted
    rows = train(
        tiny,
        tmp_path / "accum",
        **{
            "training.micro_batch_size": 2,
            "training.grad_accum_steps": 2,
            "training.max_steps": 30,
            "training.stop_at_step": 6,
        },
    )
    torch.testing.assert_close(torch.tensor(losses(rows)), torch.tensor(losses(full, range(1, 7))), rtol=1e-5, atol=0)


def test_torchrun_two_processes_fsdp2_match_one_process(uninterrupted, tiny, tmp_path):
    _, full = uninterrupted
    out = tmp_path / "fsdp"
    torchrun(
        "recipes/full_finetune_baseline.py",
        base_args(
            tiny, out, **{"training.micro_batch_size": 2, "training.stop_at_step": 6, "checkpoint.save_every": 3}
        ),
    )
    rows = [r for r in read_metrics(out) if "loss" in r]
    torch.testing.assert_close(torch.tensor(losses(rows)), torch.tensor(losses(full, range(1, 7))), rtol=1e-5, atol=0)
    # Sharded checkpoint: one DCP shard file per rank, completed atomically.
    ckpt = out / "checkpoints" / "step_000006"
    assert len(list(ckpt.glob("*.distcp"))) == 2 and not list(out.glob("checkpoints/*.tmp"))


def test_unknown_key_and_wrong_type_exit_with_named_error(tiny, tmp_path):
    script = "recipes/full_finetune_baseline.py"
    proc = run_script([script, *base_args(tiny, tmp_path), "--training.max_stepz", "3"], check=False)
    assert proc.returncode == 2 and "training.max_stepz" in proc.stderr
    proc = run_script([script, *base_args(tiny, tmp_path), "--training.max_steps", "many"], check=False)
    assert proc.returncode == 2 and "training.max_steps" in proc.stderr and "many" in proc.stderr


def test_malformed_rows_are_skipped_and_counted(tiny, tmp_path):
    data = tmp_path / "train.jsonl"
    lines = (tiny / "data" / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    del row["output"]
    lines[3:3] = ["{not json", json.dumps(row)]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    proc = run_script(
        [
            "recipes/full_finetune_baseline.py",
            *base_args(tiny, out, **{"data.train_path": data, "training.max_steps": 2}),
        ]
    )
    assert "2 bad rows skipped" in proc.stdout
    step0 = read_metrics(out)[0]
    assert sum(v for k, v in step0.items() if k.startswith("data/skipped")) == 2


def test_activation_checkpointing_gives_the_same_losses(uninterrupted, tiny, tmp_path):
    _, full = uninterrupted
    out = tmp_path / "ac"
    rows = train(
        tiny,
        out,
        **{"distributed.activation_checkpointing": "every_n", "distributed.ac_every_n": 2, "training.max_steps": 3},
    )
    # Same first step (the LR schedule differs afterwards: max_steps changed).
    assert losses(rows)[0] == pytest.approx(losses(full)[0], rel=1e-6)
    assert set(load_mtp(out / "final").state_dict()) == set(load_mtp(tiny / "mtp_model").state_dict())
