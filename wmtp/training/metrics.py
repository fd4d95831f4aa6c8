"""Rank-0 metric sinks: metrics.jsonl in the run folder (the record) and MLflow (embedded SQLite by
default, or a tracking server).

metrics.jsonl is written synchronously. MLflow is fed by a background thread that reads the new
lines of metrics.jsonl, so training never waits on it: a server that is down (at the start or in the
middle of a run) costs one warning, and what it missed is sent when it is back, at close (bounded by
a timeout), or later by `scripts/sync_mlflow.py RUN_DIR`. What MLflow has of a run folder is kept in
mlflow_state.json (written atomically), so no attempt of the run and no sync sends a (step, key)
twice. Credentials for a remote server are MLflow's own environment variables
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN), read per request.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from wmtp.atomic import atomic_write_text
from wmtp.config.sections import MetricsConfig
from wmtp.errors import exception_line
from wmtp.layout import METRICS_FILE, MLFLOW_ARTIFACTS, MLFLOW_DB

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run

log = logging.getLogger(__name__)

STATE_FILE = "mlflow_state.json"
LOCK_FILE = "mlflow_state.lock"
"""Held (flock) by the process that sends a run folder to MLflow, so a sync cannot race a live run."""
TIME_KEY = "time"
"""Unix time (s) of a metrics.jsonl row; MLflow gets it as the metrics' timestamp, even when sent later."""
RESERVED_KEYS = frozenset({"step", TIME_KEY})
SQLITE_PREFIX = "sqlite:///"

RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"

MLFLOW_PARAM_MAX = 500
"""MLflow rejects longer parameter values."""
MLFLOW_PARAMS_BATCH_MAX = 100
"""Parameters per log_batch call (MLflow's limit)."""
MLFLOW_METRICS_BATCH_MAX = 1000
"""Metric values per log_batch call (MLflow's limit)."""
READ_CHUNK_BYTES = 1 << 20
"""metrics.jsonl is read in chunks of about this size: a long backlog never sits in memory at once."""

HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
"""Set for this process unless the user set them (MLflow reads them per request). MLflow's own
defaults (120 s timeout, 7 retries with exponential backoff) make a dead server cost ~4 minutes per
call; here the background worker does the retrying, so each call fails fast."""
RETRY_MAX_S = 8.0
"""Longest wait between the worker's attempts while MLflow is unreachable (1, 2, 4, 8, 8, ... s)."""
CLOSE_TIMEOUT_S = 30.0
"""Default bound on close(): how long it waits for MLflow to take what is pending and the status."""
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE"})
"""MLflow error codes that refusing a metrics batch again would not change: that batch is dropped."""


def embedded_tracking_uri(output_dir: Path) -> str:
    return f"{SQLITE_PREFIX}{(output_dir / MLFLOW_DB).resolve()}"


def sqlite_artifact_root(tracking_uri: str) -> str | None:
    """`mlartifacts/` beside a SQLite store (set explicitly: MLflow's default is relative to the CWD)."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    return (Path(tracking_uri[len(SQLITE_PREFIX) :]).parent / MLFLOW_ARTIFACTS).resolve().as_uri()


def resolve_tracking_uri(cfg: MetricsConfig, output_dir: Path) -> str:
    """Config > $MLFLOW_TRACKING_URI > a SQLite store inside the run folder."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(output_dir)


def use_short_http_timeouts() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def status_for(exc: BaseException | None) -> str:
    """The MLflow status of a run ending with `exc` propagating (None: it ended normally)."""
    if exc is None or (isinstance(exc, SystemExit) and exc.code in (None, 0)):
        return FINISHED
    return KILLED if isinstance(exc, KeyboardInterrupt) else FAILED


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun, a scheduler), raised so `finally` blocks run and the run is recorded KILLED.

    A KeyboardInterrupt, so that `except Exception` does not swallow it."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


