"""MLflow cannot stop training: a real `mlflow server` on 127.0.0.1 that is down at the start, killed and
restarted mid-run; a crash ends FAILED and SIGTERM KILLED; kill -9 at random moments loses and
duplicates nothing. Every check reads what the server (or the SQLite store) holds."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, TEST_ENV, recipe_args, run_script

from wmtp.training.metrics import FINISHED, STATE_FILE, read_metrics, sync_folder

MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
SERVER_START_S = 120
RECIPE = "recipes/full_finetune_baseline.py"
ENV = {**os.environ, **TEST_ENV, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its own SQLite store; stop() kills it, start() brings it back
    on the same port and store. With `password`, MLflow's basic-auth app: every request needs the
    user "admin" and that password."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        self.folder, self.port, self.password = folder, free_port(), password
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(MLFLOW_BIN),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'store.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
        ]
        env = dict(ENV)
        if self.password:
            cmd += ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_ADMIN_PASSWORD=self.password, MLFLOW_FLASK_SERVER_SECRET_KEY="test-only")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "server.log", "a"),
            start_new_session=True,
        )
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not start within {SERVER_START_S} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a crash, not a shutdown; the workers too
            self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server")
    yield srv
    srv.stop()


@pytest.fixture
def auth_server(tmp_path, monkeypatch):
    """A server that refuses requests without credentials; this process and the runs it starts get
    them the way MLflow reads them, from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    srv = MlflowServer(tmp_path / "server", password="test-Only-pass-42")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", srv.password)
    yield srv
    srv.stop()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def tracked_run(out: Path):
    state = json.loads((out / STATE_FILE).read_text())
    return client(state["tracking_uri"]), state


def assert_each_step_once(out: Path, steps: range, key: str = "loss") -> None:
    """metrics.jsonl and MLflow hold `key` once per step."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if key in r) == list(steps)
    c, state = tracked_run(out)
    history = c.get_metric_history(state["run_id"], key)
    assert sorted(m.step for m in history) == list(steps)
    by_step = {r["step"]: r[key] for r in rows if key in r}
    assert all(m.value == by_step[m.step] for m in history)


def args(tiny: Path, out: Path, **overrides) -> list[str]:
    return [RECIPE, *recipe_args(tiny, out, "baseline_tiny.toml", **{"metrics.mlflow": "true", **overrides})]


def launch(tiny: Path, out: Path, **overrides) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args(tiny, out, **overrides)],
        cwd=ROOT,
        env={**ENV, **os.environ},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def logged_step(out: Path) -> int:
    """The newest step in metrics.jsonl (0 before the first)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(out) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.02)


def test_server_down_at_start_costs_seconds_and_sync_sends_each_value_once(server, tiny, tmp_path):
    off = tmp_path / "off"
    t0 = time.perf_counter()
    run_script(args(tiny, off, **{"metrics.mlflow": "false"}))
    seconds_off = time.perf_counter() - t0

    out = tmp_path / "down"
    t0 = time.perf_counter()
    proc = run_script(args(tiny, out, **{"metrics.tracking_uri": server.uri}))
    seconds_down = time.perf_counter() - t0
    print(f"30-step tiny run: MLflow off {seconds_off:.1f} s, server down {seconds_down:.1f} s")
    assert seconds_down - seconds_off < 30
    assert proc.stderr.count("unreachable") == 1, proc.stderr
    assert "sync_mlflow.py" in proc.stderr
    assert [r["loss"] for r in read_metrics(out) if "loss" in r] == [
        r["loss"] for r in read_metrics(off) if "loss" in r
    ]

    server.start()
    synced = run_script(["scripts/sync_mlflow.py", str(out)])
    assert "sent" in synced.stdout
    assert_each_step_once(out, range(1, 31))
    c, state = tracked_run(out)
    run = c.get_run(state["run_id"])
    assert run.info.status == FINISHED
    assert run.data.params == state["params"] and "training.max_steps" in run.data.params
    assert "config.toml" in [a.path for a in c.list_artifacts(state["run_id"])]
    again = sync_folder(out)  # nothing twice
    assert (again["params"], again["values"], again["artifacts"]) == (0, 0, 0) and again["skipped"] > 0


