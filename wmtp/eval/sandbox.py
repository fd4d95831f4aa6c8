"""Run untrusted Python programs (model completions plus their tests) in a sandbox.

Each program runs in its own process, session and fresh temporary directory. What protects the
machine, and where each protection comes from:

- **Launch chain** (Linux, as root): ``unshare --net --pid --fork --mount-proc -- setpriv
  --reuid=U --regid=U --clear-groups --no-new-privs --pdeathsig=KILL -- python -I -S -c PRELUDE``.
  ``unshare`` creates the namespaces and stays behind as the program's parent; ``setpriv`` drops
  root; the prelude (``_PRELUDE``) sets the resource limits in the program's own interpreter, then
  compiles and runs the program as ``__main__``. Small C tools instead of ``preexec_fn``: the
  parent is threaded (``run_programs``) and may be a large training process, where forking Python
  is unsafe and slow, and ``subprocess`` can then still use ``vfork``.
- **Network**: a new network namespace (no interface is up, not even loopback). Without one, the
  prelude replaces ``_socket.socket`` with a class that raises: a weaker block, which ``ctypes`` or
  a child process gets around.
- **Orphans**: the program is the init of a new PID namespace, so when it exits or is killed the
  kernel kills every process it started, daemons that called ``setsid`` included, before the
  launcher's wait returns; ``--mount-proc`` also hides the host's processes (and their command
  lines). Without a PID namespace, the program's process group is killed, and (when the program
  has its own uid) every process of that uid, found by scanning ``/proc``.
- **Privileges and process count**: as root, each concurrently running program gets a uid of its
  own from a block of ``UIDS_PER_BLOCK`` uids that this process claims (``flock`` under
  ``UID_LOCK_DIR``, so concurrent evaluations on one machine use different uids). The program can
  change only its temporary directory (and world-writable places such as ``/tmp``), and
  ``RLIMIT_NPROC``, which Linux ignores for root and counts per uid, bounds a fork bomb to
  ``PROCESS_LIMIT`` processes without starving the other workers. When not root, ``unshare
  --user`` gives the namespaces where unprivileged user namespaces are allowed, programs run as the
  calling user, and no process limit is set (it would count the user's other processes too).
- **Resources**: rlimits on address space (``memory_mb``), CPU time (the timeout plus
  ``CPU_GRACE_S``), file size (``FILE_SIZE_LIMIT_BYTES``, which also caps stdout and stderr: they go
  to unnamed files, of which the harness reads at most ``max_output_bytes``), open files and core
  dumps; a wall-clock timeout after which the program's namespace (or group) is killed with
  SIGKILL, so ignoring SIGTERM does not help.
- **Environment**: none of the parent's variables (no credentials leak), a minimal ``PATH``,
  ``LANG``, ``HOME`` and ``TMPDIR`` set to the temporary directory, thread pools of one thread;
  stdin is ``/dev/null`` unless given; ``python -I -S``: isolated mode without ``site``, so only the
  standard library is importable and startup is cheaper. The interpreter is ``sys.executable`` if
  the sandbox uid can run it, else the system's (``sandbox_python()`` says which).

At first use a probe program runs through the chain and reports what is in effect
(``sandbox_protections()``); whatever this OS cannot provide is logged once per process as a
warning. Not bounded: disk use (no quota; a program can write many files of up to
``FILE_SIZE_LIMIT_BYTES``, in world-writable places too) and memory across a program's processes
(only ``PROCESS_LIMIT`` times ``memory_mb``); a cgroup or a size-limited tmpfs would bound them.

As init of its namespace the program sees ``os.getpid() == 1`` and ``os.getppid() == 0``, and
signals it sends itself with the default action are ignored (the kernel protects init).
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

log = logging.getLogger(__name__)

STATUSES = {
    "passed": "exited with status 0 within the limits",
    "failed": "exited with a non-zero status (an exception, a failed assert, sys.exit(n))",
    "timeout": "ran past the wall-clock timeout (then killed) or its CPU-time limit",
    "memory": "failed with MemoryError: it reached the address-space limit",
    "file_size": "a write failed or was killed at the file-size limit",
    "output_limit": "stdout or stderr reached the file-size limit",
    "killed": "killed by a signal it did not survive (other than the timeout's)",
}
"""Values of ``ExecResult.status`` and what each means."""

PROTECTIONS = {
    "network_namespace": "a new network namespace: no network at all, not even loopback",
    "socket_block": "fallback without one: the program's socket class raises (ctypes gets around it)",
    "pid_namespace": "init of a new PID namespace: every process it starts dies with it",
    "own_uid": "an unprivileged uid of its own: cannot change files outside its temporary directory",
    "process_limit": "RLIMIT_NPROC of PROCESS_LIMIT processes for that uid (stops fork bombs)",
    "not_root": "the program does not run as root",
}
"""Keys of ``sandbox_protections()`` and what each, when true, means."""

CPU_GRACE_S = 1
"""CPU seconds allowed beyond the wall-clock timeout, so that the timeout normally fires first."""
FILE_SIZE_LIMIT_BYTES = 16 << 20
"""RLIMIT_FSIZE: the largest file a program may write, stdout and stderr included."""
OPEN_FILES_LIMIT = 256
"""RLIMIT_NOFILE of a program."""
PROCESS_LIMIT = 64
"""RLIMIT_NPROC of a program's own uid: processes and threads it may have at once."""
MAX_OUTPUT_BYTES = 1 << 20
"""Default of how much stdout (its head) and stderr (its tail, where the exception is) is kept."""
KILL_WAIT_S = 5.0
"""How long to wait for a killed program's launcher to exit before killing its process group."""
SANDBOX_UID_BASE = 2_000_000_000
"""First sandbox uid: above the ranges distributions and systemd allocate, below 2**31."""
UIDS_PER_BLOCK = 1024
"""Uids a process claims, one per concurrently running program (more concurrent runs wait)."""
UID_BLOCKS = 64
"""Blocks of uids: how many processes on one machine can run sandboxes at the same time."""
UID_LOCK_DIR = "/run/wmtp-sandbox"
"""Where the per-block lock files live (root-only, as only root drops to sandbox uids)."""
PROGRAM_NAME = "program.py"
INTERPRETER_FLAGS = ("-I", "-S")
"""Isolated mode, no ``site``: the standard library only, and ~15 ms less startup than with site."""
BASE_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    # Thread pools sized to the machine would trip the process and memory limits.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
"""The whole environment of a program, plus HOME and TMPDIR (its temporary directory)."""
_UNSHARE_SIGKILL_MESSAGE = "unshare: sigprocmask unblock failed: Invalid argument\n"
"""What ``unshare`` (util-linux 2.38) writes, exiting 1, when it fails to re-raise its child's
SIGKILL on itself; read as the program's SIGKILL."""
_POLL_S = 0.002
"""Polling interval where pidfd_open is unavailable, and between rounds of killing a uid."""

