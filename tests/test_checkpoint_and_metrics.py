"""Atomic checkpoint completion, keep-last-k, and the MLflow store selection."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from wmtp.atomic import atomic_directory
from wmtp.config.sections import MetricsConfig
from wmtp.training.checkpointer import Checkpointer
from wmtp.training.metrics import MetricLogger, read_metrics


def tiny_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_incomplete_checkpoint_is_never_taken_as_latest(tmp_path):
    model, opt = tiny_model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep_last=2, is_main=True)
    ckpt.save(10, model, opt, {"note": "ten"})
    # A crash mid-save leaves only the .tmp folder (and possibly shards without trainer_state.json).
    (tmp_path / "checkpoints" / "step_000020.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_000030").mkdir()
    assert ckpt.latest().name == "step_000010"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = ckpt.load(ckpt.latest(), model, opt)
    assert state == {"step": 10, "note": "ten"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model, opt = tiny_model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep_last=2, is_main=True)
    for step in (1, 2, 3):
        ckpt.save(step, model, opt, {})
    assert ckpt.complete_steps() == [2, 3]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_embedded_sqlite_store_by_default_and_env_uri_override(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricLogger(MetricsConfig(experiment="t"), tmp_path / "run", params={"a.b": 1}, enabled=True)
    log.log(1, {"loss": 2.5})
    log.close()
    db = sqlite3.connect(tmp_path / "run" / "mlflow.db")
    assert db.execute("select value from metrics where key='loss'").fetchone()[0] == 2.5
    assert read_metrics(tmp_path / "run") == [{"step": 1, "loss": 2.5}]
    # A team server URI from the environment wins over the embedded store.
    remote = tmp_path / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{remote}")
    log = MetricLogger(MetricsConfig(experiment="t2"), tmp_path / "run2", params={}, enabled=True)
    log.log(1, {"loss": 1.0})
    log.close()
    assert remote.is_file() and not (tmp_path / "run2" / "mlflow.db").exists()
