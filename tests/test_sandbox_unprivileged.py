"""The sandbox as an unprivileged user, the usual case on a GPU cluster.

The harness runs as ``nobody`` (``setpriv``; as the calling user when the tests do not run as
root) from a venv in a home only that user can read, importing a copy of wmtp/eval/sandbox.py
(it needs only the standard library): root's venv is out of that user's reach. The user's files
must stay intact whatever a program does, no other process of the user can be signalled, and a
fork bomb stays under ``PROCESS_LIMIT`` while the other workers finish their programs.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wmtp.eval import sandbox
from wmtp.eval.sandbox import PROCESS_LIMIT

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
SAFETY_NPROC = 400
"""RLIMIT_NPROC around the whole unprivileged harness: if the per-program bound failed, the fork bomb
would stop here instead of taking the machine down."""
POLL_S = 0.005
"""How often the fork bomb's processes are counted."""
BOMB_TIMEOUT_S = 3.0

DRIVER = r"""
import json, logging, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox

warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("sandbox").addHandler(handler)
task = json.loads(sys.argv[1])
if task["without_namespaces"]:  # as where user namespaces are not allowed
    sandbox._namespace_command = lambda root, isolate: ((), "disabled by the test")
out = {
    "uid": os.getuid(),
    "python": sys.executable,
    "sandbox_python": sandbox.sandbox_python(),
    "protections": sandbox.sandbox_protections(),
    "warnings": warnings,
}
try:
    sandbox.require_isolation()
except sandbox.SandboxIsolationError as e:
    out["refused"] = str(e)  # destructive programs are not run without isolation
else:
    results = sandbox.run_programs(task["programs"], workers=task["workers"], timeout_s=task["timeout_s"])
    out["results"] = [
        {"status": r.status, "reason": r.reason, "stdout": r.stdout, "stderr": r.stderr[-2000:], "seconds": r.seconds}
        for r in results
    ]
print(json.dumps(out))
"""


