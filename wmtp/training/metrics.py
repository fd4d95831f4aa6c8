"""Rank-0 metric sinks: metrics.jsonl in the run folder and MLflow (embedded SQLite by default)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from wmtp.config.sections import MetricsConfig

RUN_ID_FILE = "mlflow_run_id"
SQLITE_PREFIX = "sqlite:///"
MLFLOW_PARAM_MAX = 500
"""MLflow rejects longer parameter values."""
MLFLOW_BATCH_MAX = 100
"""Parameters or metrics per log_batch call (MLflow's limit for params)."""


def embedded_tracking_uri(output_dir: Path) -> str:
    return f"{SQLITE_PREFIX}{(output_dir / 'mlflow.db').resolve()}"


def sqlite_artifact_root(tracking_uri: str) -> str | None:
    """`mlartifacts/` beside a SQLite store (set explicitly: MLflow's default is relative to the CWD)."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    return (Path(tracking_uri[len(SQLITE_PREFIX):]).parent / "mlartifacts").resolve().as_uri()


def resolve_tracking_uri(cfg: MetricsConfig, output_dir: Path) -> str:
    """Config > $MLFLOW_TRACKING_URI > a SQLite store inside the run folder."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(output_dir)


class MetricLogger:
    """Writes every logged step to metrics.jsonl and, when enabled, to one MLflow run.

    A resumed run continues the same MLflow run (its id is kept in the run folder).
    """

    def __init__(self, cfg: MetricsConfig, output_dir: str | Path, *, params: Mapping[str, Any],
                 enabled: bool) -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self._client = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a")
        if cfg.mlflow:
            self._start_mlflow(cfg, params)

    def _start_mlflow(self, cfg: MetricsConfig, params: Mapping[str, Any]) -> None:
        # An explicit client, not mlflow's process-global tracking URI: nothing leaks between runs.
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.tracking_uri = resolve_tracking_uri(cfg, self.output_dir)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(cfg.experiment,
                                                     artifact_location=sqlite_artifact_root(self.tracking_uri))
        else:
            experiment_id = experiment.experiment_id
        id_file = self.output_dir / RUN_ID_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=cfg.run_name or self.output_dir.name)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id)
            items = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in params.items()]
            for i in range(0, len(items), MLFLOW_BATCH_MAX):
                client.log_batch(self.run_id, params=items[i:i + MLFLOW_BATCH_MAX])
        self._client = client

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, v, now, step) for k, v in clean.items() if math.isfinite(v)]
            for i in range(0, len(items), MLFLOW_BATCH_MAX):
                self._client.log_batch(self.run_id, metrics=items[i:i + MLFLOW_BATCH_MAX])

    def log_artifact(self, path: str | Path) -> None:
        if self._client is not None:
            self._client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._client is not None:
            self._client.set_terminated(self.run_id)
            self._client = None


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """One merged row per step of metrics.jsonl; on a resumed run the newest value of a key wins."""
    by_step: dict[int, dict[str, float]] = {}
    with open(Path(output_dir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]