# Runs in the program's interpreter before the program: argv is [-c, path, as, cpu, fsize, nofile,
# nproc, block_socket]. A function, so that the program's globals hold none of its names.
_PRELUDE = r"""
def _wmtp_sandbox():
    import builtins, resource, sys
    path, address_space, cpu, fsize, nofile, nproc, block_socket = sys.argv[1:8]
    limits = [(resource.RLIMIT_AS, int(address_space)), (resource.RLIMIT_FSIZE, int(fsize)),
              (resource.RLIMIT_NOFILE, int(nofile)), (resource.RLIMIT_CORE, 0)]
    if int(nproc) > 0:
        limits.append((resource.RLIMIT_NPROC, int(nproc)))
    for res, value in limits:
        resource.setrlimit(res, (value, value))
    # One second between SIGXCPU and SIGKILL (init of a PID namespace ignores SIGXCPU).
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
    if block_socket == "1":
        import _socket

        class _NoSocket(_socket.socket):
            __slots__ = ()  # socket.socket, a subclass, adds __weakref__

            def __init__(self, *args, **kwargs):
                raise PermissionError(1, "network access is disabled in the wmtp sandbox")

        _socket.socket = _socket.SocketType = _NoSocket
    # -S skips site, which defines exit() and quit(); programs (CodeContests ones often) call them.
    builtins.exit = builtins.quit = sys.exit
    sys.argv = [path]
    globals()["__file__"] = path
    with open(path, "rb") as f:
        return compile(f.read(), path, "exec")
exec(globals().pop("_wmtp_sandbox")())
"""

