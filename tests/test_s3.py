"""S3 sync against a real moto_server on 127.0.0.1 (no mocks of boto3): uploads, markers, outages,
keep-last-k, pruning during an upload, download for resume, dead endpoints and the bounded wait; then
the same through the baseline recipe (tiny, CPU): resume from S3 after the local folder is lost, a
server outage mid-run, keep-last-k, two torchrun "nodes" without a shared filesystem, a dead endpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")

from wmtp.config.sections import S3Config  # noqa: E402
from wmtp.training import s3  # noqa: E402
from wmtp.training.checkpointer import Checkpointer  # noqa: E402
from wmtp.training.s3 import S3Error, S3Sync, SyncTiming  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOTO_SERVER = Path(sys.executable).parent / "moto_server"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
"""Dummy credentials (boto3's environment chain); no ~/.aws file may interfere."""
PREFIX = "runs/t"
FAST = SyncTiming(
    connect_timeout_s=1.0, read_timeout_s=5.0, backoff_s=0.05, max_backoff_s=0.3, poll_s=0.1, completion_timeout_s=20.0
)
"""Short backoff and polling so that the tests take seconds."""
BIG_SHARD = 9 << 20
"""Above boto3's 8 MiB multipart threshold: one shard goes up (and down) in parts."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """A moto_server process on a fixed port, which can be stopped and started again (losing its state)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                time.sleep(0.05)
        raise TimeoutError(f"moto_server on port {self.port} did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def server(aws_env, tmp_path_factory) -> Iterator[MotoServer]:
    srv = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def later_server(aws_env, tmp_path) -> Iterator[MotoServer]:
    """A server of the test's own, not started yet: the test starts (and stops) it."""
    srv = MotoServer(free_port(), tmp_path / "moto.log")
    yield srv
    srv.stop()


@pytest.fixture
def make_sync(aws_env) -> Iterator:
    made: list[S3Sync] = []

    def make(
        cfg: S3Config,
        output_dir: Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        attempt: str = "launch-1",
        timing: SyncTiming = FAST,
    ) -> S3Sync:
        made.append(
            S3Sync(cfg, output_dir=output_dir, rank=rank, world_size=world_size, attempt=attempt, timing=timing)
        )
        return made[-1]

    yield make
    for sync in made:
        sync.close()


def client(url: str):
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1")


def create_bucket(url: str, name: str) -> str:
    client(url).create_bucket(Bucket=name)
    return name


def config(url: str, bucket: str, prefix: str = PREFIX, **overrides) -> S3Config:
    return S3Config(bucket=bucket, prefix=prefix, endpoint_url=url, region="us-east-1", **overrides)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_checkpoint(folder: Path, *, world_size: int, step: int, big: bool = False) -> dict[str, str]:
    """A DCP-like folder: one shard per rank, .metadata, trainer_state.json; returns name -> sha256."""
    folder.mkdir(parents=True)
    files = {
        f"__{r}_0.distcp": os.urandom(BIG_SHARD if big and r == world_size - 1 else 4096 + r) for r in range(world_size)
    }
    files[".metadata"] = os.urandom(512)
    files["trainer_state.json"] = json.dumps({"step": step}).encode()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: sha(data) for name, data in files.items()}


def step_prefix(step: int) -> str:
    return f"{PREFIX}/checkpoints/step_{step:06d}/"


def remote(url: str, bucket: str, prefix: str) -> dict[str, str]:
    """sha256 of every object under `prefix`, by key relative to it."""
    c = client(url)
    keys = [
        o["Key"]
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {k[len(prefix) :]: sha(c.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys}


def payload(files: dict[str, str]) -> dict[str, str]:
    """Without the markers."""
    return {k: v for k, v in files.items() if k != "_COMPLETE" and not k.startswith("_ranks/")}


def remote_steps(url: str, bucket: str) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for key in remote(url, bucket, f"{PREFIX}/checkpoints/"):
        folder, _, rel = key.partition("/")
        found.setdefault(int(folder.removeprefix("step_")), set()).add(rel)
    return found


def test_every_rank_uploads_its_files_and_complete_comes_last(server, make_sync, tmp_path):
    bucket = create_bucket(server.url, "two-ranks")
    cfg = config(server.url, bucket)
    ckpt = tmp_path / "checkpoints" / "step_000010"
    sums = fake_checkpoint(ckpt, world_size=2, step=10, big=True)
    rank0 = make_sync(cfg, tmp_path, rank=0, world_size=2)
    rank1 = make_sync(cfg, tmp_path, rank=1, world_size=2)

    started = time.monotonic()
    rank0.upload_checkpoint(10, ckpt)
    assert time.monotonic() - started < 1.0, "the training thread must not wait for the upload"
    first = rank0.wait(1.0)
    assert not first.complete and any("step 10" in p for p in first.pending)
    on_s3 = remote(server.url, bucket, step_prefix(10))
    assert "_ranks/rank_0" in on_s3 and "_COMPLETE" not in on_s3
    assert "__1_0.distcp" not in on_s3, "rank 0 must upload only what it wrote"

    rank1.upload_checkpoint(10, ckpt)
    assert rank1.wait(30).complete
    done = rank0.wait(30)
    assert done.complete and done.uploaded == ("checkpoint step 10",)
    on_s3 = remote(server.url, bucket, step_prefix(10))
    assert payload(on_s3) == sums
    assert {"_COMPLETE", "_ranks/rank_0", "_ranks/rank_1"} <= set(on_s3)
    manifest = json.loads(
        client(server.url).get_object(Bucket=bucket, Key=step_prefix(10) + "_COMPLETE")["Body"].read()
    )
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == sums
    assert rank0.latest_complete_step() == rank1.latest_complete_step() == 10
    assert not any((tmp_path / s3.STAGING_DIR).iterdir()), "staging is removed after the upload"


def test_failed_or_stale_rank_leaves_the_checkpoint_incomplete(server, make_sync, tmp_path, caplog):
    bucket = create_bucket(server.url, "partial")
    cfg = config(server.url, bucket)
    impatient = dataclasses.replace(FAST, completion_timeout_s=1.5)
    rank0 = make_sync(cfg, tmp_path, rank=0, world_size=2, attempt="new", timing=impatient)
    rank1 = make_sync(cfg, tmp_path, rank=1, world_size=2, attempt="new")
    step10 = tmp_path / "checkpoints" / "step_000010"
    fake_checkpoint(step10, world_size=2, step=10)
    for sync in (rank0, rank1):
        sync.upload_checkpoint(10, step10)
    assert rank1.wait(30).complete and rank0.wait(30).complete

    # An earlier, preempted launch had rank 1's part of step 20 uploaded (its marker is there).
    step20 = tmp_path / "checkpoints" / "step_000020"
    fake_checkpoint(step20, world_size=2, step=20)
    old_rank1 = make_sync(cfg, tmp_path / "old", rank=1, world_size=2, attempt="old")
    old_rank1.upload_checkpoint(20, step20)
    assert old_rank1.wait(30).complete
    # This launch: rank 1's endpoint is dead, rank 0's part goes up.
    dead_cfg = config(f"http://127.0.0.1:{free_port()}", bucket, max_retries=2)
    dead_rank1 = make_sync(dead_cfg, tmp_path / "dead", rank=1, world_size=2, attempt="new")
    dead_rank1.upload_checkpoint(20, step20)
    rank0.upload_checkpoint(20, step20)
    assert any("step 20" in f for f in dead_rank1.wait(30).failed)
    summary = rank0.wait(30)
    assert not summary.pending and any("step 20" in f and "rank(s) [1]" in f for f in summary.failed)

    on_s3 = remote(server.url, bucket, step_prefix(20))
    assert "_ranks/rank_1" in on_s3 and "_ranks/rank_0" in on_s3, "both markers exist, one of another launch"
    assert "_COMPLETE" not in on_s3
    assert rank0.latest_complete_step() == 10
    assert any(f"s3://{bucket}/{step_prefix(20)}_COMPLETE" in r.getMessage() for r in caplog.records)


def test_uploads_are_retried_through_a_server_outage(later_server, make_sync, tmp_path, caplog):
    later_server.start()
    bucket = create_bucket(later_server.url, "outage")
    sync = make_sync(config(later_server.url, bucket, max_retries=80), tmp_path)
    sums = {}
    for step in (10, 20, 30, 40):
        sums[step] = fake_checkpoint(tmp_path / "checkpoints" / f"step_{step:06d}", world_size=1, step=step)
    sync.upload_checkpoint(10, tmp_path / "checkpoints" / "step_000010")
    assert sync.wait(30).complete

    later_server.stop()
    sync.upload_checkpoint(20, tmp_path / "checkpoints" / "step_000020")
    assert sync.wait(0.3).pending == ("checkpoint step 20",), "started (and retrying), so never superseded"
    for step in (30, 40):
        sync.upload_checkpoint(step, tmp_path / "checkpoints" / f"step_{step:06d}")
    started = time.monotonic()
    summary = sync.wait(0.5)
    assert 0.4 < time.monotonic() - started < 3, "wait is bounded"
    assert summary.pending == ("checkpoint step 20", "checkpoint step 40")
    assert summary.skipped == ("checkpoint step 30",), "a queued checkpoint is superseded by a newer one"
    assert any("still pending" in r.getMessage() and "checkpoint step 40" in r.getMessage() for r in caplog.records)

    later_server.start()  # moto keeps state in memory: the bucket has to be made again
    create_bucket(later_server.url, bucket)
    summary = sync.wait(60)
    assert summary.complete, summary
    assert summary.uploaded == ("checkpoint step 10", "checkpoint step 20", "checkpoint step 40")
    for step in (20, 40):
        on_s3 = remote(later_server.url, bucket, step_prefix(step))
        assert payload(on_s3) == sums[step] and "_COMPLETE" in on_s3
    assert set(remote_steps(later_server.url, bucket)) == {20, 40}
    assert sync.latest_complete_step() == 40


def test_local_pruning_during_an_upload_does_not_break_it(later_server, make_sync, tmp_path):
    # The endpoint is unreachable when the upload is queued and comes up only after the local prune.
    sync = make_sync(config(later_server.url, "pruned", max_retries=80), tmp_path)
    ckpt10 = tmp_path / "checkpoints" / "step_000010"
    sums = fake_checkpoint(ckpt10, world_size=1, step=10, big=True)
    sync.upload_checkpoint(10, ckpt10)
    fake_checkpoint(tmp_path / "checkpoints" / "step_000020", world_size=1, step=20)
    Checkpointer(tmp_path, keep_last=1, is_main=True)._prune()
    assert not ckpt10.exists()

    later_server.start()
    create_bucket(later_server.url, "pruned")
    assert sync.wait(60).complete
    assert payload(remote(later_server.url, "pruned", step_prefix(10))) == sums
    assert not any((tmp_path / s3.STAGING_DIR).iterdir())


def test_remote_keep_last_k_spares_the_newest_complete_and_final(server, make_sync, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "LIST_PAGE_SIZE", 2)  # every listing spans several pages
    bucket = create_bucket(server.url, "keep-last")
    c = client(server.url)
    sync = make_sync(config(server.url, bucket, keep_last=2), tmp_path)
    assert sync.latest_complete_step() is None
    final = tmp_path / "final"
    final.mkdir()
    exported = {
        name: os.urandom(1000 + i) for i, name in enumerate(("params.json", "model.safetensors", "tokenizer.model"))
    }
    for name, data in exported.items():
        (final / name).write_bytes(data)
    sync.upload_final(final)
    assert sync.wait(30).complete
    # Leftovers of uploads that never completed: one older than every complete checkpoint, one newer.
    c.put_object(Bucket=bucket, Key=step_prefix(5) + "__0_0.distcp", Body=b"old")
    c.put_object(Bucket=bucket, Key=step_prefix(40) + "__0_0.distcp", Body=b"in flight")
    for step in (10, 20, 30):
        ckpt = tmp_path / "checkpoints" / f"step_{step:06d}"
        fake_checkpoint(ckpt, world_size=1, step=step)
        sync.upload_checkpoint(step, ckpt)
        assert sync.wait(30).complete

    steps = remote_steps(server.url, bucket)
    assert sorted(steps) == [20, 30, 40]
    assert "_COMPLETE" in steps[20] and "_COMPLETE" in steps[30] and steps[40] == {"__0_0.distcp"}
    assert sync.latest_complete_step() == 30
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
    assert len(list(pages)) > 3, "the server paginates, so the listings above did too"
    on_s3 = remote(server.url, bucket, f"{PREFIX}/final/")
    assert payload(on_s3) == {name: sha(data) for name, data in exported.items()} and "_COMPLETE" in on_s3

    # A critic's export replaces the folder: the earlier export's files go.
    critic_final = tmp_path / "critic_final"
    critic_final.mkdir()
    (critic_final / "value_head.safetensors").write_bytes(b"head")
    sync.upload_final(critic_final)
    assert sync.wait(30).complete
    assert set(remote(server.url, bucket, f"{PREFIX}/final/")) == {"value_head.safetensors", "_COMPLETE"}


def test_download_reproduces_the_newest_complete_checkpoint(server, make_sync, tmp_path, caplog):
    bucket = create_bucket(server.url, "download")
    cfg = config(server.url, bucket, keep_last=3)
    rank0 = make_sync(cfg, tmp_path, rank=0, world_size=2)
    rank1 = make_sync(cfg, tmp_path, rank=1, world_size=2)
    sums = {}
    for step in (10, 20, 30):
        ckpt = tmp_path / "checkpoints" / f"step_{step:06d}"
        sums[step] = fake_checkpoint(ckpt, world_size=2, step=step, big=step == 20)
        for sync in (rank0, rank1) if step < 30 else (rank0,):  # step 30: rank 1's part never arrives
            sync.upload_checkpoint(step, ckpt)
        assert rank1.wait(30).complete
        assert rank0.wait(30 if step < 30 else 1).complete == (step < 30)

    resume = tmp_path / "resume" / "checkpoints"
    got = rank0.download_latest(resume)
    assert got == resume / "step_000020"
    assert sorted(p.name for p in resume.iterdir()) == ["step_000020"], "no temporary folder is left"
    originals = tmp_path / "checkpoints" / "step_000020"
    assert sorted(p.name for p in got.iterdir()) == sorted(sums[20])
    for name in sums[20]:
        assert (got / name).read_bytes() == (originals / name).read_bytes()
    assert rank0.download_latest(resume) is None, "a local checkpoint as new as S3's is not downloaded again"
    assert rank0.download_checkpoint(20, got) == got

    # A corrupted object (same size) is caught by the manifest's checksum.
    c = client(server.url)
    c.put_object(Bucket=bucket, Key=step_prefix(20) + "__0_0.distcp", Body=os.urandom(4096))
    other = tmp_path / "other" / "checkpoints"
    with pytest.raises(S3Error, match="sha256"):
        rank0.download_checkpoint(20, other / "step_000020")
    assert not other.exists() or not any(other.iterdir())
    fallback = rank0.download_latest(other)
    assert fallback == other / "step_000010"
    assert {name: sha((fallback / name).read_bytes()) for name in sums[10]} == sums[10]
    assert any("step 20 could not be downloaded" in r.getMessage() for r in caplog.records)


def test_a_dead_endpoint_costs_seconds_and_a_warning(make_sync, tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused
    ckpt = tmp_path / "checkpoints" / "step_000010"
    fake_checkpoint(ckpt, world_size=1, step=10)
    sync = make_sync(config(dead, "dead-end", max_retries=3), tmp_path, timing=SyncTiming())
    started = time.monotonic()
    sync.upload_checkpoint(10, ckpt)
    assert time.monotonic() - started < 0.5
    summary = sync.wait(60)
    assert time.monotonic() - started < 15, "default timing: seconds, not minutes"
    assert not summary.pending and summary.failed and "step 10" in summary.failed[0]
    warning = next(r.getMessage() for r in caplog.records if r.name == s3.__name__ and r.levelname == "WARNING")
    assert f"s3://dead-end/{step_prefix(10)}" in warning and "Could not connect" in warning
    started = time.monotonic()
    with pytest.raises(S3Error, match="Could not connect"):
        sync.latest_complete_step()
    assert time.monotonic() - started < 15

    # An endpoint that accepts connections and never answers: the read timeout bounds each attempt.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        timing = SyncTiming(connect_timeout_s=0.5, read_timeout_s=0.5, backoff_s=0.05)
        stuck = make_sync(
            config(f"http://127.0.0.1:{hung.getsockname()[1]}", "hung", max_retries=2), tmp_path / "hung", timing=timing
        )
        started = time.monotonic()
        stuck.upload_checkpoint(10, ckpt)
        summary = stuck.wait(30)
        assert time.monotonic() - started < 10
        assert summary.failed and "timeout" in summary.failed[0].lower()


def test_off_and_filtered_uploads_are_no_ops(server, make_sync, tmp_path):
    # No bucket: nothing happens, and boto3 is not even imported.
    code = (
        "import sys; sys.modules['boto3'] = None\n"
        "from wmtp.config.sections import S3Config\n"
        "from wmtp.training.s3 import S3Sync\n"
        "s = S3Sync(S3Config(), output_dir='/nonexistent', rank=0, world_size=1, attempt='x')\n"
        "s.upload_checkpoint(1, '/nonexistent'); s.upload_final('/nonexistent')\n"
        "assert not s.enabled and not s._threads and str(s.wait(0)) == 'nothing to upload'\n"
        "assert s.latest_complete_step() is None and s.download_latest('/nonexistent') is None\n"
        "s.close(); print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]

    ckpt = tmp_path / "checkpoints" / "step_000010"
    fake_checkpoint(ckpt, world_size=2, step=10)
    final_only = make_sync(config(server.url, "filtered", upload="final"), tmp_path, rank=0, world_size=2)
    final_only.upload_checkpoint(10, ckpt)
    other_rank = make_sync(config(server.url, "filtered"), tmp_path, rank=1, world_size=2)
    other_rank.upload_final(ckpt)
    for sync in (final_only, other_rank):
        assert str(sync.wait(0)) == "nothing to upload"
    assert not (tmp_path / s3.STAGING_DIR).exists()
    assert len(s3.shared_attempt_id()) == 32  # without a process group: this process's own id


# ---------------------------------------------------------------- through the recipes (baseline, tiny, CPU)

RECIPE = "full_finetune_baseline"
RECIPE_STEPS = 20


def s3_recipe_args(tiny: Path, out: Path, url: str, bucket: str, prefix: str, **overrides) -> list[str]:
    from tests.conftest import recipe_args

    return recipe_args(
        tiny,
        out,
        "baseline_tiny.toml",
        **{
            "training.max_steps": RECIPE_STEPS,
            "training.micro_batch_size": 2,
            "model.max_seq_len": 256,
            "checkpoint.save_every": 5,
            "checkpoint.keep_last": 5,
            "s3.bucket": bucket,
            "s3.prefix": prefix,
            "s3.endpoint_url": url,
            "s3.region": "us-east-1",
            "s3.max_retries": 3,
            "s3.wait_s": 60,
            **overrides,
        },
    )


def train_in_process(args: list[str]) -> list[float]:
    from tests.conftest import load_recipe
    from wmtp.training.metrics import read_metrics

    load_recipe(RECIPE).main(args)
    out = Path(args[args.index("--training.output_dir") + 1])
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def local_sums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_sums(url: str, bucket: str, prefix: str) -> dict[str, str]:
    body = client(url).get_object(Bucket=bucket, Key=prefix + "_COMPLETE")["Body"].read()
    return {name: entry["sha256"] for name, entry in json.loads(body)["files"].items()}


def steps_under(url: str, bucket: str, prefix: str) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for key in remote(url, bucket, f"{prefix}/checkpoints/"):
        folder, _, rel = key.partition("/")
        found.setdefault(int(folder.removeprefix("step_")), set()).add(rel)
    return found


@pytest.fixture(scope="module")
def reference(server, tiny, tmp_path_factory):
    """An uninterrupted 20-step run uploading to S3 (keep_last 2, a save every 5 steps)."""
    bucket = create_bucket(server.url, "recipe")
    out = tmp_path_factory.mktemp("reference") / "run"
    started = time.monotonic()
    losses = train_in_process(s3_recipe_args(tiny, out, server.url, bucket, "runs/reference", **{"s3.keep_last": 2}))
    assert sorted(losses) == list(range(1, RECIPE_STEPS + 1))
    return {
        "out": out,
        "losses": losses,
        "bucket": bucket,
        "prefix": "runs/reference",
        "seconds": time.monotonic() - started,
    }


@pytest.mark.slow
def test_recipe_keeps_the_last_two_complete_checkpoints_and_final_on_s3(server, reference):
    bucket, prefix, out = reference["bucket"], reference["prefix"], reference["out"]
    steps = steps_under(server.url, bucket, prefix)
    assert sorted(steps) == [15, 20], "4 saves (5, 10, 15, 20), keep_last 2"
    for step in (15, 20):
        assert "_COMPLETE" in steps[step]
        ckpt_prefix = f"{prefix}/checkpoints/step_{step:06d}/"
        assert (
            payload(remote(server.url, bucket, ckpt_prefix))
            == manifest_sums(server.url, bucket, ckpt_prefix)
            == local_sums(out / "checkpoints" / f"step_{step:06d}")
        )
    final = remote(server.url, bucket, f"{prefix}/final/")
    assert "_COMPLETE" in final and payload(final) == local_sums(out / "final")
    assert not (out / s3.STAGING_DIR).exists() or not any((out / s3.STAGING_DIR).iterdir())


@pytest.mark.slow
def test_recipe_resumes_from_s3_after_the_local_folder_is_lost(server, reference, tiny, tmp_path):
    bucket, prefix, out = reference["bucket"], "runs/resume", tmp_path / "run"
    args = s3_recipe_args(tiny, out, server.url, bucket, prefix)
    first = train_in_process(args + ["--training.stop_at_step", "10"])
    assert first == {s: reference["losses"][s] for s in range(1, 11)}
    step10 = f"{prefix}/checkpoints/step_000010/"
    written = local_sums(out / "checkpoints" / "step_000010")
    assert manifest_sums(server.url, bucket, step10) == written == payload(remote(server.url, bucket, step10))

    shutil.rmtree(out)  # the machine is gone; a fresh one starts the same job again
    resumed = train_in_process(args)
    assert sorted(resumed) == list(range(11, RECIPE_STEPS + 1)), "resumed from step 10, not from scratch"
    assert resumed == {s: reference["losses"][s] for s in range(11, RECIPE_STEPS + 1)}, "bit for bit"
    assert local_sums(out / "checkpoints" / "step_000010") == written, "the download is what was written"
    final = remote(server.url, bucket, f"{prefix}/final/")
    assert "_COMPLETE" in final and payload(final) == local_sums(out / "final") == manifest_sums(
        server.url, bucket, f"{prefix}/final/"
    )
    assert payload(final) == local_sums(reference["out"] / "final"), "the same model as the uninterrupted run"


def newest_steps(url: str, bucket: str, prefix: str) -> list[int]:
    """Steps with a _COMPLETE under `prefix` (via a reader of its own)."""
    reader = S3Sync(
        config(url, bucket, prefix=prefix),
        output_dir="/nonexistent-unused",
        rank=0,
        world_size=1,
        attempt="reader",
        timing=FAST,
    )
    try:
        return reader.complete_steps()
    finally:
        reader.close()


@pytest.mark.slow
def test_recipe_survives_a_server_outage_and_completes_after_it(later_server, reference, tiny, tmp_path):
    from tests.conftest import TEST_ENV
    from wmtp.training.metrics import read_metrics

    later_server.start()
    bucket, prefix, out = create_bucket(later_server.url, "outage"), "runs/outage", tmp_path / "run"
    args = s3_recipe_args(
        tiny,
        out,
        later_server.url,
        bucket,
        prefix,
        **{"checkpoint.save_every": 2, "s3.max_retries": 6, "s3.keep_last": 20},
    )
    started = time.monotonic()
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, f"recipes/{RECIPE}.py", *args],
            cwd=ROOT,
            env={**os.environ, **TEST_ENV},
            stdout=stdout,
            stderr=stderr,
        )
    try:
        c = client(later_server.url)
        while not any(
            o["Key"].endswith("/_COMPLETE")
            for o in c.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/checkpoints/").get("Contents", [])
        ):
            assert proc.poll() is None and time.monotonic() - started < 300, (tmp_path / "stderr").read_text()
            time.sleep(0.2)
        later_server.stop()
        down = time.monotonic()
        steps_at_stop = len((out / "metrics.jsonl").read_text().splitlines())
        time.sleep(2.0)
        later_server.start()  # empty: moto keeps its state in memory
        create_bucket(later_server.url, bucket)
        outage = time.monotonic() - down
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "stderr").read_text()
    assert rc == 0, err[-4000:]
    assert "[s3]" in err and f"s3://{bucket}/{prefix}/checkpoints/" in err, "the outage is reported"
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert {r["step"]: r["loss"] for r in rows} == reference["losses"], "S3 never touches the training"
    print(f"outage {outage:.1f} s from about step {steps_at_stop - 1}; run {time.monotonic() - started:.1f} s")
    assert "retrying" in err

    # Only what was uploaded after the restart is there; the newest checkpoint and final are complete.
    complete = newest_steps(later_server.url, bucket, prefix)
    assert complete and complete[-1] == RECIPE_STEPS, complete
    on_s3 = steps_under(later_server.url, bucket, prefix)
    for step in complete:
        ckpt_prefix = f"{prefix}/checkpoints/step_{step:06d}/"
        assert payload(remote(later_server.url, bucket, ckpt_prefix)) == manifest_sums(
            later_server.url, bucket, ckpt_prefix
        )
    assert local_sums(out / "checkpoints" / f"step_{RECIPE_STEPS:06d}") == manifest_sums(
        later_server.url, bucket, f"{prefix}/checkpoints/step_{RECIPE_STEPS:06d}/"
    )
    assert set(complete) == {s for s, keys in on_s3.items() if "_COMPLETE" in keys}
    final = remote(later_server.url, bucket, f"{prefix}/final/")
    assert "_COMPLETE" in final and payload(final) == local_sums(out / "final")

    # A newer prefix that never got its _COMPLETE (files and a marker only) is never taken.
    partial = f"{prefix}/checkpoints/step_{RECIPE_STEPS + 2:06d}/"
    for name in ("__0_0.distcp", ".metadata", "trainer_state.json", "_ranks/rank_0"):
        c.put_object(Bucket=bucket, Key=partial + name, Body=b"{}")
    assert newest_steps(later_server.url, bucket, prefix)[-1] == RECIPE_STEPS
    reader = S3Sync(
        config(later_server.url, bucket, prefix=prefix),
        output_dir=tmp_path / "reader",
        rank=0,
        world_size=1,
        attempt="reader",
        timing=FAST,
    )
    try:
        got = reader.download_latest(tmp_path / "fresh" / "checkpoints")
    finally:
        reader.close()
    assert got is not None and got.name == f"step_{RECIPE_STEPS:06d}"
    assert local_sums(got) == local_sums(out / "checkpoints" / f"step_{RECIPE_STEPS:06d}")


def launch_nodes(tiny: Path, folders: list[Path], url: str, bucket: str, prefix: str, stop: int) -> list[str]:
    """Two torchrun agents as two "nodes" on loopback (c10d rendezvous), each with its own output folder."""
    from tests.conftest import TEST_ENV

    port = free_port()
    agents = []
    for i, folder in enumerate(folders):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={i}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=wmtp-s3",
            f"recipes/{RECIPE}.py",
            *s3_recipe_args(
                tiny,
                folder,
                url,
                bucket,
                prefix,
                **{
                    "training.micro_batch_size": 1,
                    "checkpoint.save_every": 2,
                    "training.stop_at_step": stop,
                    "s3.keep_last": 10,
                },
            ),
        ]
        agents.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [agent.communicate(timeout=400)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    return logs


@pytest.mark.slow
def test_two_nodes_with_separate_folders_make_one_complete_checkpoint(server, reference, tiny, tmp_path):
    from wmtp.training.metrics import read_metrics

    bucket, prefix = reference["bucket"], "runs/nodes"
    folders = [tmp_path / "node_a", tmp_path / "node_b"]
    launch_nodes(tiny, folders, server.url, bucket, prefix, stop=4)
    main = next(f for f in folders if (f / "metrics.jsonl").exists())  # c10d picks which agent is rank 0
    other = next(f for f in folders if f != main)
    steps = steps_under(server.url, bucket, prefix)
    assert sorted(steps) == [2, 4] and all("_COMPLETE" in keys for keys in steps.values())
    for step in (2, 4):
        ckpt_prefix = f"{prefix}/checkpoints/step_{step:06d}/"
        sums = manifest_sums(server.url, bucket, ckpt_prefix)
        assert set(sums) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.json"}
        assert payload(remote(server.url, bucket, ckpt_prefix)) == sums
    assert not list((other / "checkpoints").glob("*")), "node 1's part went to S3 and its .tmp folder is gone"
    assert not any((other / s3.STAGING_DIR).iterdir())
    losses = {r["step"]: r["loss"] for r in read_metrics(main) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    torch = pytest.importorskip("torch")
    expected = [reference["losses"][s] for s in sorted(losses)]
    torch.testing.assert_close(torch.tensor(list(losses.values())), torch.tensor(expected), rtol=1e-5, atol=0)

    # Restarted: rank 0's machine keeps its folder, the other node is a fresh machine.
    fresh = tmp_path / "node_c"
    logs = launch_nodes(tiny, [main, fresh], server.url, bucket, prefix, stop=6)
    assert sum(log.count("[s3] downloaded") for log in logs) == 2, "each node downloads step 4"
    resumed = {}
    for folder in (main, fresh):
        if (folder / "metrics.jsonl").exists():
            resumed.update({r["step"]: r["loss"] for r in read_metrics(folder) if "loss" in r and r["step"] > 4})
    assert sorted(resumed) == [5, 6]
    torch.testing.assert_close(
        torch.tensor([resumed[5], resumed[6]]),
        torch.tensor([reference["losses"][5], reference["losses"][6]]),
        rtol=1e-5,
        atol=0,
    )
    assert "_COMPLETE" in steps_under(server.url, bucket, prefix)[6]


@pytest.mark.slow
def test_recipe_with_a_dead_endpoint_costs_seconds_and_a_warning(aws_env, tiny, tmp_path, caplog, capfd):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens
    overrides = {"training.max_steps": 4, "checkpoint.save_every": 2, "s3.max_retries": 2}
    started = time.monotonic()
    plain = train_in_process(s3_recipe_args(tiny, tmp_path / "plain", dead, "", "", **overrides))
    plain_s = time.monotonic() - started
    started = time.monotonic()
    losses = train_in_process(s3_recipe_args(tiny, tmp_path / "dead", dead, "dead-end", "runs/dead", **overrides))
    dead_s = time.monotonic() - started
    err = capfd.readouterr().err
    with capfd.disabled():
        print(f"no S3 {plain_s:.1f} s, dead endpoint (max_retries 2) {dead_s:.1f} s")
    assert losses == plain
    assert dead_s < plain_s + 15, "seconds, not minutes"
    assert "[s3] warning: cannot look for checkpoints on S3" in err
    warnings = [r.getMessage() for r in caplog.records if r.name == s3.__name__ and r.levelname == "WARNING"]
    assert any("s3://dead-end/runs/dead/checkpoints/" in w and "Could not connect" in w for w in warnings)
    assert any("final export" in w for w in warnings)
