"""Evaluation metrics: accuracy, support-weighted F1 and the Wilson 95 % confidence interval.

Implemented without scikit-learn so the definitions are explicit; the tests check them against
``sklearn.metrics.accuracy_score`` and ``f1_score(average="weighted")``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

Z_95 = 1.959963984540054
"""The two-sided 95 % standard-normal quantile."""


def _check_lengths(y_true: Sequence[object], y_pred: Sequence[object]) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """The fraction of positions where ``y_pred`` equals ``y_true`` (nan when empty)."""
    _check_lengths(y_true, y_pred)
    if not y_true:
        return math.nan
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def weighted_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Per-class F1 averaged with weights equal to each class's support in ``y_true``.

    F1 of class c is ``2·TP / (2·TP + FP + FN)`` (0 when the class is never predicted correctly), which is
    scikit-learn's ``f1_score(average="weighted")`` with ``zero_division=0``. Classes that occur only in
    ``y_pred`` have zero weight but their false positives still lower the other classes' precision.
    """
    _check_lengths(y_true, y_pred)
    if not y_true:
        return math.nan
    support = Counter(y_true)
    total = 0.0
    for c, n_c in support.items():
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred, strict=True))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred, strict=True))
        fn = n_c - tp
        total += n_c * (2 * tp / (2 * tp + fp + fn))
    return total / len(y_true)


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion of ``k`` successes in ``n`` trials (95 % by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 % and 100 %.
    Returns ``(nan, nan)`` when ``n == 0``.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"k={k} successes is outside 0..n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