# Reports, as one JSON line, what the prelude and the launch chain put in effect.
_PROBE = r"""
import json, os, resource, sys
print(json.dumps({
    "version": sys.version,
    "uid": os.getuid(),
    "pid": os.getpid(),
    "net_ns": os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None,
    "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
    "socket_blocked": __import__("_socket").socket.__name__ == "_NoSocket",
}))
"""
_PROBE_MEMORY_MB = 512
_PROBE_TIMEOUT_S = 30.0
"""Generous: the probe runs once, and a slow first start must not read as a broken sandbox."""


@dataclass(frozen=True)
class ExecResult:
    """How one program run ended."""

    passed: bool
    """Exit status 0 within the limits."""
    status: str
    """One of ``STATUSES``."""
    returncode: int
    """The program's exit status, or minus the signal that killed it."""
    stdout: str
    """The head of stdout, at most ``max_output_bytes`` (decoded with replacement)."""
    stderr: str
    """The tail of stderr, at most ``max_output_bytes``."""
    seconds: float
    """Wall-clock time from launch until the program and everything it started were gone."""
    truncated: bool
    """Whether stdout or stderr was longer than what is kept."""


class _UidPool:
    """The uids of a claimed block, handed to one running program at a time."""

    def __init__(self, base: int) -> None:
        self._base = base
        self._free = list(range(UIDS_PER_BLOCK))  # a heap: the lowest free slot first
        self._ready = threading.Condition()

    def acquire(self) -> int:
        with self._ready:
            self._ready.wait_for(lambda: self._free)
            return self._base + heapq.heappop(self._free)

    def release(self, uid: int) -> None:
        with self._ready:
            heapq.heappush(self._free, uid - self._base)
            self._ready.notify()


@dataclass(frozen=True, eq=False)
class _Sandbox:
    """How programs are launched in this process, decided once by probing."""

    python: str
    namespaces: tuple[str, ...]
    """The ``unshare`` command line, or empty."""
    setpriv: str | None
    """The ``setpriv`` executable when programs run as their own uid (running as root)."""
    uids: _UidPool | None
    block_socket: bool
    protections: dict[str, bool]

    def command(self, uid: int | None, *, timeout_s: float, memory_mb: int) -> list[str]:
        drop = (
            []
            if uid is None or self.setpriv is None
            else [
                self.setpriv,
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--no-new-privs",
                "--pdeathsig=KILL",
                "--",
            ]
        )
        limits = [
            memory_mb << 20,
            math.ceil(timeout_s) + CPU_GRACE_S,
            FILE_SIZE_LIMIT_BYTES,
            OPEN_FILES_LIMIT,
            PROCESS_LIMIT if drop else 0,
            int(self.block_socket),
        ]
        return [
            *self.namespaces,
            *drop,
            self.python,
            *INTERPRETER_FLAGS,
            "-c",
            _PRELUDE,
            PROGRAM_NAME,
            *map(str, limits),
        ]


_setup_lock = threading.Lock()
_sandbox_by_pid: dict[int, _Sandbox] = {}
"""The sandbox of this process (keyed by pid: a forked child claims its own uids and probes again)."""
_uid_lock_files: list[int] = []
"""Open descriptors of claimed uid blocks' lock files, held for the life of the process."""


