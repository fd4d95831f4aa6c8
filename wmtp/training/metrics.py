"""Rank-0 metric sinks: metrics.jsonl in the run folder and MLflow (embedded SQLite by default)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from wmtp.config.sections import MetricsConfig

RUN_ID_FILE = "mlflow_run_id"
MLFLOW_PARAM_MAX = 500
"""MLflow rejects longer parameter values."""


def embedded_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


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
        self._mlflow = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a")
        if cfg.mlflow:
            self._start_mlflow(cfg, params)

    def _start_mlflow(self, cfg: MetricsConfig, params: Mapping[str, Any]) -> None:
        import mlflow  # slow import: only on rank 0 and only when enabled

        self.tracking_uri = resolve_tracking_uri(cfg, self.output_dir)
        mlflow.set_tracking_uri(self.tracking_uri)
        if mlflow.get_experiment_by_name(cfg.experiment) is None:
            artifacts = None
            if self.tracking_uri == embedded_tracking_uri(self.output_dir):
                artifacts = (self.output_dir / "mlartifacts").resolve().as_uri()
            mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
        mlflow.set_experiment(cfg.experiment)
        id_file = self.output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        run = mlflow.start_run(run_id=run_id, run_name=cfg.run_name or self.output_dir.name)
        if run_id is None:
            id_file.write_text(run.info.run_id)
            mlflow.log_params({k: str(v)[:MLFLOW_PARAM_MAX] for k, v in params.items()})
        self.run_id = run.info.run_id
        self._mlflow = mlflow

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: v for k, v in clean.items() if math.isfinite(v)}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path))

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """One merged row per step of metrics.jsonl; on a resumed run the newest value of a key wins."""
    by_step: dict[int, dict[str, float]] = {}
    with open(Path(output_dir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]
