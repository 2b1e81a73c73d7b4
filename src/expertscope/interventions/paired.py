"""Paired statistics of the intervention study (docs/methods.md): bootstrap intervals over items and exact paired tests.

Every condition is evaluated on the same items, so changes are paired per item. Intervals resample items
(one index matrix per comparison, drawn jointly for every arm it involves); the exact tests are the sign
test on items whose value changed (McNemar's exact test when the values are 0/1 correctness).

These helpers live here (not in ``stats/rules.py``) so the study does not wait on that module; they use no
state beyond their arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` item indices drawn with replacement (seeded): one resampling shared by every arm."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), dtype=np.int64)


def mean_ci(d: np.ndarray, idx: np.ndarray, ci: float = 0.95) -> tuple[float, float, float]:
    """Mean of the per-item values ``d`` ``(n,)`` and its percentile bootstrap interval over ``idx``."""
    d = np.asarray(d, float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return float(d.mean()), float(lo), float(hi)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
                     ) -> tuple[float, float, float]:
    """Mean of ``b - a`` over paired examples and its percentile bootstrap CI (examples resampled)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return mean_ci(b - a, bootstrap_indices(len(a), n_boot, seed), ci)


def sign_test(d: Sequence[float] | np.ndarray) -> tuple[float, int, int]:
    """Exact two-sided sign test of per-item differences ``d``: items with ``d = 0`` are dropped; under the
    null each remaining item is positive with probability ½. Returns ``(p, n_positive, n_negative)``;
    ``p = min(1, 2·P(X ≤ min(pos, neg)))`` for ``X ~ Binomial(pos + neg, ½)``, and 1 when nothing changed.
    On 0/1 correctness (``d = b - a``) this is McNemar's exact test."""
    d = np.asarray(d, float)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    n = pos + neg
    if n == 0:
        return 1.0, 0, 0
    k = min(pos, neg)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail), pos, neg


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> tuple[float, int, int]:
    """McNemar's exact test for paired 0/1 outcomes: ``(p, gained, lost)``, where ``gained`` counts items
    wrong before and right after, ``lost`` the reverse (the discordant pairs)."""
    return sign_test(np.asarray(after, float) - np.asarray(before, float))


def bh(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of ``p`` (NaN stays NaN and is not counted as a test)."""
    p = np.asarray(p, float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


__all__ = ["bh", "bootstrap_indices", "mcnemar_exact", "mean_ci", "paired_bootstrap", "sign_test"]