def _claim_uid_block() -> int:
    """First uid of a block no other live process holds."""
    os.makedirs(UID_LOCK_DIR, mode=0o755, exist_ok=True)
    for block in range(UID_BLOCKS):
        fd = os.open(os.path.join(UID_LOCK_DIR, f"block-{block}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _uid_lock_files.append(fd)
        return SANDBOX_UID_BASE + block * UIDS_PER_BLOCK
    raise RuntimeError(f"all {UID_BLOCKS} sandbox uid blocks under {UID_LOCK_DIR} are in use")


def _interpreters() -> list[str]:
    """This interpreter, then the system's of the same version, then any python3 on the default
    PATH: the first one an unprivileged uid can run (one under /root it cannot) is used."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    found = [sys.executable, *(shutil.which(name, path=BASE_ENV["PATH"]) for name in (version, "python3"))]
    unique: dict[str, str] = {}
    for path in found:
        if path:
            unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def _namespace_command(root: bool) -> tuple[tuple[str, ...], str]:
    """The ``unshare`` prefix that works here (or empty) and, if none, why not."""
    unshare = shutil.which("unshare")
    if sys.platform != "linux" or unshare is None:
        return (), "no unshare command" if sys.platform == "linux" else f"not Linux ({sys.platform})"
    command = (unshare, *(() if root else ("--user",)), "--net", "--pid", "--fork", "--mount-proc", "--")
    try:
        probe = subprocess.run([*command, "/bin/true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return (), f"unshare failed: {e}"
    if probe.returncode != 0:
        return (), f"unshare failed: {probe.stderr.strip() or probe.returncode}"
    return command, ""


def _probe(sandbox: _Sandbox) -> dict | None:
    """What the probe program reports from inside ``sandbox``, or None if it could not run."""
    result = _run(
        sandbox,
        _PROBE,
        stdin=None,
        timeout_s=_PROBE_TIMEOUT_S,
        memory_mb=_PROBE_MEMORY_MB,
        max_output_bytes=MAX_OUTPUT_BYTES,
    )
    if not result.passed:
        log.debug("sandbox probe with %s failed: %s", sandbox.python, result.stderr.strip())
        return None
    return json.loads(result.stdout)


def _find_sandbox() -> _Sandbox:
    root = os.geteuid() == 0
    namespaces, no_namespaces = _namespace_command(root)
    setpriv = shutil.which("setpriv") if root and sys.platform == "linux" else None
    uids = _UidPool(_claim_uid_block()) if setpriv else None
    no_uid = (
        "not root: programs run as this user and can change its files"
        if not root
        else "no setpriv command: programs run as root"
        if setpriv is None
        else ""
    )
    report = None
    for python in _interpreters():
        sandbox = _Sandbox(python, namespaces, setpriv, uids, not namespaces, {})
        report = _probe(sandbox)
        # An interpreter whose own libpython the uid cannot read may load the system's instead.
        if report is not None and (python != sys.executable or report["version"] == sys.version):
            break
        report = None
    if report is None and setpriv:
        no_uid = "no interpreter that an unprivileged uid can run: programs run as root"
        setpriv, uids = None, None
        sandbox = _Sandbox(sys.executable, namespaces, None, None, not namespaces, {})
        report = _probe(sandbox)
    if report is None:
        raise RuntimeError(f"the sandbox cannot run {sys.executable} (see the debug log)")
    own_uid = uids is not None and report["uid"] >= SANDBOX_UID_BASE
    protections = {
        "network_namespace": bool(namespaces) and report["net_ns"] != _own_net_namespace(),
        "socket_block": report["socket_blocked"],
        "pid_namespace": bool(namespaces) and report["pid"] == 1,
        "own_uid": own_uid,
        "process_limit": own_uid and report["nproc"] == PROCESS_LIMIT,
        "not_root": report["uid"] != 0,
    }
    missing = []
    if not protections["network_namespace"]:
        missing.append(
            f"a network namespace ({no_namespaces}): network is blocked in-process only, "
            "which ctypes or a child process gets around"
        )
    if not protections["pid_namespace"]:
        missing.append(
            f"a PID namespace ({no_namespaces}): orphans are killed by process group"
            + (" and uid" if own_uid else ", so one that calls setsid survives")
        )
    if not own_uid:
        missing.append(
            f"a uid per program ({no_uid}) and so a process limit (fork bombs are bounded "
            + ("by nothing: root ignores RLIMIT_NPROC)" if report["uid"] == 0 else "only by the user's RLIMIT_NPROC)")
        )
    if missing:
        log.warning("wmtp sandbox: this OS lacks %s", "; ".join(missing))
    if sandbox.python != sys.executable:
        log.info(
            "wmtp sandbox: programs run with %s (%s is not usable by the sandbox uid)", sandbox.python, sys.executable
        )
    return _Sandbox(sandbox.python, namespaces, setpriv, uids, not namespaces, protections)


def _own_net_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


def _sandbox() -> _Sandbox:
    with _setup_lock:
        if os.getpid() not in _sandbox_by_pid:
            _sandbox_by_pid.clear()
            _sandbox_by_pid[os.getpid()] = _find_sandbox()
        return _sandbox_by_pid[os.getpid()]


def sandbox_protections() -> dict[str, bool]:
    """Which of ``PROTECTIONS`` are in effect here (probed at first use)."""
    return dict(_sandbox().protections)


def sandbox_python() -> str:
    """The interpreter programs run with (``sys.executable`` unless the sandbox uid cannot run it)."""
    return _sandbox().python


def _exited(pid: int, timeout_s: float) -> bool:
    """Whether child ``pid`` exits within ``timeout_s``; it is left unreaped, so that its pid, and
    process group id, cannot be reused while the group is being killed."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        deadline = time.monotonic() + timeout_s
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(math.ceil(max(timeout_s, 0.0) * 1000)))
    finally:
        os.close(fd)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _processes_of(uid: int) -> list[int]:
    """Live processes whose real uid is ``uid`` (from /proc/PID/status: a process that made itself
    non-dumpable shows root as the owner of /proc/PID but not in its status)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        zombie = fields.get("State", "").split()[:1] == ["Z"]
        if int(fields.get("Uid", "-1").split()[0]) == uid and not zombie:
            found.append(int(entry))
    return found


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``, again while some still fork."""
    for _ in range(100):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            _kill(pid)
        time.sleep(_POLL_S)  # let the killed exit before looking again
    log.warning("wmtp sandbox: processes of uid %d survived 100 rounds of SIGKILL", uid)


def _read_head(f: IO[bytes], size: int, limit: int) -> bytes:
    f.seek(0)
    return f.read(min(size, limit))


def _read_tail(f: IO[bytes], size: int, limit: int) -> bytes:
    f.seek(max(0, size - limit))
    return f.read(limit)


def _status(
    returncode: int,
    *,
    timed_out: bool,
    cpu_s: float,
    cpu_limit_s: int,
    stdout_size: int,
    stderr_size: int,
    stderr_tail: str,
) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_s >= cpu_limit_s):
        return "timeout"
    if max(stdout_size, stderr_size) >= FILE_SIZE_LIMIT_BYTES:
        return "output_limit"
    if returncode == -signal.SIGXFSZ:
        return "file_size"
    if returncode < 0:
        return "killed"
    last_line = stderr_tail.rstrip().rsplit("\n", 1)[-1]
    if last_line.startswith("MemoryError"):
        return "memory"
    if f"[Errno {errno.EFBIG}]" in last_line:
        return "file_size"
    return "failed"


