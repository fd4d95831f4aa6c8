"""Atomic file and directory writes: a crash never leaves something that looks complete but is not.

A write that fails for an I/O reason (a full disk, a quota, a read-only or failing file system)
raises `WriteError`, whose message names the path and the cause ("no space left on device at
/runs/x/final.tmp (0 B free)") instead of whatever the library underneath said (torch's zip writer
says "unexpected pos 704 vs 598" when the disk is full). The temporary `.tmp` file or folder is
removed, never renamed to the final name.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

TMP_SUFFIX = ".tmp"

LOW_SPACE_BYTES = 1 << 20
"""A failed write with less than this much free space left (and no errno to say otherwise) is
reported as a full disk: torch's zip writer turns ENOSPC into a RuntimeError without the errno."""
_RUST_OS_ERROR = re.compile(r"os error (\d+)")
"""How a Rust library (safetensors) spells an errno inside its message."""


class WriteError(OSError):
    """A write that failed for an I/O reason; `str()` names the path and the cause.

    `errno` is the cause's errno when one is known (errno.ENOSPC for a full disk), `filename` the
    path that was being written.
    """

    def __init__(self, message: str, *, errno: int | None = None, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:
        return str(self.args[0])


def find_errno(exc: BaseException, extra: Iterable[BaseException] = ()) -> int | None:
    """The errno behind a failure: an OSError in the exception, its cause/context chain, the
    per-rank failures of a torch.distributed.checkpoint CheckpointException, or a Rust library's
    "(os error N)"; None when there is none."""
    seen: set[int] = set()
    todo = [exc, *extra]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        first = e.args[0] if e.args and isinstance(e.args[0], str) else ""
        if m := _RUST_OS_ERROR.search(first):
            return int(m.group(1))
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of `path` (its nearest existing parent); None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def describe_write_failure(
    exc: BaseException, path: str | Path, *, what: str = "write", extra: Iterable[BaseException] = ()
) -> tuple[str, int | None]:
    """(message, errno) of a failed write to `path`: "no space left on device at <path> (N free)"
    for ENOSPC (also inferred when the errno is lost and the disk is all but full), the errno's
    text for another I/O error, else the exception itself. `what` prefixes the message."""
    code = find_errno(exc, extra)
    free = free_bytes(path)
    if code is None and free is not None and free < LOW_SPACE_BYTES:
        code = errno_codes.ENOSPC
    space = f" ({format_bytes(free)} free)" if free is not None else ""
    if code in (errno_codes.ENOSPC, errno_codes.EDQUOT):
        cause = "no space left on device" if code == errno_codes.ENOSPC else "disk quota exceeded"
        return f"{what}: {cause} at {path}{space}", code
    if code is not None:
        text = os.strerror(code)
        return f"{what}: {text[:1].lower() + text[1:]} at {path}", code
    return f"{what} failed at {path}: {type(exc).__name__}: {exc}", None


def write_error(exc: BaseException, path: str | Path, *, what: str = "write") -> WriteError:
    message, code = describe_write_failure(exc, path, what=what)
    return WriteError(message, errno=code, path=path)


def _is_io_failure(exc: BaseException) -> bool:
    """An exception that a failed write stands behind (an OSError, or one with an errno in it)."""
    return isinstance(exc, OSError) or find_errno(exc) is not None


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield `<path>.tmp` to fill; on success it is renamed to `path` (on error it is removed).

    An I/O failure (while filling it, syncing or renaming) raises WriteError naming the path and the
    cause; other exceptions pass through unchanged.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    exists: FileExistsError | None = None
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            if not overwrite:
                exists = FileExistsError(f"{path} already exists")
                raise exists
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        # Diagnose first (it reads the free space), then free what the partial folder holds.
        convert = (
            exc is not exists and isinstance(exc, Exception) and not isinstance(exc, WriteError) and _is_io_failure(exc)
        )
        error = write_error(exc, tmp, what=f"writing {path}") if convert else None
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `<path>.tmp`, fsync it and rename it to `path`; an I/O failure raises
    WriteError naming `path` (and removes the temporary file)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        error = write_error(exc, path, what=f"writing {path.name}")
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise error from exc


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write` on a fresh temporary file beside `path` (opened "wb"), fsync it and rename it
    to `path`; an I/O failure raises WriteError naming `path` (the temporary file is removed).
    Each call has its own temporary name, so processes writing the same path never share one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(exc, path, what=f"writing {path.name}") from exc
        raise


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (best effort: some file systems refuse to fsync a folder)."""
    with contextlib.suppress(OSError):
        _fsync_dir(Path(path))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
