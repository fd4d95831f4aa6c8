"""Judge completions by running them in the sandbox: one test program (HumanEval, MBPP) or one
run per stdin/stdout test (CodeContests), compared as AlphaCode's tester compares outputs.

A test program passes iff its code ran to the end (``wmtp.eval.sandbox``): one that leaves early,
``exit()`` or ``sys.exit(0)`` included, fails ("exited"). A CodeContests run is judged by its
output, and ``exit()`` is a normal way for such a program to stop: it passes a test iff it exits
with status 0 within the limits and its output is accepted.

Output comparison (``outputs_match``): both outputs are split on whitespace and lowercased; the
token counts must agree and each pair of tokens must be equal as text, or both integers of equal
value (exact, whatever their size), or both numbers within ``FLOAT_TOLERANCE`` (absolute). "nan"
and "inf" are words, not numbers.

A CodeContests submission runs its tests in order (public, private, generated) and stops at the
first failure: its verdict is the first failing test's (wrong answer, time limit, runtime error,
memory limit) or passed. Each test runs under the problem's time limit (times ``time_scale``) and
its memory limit plus ``MEMORY_SLACK_BYTES`` of address space, as AlphaCode runs them. The
submissions' next tests are run in waves, as many programs at once as there are workers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from wmtp.data.problems import CODECONTESTS, Problem
from wmtp.eval.problems import ALPACA, completion_to_program
from wmtp.eval.sandbox import MAX_OUTPUT_BYTES, ExecResult, run_programs

FLOAT_TOLERANCE = 1e-5
MEMORY_SLACK_BYTES = 32 << 20
"""Address space given on top of a problem's memory limit (the interpreter's own)."""
OUTPUT_SLACK_BYTES = 4096
"""Output kept beyond the expected output's size, so a longer wrong output is seen as longer."""

PASSED = "passed"
WRONG_ANSWER = "wrong_answer"
NO_TESTS = "no_tests"
_REASONS = {
    "exited": "left before its tests finished",
    "timeout": "time limit exceeded",
    "failed": "runtime error",
    "memory": "memory limit exceeded",
    "file_size": "file size limit exceeded",
    "output_limit": "output limit exceeded",
    "killed": "killed by a signal",
}

_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _tokens_match(expected: str, actual: str) -> bool:
    if expected == actual:
        return True
    if _INTEGER.fullmatch(expected) and _INTEGER.fullmatch(actual):
        return int(expected) == int(actual)
    if _NUMBER.fullmatch(expected) and _NUMBER.fullmatch(actual):
        a, b = float(expected), float(actual)
        return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= FLOAT_TOLERANCE
    return False