def _stdin_file(stdin: str | bytes | None) -> IO[bytes] | None:
    if stdin is None:
        return None
    f = tempfile.TemporaryFile()
    f.write(stdin.encode() if isinstance(stdin, str) else stdin)
    f.seek(0)
    return f


def _run(
    sandbox: _Sandbox,
    source: str,
    *,
    stdin: str | bytes | None,
    timeout_s: float,
    memory_mb: int,
    max_output_bytes: int,
) -> ExecResult:
    uid = sandbox.uids.acquire() if sandbox.uids else None
    workdir = tempfile.mkdtemp(prefix="wmtp-sandbox-")
    try:
        with open(os.path.join(workdir, PROGRAM_NAME), "w", encoding="utf-8", errors="replace") as f:
            f.write(source)
        if uid is not None:
            os.chown(workdir, uid, uid)
        return _launch(
            sandbox,
            uid,
            workdir,
            stdin=stdin,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            max_output_bytes=max_output_bytes,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            sandbox.uids.release(uid)


def _launch(
    sandbox: _Sandbox,
    uid: int | None,
    workdir: str,
    *,
    stdin: str | bytes | None,
    timeout_s: float,
    memory_mb: int,
    max_output_bytes: int,
) -> ExecResult:
    stdin_file = _stdin_file(stdin)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                sandbox.command(uid, timeout_s=timeout_s, memory_mb=memory_mb),
                cwd=workdir,
                env={**BASE_ENV, "HOME": workdir, "TMPDIR": workdir},
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        finally:
            if stdin_file is not None:
                stdin_file.close()
        timed_out = not _exited(proc.pid, timeout_s)
        if timed_out and sandbox.namespaces:
            # Kill the namespace's init, not the launcher: the launcher then exits only once the
            # kernel has killed and reaped every process in the namespace.
            children = _children(proc.pid)
            for child in children:
                _kill(child)
            if children:
                _exited(proc.pid, KILL_WAIT_S)
        _killpg(proc.pid)  # the launcher is not reaped yet, so its group id is still ours
        if uid is not None and not sandbox.namespaces:
            _kill_uid(uid)
        _, wait_status, usage = os.wait4(proc.pid, 0)
        proc.returncode = returncode = os.waitstatus_to_exitcode(wait_status)
        seconds = time.perf_counter() - start
        sizes = os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size
        stdout = _read_head(out, sizes[0], max_output_bytes).decode("utf-8", "replace")
        stderr = _read_tail(err, sizes[1], max_output_bytes).decode("utf-8", "replace")
    if sandbox.namespaces and returncode == 1 and stderr.endswith(_UNSHARE_SIGKILL_MESSAGE):
        returncode, stderr = -signal.SIGKILL, stderr[: -len(_UNSHARE_SIGKILL_MESSAGE)]
    status = _status(
        returncode,
        timed_out=timed_out,
        cpu_s=usage.ru_utime + usage.ru_stime,
        cpu_limit_s=math.ceil(timeout_s) + CPU_GRACE_S,
        stdout_size=sizes[0],
        stderr_size=sizes[1],
        stderr_tail=stderr,
    )
    return ExecResult(
        passed=status == "passed",
        status=status,
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        seconds=seconds,
        truncated=max(sizes) > max_output_bytes,
    )


def run_program(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
    stdin: str | bytes | None = None,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> ExecResult:
    """Run the Python program ``source`` in the sandbox; ``stdin`` is fed to it (None: empty)."""
    return _run(
        _sandbox(), source, stdin=stdin, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes
    )


def run_programs(
    sources: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
    stdins: Sequence[str | bytes | None] | None = None,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> list[ExecResult]:
    """``run_program`` over ``sources`` (with ``stdins[i]`` as the stdin of program i, if given),
    ``workers`` at a time (default: the CPU count), results in input order."""
    if stdins is not None and len(stdins) != len(sources):
        raise ValueError(f"{len(stdins)} stdins for {len(sources)} programs")
    if not sources:
        return []
    sandbox = _sandbox()
    inputs = stdins if stdins is not None else [None] * len(sources)
    with ThreadPoolExecutor(max_workers=min(workers or os.cpu_count() or 1, len(sources))) as pool:
        return list(
            pool.map(
                lambda args: _run(
                    sandbox,
                    args[0],
                    stdin=args[1],
                    timeout_s=timeout_s,
                    memory_mb=memory_mb,
                    max_output_bytes=max_output_bytes,
                ),
                zip(sources, inputs),
            )
        )
