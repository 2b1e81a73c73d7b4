"""The rules every analysis shares: multiple testing, bootstrap intervals, pass flags and rule text.

Written once and used by domain experts (:mod:`expertscope.stats.domain_experts`), drivers
(:mod:`expertscope.causal.drivers`), replication (:mod:`expertscope.stats.replication`) and intervention
controls. Definitions and defaults are in ``docs/methods.md``.

Resampling convention: a bootstrap resample of ``N`` items is drawn as multinomial counts
``rng.multinomial(N, [1/N]*N)`` (how often each item appears), ``n_boot`` at once; a statistic that is a
weighted sum over items is then one matrix product. :func:`bootstrap_weights` is that draw, so callers
with a statistic of their own (ratios, stratified resamples) resample the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


class Interval(NamedTuple):
    """An estimate with its interval: floats for one column, arrays ``(C,)`` for several."""

    estimate: np.ndarray | float
    lo: np.ndarray | float
    hi: np.ndarray | float


# ----- multiple testing ---------------------------------------------------------------------------------
def bh_qvalues(p: np.ndarray | Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of the p-values ``p`` (any shape, shape kept).

    ``q_(i) = min_{j >= i} min(1, p_(j)·m/j)`` over the ``m`` non-NaN p-values sorted ascending; a cell
    passes FDR level ``alpha`` when ``q <= alpha``. NaNs (tests not run) stay NaN and do not count in ``m``.
    """
    arr = np.asarray(p, dtype=float)
    flat = arr.ravel()
    q = np.full_like(flat, np.nan)
    ok = ~np.isnan(flat)
    m = int(ok.sum())
    if m == 0:
        return q.reshape(arr.shape)
    pv = flat[ok]
    order = np.argsort(pv, kind="stable")
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q.reshape(arr.shape)


