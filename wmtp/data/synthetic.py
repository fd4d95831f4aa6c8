"""Small generated coding problems for the tiny demo and the tests when no real data is present.

Each problem comes from one of a dozen templates (arithmetic, strings, lists; difficulty 0..2) with
random parameters, and yields two rows in the processed schema (source "synthetic"): a correct
solution and a plausible buggy one. The tests' expected values are computed by running the correct
solution, and inputs are redrawn until the buggy solution fails at least one test, so the labels
hold by construction (and ``tests/test_rows_and_tiny_data.py`` checks them in a subprocess).

The buggy solution is a small mutation of the correct one (``x + k`` -> ``x - k``, a ``%`` test
flipped, ``>`` -> ``>=``, ...), so where it goes wrong is known: both rows of a pair carry
``metadata.first_diff_char``, the index of the first character of ``output`` where the row differs
from its sibling (the bug in the incorrect row, the text the bug replaces in the correct one), and
``metadata.sibling_output``, the sibling's output. The loader turns them into a token index
(`wmtp.data.first_diff`), which the token-level diagnostics use.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wmtp.data.rows import make_row, tests_instruction

SOURCE = "synthetic"
TESTS_PER_PROBLEM = 3
ROW_MAX_CHARS = 600
"""Bound on a row's instruction + input + output, the text a model sees: short enough for a tiny
model's context."""
MAX_INPUT_DRAWS = 50
"""Attempts at drawing test inputs that tell the buggy solution apart; templates need one or two."""


@dataclass(frozen=True)
class _Template:
    text: str
    name: str
    correct: str
    incorrect: str
    draw_args: Callable[[random.Random], tuple[Any, ...]]
    difficulty: int


# Short inputs keep the asserts, and so the instruction, short.
def _ints(rng: random.Random, lo: int = -5, hi: int = 9) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(2, 4))]


def _word(rng: random.Random, letters: str = "abcde") -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))


def _add(rng: random.Random) -> _Template:
    k = rng.randint(1, 9)
    return _Template(
        f"Write a function to add {k} to a number.",
        f"add_{k}",
        f"def add_{k}(x):\n    return x + {k}",
        f"def add_{k}(x):\n    return x - {k}",
        lambda r: (r.randint(-20, 20),),
        0,
    )


def _scale(rng: random.Random) -> _Template:
    k = rng.randint(2, 9)
    return _Template(
        f"Write a function to multiply a number by {k}.",
        f"times_{k}",
        f"def times_{k}(x):\n    return x * {k}",
        f"def times_{k}(x):\n    return x + {k}",
        lambda r: (r.randint(-20, 20),),
        0,
    )


def _divisible(rng: random.Random) -> _Template:
    k = rng.randint(2, 7)
    return _Template(
        f"Write a function to check whether a number is divisible by {k}.",
        f"divisible_by_{k}",
        f"def divisible_by_{k}(n):\n    return n % {k} == 0",
        f"def divisible_by_{k}(n):\n    return n % {k} == 1",
        lambda r: (r.randint(0, 50),),
        0,
    )


def _larger(rng: random.Random) -> _Template:
    name = rng.choice(["larger", "max_of_two", "bigger"])
    return _Template(
        "Write a function to return the larger of two numbers.",
        name,
        f"def {name}(a, b):\n    return a if a > b else b",
        f"def {name}(a, b):\n    return a if a < b else b",
        lambda r: (r.randint(-9, 9), r.randint(-9, 9)),
        0,
    )


def _sum_above(rng: random.Random) -> _Template:
    t = rng.randint(1, 5)  # with 0, ">=" only adds zeros and the bug is invisible
    return _Template(
        f"Write a function to sum the elements of a list that are greater than {t}.",
        "sum_above",
        f"def sum_above(xs):\n    return sum(x for x in xs if x > {t})",
        f"def sum_above(xs):\n    return sum(x for x in xs if x >= {t})",
        lambda r: (_ints(r, 0, 9),),
        1,
    )


def _count_char(rng: random.Random) -> _Template:
    c = rng.choice("abc")
    body = "    n = 0\n    for ch in s{}:\n        if ch == {!r}:\n            n += 1\n    return n"
    return _Template(
        f"Write a function to count the occurrences of {c!r} in a string.",
        "count_char",
        "def count_char(s):\n" + body.format("", c),
        "def count_char(s):\n" + body.format("[1:]", c),
        lambda r: (_word(r, "abc"),),
        1,
    )


def _repeat(rng: random.Random) -> _Template:
    k = rng.randint(2, 4)
    return _Template(
        f"Write a function to repeat a string {k} times.",
        f"repeat_{k}",
        f"def repeat_{k}(s):\n    return s * {k}",
        f"def repeat_{k}(s):\n    return s * ({k} - 1)",
        lambda r: (_word(r),),
        1,
    )


def _squares(rng: random.Random) -> _Template:
    name = rng.choice(["squares", "first_squares"])
    return _Template(
        "Write a function to list the squares of the first n positive integers.",
        name,
        f"def {name}(n):\n    return [i * i for i in range(1, n + 1)]",
        f"def {name}(n):\n    return [i * i for i in range(n)]",
        lambda r: (r.randint(1, 5),),
        1,
    )