def raise_on_sigterm() -> None:
    """Make SIGTERM raise Terminated (in the main thread only: signals are delivered there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _is_after(step: int, mark: int | None) -> bool:
    return mark is None or step > mark


@dataclasses.dataclass
class MlflowState:
    """What MLflow has of one run folder (mlflow_state.json)."""

    tracking_uri: str
    experiment: str
    run_name: str
    start_time_ms: int
    params: dict[str, str]
    """The run's params (as MLflow stores them), kept to log them into a run that lacks them."""
    run_id: str | None = None
    """Set once the run exists; metrics go to it only once params_logged."""
    params_logged: bool = False
    sent: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per metric key, the highest step MLflow has: values are sent in step order, so it has every
    step of that key up to there."""
    artifacts: list[str] = dataclasses.field(default_factory=list)
    """Files logged but not yet in MLflow."""
    end_status: str | None = None
    """The status close() set that MLflow does not have yet (with its end time)."""
    end_time_ms: int | None = None

    @classmethod
    def load(cls, output_dir: Path) -> MlflowState | None:
        path = output_dir / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def save(self, output_dir: Path) -> None:
        atomic_write_text(output_dir / STATE_FILE, json.dumps(dataclasses.asdict(self), indent=1))


def _lock_folder(output_dir: Path) -> int | None:
    """An exclusive lock on the folder's MLflow state (its fd), or None when another process holds it."""
    fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _truncate_after(path: Path, step: int) -> dict[str, int]:
    """Drop the rows of metrics.jsonl after `step` (an attempt that crashed after its last checkpoint
    logged them; the resumed attempt logs them again) and any torn line; per key, the last step kept."""
    kept: list[str] = []
    last: dict[str, int] = {}
    changed = False
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line a kill cut short
            changed = True
            continue
        if row["step"] > step:
            changed = True
            continue
        changed |= not line.endswith("\n")
        kept.append(line.rstrip("\n") + "\n")
        for key in row.keys() - RESERVED_KEYS:
            last[key] = max(last.get(key, row["step"]), row["step"])
    if changed:
        atomic_write_text(path, "".join(kept))
    return last


