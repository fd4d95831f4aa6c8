"""Background upload of checkpoints and the final export to S3 (or any S3-compatible store), and resume from it.

Key layout (`<run>` = `s3://<bucket>/<prefix>`):

    <run>/checkpoints/step_000010/<files>           the DCP shards, .metadata, trainer_state.json
    <run>/checkpoints/step_000010/_ranks/rank_<r>   rank r's marker: its files' sizes and sha256
    <run>/checkpoints/step_000010/_COMPLETE         written last: the manifest of every file
    <run>/final/<files>                             params.json, model.safetensors, tokenizer.model
                                                    (a critic: value_head.safetensors)
    <run>/final/_COMPLETE                           written last: the manifest

A checkpoint (or the final export) counts only once its `_COMPLETE` exists; readers
(`latest_complete_step`, `download_checkpoint`) ignore everything else and verify every downloaded
file against the manifest's size and sha256.

Design:
- Every rank uploads the files it wrote itself (rank r: `__r_*.distcp`; rank 0: everything else in
  the folder too), so nodes need no shared filesystem. A rank writes its marker after its files;
  rank 0 writes `_COMPLETE` once all `world_size` markers of this launch exist, polling S3 (after
  FIRST_POLL_S, then less often; bounded by `SyncTiming.completion_timeout_s`; no process group
  involved), and only when every object the markers list is there with its size (once all markers
  are in, a missing object fails the checkpoint at once: waiting cannot bring it back).
- Markers carry the launch's `attempt` id, so markers left by an earlier, preempted launch that saved
  the same step never count. Each rank deletes the step's old `_COMPLETE` before it uploads, and a
  new `_COMPLETE` needs every rank's new marker, so no reader sees a marker over half-replaced files.
- The training thread only hard-links the files into `<output_dir>/s3_staging/` (a copy where
  linking fails) and queues them: the upload runs on a worker thread, so the local Checkpointer may
  prune the checkpoint meanwhile. A queued checkpoint that has not started when a newer one is queued
  is skipped (uploads slower than checkpoints would otherwise pile up staged copies).
- Each file gets `max_retries` attempts with exponential backoff; its first failure is a warning
  (an outage shows at once), and giving up is one too, naming the key and the reason, never an
  exception in training; it leaves the checkpoint without a marker.
- Remote keep-last-k (rank 0, after each `_COMPLETE`): complete checkpoints beyond the newest
  `keep_last` are deleted (keep_last <= 0 keeps all), as are incomplete leftovers older than the
  newest complete one; incomplete ones newer than it may still be uploading and stay. `_COMPLETE` is
  always deleted first; `final/` is never touched.
- Resume: `download_latest` / `download_checkpoint` fetch a complete checkpoint into
  `checkpoints/step_NNNNNN` atomically (a per-host `.tmp` folder renamed when every file is verified).
  Every node needs all the files DCP reads, so local rank 0 of each node downloads the whole
  checkpoint. On a shared filesystem concurrent downloaders are safe (each host has its own temporary
  folder; whoever renames second keeps the first one's folder), only wasteful.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from wmtp.atomic import TMP_SUFFIX
from wmtp.config.sections import S3Config
from wmtp.distributed.env import broadcast_object
from wmtp.errors import exception_line
from wmtp.layout import CHECKPOINTS_DIR, FINAL_DIR, STEP_DIR, TRAINER_STATE, step_dir_name

log = logging.getLogger(__name__)
T = TypeVar("T")

S3_REASON_MAX_CHARS = 400
"""Reasons of failed S3 operations are cut after this many characters (botocore's run long)."""
COMPLETE_MARKER = "_COMPLETE"
"""Written last into a checkpoint's (or final/'s) prefix: its manifest; nothing counts without it."""
RANKS_DIR = "_ranks"
"""Per-rank markers inside a checkpoint prefix: `_ranks/rank_<r>`."""
STAGING_DIR = "s3_staging"
"""Hard links of queued uploads, inside the output folder (same filesystem, so linking works)."""
LIST_PAGE_SIZE = 1000
"""Keys per ListObjectsV2 page (S3's maximum)."""
DELETE_BATCH = 1000
"""Keys per DeleteObjects request (S3's maximum)."""
BOTO_ATTEMPTS = 2
"""botocore's own attempts per request (one multipart part), under our per-file retries: a failed
part is retried once without restarting a multi-GB file, and a dead endpoint still costs seconds."""
HASH_CHUNK = 8 << 20
"""Bytes read at a time when hashing a file."""
CLOSE_JOIN_S = 5.0
"""How long close() waits for the worker threads to notice (a request in flight may take longer)."""
FIRST_POLL_S = 0.25
"""Rank 0: first interval between looks for the other ranks' markers; it doubles up to `poll_s`."""
DISTCP_FILE = re.compile(r"__(\d+)_\d+\.distcp")
"""A DCP shard, `__<rank>_<i>.distcp`, written by rank <rank>."""


@dataclasses.dataclass(frozen=True)
class SyncTiming:
    connect_timeout_s: float = 5.0
    """TCP connect timeout of every request: a dead endpoint fails fast."""
    read_timeout_s: float = 20.0
    """Longest wait for a reply to a sent request (S3 answers in well under a second)."""
    backoff_s: float = 1.0
    """Delay before the second attempt of a file; it doubles after each failure (with jitter)."""
    max_backoff_s: float = 30.0
    """Cap of the delay between attempts."""
    poll_s: float = 10.0
    """Rank 0: longest interval between looks for the other ranks' markers (the first comes after
    FIRST_POLL_S, then the interval doubles)."""
    completion_timeout_s: float = 3600.0
    """Rank 0: how long after its own part it waits for the other ranks' markers before it gives up
    (the checkpoint then stays incomplete on S3)."""


@dataclasses.dataclass(frozen=True)
class SyncSummary:
    """What this rank's uploads came to (on ranks > 0 "uploaded" means their own files and marker)."""

    uploaded: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.pending and not self.failed

    def __str__(self) -> str:
        parts = [
            f"{name}: {', '.join(items)}"
            for name, items in (
                ("uploaded", self.uploaded),
                ("failed", self.failed),
                ("skipped", self.skipped),
                ("still pending", self.pending),
            )
            if items
        ]
        return "; ".join(parts) or "nothing to upload"


class S3Error(RuntimeError):
    """S3 could not be read or written after every attempt (the message names the key and the reason)."""


@dataclasses.dataclass
class _Task:
    label: str
    staging: Path
    files: list[str]
    step: int | None
    """None: the final export."""


@dataclasses.dataclass
class _Pending:
    """Rank 0: a checkpoint whose own part is uploaded, waiting for the other ranks' markers."""

    deadline: float
    confirmed: dict[int, dict[str, Any]]
    """rank -> its files (rank 0's own are known without reading its marker back)."""
    last_error: str = ""
    looks: int = 0


def shared_attempt_id() -> str:
    """An id for this launch that every rank shares (rank 0's, broadcast): a collective, so call it on
    every rank at setup. No earlier launch has it, so its markers never count for this one."""
    return broadcast_object(uuid.uuid4().hex)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class S3Sync:
    """Uploads this rank's checkpoint files and (rank 0) the final export in the background.

    Everything is a no-op when `cfg.bucket` is empty (boto3 is then never imported). Credentials come
    from boto3's usual chain (environment, ~/.aws, instance role).
    """

    def __init__(
        self,
        cfg: S3Config,
        *,
        output_dir: str | Path,
        rank: int,
        world_size: int,
        attempt: str,
        timing: SyncTiming = SyncTiming(),
    ) -> None:
        self.cfg = cfg
        self.enabled = bool(cfg.bucket)
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt
        self.timing = timing
        self.attempts = max(1, cfg.max_retries)
        self.bucket = cfg.bucket
        self.root = cfg.prefix.strip("/")
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._queue: deque[_Task] = deque()
        self._active: _Task | None = None
        self._pending: dict[int, _Pending] = {}
        self._uploaded: list[str] = []
        self._failed: list[str] = []
        self._skipped: list[str] = []
        self._staged = 0
        self._threads: list[threading.Thread] = []
        if not self.enabled:
            return
        self.staging_root = self.output_dir / STAGING_DIR
        # Staging left by a crashed launch of this rank (names carry the rank: other ranks may share the folder).
        for stale in self.staging_root.glob(f"*.rank_{rank}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        self._client, self._transfer = self._make_client()
        self._threads.append(threading.Thread(target=self._work_loop, name=f"s3-upload-rank{rank}", daemon=True))
        if rank == 0:
            self._threads.append(threading.Thread(target=self._complete_loop, name="s3-complete", daemon=True))
        for thread in self._threads:
            thread.start()

    def _make_client(self) -> tuple[Any, Any]:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        config = Config(
            connect_timeout=self.timing.connect_timeout_s,
            read_timeout=self.timing.read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": BOTO_ATTEMPTS},
            # S3-compatible stores (MinIO, Ceph) usually serve path-style URLs only.
            s3={"addressing_style": "path"} if self.cfg.endpoint_url else None,
        )
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.cfg.endpoint_url or None, region_name=self.cfg.region or None, config=config
        )
        return client, TransferConfig()

    # ---- keys

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _prefix(self, *parts: str) -> str:
        return "/".join(p for p in (self.root, *parts) if p) + "/"

    def _step_prefix(self, step: int) -> str:
        return self._prefix(CHECKPOINTS_DIR, step_dir_name(step))

    # ---- the training thread's side

    def upload_checkpoint(self, step: int, local_dir: str | Path) -> None:
        """Queue this rank's files of the checkpoint in `local_dir` (call on every rank after the save)."""
        if self.enabled and self.cfg.upload in (CHECKPOINTS_DIR, "both"):
            self._queue_upload(f"checkpoint step {step}", Path(local_dir), step_dir_name(step), step)

    def upload_final(self, local_dir: str | Path) -> None:
        """Queue the final export in `local_dir` (rank 0 alone uploads it; a no-op on other ranks)."""
        if self.enabled and self.rank == 0 and self.cfg.upload in (FINAL_DIR, "both"):
            self._queue_upload("final export", Path(local_dir), FINAL_DIR, None)

    def _queue_upload(self, label: str, local_dir: Path, name: str, step: int | None) -> None:
        try:
            names = [str(p.relative_to(local_dir)) for p in sorted(local_dir.rglob("*")) if p.is_file()]
            if not names:
                raise FileNotFoundError(f"no files in {local_dir}")
            if step is not None:
                names = [n for n in names if self._writes(n)]
            self._enqueue(_Task(label, self._stage(name, local_dir, names), names, step))
        except Exception as e:
            prefix = self._prefix(FINAL_DIR) if step is None else self._step_prefix(step)
            log.warning(
                "[s3] %s: %s not queued for %s: %s",
                label,
                local_dir,
                self._url(prefix),
                exception_line(e, S3_REASON_MAX_CHARS),
            )
            with self._cond:
                self._failed.append(f"{label} ({exception_line(e, S3_REASON_MAX_CHARS)})")

    def _writes(self, name: str) -> bool:
        """Rank r uploads its own DCP shards; rank 0 also everything that is not a shard."""
        shard = DISTCP_FILE.fullmatch(name)
        return int(shard.group(1)) == self.rank if shard else self.rank == 0

    def _stage(self, name: str, src: Path, files: list[str]) -> Path:
        """Hard links (copies where linking fails) that survive the local pruning of `src`."""
        self._staged += 1
        staging = self.staging_root / f"{name}.rank_{self.rank}.{self._staged}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for rel in files:
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src / rel, dst)
                except OSError:
                    shutil.copy2(src / rel, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _enqueue(self, task: _Task) -> None:
        with self._cond:
            if task.step is not None:
                for old in [t for t in self._queue if t.step is not None]:
                    self._queue.remove(old)
                    shutil.rmtree(old.staging, ignore_errors=True)
                    self._skipped.append(old.label)
                    log.warning(
                        "[s3] %s: skipped, superseded by step %d before its upload to %s started "
                        "(uploads are slower than checkpoints)",
                        old.label,
                        task.step,
                        self._url(self._step_prefix(old.step)),
                    )
            self._queue.append(task)
            self._cond.notify_all()

    def wait(self, timeout_s: float) -> SyncSummary:
        """Wait at most `timeout_s` for the queued uploads (rank 0: and their markers); say what is left."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._busy() and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            summary = self._summary()
        if summary.pending:
            log.warning(
                "[s3] still pending after waiting %.0f s for s3://%s/%s: %s",
                timeout_s,
                self.bucket,
                self.root,
                ", ".join(summary.pending),
            )
        return summary

    def close(self) -> None:
        """Stop the worker threads; uploads not finished by now are abandoned (without their markers)."""
        if not self.enabled:
            return
        with self._cond:
            abandoned = self._summary().pending
            for task in self._queue:
                shutil.rmtree(task.staging, ignore_errors=True)
            self._queue.clear()
            self._stop.set()
            self._cond.notify_all()
        if abandoned:
            log.warning(
                "[s3] closing with unfinished uploads to s3://%s/%s, abandoned without markers: %s",
                self.bucket,
                self.root,
                ", ".join(abandoned),
            )
        for thread in self._threads:
            thread.join(timeout=CLOSE_JOIN_S)

    def _busy(self) -> bool:
        return bool(self._queue or self._active or self._pending)

    def _summary(self) -> SyncSummary:
        pending = [t.label for t in ([self._active] if self._active else []) + list(self._queue)]
        pending += [f"checkpoint step {s} (waiting for rank markers)" for s in sorted(self._pending)]
        return SyncSummary(tuple(self._uploaded), tuple(self._failed), tuple(self._skipped), tuple(pending))

    # ---- worker thread: uploads

    def _work_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                task = self._active = self._queue.popleft()
            try:
                if task.step is None:
                    self._upload_final(task)
                else:
                    self._upload_checkpoint(task)
            except Exception as e:
                log.warning(
                    "[s3] %s not uploaded (no marker written): %s", task.label, exception_line(e, S3_REASON_MAX_CHARS)
                )
                with self._cond:
                    self._failed.append(f"{task.label} ({exception_line(e, S3_REASON_MAX_CHARS)})")
            finally:
                shutil.rmtree(task.staging, ignore_errors=True)
                with self._cond:
                    self._active = None
                    self._cond.notify_all()

    def _upload_checkpoint(self, task: _Task) -> None:
        prefix = self._step_prefix(task.step)
        # An earlier launch's marker must go before any of its files is replaced.
        self._retry(
            f"delete {self._url(prefix + COMPLETE_MARKER)}",
            lambda: self._client.delete_object(Bucket=self.bucket, Key=prefix + COMPLETE_MARKER),
        )
        files = self._upload_files(task, prefix)
        marker = f"{prefix}{RANKS_DIR}/rank_{self.rank}"
        self._put_json(marker, {"attempt": self.attempt, "rank": self.rank, "files": files})
        with self._cond:
            if self.rank == 0:
                self._pending[task.step] = _Pending(time.monotonic() + self.timing.completion_timeout_s, {0: files})
            else:
                self._uploaded.append(task.label)
            self._cond.notify_all()

    def _upload_final(self, task: _Task) -> None:
        prefix = self._prefix(FINAL_DIR)
        marker = prefix + COMPLETE_MARKER
        self._retry(f"delete {self._url(marker)}", lambda: self._client.delete_object(Bucket=self.bucket, Key=marker))
        files = self._upload_files(task, prefix)
        self._put_json(marker, {"attempt": self.attempt, "files": files})
        with self._cond:
            self._uploaded.append(task.label)
        # Files of an earlier, different export (e.g. a critic's value head) would only confuse readers.
        try:
            stale = [k for k in self._list(prefix) if k != marker and k[len(prefix) :] not in files]
            self._delete(stale)
        except Exception as e:
            log.warning(
                "[s3] final export: could not delete stale keys under %s: %s",
                self._url(prefix),
                exception_line(e, S3_REASON_MAX_CHARS),
            )

    def _upload_files(self, task: _Task, prefix: str) -> dict[str, dict[str, Any]]:
        files = {}
        for rel in task.files:
            path, key = task.staging / rel, prefix + rel
            entry = {"size": path.stat().st_size, "sha256": _sha256(path)}
            self._retry(
                f"upload {path} -> {self._url(key)}",
                functools.partial(self._client.upload_file, str(path), self.bucket, key, Config=self._transfer),
            )
            files[rel] = entry
        return files

    # ---- rank 0's completion thread: markers and remote keep-last-k

    def _complete_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                if not self._pending:
                    self._cond.wait()
                    continue
                steps = sorted(self._pending)
            for step in steps:
                self._try_complete(step)
            with self._cond:
                self._cond.notify_all()
                if self._pending and not self._stop.is_set():
                    # Look again soon (the other ranks are usually close behind), then less often.
                    looks = min(p.looks for p in self._pending.values())
                    self._cond.wait(min(self.timing.poll_s, FIRST_POLL_S * 2 ** (looks - 1)))

    def _try_complete(self, step: int) -> None:
        pending = self._pending.get(step)
        if pending is None:  # superseded and pruned by a newer step in this round
            return
        label, prefix = f"checkpoint step {step}", self._step_prefix(step)
        pending.looks += 1
        try:
            listing = self._list(prefix)
            for r in range(self.world_size):
                key = f"{prefix}{RANKS_DIR}/rank_{r}"
                if r not in pending.confirmed and key in listing:
                    body = json.loads(self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
                    if body.get("attempt") == self.attempt:  # else: an earlier launch's, to be replaced
                        pending.confirmed[r] = body["files"]
            missing = [r for r in range(self.world_size) if r not in pending.confirmed]
            if missing:
                pending.last_error = f"no marker of this launch from rank(s) {missing}"
            else:
                files = {name: entry for r in range(self.world_size) for name, entry in pending.confirmed[r].items()}
                # Every marker is in, so waiting longer cannot bring back an object that went missing.
                if wrong := [n for n, e in files.items() if listing.get(prefix + n) != e["size"]]:
                    return self._give_up(
                        step,
                        f"objects missing or of the wrong size under {self._url(prefix)} "
                        f"although every rank's marker is there: {wrong}",
                    )
                self._put_json(
                    prefix + COMPLETE_MARKER,
                    {"attempt": self.attempt, "step": step, "world_size": self.world_size, "files": files},
                )
                with self._cond:
                    del self._pending[step]
                    self._uploaded.append(label)
                self._prune_remote()
                return
        except Exception as e:
            pending.last_error = exception_line(e, S3_REASON_MAX_CHARS)
        if time.monotonic() > pending.deadline:
            self._give_up(step, f"gave up after {self.timing.completion_timeout_s:.0f} s: {pending.last_error}")

    def _give_up(self, step: int, reason: str) -> None:
        label = f"checkpoint step {step}"
        log.warning(
            "[s3] %s: %s not written: %s; it stays incomplete on S3",
            label,
            self._url(self._step_prefix(step) + COMPLETE_MARKER),
            reason,
        )
        with self._cond:
            del self._pending[step]
            self._failed.append(f"{label} ({reason})")

    def _prune_remote(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop incomplete ones older than the newest."""
        try:
            steps = self._list_steps()
            complete = sorted(s for s, keys in steps.items() if COMPLETE_MARKER in keys)
            if not complete:
                return
            doomed = set(complete[: -self.cfg.keep_last]) if self.cfg.keep_last > 0 else set()
            doomed |= {s for s in steps if s not in complete and s < complete[-1]}
            with self._cond:
                for step in sorted(doomed & set(self._pending)):
                    del self._pending[step]
                    self._skipped.append(f"checkpoint step {step}")
                    log.warning(
                        "[s3] checkpoint step %d: superseded by complete step %d before all rank "
                        "markers arrived; deleted from %s",
                        step,
                        complete[-1],
                        self._url(self._step_prefix(step)),
                    )
            for step in sorted(doomed):
                prefix = self._step_prefix(step)
                if COMPLETE_MARKER in steps[step]:  # the marker first: never a marker over missing files
                    self._delete([prefix + COMPLETE_MARKER])
                self._delete([prefix + rel for rel in steps[step] if rel != COMPLETE_MARKER])
        except Exception as e:
            log.warning(
                "[s3] keep-last-%d under %s failed (old checkpoints stay): %s",
                self.cfg.keep_last,
                self._url(self._prefix(CHECKPOINTS_DIR)),
                exception_line(e, S3_REASON_MAX_CHARS),
            )

    # ---- S3 primitives

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                error = e
            if attempt == self.attempts:
                break
            delay = min(self.timing.max_backoff_s, self.timing.backoff_s * 2 ** (attempt - 1))
            if attempt == 1:  # an outage shows at once, not only when the last attempt fails
                log.warning(
                    "[s3] %s: %s; retrying (%d more attempt(s))",
                    what,
                    exception_line(error, S3_REASON_MAX_CHARS),
                    self.attempts - 1,
                )
            # Jitter, so that many ranks hitting the same outage do not retry in lockstep.
            if self._stop.wait(delay * random.uniform(0.5, 1.0)):
                break
        raise S3Error(f"{what}: {exception_line(error, S3_REASON_MAX_CHARS)} (after {attempt} attempt(s))") from error

    def _put_json(self, key: str, body: dict[str, Any]) -> None:
        data = json.dumps(body, indent=1).encode()
        self._retry(
            f"write {self._url(key)}",
            lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json"),
        )

    def _list(self, prefix: str) -> dict[str, int]:
        """Every key under `prefix` with its size (all pages)."""
        paginator = self._client.get_paginator("list_objects_v2")
        return {
            obj["Key"]: obj["Size"]
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE}
            )
            for obj in page.get("Contents", [])
        }

    def _list_steps(self) -> dict[int, list[str]]:
        """step -> its keys relative to the step's prefix (markers included)."""
        root = self._prefix(CHECKPOINTS_DIR)
        steps: dict[int, list[str]] = {}
        for key in self._list(root):
            folder, _, rel = key[len(root) :].partition("/")
            if (m := STEP_DIR.match(folder)) and rel:
                steps.setdefault(int(m.group(1)), []).append(rel)
        return steps

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i : i + DELETE_BATCH]
            reply = self._retry(
                f"delete {len(batch)} key(s) such as {self._url(batch[0])}",
                functools.partial(
                    self._client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                ),
            )
            if reply.get("Errors"):
                error = reply["Errors"][0]
                raise S3Error(f"delete {self._url(error['Key'])}: {error.get('Code')}: {error.get('Message')}")

    # ---- resume (the calling thread, at setup)

    def complete_steps(self) -> list[int]:
        """Steps with a `_COMPLETE` marker on S3, ascending ([] when S3 is off). Raises S3Error when S3
        cannot be read: "none there" and "could not look" must not be confused at resume."""
        if not self.enabled:
            return []
        steps = self._retry(f"list {self._url(self._prefix('checkpoints'))}", self._list_steps)
        return sorted(s for s, keys in steps.items() if COMPLETE_MARKER in keys)

    def latest_complete_step(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def download_checkpoint(self, step: int, dest: str | Path) -> Path:
        """Download the complete checkpoint `step` into `dest` (skipped when `dest` exists), verified
        against its manifest, atomically. Raises S3Error (leaving nothing at `dest`) on failure."""
        dest = Path(dest)
        if dest.exists():
            log.info("[s3] %s exists; not downloading step %d", dest, step)
            return dest
        if not self.enabled:
            raise S3Error(f"cannot download step {step}: S3 is off (s3.bucket is empty)")
        prefix = self._step_prefix(step)
        marker = prefix + COMPLETE_MARKER
        manifest = self._retry(
            f"read {self._url(marker)}",
            lambda: json.loads(self._client.get_object(Bucket=self.bucket, Key=marker)["Body"].read()),
        )
        tmp = dest.with_name(f"{dest.name}.download-{socket.gethostname()}{TMP_SUFFIX}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for rel, entry in manifest["files"].items():
                path, key = tmp / rel, prefix + rel
                path.parent.mkdir(parents=True, exist_ok=True)
                self._retry(f"download {self._url(key)} -> {path}", functools.partial(self._fetch, key, path, entry))
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
                shutil.rmtree(tmp)  # another node on a shared filesystem was faster
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def _fetch(self, key: str, path: Path, entry: dict[str, Any]) -> None:
        self._client.download_file(self.bucket, key, str(path), Config=self._transfer)
        size, digest = path.stat().st_size, _sha256(path)
        if (size, digest) != (entry["size"], entry["sha256"]):
            raise S3Error(
                f"{path}: {size} bytes with sha256 {digest}, the manifest says {entry['size']} "
                f"bytes with sha256 {entry['sha256']}"
            )
        with open(path, "rb") as f:  # on disk before the folder is renamed into place
            os.fsync(f.fileno())

    def download_latest(self, checkpoints_dir: str | Path) -> Path | None:
        """The newest complete checkpoint on S3 into `checkpoints_dir/step_NNNNNN` when no complete local
        one is as new; an older complete one when a download fails (with a warning). Returns the folder
        downloaded, or None when nothing was (nothing newer on S3, or every download failed)."""
        checkpoints_dir = Path(checkpoints_dir)
        newest_local = max(
            (
                int(m.group(1))
                for p in checkpoints_dir.glob("step_*")
                if (m := STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()
            ),
            default=-1,
        )
        for step in reversed(self.complete_steps()):
            if step <= newest_local:
                return None
            dest = checkpoints_dir / step_dir_name(step)
            try:
                return self.download_checkpoint(step, dest)
            except S3Error as e:
                log.warning(
                    "[s3] checkpoint step %d could not be downloaded to %s, trying an older one: %s", step, dest, e
                )
        return None
