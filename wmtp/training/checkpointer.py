"""Sharded training checkpoints (DCP) with atomic completion, resume and keep-last-k.

Layout: <output_dir>/checkpoints/step_000010/ holds the DCP shards of model + optimizer and
`trainer_state.json` (step, sampler, scheduler). Every rank writes into `step_000010.tmp/`; rank 0
renames it only after all ranks finished, so a directory without `.tmp` is always complete.

Damaged checkpoints. A complete-looking checkpoint can still fail to load: a shard deleted or cut
short, a missing or truncated `.metadata`, a truncated `trainer_state.json` (storage faults, a
partial copy or download). `load_latest` tries the newest one first; one that does not load is
reported with its path and the reason, moved aside to `step_000010.damaged` (never deleted: rename
it back to retry it) and the next newest one is tried. The listing (`complete_steps`) ignores
moved-aside folders. "Loads" means: trainer_state.json parses and has the required keys (and the
folder's step), `.metadata` reads, every shard file it names exists and is as long as its items
need, and DCP reads every tensor. Under torchrun the load is collective and a damaged shard may fail
on one rank only, so after each check every rank's verdict is gathered (`all_gather_object`) and all
ranks agree: all fall back together (rank 0 renames). A checkpoint that reads but does not fit the
model (DCP's planning fails: another model config) is an error, not damage: it is left in place.

Failed saves. An I/O failure while saving (a full disk, a quota, an I/O error, on any rank) raises
CheckpointSaveError on every rank, naming the path and the cause ("no space left on device at
.../step_000010.tmp/__0_0.distcp (0 B free)") instead of torch's "unexpected pos 704 vs 598". The
`.tmp` folder is removed (which also frees the space it took), never renamed, so no partial
checkpoint ever looks complete. A run that cannot checkpoint stops: it would otherwise go on
training past its last recoverable step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from wmtp.atomic import TMP_SUFFIX, WriteError, atomic_write_text, describe_write_failure, fsync_dir
from wmtp.distributed.env import barrier, broadcast_object
from wmtp.distributed.load import dcp_quietly
from wmtp.errors import exception_line
from wmtp.layout import CHECKPOINTS_DIR, STEP_DIR, TRAINER_STATE, complete_steps, step_dir_name

log = logging.getLogger(__name__)

METADATA = ".metadata"
"""DCP's global metadata file: every tensor's shards and where they lie in the shard files."""
DAMAGED_SUFFIX = ".damaged"
"""A checkpoint that did not load is renamed step_000010.damaged (then .damaged-2, ...)."""
DAMAGED_NOTE = "DAMAGED.txt"
"""Written into a moved-aside checkpoint (best effort): why it did not load."""
_MAX_REASON = 400


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not load (raised on every rank alike)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that reads but does not fit the model or optimizer (another config)."""


class NoLoadableCheckpointError(RuntimeError):
    """There were checkpoints, and none of them loads (each was moved aside)."""


class CheckpointSaveError(WriteError):
    """A checkpoint save that failed (raised on every rank alike); nothing complete-looking is left."""