def count_unsent(output_dir: Path, sent: Mapping[str, int]) -> int:
    """Finite metric values of metrics.jsonl at steps MLflow does not have (per `sent`)."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return 0
    n = 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            n += sum(
                1
                for k, v in row.items()
                if k not in RESERVED_KEYS and math.isfinite(v) and _is_after(row["step"], sent.get(k))
            )
    return n


class _Sender:
    """Sends a run folder's params, metrics.jsonl, artifacts and status to MLflow, each once.

    One thread drives it; `lock` guards the state it shares with the MetricLogger.
    """

    def __init__(self, output_dir: Path, state: MlflowState, lock: threading.Lock) -> None:
        from mlflow.tracking import MlflowClient

        self.output_dir, self.state, self.lock = output_dir, state, lock
        self.client = MlflowClient(tracking_uri=state.tracking_uri)
        self.connected = False
        self.counts = {"params": 0, "values": 0, "skipped": 0, "artifacts": 0}
        self._offset = 0  # bytes of metrics.jsonl read
        self._pending: list[Metric] = []
        self._planned = dict(state.sent)  # per key, the highest step sent or pending
        self._failed_artifacts: set[str] = set()

    def connect(self, *, running: bool) -> None:
        """Find (or create) the run, make sure it has its params, and learn what metrics it has."""
        run = self._existing_run()
        if run is None:
            run = self._create_run()
        if not self.state.params_logged:
            self._log_params(run)
        if running and run.info.status != RUNNING:
            self.client.update_run(run.info.run_id, status=RUNNING)
        self._reconcile(run)
        self.connected = True

    def _existing_run(self) -> Run | None:
        from mlflow.exceptions import MlflowException

        st = self.state
        if st.run_id is None:
            return None
        try:
            return self.client.get_run(st.run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        log.warning("[mlflow] run %s is not at %s: this folder goes to a new run there", st.run_id, st.tracking_uri)
        with self.lock:
            st.run_id, st.params_logged, st.sent = None, False, {}
        self._offset, self._pending, self._planned = 0, [], {}
        return None

    def _create_run(self) -> Run:
        st = self.state
        experiment = self.client.get_experiment_by_name(st.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(st.experiment, artifact_location=sqlite_artifact_root(st.tracking_uri))
        )
        run = self.client.create_run(experiment_id, start_time=st.start_time_ms, run_name=st.run_name)
        # Recorded before the params: an attempt killed in between finds this run and logs them.
        with self.lock:
            st.run_id, st.params_logged = run.info.run_id, False
            st.save(self.output_dir)
        return run

    def _log_params(self, run: Run) -> None:
        from mlflow.entities import Param

        have = run.data.params  # a killed attempt may have logged some batches: MLflow refuses changes
        items = [Param(k, v) for k, v in self.state.params.items() if k not in have]
        for i in range(0, len(items), MLFLOW_PARAMS_BATCH_MAX):
            self.client.log_batch(run.info.run_id, params=items[i : i + MLFLOW_PARAMS_BATCH_MAX])
        with self.lock:
            self.state.params_logged = True
            self.state.save(self.output_dir)
        self.counts["params"] += len(items)

    def _reconcile(self, run: Run) -> None:
        """Catch up with what MLflow has: a batch may have landed although its reply (or the state
        write after it) did not, and a crashed attempt may have sent steps a resumed one logs again."""
        latest = {m.key: m.step for m in run.to_proto().data.metrics}
        with self.lock:
            sent = self.state.sent
            ahead = {k: s for k, s in latest.items() if _is_after(s, sent.get(k))}
            if ahead:
                sent.update(ahead)
                self.state.save(self.output_dir)
        for k, s in ahead.items():
            self._planned[k] = max(s, self._planned.get(k, s))
        kept = [m for m in self._pending if _is_after(m.step, sent.get(m.key))]
        self.counts["skipped"] += len(self._pending) - len(kept)
        self._pending = kept

    def send_metrics(self, *, deadline: float = math.inf) -> None:
        """Send every complete line of metrics.jsonl MLflow lacks (until EOF or the deadline)."""
        from mlflow.exceptions import MlflowException

        while time.monotonic() < deadline:
            if not self._pending and not self._read_chunk():
                return
            batch = self._pending[:MLFLOW_METRICS_BATCH_MAX]
            if batch:
                try:
                    self.client.log_batch(self.state.run_id, metrics=batch)
                except MlflowException as e:
                    if e.error_code not in PERMANENT_ERRORS:
                        raise
                    log.warning("[mlflow] dropped %d metric values MLflow refused: %s", len(batch), e)
                else:
                    with self.lock:
                        for m in batch:
                            self.state.sent[m.key] = max(m.step, self.state.sent.get(m.key, m.step))
                        self.state.save(self.output_dir)
                    self.counts["values"] += len(batch)
            del self._pending[: len(batch)]

    def _read_chunk(self) -> bool:
        """Queue the values of the next complete lines; False at the end (a line still being written
        ends without a newline and waits for the next call)."""
        from mlflow.entities import Metric

        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            f.seek(self._offset)
            lines = f.readlines(READ_CHUNK_BYTES)
        complete = [line for line in lines if line.endswith(b"\n")]
        for line in complete:
            self._offset += len(line)
            row = json.loads(line)
            step = row.pop("step")
            stamp = row.pop(TIME_KEY, None)
            timestamp = int(round(stamp * 1000)) if stamp is not None else int(time.time() * 1000)
            for key, value in row.items():
                if not math.isfinite(value):
                    continue
                if not _is_after(step, self._planned.get(key)):
                    self.counts["skipped"] += 1
                    continue
                self._planned[key] = step
                self._pending.append(Metric(key, value, timestamp, step))
        return bool(complete)

    def send_artifacts(self, *, retry_failed: bool) -> None:
        """One attempt per artifact (a failure is reported; the sync script tries it again)."""
        with self.lock:
            todo = [p for p in self.state.artifacts if retry_failed or p not in self._failed_artifacts]
        for path in todo:
            sent = not Path(path).is_file()
            if sent:
                log.warning("[mlflow] artifact %s no longer exists: not logged", path)
            else:
                try:
                    self.client.log_artifact(self.state.run_id, path)
                    sent = True
                    self.counts["artifacts"] += 1
                except Exception as e:  # best effort: an artifact never stops the metrics
                    self._failed_artifacts.add(path)
                    log.warning("[mlflow] artifact %s not logged (%s); scripts/sync_mlflow.py retries it", path, e)
            if sent:
                with self.lock:
                    self.state.artifacts.remove(path)
                    self.state.save(self.output_dir)

    def terminate(self) -> None:
        """Give the run the status close() set, if MLflow does not have it yet."""
        st = self.state
        with self.lock:
            status, end_time = st.end_status, st.end_time_ms
        if status is None:
            return
        self.client.set_terminated(st.run_id, status=status, end_time=end_time)
        with self.lock:
            st.end_status = st.end_time_ms = None
            st.save(self.output_dir)


class MetricLogger:
    """Writes every logged step to metrics.jsonl and, when enabled, to one MLflow run.

    `resume_step`: the step this attempt starts from; rows a crashed attempt logged after it are
    dropped from metrics.jsonl (this attempt logs them again) and MLflow keeps the values it has, so
    both hold each step once. A resumed run continues the same MLflow run (mlflow_state.json).
    """

    def __init__(
        self,
        cfg: MetricsConfig,
        output_dir: str | Path,
        *,
        params: Mapping[str, Any],
        enabled: bool,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self._sender: _Sender | None = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / METRICS_FILE
        if resume_step is not None and path.is_file():
            _truncate_after(path, resume_step)
        self._jsonl = open(path, "a")
        if cfg.mlflow:
            self._start_mlflow(cfg, params)

    def _start_mlflow(self, cfg: MetricsConfig, params: Mapping[str, Any]) -> None:
        use_short_http_timeouts()
        out = self.output_dir
        self._lock_fd = _lock_folder(out)
        if self._lock_fd is None:
            log.warning("[mlflow] another process is sending %s to MLflow; this one writes metrics.jsonl only", out)
            return
        uri = resolve_tracking_uri(cfg, out)
        state = MlflowState.load(out)
        if state is not None and state.tracking_uri != uri:
            log.warning("[mlflow] %s was tracked at %s; it now goes to a new run at %s", out, state.tracking_uri, uri)
            state = None
        if state is None:
            state = MlflowState(
                tracking_uri=uri,
                experiment=cfg.experiment,
                run_name=cfg.run_name or out.name,
                start_time_ms=int(time.time() * 1000),
                params={k: str(v)[:MLFLOW_PARAM_MAX] for k, v in params.items()},
            )
        state.end_status = state.end_time_ms = None
        state.save(out)
        self._lock = threading.Lock()
        self._sender = _Sender(out, state, self._lock)
        self._wake, self._closing = threading.Event(), threading.Event()
        self._gave_up = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    def _send_loop(self) -> None:
        """Send what MLflow lacks whenever a step is logged; while MLflow is unreachable, retry with
        backoff (one warning per outage). At close: flush, set the status, or give up after one try."""
        sender, delay, down = self._sender, 1.0, False
        while True:
            closing = self._closing.is_set()
            try:
                if not sender.connected:
                    sender.connect(running=True)
                sender.send_metrics()
                sender.send_artifacts(retry_failed=False)
                if closing:
                    sender.terminate()
                    return
            except Exception as exc:  # noqa: BLE001 - MLflow must never stop training
                sender.connected = False
                if not down:
                    log.warning(
                        "[mlflow] %s unreachable (%s); training goes on, metrics stay in %s and are "
                        "sent when it is back (or by scripts/sync_mlflow.py %s)",
                        sender.state.tracking_uri,
                        _one_line(exc),
                        METRICS_FILE,
                        self.output_dir,
                    )
                    down = True
                if closing:
                    self._gave_up = True
                    return
                self._closing.wait(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            if down:
                log.warning("[mlflow] %s is reachable again: the backlog was sent", sender.state.tracking_uri)
                down, delay = False, 1.0
            self._wake.wait()
            self._wake.clear()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, TIME_KEY: round(time.time(), 3), **clean}) + "\n")
        self._jsonl.flush()
        if self._sender is not None:
            self._wake.set()

    def log_artifact(self, path: str | Path) -> None:
        if self._sender is None:
            return
        with self._lock:
            self._sender.state.artifacts.append(str(Path(path).resolve()))
            self._sender.state.save(self.output_dir)
        self._wake.set()

    def close(self, status: str = FINISHED, *, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close metrics.jsonl; give MLflow what is pending and the run's status (at most `timeout_s`)."""
        if not self.enabled:
            return
        self._jsonl.close()
        self.enabled = False
        if self._sender is None:
            return
        state = self._sender.state
        with self._lock:
            state.end_status, state.end_time_ms = status, int(time.time() * 1000)
            state.save(self.output_dir)
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive() or self._gave_up:
            with self._lock:
                unsent = count_unsent(self.output_dir, state.sent)
            log.warning(
                "[mlflow] %d metric values and the status %s are not in MLflow at %s; they are kept: "
                "`python scripts/sync_mlflow.py %s` sends them",
                unsent,
                status,
                state.tracking_uri,
                self.output_dir,
            )
        os.close(self._lock_fd)
        self._sender = None