def _running_sum(rng: random.Random) -> _Template:
    body = "    out, total = [], 0\n    for x in xs:\n{}\n    return out"
    step = ["        total += x", "        out.append(total)"]
    return _Template(
        "Write a function to return the running sums of a list.",
        "running_sum",
        "def running_sum(xs):\n" + body.format("\n".join(step)),
        "def running_sum(xs):\n" + body.format("\n".join(step[::-1])),
        lambda r: (_ints(r),),
        2,
    )


def _count_vowels(rng: random.Random) -> _Template:
    return _Template(
        "Write a function to count the vowels in a lowercase string.",
        "count_vowels",
        "def count_vowels(s):\n    return sum(1 for ch in s if ch in 'aeiou')",
        "def count_vowels(s):\n    return sum(1 for ch in s if ch in 'aeio')",
        lambda r: (_word(r, "abeiosu"),),
        2,
    )


def _multiples(rng: random.Random) -> _Template:
    a, b = rng.sample(range(2, 6), 2)
    body = f"    return [i for i in range(1, n + 1) if i % {a} == 0 {{}} i % {b} == 0]"
    return _Template(
        f"Write a function to list the numbers from 1 to n divisible by {a} or {b}.",
        "multiples",
        "def multiples(n):\n" + body.format("or"),
        "def multiples(n):\n" + body.format("and"),
        lambda r: (r.randint(4, 10),),
        2,
    )


def _with_repeated_max(rng: random.Random) -> list[int]:
    xs = rng.sample(range(10), rng.randint(2, 3))
    xs.append(max(xs))
    rng.shuffle(xs)
    return xs


def _second_largest(rng: random.Random) -> _Template:
    return _Template(
        "Write a function to find the second largest distinct value in a list.",
        "second_largest",
        "def second_largest(xs):\n    return sorted(set(xs))[-2]",
        "def second_largest(xs):\n    return sorted(xs)[-2]",
        lambda r: (_with_repeated_max(r),),
        2,
    )


TEMPLATES: tuple[Callable[[random.Random], _Template], ...] = (
    _add,
    _scale,
    _divisible,
    _larger,
    _sum_above,
    _count_char,
    _repeat,
    _squares,
    _running_sum,
    _count_vowels,
    _multiples,
    _second_largest,
)


def _function(source: str, name: str) -> Callable[..., Any]:
    # Only this module's own template code is executed here, never data from outside.
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102
    return namespace[name]


def _tests(t: _Template, rng: random.Random) -> list[str]:
    """Asserts on distinct drawn inputs, expected values from the correct solution, that the
    incorrect solution fails at least once."""
    correct, incorrect = _function(t.correct, t.name), _function(t.incorrect, t.name)
    for _ in range(MAX_INPUT_DRAWS):
        calls = {repr(args): args for args in (t.draw_args(rng) for _ in range(TESTS_PER_PROBLEM))}
        if len(calls) < TESTS_PER_PROBLEM:
            continue
        if any(incorrect(*args) != correct(*args) for args in calls.values()):
            return [f"assert {t.name}({', '.join(map(repr, args))}) == {correct(*args)!r}" for args in calls.values()]
    raise RuntimeError(f"no inputs separate the solutions of {t.name!r}")


def template_name(make: Callable[[random.Random], _Template]) -> str:
    """The name rows keep in ``metadata.template``: "add" for `_add`."""
    return make.__name__.lstrip("_")


def first_diff_char(a: str, b: str) -> int:
    """Index of the first character where `a` and `b` differ (the shorter length when one is a
    prefix of the other; then the longer one differs at that character and the shorter at its end)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def synthetic_rows(n_problems: int, *, seed: int) -> list[dict[str, Any]]:
    """``2 * n_problems`` rows: per problem a correct then an incorrect solution, same task_id, each
    with ``metadata.first_diff_char`` (where it departs from its sibling), ``sibling_output`` and
    ``template`` (the generator's template, `template_name`)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_problems):
        make = rng.choice(TEMPLATES)
        t = make(rng)
        tests = _tests(t, rng)
        fields = dict(
            instruction=tests_instruction(t.text, tests),
            task_id=f"{SOURCE}/{seed}/{i}",
            source=SOURCE,
            difficulty=t.difficulty,
            tests=tests,
            first_diff_char=first_diff_char(t.correct, t.incorrect),
            template=template_name(make),
        )
        rows.append(make_row(output=t.correct, is_correct=True, sibling_output=t.incorrect, **fields))
        rows.append(make_row(output=t.incorrect, is_correct=False, sibling_output=t.correct, **fields))
    return rows


def synthetic_problems(n_problems: int, *, seed: int) -> list[dict[str, Any]]:
    """``n_problems`` problems in MBPP's JSON form (task_id 1..n, text, code, test_list, ...): a toy
    evaluation set from the same templates as the training rows, so that a tiny model trained on
    those can solve some of them (`recipes/evaluate.py` with dataset "mbpp")."""
    rng = random.Random(seed)
    problems = []
    for i in range(1, n_problems + 1):
        t = rng.choice(TEMPLATES)(rng)
        problems.append(
            {
                "task_id": i,
                "text": t.text,
                "code": t.correct,
                "test_list": _tests(t, rng),
                "test_setup_code": "",
                "challenge_test_list": [],
            }
        )
    return problems