# ----- bootstrap ------------------------------------------------------------------------------------------
def percentile_bounds(ci: float) -> tuple[float, float]:
    """The percentiles (0–100) of a central ``ci`` interval: ``ci=0.95`` → ``(2.5, 97.5)``."""
    return 100 * (1 - ci) / 2, 100 * (1 + ci) / 2


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` float counts: how often each of ``n`` items appears in each resample (rows sum to n)."""
    return rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(np.float64)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def bootstrap_ci(
    x: np.ndarray, n_boot: int = 1000, ci: float = 0.95, rng: np.random.Generator | int | None = 0,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over axis 0 (items resampled with replacement).

    ``x`` ``(N,)`` or ``(N, C)``: N items, C columns resampled together (one draw of items serves every
    column). Returns ``lo``, ``hi`` of shape ``x.shape[1:]``; a column holding NaN gives NaN, and so does
    ``n_boot == 0`` or ``N == 0``. ``rng``: a generator (advanced by one :func:`bootstrap_weights` draw) or
    a seed. ``weights``: a ``(n_boot, N)`` draw of :func:`bootstrap_weights` to reuse instead (one resampling
    of the items shared by several comparisons, so their intervals are joint).
    """
    x = np.asarray(x, dtype=float)
    N = x.shape[0]
    tail = x.shape[1:]
    flat = x.reshape(N, -1)
    if n_boot == 0 or N == 0:
        nan = np.full(tail, np.nan)
        return nan, nan.copy()
    W = bootstrap_weights(N, n_boot, _rng(rng)) if weights is None else np.asarray(weights, dtype=float)
    bad = np.isnan(flat).any(axis=0)
    means = W @ np.where(np.isnan(flat), 0.0, flat) / N
    lo, hi = np.percentile(means, percentile_bounds(ci), axis=0)
    return np.where(bad, np.nan, lo).reshape(tail), np.where(bad, np.nan, hi).reshape(tail)


def paired_bootstrap_diff(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, ci: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> Interval:
    """Mean of ``b - a`` over paired items and its percentile bootstrap interval (items resampled jointly).

    ``a``, ``b`` ``(N,)`` or ``(N, C)``: the same N items measured twice (e.g. per-item correctness without
    and with an intervention). Each resample draws items, and both measurements of a drawn item go with it,
    so the interval is of the paired difference. For "target beyond control" pass ``a`` = the mean over
    control draws per item and ``b`` = the target's per-item value: ``mean(b - a)`` is then
    ``Δ_target − mean Δ_control`` (the baseline cancels). Returns :class:`Interval` (floats for 1-D input);
    NaN for no items.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired measurements need the same shape, got {a.shape} and {b.shape}")
    d = b - a
    if d.shape[0] == 0:
        nan = np.full(d.shape[1:], np.nan)
        return Interval(float("nan"), float("nan"), float("nan")) if d.ndim == 1 else Interval(nan, nan, nan)
    lo, hi = bootstrap_ci(d, n_boot, ci, rng)
    est = d.mean(axis=0)
    if d.ndim == 1:
        return Interval(float(est), float(lo), float(hi))
    return Interval(est, lo, hi)


def mean_ci(d: np.ndarray, weights: np.ndarray, ci: float = 0.95) -> tuple[float, float, float]:
    """Mean of the per-item values ``d`` ``(N,)`` and its percentile bootstrap interval over the resampling
    ``weights`` ``(n_boot, N)`` (:func:`bootstrap_weights`); NaNs for no items."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = bootstrap_ci(d, ci=ci, weights=weights)
    return float(d.mean()), float(lo), float(hi)


# ----- exact paired tests ---------------------------------------------------------------------------------
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


# ----- rules: pass flags and text -------------------------------------------------------------------------
def passes(flags: Mapping[str, np.ndarray]) -> np.ndarray:
    """The cells that pass every criterion: the AND of ``flags`` (``{name: bool array}``, one shape)."""
    arrays = [np.asarray(v, dtype=bool) for v in flags.values()]
    if not arrays:
        raise ValueError("a rule needs at least one criterion")
    out = arrays[0].copy()
    for v in arrays[1:]:
        out &= v
    return out


def z_cap(num_experts: int, z: float) -> float:
    """The most values among ``num_experts`` that can reach ``mean + z·sd`` (ddof 0): ``E / (1 + z²)``."""
    return num_experts / (1 + z * z)


def z_rule_text(quantity: str, num_experts: int, z: float) -> str:
    """``"<quantity> >= layer mean + z sd ... (cap: ...)"``: the z rule and its documented cap."""
    return (f"{quantity} >= mean + {z} sd (ddof=0) of the layer's experts (cap: at most {num_experts}/(1+{z}^2) "
            f"= {z_cap(num_experts, z):.2f} experts per layer can reach z)")


def bh_text(alpha: float, m: int, test: str) -> str:
    """``"BH q <= alpha over m cells on <test>"``."""
    return f"BH q <= {alpha} over {m} cells on {test}"


def rule_text(*criteria: str) -> str:
    """The criteria of a rule, all of which must hold, as one line (``"; "`` between them)."""
    return "; ".join(c for c in criteria if c)


#: The Jaccard of two disjoint halves' sets at or above which a rule's set is said to replicate
#: (docs/methods.md); a driver set is called stable when two half-samples are expected to reach it.
REPLICATES = 0.6


def is_stable(expected_jaccard: float | None) -> bool | None:
    """Is a driver set stable at its sample size (:data:`REPLICATES`)? None when no expert was ever
    flagged (nothing to be stable or not)."""
    if expected_jaccard is None or not np.isfinite(expected_jaccard):
        return None
    return bool(expected_jaccard >= REPLICATES)


def jaccard(a: set[tuple[int, int]] | Sequence[tuple[int, int]], b: set[tuple[int, int]] | Sequence[tuple[int, int]]
            ) -> float:
    """``|a ∩ b| / |a ∪ b|`` of two sets of experts; NaN when both are empty (nothing to agree on)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else float("nan")


__all__ = [
    "REPLICATES",
    "Interval",
    "bh_qvalues",
    "bh_text",
    "bootstrap_ci",
    "bootstrap_weights",
    "is_stable",
    "jaccard",
    "mcnemar_exact",
    "mean_ci",
    "paired_bootstrap_diff",
    "passes",
    "percentile_bounds",
    "rule_text",
    "sign_test",
    "spearman_ci",
    "z_cap",
    "z_rule_text",
]


def spearman_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 500, seed: int = 0) -> tuple[float, float, float, int]:
    """Spearman's rho of ``x`` and ``y`` (finite pairs), a 95% bootstrap interval over cells, and n. The
    resamples are ranked all at once (average ranks for ties, then Pearson per resample: Spearman's rho);
    resamples where either side is constant are left out."""
    from scipy.stats import rankdata, spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(ok.sum())
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), float("nan"), n
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, n, n) for _ in range(n_boot)])  # (n_boot, n), drawn as one resample at a time
    xs, ys = x[idx], y[idx]
    keep = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
    rx, ry = rankdata(xs[keep], axis=1), rankdata(ys[keep], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    boots = (rx * ry).sum(1) / np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (float("nan"), float("nan")))
    return rho, float(lo), float(hi), n