def outputs_match(expected: str, actual: str) -> bool:
    """Whether `actual` is an accepted output for `expected` (see the module docstring)."""
    want, got = expected.lower().split(), actual.lower().split()
    return len(want) == len(got) and all(_tokens_match(w, g) for w, g in zip(want, got))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How one submission was judged."""

    passed: bool
    status: str
    """PASSED, WRONG_ANSWER, NO_TESTS, or the sandbox status of the failing run (``timeout`` ...)."""
    reason: str
    """One line for people: "passed 12 tests", "test 3 of 12: wrong answer", ..."""
    tests_passed: int
    tests_run: int
    tests_total: int
    """For test programs (HumanEval, MBPP) 1: the program is the test."""
    seconds: float
    """Sandbox wall time of every run of the submission, summed."""


def _failure(status: str, result: ExecResult, timeout_s: float) -> str:
    reason = _REASONS.get(status, status)
    if status == "exited":
        return result.reason
    if status == "timeout":
        return f"{reason} ({timeout_s:g} s)"
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return f"{reason} ({lines[-1].strip()[:200]})" if status == "failed" and lines else reason


def time_limit_s(problem: Problem, *, default_s: float, time_scale: float = 1.0) -> float:
    """A CodeContests test's wall-clock limit: the problem's limit times `time_scale`, or `default_s`."""
    return problem.time_limit_s * time_scale if problem.time_limit_s else default_s


def memory_limit_mb(problem: Problem, *, default_mb: int) -> int:
    """A CodeContests test's address-space limit: the problem's limit plus MEMORY_SLACK_BYTES, or `default_mb`."""
    if not problem.memory_limit_bytes:
        return default_mb
    return math.ceil((problem.memory_limit_bytes + MEMORY_SLACK_BYTES) / (1 << 20))


@dataclasses.dataclass
class _Progress:
    problem: Problem
    code: str
    timeout_s: float
    memory_mb: int
    next_test: int = 0
    seconds: float = 0.0
    verdict: Verdict | None = None


def judge(
    submissions: Sequence[tuple[Problem, str]],
    *,
    workers: int = 1,
    timeout_s: float = 10.0,
    memory_mb: int = 2048,
    time_scale: float = 1.0,
    template: str = ALPACA,
) -> list[Verdict]:
    """The verdict of each (problem, completion), in order.

    The completion is cut at the template's stop sequences and turned into its program as
    evaluation does (``completion_to_program``). `timeout_s` / `memory_mb` limit test programs,
    and CodeContests tests whose problem publishes no limit.
    """
    verdicts: list[Verdict | None] = [None] * len(submissions)
    programs, streams = [], []
    for i, (problem, completion) in enumerate(submissions):
        program = completion_to_program(problem, completion, template)
        if problem.dataset != CODECONTESTS:
            programs.append((i, program))
        elif not problem.io_tests:
            verdicts[i] = Verdict(False, NO_TESTS, "the problem has no tests", 0, 0, 0, 0.0)
        else:
            streams.append(
                (
                    i,
                    _Progress(
                        problem,
                        program,
                        time_limit_s(problem, default_s=timeout_s, time_scale=time_scale),
                        memory_limit_mb(problem, default_mb=memory_mb),
                    ),
                )
            )
    results = run_programs([p for _, p in programs], workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    for (i, _), result in zip(programs, results):
        reason = (
            "the test program passed"
            if result.passed
            else f"the test program failed: {_failure(result.status, result, timeout_s)}"
        )
        verdicts[i] = Verdict(
            result.passed, PASSED if result.passed else result.status, reason, int(result.passed), 1, 1, result.seconds
        )
    _judge_io([s for _, s in streams], workers=workers)
    for i, s in streams:
        verdicts[i] = s.verdict
    return verdicts  # type: ignore[return-value]


def _judge_io(streams: list[_Progress], *, workers: int) -> None:
    """Run the submissions' tests in waves until each has failed one or passed all."""
    pending = list(streams)
    while pending:
        # Several next tests per submission when few remain, so that every worker has a run.
        per = max(1, workers // len(pending))
        runs = [(s, t) for s in pending for t in range(s.next_test, min(s.next_test + per, len(s.problem.io_tests)))]
        by_limits: dict[tuple[float, int], list[tuple[_Progress, int]]] = {}
        for s, t in runs:
            by_limits.setdefault((s.timeout_s, s.memory_mb), []).append((s, t))
        outcome: dict[tuple[int, int], ExecResult] = {}
        for (timeout_s, memory_mb), group in by_limits.items():
            longest = max(len(s.problem.io_tests[t][1].encode()) for s, t in group)
            results = run_programs(
                [s.code for s, _ in group],
                stdins=[s.problem.io_tests[t][0] for s, t in group],
                workers=workers,
                timeout_s=timeout_s,
                memory_mb=memory_mb,
                max_output_bytes=max(MAX_OUTPUT_BYTES, 2 * longest + OUTPUT_SLACK_BYTES),
                exit_ok=True,
            )
            outcome.update({(id(s), t): r for (s, t), r in zip(group, results)})
        for s, t in runs:
            if s.verdict is not None:
                continue  # an earlier test of this wave failed: later ones do not count
            result = outcome[(id(s), t)]
            s.seconds += result.seconds
            total = len(s.problem.io_tests)
            if not result.passed:
                status, why = result.status, _failure(result.status, result, s.timeout_s)
            elif result.truncated or not outputs_match(s.problem.io_tests[t][1], result.stdout):
                status, why = WRONG_ANSWER, "wrong answer"
            else:
                s.next_test = t + 1
                if s.next_test == total:
                    s.verdict = Verdict(True, PASSED, f"passed {total} tests", total, total, total, s.seconds)
                continue
            s.verdict = Verdict(False, status, f"test {t + 1} of {total}: {why}", t, t + 1, total, s.seconds)
        pending = [s for s in pending if s.verdict is None]
