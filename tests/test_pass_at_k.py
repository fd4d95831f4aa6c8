"""pass@k: hand-computed values, the product form against the exact binomial formula, errors, averaging."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from wmtp.eval.passk import count_passes, mean_pass_at_k, pass_at_k


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) in exact arithmetic (math.comb is 0 when k > n - c)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 1, 3, 0.6),  # 1 - C(4,3)/C(5,3) = 1 - 4/10
        (10, 0, 1, 0.0),
        (10, 0, 10, 0.0),
        (10, 10, 1, 1.0),
        (5, 4, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (20, 3, 20, 1.0),
    ],
)
def test_hand_computed_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_product_form_equals_exact_binomials() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 200)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_large_n_is_stable() -> None:
    # C(2000, 100) is about 1e189: the naive float ratio of binomials would overflow.
    value = pass_at_k(2000, 37, 100)
    assert math.isfinite(value)
    assert value == pytest.approx(float(exact_pass_at_k(2000, 37, 100)), rel=1e-10)


def test_increases_with_k_and_c() -> None:
    assert [pass_at_k(50, 5, k) for k in (1, 5, 10, 20)] == sorted(pass_at_k(50, 5, k) for k in (1, 5, 10, 20))
    assert pass_at_k(50, 5, 10) < pass_at_k(50, 6, 10)


@pytest.mark.parametrize(
    "n, c, k, words",
    [
        (5, 2, 6, ["k=6", "n=5"]),
        (5, 2, 0, ["k=0"]),
        (5, 2, -1, ["k=-1"]),
        (5, 6, 1, ["c=6", "n=5"]),
        (-1, 0, 1, ["n=-1"]),
        (5, -2, 1, ["c=-2"]),
    ],
)
def test_invalid_values_are_named(n: int, c: int, k: int, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        pass_at_k(n, c, k)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("args", [(5.0, 2, 1), (5, 2, 1.5), (5, True, 1)])
def test_non_integers_are_refused(args: tuple) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        pass_at_k(*args)


def test_mean_reports_only_ks_every_problem_has_samples_for() -> None:
    counts = {"a": (5, 2), "b": (5, 0), "c": (10, 10)}
    result = mean_pass_at_k(counts, [2, 1, 10, 1])
    assert list(result) == [2, 1]  # k=10 > n=5 of "a" and "b": left out; order of ks, duplicates once
    assert result[1] == pytest.approx((0.4 + 0.0 + 1.0) / 3)
    assert result[2] == pytest.approx((0.7 + 0.0 + 1.0) / 3)


def test_mean_errors() -> None:
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k({}, [1])
    with pytest.raises(ValueError, match="k=0"):
        mean_pass_at_k({"a": (5, 1)}, [1, 0])
    with pytest.raises(ValueError, match="c=3"):
        mean_pass_at_k({"a": (2, 3)}, [1])


def test_count_passes_feeds_the_mean() -> None:
    results = [("t1", True), ("t2", False), ("t1", False), ("t2", False), ("t1", True), ("t2", True)]
    counts = count_passes(results)
    assert counts == {"t1": (3, 2), "t2": (3, 1)}
    assert mean_pass_at_k(counts, [1, 3]) == pytest.approx({1: 0.5, 3: 1.0})