def sync_folder(output_dir: str | Path) -> dict[str, int]:
    """Send what MLflow lacks of a run folder (its params, metrics, artifacts, status); the counts sent.

    A folder whose process died without closing (kill -9, a lost node) is marked KILLED unless it
    is resumed later. Raises RuntimeError while another process (a live run) is sending it.
    """
    out = Path(output_dir)
    state = MlflowState.load(out)
    if state is None:
        raise FileNotFoundError(f"{out / STATE_FILE} does not exist: this folder was never tracked in MLflow")
    fd = _lock_folder(out)
    if fd is None:
        raise RuntimeError(f"another process (a live run?) is sending {out} to MLflow; try again when it ends")
    try:
        use_short_http_timeouts()
        if state.end_status is None:
            state.end_status, state.end_time_ms = KILLED, int(time.time() * 1000)
        sender = _Sender(out, state, threading.Lock())
        sender.connect(running=False)
        sender.send_metrics()
        sender.send_artifacts(retry_failed=True)
        sender.terminate()
        return sender.counts
    finally:
        os.close(fd)


_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] [^'\")]*")
"""The OS error inside an MLflow/urllib3 message ("[Errno 111] Connection refused")."""


def _one_line(exc: BaseException) -> str:
    """A short reason: the OS error behind a failed request when there is one, else the message."""
    if m := _ERRNO_TEXT.search(" ".join(str(exc).split())):
        return m.group(0)
    return exception_line(exc)


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """One merged row per step of metrics.jsonl (the newest value of a key wins), without its times."""
    by_step: dict[int, dict[str, float]] = {}
    with open(Path(output_dir) / METRICS_FILE) as f:
        for line in f:
            row = json.loads(line)
            row.pop(TIME_KEY, None)
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]