class Checkpointer:
    def __init__(self, output_dir: str | Path, *, keep_last: int, is_main: bool, trainable_only: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.is_main = is_main
        # A recipe that freezes most of the model (the critic) saves only what it trains.
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints (not `.tmp`, not moved aside), oldest first."""
        return complete_steps(self.output_dir)

    def latest(self) -> Path | None:
        steps = broadcast_object(self.complete_steps() if self.is_main else None)
        return self.path_of(steps[-1]) if steps else None

    def path_of(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    # ------------------------------------------------------------------ save
    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]
    ) -> Path:
        """Write checkpoint `step` (collective). Raises CheckpointSaveError on every rank when any
        rank fails to write; the `.tmp` folder is then removed."""
        final = self.path_of(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        what = f"checkpoint step {step}"

        problem = None
        if self.is_main:
            try:
                text = json.dumps({"step": step, **trainer_state}, indent=2)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except Exception as exc:  # noqa: BLE001 - any failure here must reach every rank
                problem = describe_write_failure(exc, tmp, what=what)
        self._raise_save_failure(_gather(problem), tmp, what)

        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        fs = _RecordingFileSystem()
        writer = FileSystemWriter(str(tmp))
        writer.fs = fs  # DCP's own local file system, remembering which file a failed write was writing
        problem = None
        try:
            with dcp_quietly():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), storage_writer=writer)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            problem = _dcp_save_problem(exc, fs, tmp, what)
        self._raise_save_failure(_gather(problem), tmp, what)

        problem = None
        if self.is_main:
            try:
                atomic_write_text(tmp / TRAINER_STATE, text)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except Exception as exc:  # noqa: BLE001
                problem = describe_write_failure(exc, tmp, what=what)
            else:
                fsync_dir(self.root)
        self._raise_save_failure(_gather(problem), tmp, what)
        if self.is_main:
            self._prune()
        barrier()
        return final

    def _raise_save_failure(self, problems: list[tuple[int, str, bool]], tmp: Path, what: str) -> None:
        if not problems:
            return
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        steps = [s for s in self.complete_steps() if step_dir_name(s) != tmp.name[: -len(TMP_SUFFIX)]]
        newest = f"; the newest complete checkpoint is {self.path_of(steps[-1]).name}" if steps else ""
        message = (
            f"{_summary(problems)}; nothing was saved ({tmp.name} removed){newest}. "
            f"The run stops: free the space (or fix the storage) and start it again to resume"
        )
        errno = next((code for _, _, code in problems if isinstance(code, int)), None)
        raise CheckpointSaveError(message, errno=errno, path=tmp)

    # ------------------------------------------------------------------ load
    def load(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, required: Iterable[str] = ("step",)
    ) -> dict[str, Any]:
        """Restore model and optimizer in place; return the trainer state (step, sampler, ...).

        Collective. Raises DamagedCheckpoint on every rank when any rank finds the checkpoint
        damaged (checked before anything is restored: trainer_state.json and its `required` keys,
        `.metadata`, the shard files' presence and lengths; then DCP's read itself), and
        CheckpointMismatchError when it reads but does not fit the model.
        """
        path = Path(path)
        problem, state = None, None
        try:
            state = read_trainer_state(path, required)
            check_shard_files(path)
        except DamagedCheckpoint as exc:
            problem = exc.reason
        except Exception as exc:  # noqa: BLE001 - must reach every rank
            problem = f"its files do not check: {exception_line(exc, _MAX_REASON)}"
        if problems := _gather(problem):
            raise DamagedCheckpoint(path, _summary(problems))

        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        loaded = {"model": model_sd, "optim": optim_sd}
        problem, mismatch = None, None
        try:
            with dcp_quietly():
                dcp.load(loaded, checkpoint_id=str(path))
        except CheckpointException as exc:
            # Planning matches the checkpoint's keys and shapes with the model's; reading fetches bytes.
            if exc.args and exc.args[0] == "plan":
                mismatch = _failures_text(exc)
            else:
                problem = f"DCP read failed: {_failures_text(exc)}"
        except Exception as exc:  # noqa: BLE001 - must reach every rank
            problem = f"DCP read failed: {exception_line(exc, _MAX_REASON)}"
        if mismatches := _gather(mismatch):
            raise CheckpointMismatchError(
                f"{path} does not fit this model/optimizer (was the config changed?): "
                f"{_summary(mismatches)}; it was left in place"
            )
        if problems := _gather(problem):
            raise DamagedCheckpoint(path, _summary(problems))
        set_state_dict(
            model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=self.options
        )
        return state

    def load_latest(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, required: Iterable[str] = ("step",)
    ) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest checkpoint that loads (collective): (its path, its trainer state), or None
        when there is no checkpoint.

        Each damaged one on the way is reported on stderr (path and reason) and moved aside; when
        every checkpoint is damaged, NoLoadableCheckpointError (rather than a silent start from
        step 0). A failed attempt may have overwritten part of the model and optimizer; the
        checkpoint that loads overwrites all of it again.
        """
        required = tuple(required)
        steps = broadcast_object(self.complete_steps() if self.is_main else None)
        damaged: list[str] = []
        for i, step in enumerate(reversed(steps)):
            path = self.path_of(step)
            try:
                state = self.load(path, model, optimizer, required=required)
            except DamagedCheckpoint as exc:
                moved = self.move_aside(path, exc.reason)
                where = f"moved aside to {moved.name}" if moved else "it could not be moved aside"
                older = steps[-2 - i] if i + 1 < len(steps) else None
                nxt = f"; falling back to {self.path_of(older)}" if older is not None else ""
                self._warn(f"[checkpoint] {path} does not load: {exc.reason}; {where}{nxt}")
                damaged.append(f"{path.name} ({exc.reason})")
                continue
            return path, state
        if damaged:
            raise NoLoadableCheckpointError(
                f"no checkpoint in {self.root} loads: {'; '.join(damaged)}. Each was moved aside "
                f"(*{DAMAGED_SUFFIX}); to retry one, rename it back; starting the run again now would "
                f"start it from step 0"
            )
        return None

    def move_aside(self, path: Path, reason: str) -> Path | None:
        """Rename a damaged checkpoint to `<name>.damaged` (rank 0; collective). Returns the new path,
        or None when the rename failed (the reason is warned about; the caller goes on)."""
        target: str | None = None
        if self.is_main:
            candidate = path.with_name(path.name + DAMAGED_SUFFIX)
            n = 2
            while candidate.exists():
                candidate = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
                n += 1
            try:
                os.replace(path, candidate)
                target = str(candidate)
            except OSError as exc:
                self._warn(f"[checkpoint] could not move {path} aside: {exception_line(exc, _MAX_REASON)}")
            if target is not None:
                with contextlib.suppress(OSError):
                    (candidate / DAMAGED_NOTE).write_text(f"{path.name} did not load: {reason}\n")
                fsync_dir(path.parent)
        target = broadcast_object(target)
        return Path(target) if target else None

    def _prune(self) -> None:
        for step in self.complete_steps()[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.path_of(step), ignore_errors=True)

    def _warn(self, line: str) -> None:
        if self.is_main:  # every rank reaches the same verdict (gathered); one says it
            log.warning(line)


# ---------------------------------------------------------------------------------------------
# Checks of a checkpoint's files (each rank, before anything is restored)


def read_trainer_state(path: Path, required: Iterable[str] = ("step",)) -> dict[str, Any]:
    """trainer_state.json of checkpoint `path`, or DamagedCheckpoint: unreadable, not a JSON object,
    missing one of `required`, or (when "step" is required) another step than the folder's."""
    file = Path(path) / TRAINER_STATE
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise DamagedCheckpoint(path, f"{TRAINER_STATE} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedCheckpoint(path, f"{TRAINER_STATE} does not read: {exception_line(exc, _MAX_REASON)}") from None
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise DamagedCheckpoint(
            path, f"{TRAINER_STATE} is not valid JSON ({len(text)} bytes; {exc}): truncated?"
        ) from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(path, f"{TRAINER_STATE} holds a {type(state).__name__}, not an object")
    required = tuple(required)
    missing = [k for k in required if k not in state]
    if missing:
        raise DamagedCheckpoint(path, f"{TRAINER_STATE} lacks {', '.join(map(repr, missing))}")
    m = STEP_DIR.match(Path(path).name)
    if "step" in required and m and (type(state["step"]) is not int or state["step"] != int(m.group(1))):
        raise DamagedCheckpoint(
            path, f"{TRAINER_STATE} says step {state['step']!r}, the folder is step {int(m.group(1))}"
        )
    return state


def check_shard_files(path: Path) -> None:
    """DamagedCheckpoint unless `.metadata` reads and every shard file it names exists and is at
    least as long as the items stored in it need (a deleted or cut-short shard)."""
    path = Path(path)
    if not (path / METADATA).is_file():
        raise DamagedCheckpoint(path, f"{METADATA} is missing")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - pickle raises many kinds on a cut-short file
        raise DamagedCheckpoint(
            path, f"{METADATA} does not load ({exception_line(exc, _MAX_REASON)}): truncated?"
        ) from None
    needed: dict[str, int] = {}
    storage = getattr(metadata, "storage_data", None)
    for info in storage.values() if isinstance(storage, dict) else ():
        rel = getattr(info, "relative_path", None)
        if isinstance(rel, str):
            needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    if getattr(metadata, "state_dict_metadata", None) and not needed:
        raise DamagedCheckpoint(path, f"{METADATA} names no shard files")
    problems = []
    for rel, end in sorted(needed.items()):
        try:
            size = (path / rel).stat().st_size
        except FileNotFoundError:
            problems.append(f"shard {rel} is missing")
            continue
        except OSError as exc:
            problems.append(f"shard {rel} does not read: {exception_line(exc, _MAX_REASON)}")
            continue
        if size < end:
            problems.append(f"shard {rel} is truncated ({size} bytes, its items need {end})")
    if problems:
        raise DamagedCheckpoint(path, "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Agreement between ranks


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather(problem: str | tuple[str, Any] | None) -> list[tuple[int, str, Any]]:
    """Every rank's problem on every rank, as [(rank, text, extra)] of the ranks with one.

    A problem is None (none), a text, or a (text, extra) pair: extra is an errno, or "secondary"
    for a rank that only saw another rank fail (dropped when a rank reports its own failure).
    Collective: every rank must call it, with or without a problem, so that all of them take the
    same branch afterwards.
    """
    if dist.is_available() and dist.is_initialized():
        box: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(box, problem)
    else:
        box = [problem]
    out = [(rank, *(p if isinstance(p, tuple) else (str(p), None))) for rank, p in enumerate(box) if p is not None]
    primary = [x for x in out if x[2] != "secondary"]
    return sorted(set(primary or out), key=lambda x: (x[0], x[1]))


def _summary(problems: list[tuple[int, str, Any]]) -> str:
    """One line; ranks named only in a process group of more than one (equal texts merged)."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    by_text: dict[str, list[int]] = {}
    for rank, text, _ in problems:
        by_text.setdefault(text, []).append(rank)
    if not multi:
        return "; ".join(by_text)
    return "; ".join(
        f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, sorted(set(r))))}: {t}" for t, r in by_text.items()
    )


def _failures_text(exc: CheckpointException) -> str:
    """The per-rank causes of a DCP failure, without the tracebacks."""
    failures = getattr(exc, "failures", None) or {}
    parts = [
        f"rank {r}: {exception_line(f[0] if isinstance(f, tuple) else f, _MAX_REASON)}"
        for r, f in sorted(failures.items())
    ]
    return "; ".join(parts) if parts else exception_line(exc, _MAX_REASON)


def _dcp_save_problem(exc: BaseException, fs: _RecordingFileSystem, tmp: Path, what: str) -> tuple[str, Any]:
    """This rank's account of a failed DCP save: the file it failed to write and why (with the errno
    that torch's zip writer hides), or, on a rank that wrote its files, a secondary note."""
    if fs.failures:
        failed_path, failed_exc = fs.failures[0]
        return describe_write_failure(failed_exc, failed_path, what=what)
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures and _rank() not in failures:
        return (f"{what}: DCP save failed on rank(s) {sorted(failures)}: {_failures_text(exc)}", "secondary")
    message, code = describe_write_failure(exc, tmp, what=what)
    return (message if len(message) <= 2 * _MAX_REASON else message[: 2 * _MAX_REASON] + "...", code)


class _RecordingFileSystem(FileSystem):
    """DCP's local file system, remembering the file a failed write was writing and the exception
    (whose context holds the OSError that torch's zip writer reports as "unexpected pos ...")."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[tuple[Path, BaseException]] = []

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except Exception as exc:
            if any(c in mode for c in "wax+"):
                self.failures.append((Path(path), exc))
            raise


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 state dict on CPU (gathered on every rank; only rank 0 needs to write it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