def _unprivileged_prefix() -> list[str]:
    """The command prefix that drops to nobody (empty when already unprivileged)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None or not Path(SYSTEM_PYTHON).is_file():
        pytest.skip(f"running as root without setpriv or {SYSTEM_PYTHON}: cannot drop to an unprivileged user")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


class UnprivilegedHarness:
    """A home only the unprivileged user can read (0700) with a venv, the sandbox module and a driver."""

    def __init__(self, base: Path) -> None:
        self.prefix = _unprivileged_prefix()
        self.uid = NOBODY if self.prefix else os.geteuid()
        self.home = base / "home"
        self.home.mkdir(mode=0o700)
        shutil.copy(sandbox.__file__, self.home / "sandbox.py")
        (self.home / "driver.py").write_text(DRIVER)
        if self.prefix:
            for path in [self.home, *self.home.iterdir()]:
                os.chown(path, NOBODY, NOBODY)
        python = SYSTEM_PYTHON if self.prefix else sys.executable
        venv = [*self.prefix, python, "-m", "venv", "--without-pip", str(self.home / "venv")]
        subprocess.run(venv, cwd=self.home, check=True)
        self.python = str(self.home / "venv" / "bin" / "python")

    def own(self, path: Path) -> Path:
        if self.prefix:
            os.chown(path, NOBODY, NOBODY)
        return path

    def start(
        self, programs: list[str], *, workers: int, timeout_s: float, without_namespaces: bool = False
    ) -> subprocess.Popen:
        task = json.dumps(
            {"programs": programs, "workers": workers, "timeout_s": timeout_s, "without_namespaces": without_namespaces}
        )
        prlimit = [shutil.which("prlimit") or "prlimit", f"--nproc={SAFETY_NPROC}:{SAFETY_NPROC}", "--"]
        return subprocess.Popen(
            [*prlimit, *self.prefix, self.python, str(self.home / "driver.py"), task],
            cwd=self.home,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def report(self, proc: subprocess.Popen, *, refusal: bool = False) -> dict:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        report = json.loads(stdout.splitlines()[-1])
        # The venv in the unreadable home is the programs' interpreter too.
        assert report["uid"] == self.uid and report["python"] == report["sandbox_python"] == self.python
        if "refused" in report and not refusal:
            assert report["warnings"] and "require_isolation" in report["warnings"][0]
            pytest.skip(f"this OS does not isolate an unprivileged user's programs: {report['refused']}")
        return report


@pytest.fixture(scope="module")
def harness() -> Iterator[UnprivilegedHarness]:
    base = Path(tempfile.mkdtemp(prefix="wmtp-unprivileged-"))
    base.chmod(0o755)
    try:
        yield UnprivilegedHarness(base)
    finally:
        shutil.rmtree(base)


def test_the_users_files_and_processes_are_out_of_reach(harness: UnprivilegedHarness) -> None:
    checkpoints = harness.home / "checkpoints"
    checkpoints.mkdir()
    precious = checkpoints / "model.pt"
    precious.write_bytes(b"weights")
    harness.own(checkpoints), harness.own(precious)
    shared_tmp = harness.own(Path(tempfile.mkdtemp(prefix="wmtp-unprivileged-tmp-")))  # the user's own /tmp folder
    before = (precious.stat().st_mtime_ns, precious.stat().st_mode)
    sleeper = subprocess.Popen([*harness.prefix, "sleep", "60"])  # another process of the user
    path = str(precious)
    attacks = {
        "delete": f"import os\nos.remove({path!r})",
        "truncate": f"open({path!r}, 'w')",
        "append": f"open({path!r}, 'a').write('x')",
        "rename": f"import os\nos.rename({path!r}, {path + '.moved'!r})",
        "chmod": f"import os\nos.chmod({path!r}, 0o777)",
        "rmtree": f"import shutil\nshutil.rmtree({str(checkpoints)!r})",
        "create in the home": f"open({str(harness.home / 'new')!r}, 'w')",
        "create in /tmp": f"open({tempfile.gettempdir() + '/wmtp-unprivileged-new'!r}, 'w')",
        "create in the user's /tmp folder": f"open({str(shared_tmp / 'new')!r}, 'w')",
        "kill the user's process": f"import os\nos.kill({sleeper.pid}, 9)",
        "kill everything it can": (
            "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n"
            "    print('nothing in reach')"
        ),
    }
    own_folder = "open('mine', 'w').write('ok')\nprint(open('mine').read())"
    try:
        report = harness.report(harness.start([*attacks.values(), own_folder], workers=4, timeout_s=10.0))
        assert sleeper.poll() is None, "a program killed another process of the user"
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(shared_tmp)
    protections = report["protections"]
    assert protections["read_only_files"] and protections["pid_namespace"] and not protections["own_uid"]
    results = dict(zip([*attacks, "own folder"], report["results"]))
    for name in list(attacks)[:-2]:
        assert results[name]["status"] == "failed", (name, results[name])
        assert "Read-only file system" in results[name]["reason"], (name, results[name])
    assert results["kill the user's process"]["reason"].startswith("ProcessLookupError")  # not even visible
    assert results["kill everything it can"]["stdout"] == "nothing in reach\n"  # but its own init
    assert (results["own folder"]["status"], results["own folder"]["stdout"]) == ("passed", "ok\n")
    assert precious.read_bytes() == b"weights" and (precious.stat().st_mtime_ns, precious.stat().st_mode) == before
    assert not (harness.home / "new").exists() and not (checkpoints / "model.pt.moved").exists()
    assert os.listdir(checkpoints) == ["model.pt"]
    assert not Path(tempfile.gettempdir(), "wmtp-unprivileged-new").exists()


def _pid_namespaces_of(uid: int) -> collections.Counter:
    """Live processes of ``uid`` per PID namespace."""
    counts: collections.Counter = collections.Counter()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                counts[os.readlink(f"/proc/{entry}/ns/pid")] += 1
        except OSError:
            continue  # gone meanwhile
    return counts


def test_a_fork_bomb_stays_under_the_limit_while_the_others_finish(harness: UnprivilegedHarness) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    work = "print(sum(i * i for i in range(100000)))"
    driver = harness.start([bomb] + [work] * 12, workers=3, timeout_s=BOMB_TIMEOUT_S)
    peaks: collections.Counter = collections.Counter()
    while driver.poll() is None:
        for namespace, count in _pid_namespaces_of(harness.uid).items():
            peaks[namespace] = max(peaks[namespace], count)
        time.sleep(POLL_S)
    report = harness.report(driver)
    assert report["protections"]["process_limit"], report["warnings"]
    statuses = [r["status"] for r in report["results"]]
    assert statuses == ["timeout"] + ["passed"] * 12, report["results"]
    assert all(r["stdout"] == f"{sum(i * i for i in range(100000))}\n" for r in report["results"][1:])
    others = [r["seconds"] for r in report["results"][1:]]
    assert max(others) < BOMB_TIMEOUT_S, f"the other workers waited for the fork bomb: {others}"
    programs_namespaces = set(peaks) - {os.readlink("/proc/self/ns/pid")}
    peak = max(peaks[namespace] for namespace in programs_namespaces)
    print(f"fork bomb: peak {peak} processes in its namespace, limit {PROCESS_LIMIT}")
    assert PROCESS_LIMIT // 2 < peak <= PROCESS_LIMIT, f"peak {peak} processes, limit {PROCESS_LIMIT}"
    assert not programs_namespaces & set(_pid_namespaces_of(harness.uid)), "processes outlived their program"


def test_without_namespaces_the_harness_warns_once_and_require_isolation_refuses(harness: UnprivilegedHarness) -> None:
    report = harness.report(harness.start([], workers=1, timeout_s=1.0, without_namespaces=True), refusal=True)
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "PROGRAMS CAN CHANGE AND DELETE EVERY FILE OF THIS USER" in report["warnings"][0]
    assert "refused" in report and "results" not in report
    for missing in ("files", "pid_namespace", "network_namespace", "process_limit"):
        assert missing in report["refused"]