def test_server_with_credentials_killed_and_restarted_mid_run(auth_server, tiny, tmp_path):
    server = auth_server
    server.start()
    with pytest.raises(urllib.error.HTTPError, match="401"):  # the credentials are needed
        urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    out = tmp_path / "run"
    proc = launch(tiny, out, **{"metrics.tracking_uri": server.uri})
    try:
        # The run is paused (SIGSTOP) across each change of the server, so it is mid-run whatever its speed.
        wait_for_step(proc, out, 5)
        proc.send_signal(signal.SIGSTOP)
        server.stop()
        proc.send_signal(signal.SIGCONT)
        wait_for_step(proc, out, 15)
        proc.send_signal(signal.SIGSTOP)
        down_at = logged_step(out)
        server.start()
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert down_at < 30
    assert stderr.count("unreachable") == 1, stderr
    assert "reachable again" in stderr
    assert_each_step_once(out, range(1, 31))
    c, state = tracked_run(out)
    assert c.get_run(state["run_id"]).info.status == FINISHED


def test_a_crash_ends_failed_and_sigterm_ends_killed(tiny, tmp_path):
    crash = tmp_path / "crash"
    # A fault injected into the real recipe: the third training step raises.
    code = (
        "import sys; sys.path.insert(0, 'recipes'); import full_finetune_baseline as r\n"
        "step = r.BaselineRecipe.train_step\n"
        "def failing(self, batch):\n"
        "    if self.step == 2: raise RuntimeError('injected failure')\n"
        "    return step(self, batch)\n"
        "r.BaselineRecipe.train_step = failing\n"
        f"r.main({args(tiny, crash)[1:]!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "injected failure" in proc.stderr
    c, state = tracked_run(crash)
    assert c.get_run(state["run_id"]).info.status == "FAILED"
    assert sorted(m.step for m in c.get_metric_history(state["run_id"], "loss")) == [1, 2]

    term = tmp_path / "term"
    proc = launch(tiny, term, **{"training.max_steps": 200})
    wait_for_step(proc, term, 3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    c, state = tracked_run(term)
    assert c.get_run(state["run_id"]).info.status == "KILLED"


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tiny, tmp_path):
    steps = 40
    reference = tmp_path / "reference"
    run_script(args(tiny, reference, **{"training.max_steps": steps, "metrics.mlflow": "false"}))

    out = tmp_path / "killed"
    overrides = {"training.max_steps": steps, "checkpoint.save_every": 4, "checkpoint.keep_last": 2}
    rng = random.Random(0)
    kills = []
    for attempt in range(3):
        proc = launch(tiny, out, **overrides)
        start = logged_step(out)
        # The first attempt is killed between steps, the others while a checkpoint is being written
        # (if one is seen within 12 steps).
        aim_at_write = attempt > 0
        target = start + (12 if aim_at_write else rng.randint(2, 7))
        moment = "between steps"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if aim_at_write and any(p.name.endswith(".tmp") for p in (out / "checkpoints").glob("step_*")):
                moment = "in a checkpoint write"
                break
            if logged_step(out) >= target:
                break
            time.sleep(0.001)
        proc.kill()
        proc.communicate()
        kills.append((logged_step(out), moment))
    assert all(step < steps for step, _ in kills), kills
    run_script(args(tiny, out, **overrides))
    print(f"kill -9 after steps: {kills}")

    assert_each_step_once(out, range(1, steps + 1))
    ref = [r["loss"] for r in read_metrics(reference) if "loss" in r]
    assert [r["loss"] for r in read_metrics(out) if "loss" in r] == ref
    c, state = tracked_run(out)
    run = c.get_run(state["run_id"])
    assert run.info.status == FINISHED
    assert run.data.params == state["params"] and len(run.data.params) == len(state["params"]) > 40
