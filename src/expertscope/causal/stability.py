"""Driver experts by stability selection: the driver rule on many half-samples of the inputs.

One domain's per-input CE ``(N, L, E)`` is split into ``pairs`` complementary pairs of disjoint half-samples
(Shah & Samworth 2013, "complementary pairs stability selection"); the base rule (the paired test of an
expert's CE against its layer's median, BH over the L·E cells, the ratio and the floor) runs on each of the
``2·pairs`` half-samples, and an expert's *selection frequency* is the share of half-samples that flag it.
A driver is an expert selected in at least ``min_frequency`` of them. Under Meinshausen & Bühlmann's
(2010) exchangeability assumption the expected number of false drivers is at most
``q̄² / ((2·min_frequency − 1)·p)``, with ``q̄`` the mean number of experts one half-sample flags and ``p``
the number of cells tested; the bound is stated beside every driver set.

The paired test counts inputs where an expert's CE equals its layer's median (zero differences): they are
ranked with the others and split half to each side (Pratt-style "zsplit"), ties take mid-ranks, and the
normal approximation's variance is corrected for ties; dropping zeros would let an expert that differs
from its layer on 14 % of inputs look like one that exceeds it on all of them.
"""

from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr
from scipy.stats import rankdata

from ..stats.rules import REPLICATES


def signed_rank_greater(diff: np.ndarray) -> np.ndarray:
    """One-sided Wilcoxon signed-rank p-values that each column of ``diff`` has a positive location.

    ``diff`` ``(..., n, C)``: n paired differences per column (leading axes are independent batches).
    Zeros are ranked and split half to each side (``zero_method="zsplit"``), ties take mid-ranks, and p is
    the normal approximation with the tie-corrected variance and no continuity correction (scipy's
    ``wilcoxon(..., zero_method="zsplit", method="approx", correction=False, alternative="greater")``);
    a column of at most :data:`EXACT_MAX_N` differences with no zero and no tie gets the exact p-value
    (scipy's ``method="exact"``).
    Returns ``(..., C)``: 1 where every difference is 0, NaN where a column holds a NaN.
    """
    d = np.asarray(diff, dtype=float)
    n = d.shape[-2]
    bad = np.isnan(d).any(axis=-2)
    a = np.abs(np.where(np.isnan(d), 0.0, d))
    r = rankdata(a, axis=-2)  # average ranks
    t = rankdata(a, axis=-2, method="max") - rankdata(a, axis=-2, method="min") + 1  # tie group size
    t_plus = (r * (d > 0)).sum(axis=-2) + 0.5 * (r * (d == 0)).sum(axis=-2)
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - (t * t - 1).sum(axis=-2) / 48.0
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (t_plus - mean) / np.sqrt(var)
    p = np.where(var > 0, ndtr(-z), 1.0)
    if n <= EXACT_MAX_N:
        # No zeros and no ties: the exact null distribution, as scipy uses for small samples (the normal
        # approximation is anti-conservative there: 0.007 instead of 1/64 for 6 positive differences).
        clean = ~(d == 0).any(axis=-2) & (t == 1).all(axis=-2) & ~bad
        if clean.any():
            sf = _exact_sf(n)
            idx = np.clip(np.rint(np.where(clean, t_plus, 0)).astype(np.int64), 0, len(sf) - 1)
            p = np.where(clean, sf[idx], p)
    return np.where(bad, np.nan, p)


#: Largest sample size the exact signed-rank distribution is used for (scipy's choice too).
EXACT_MAX_N = 50


@functools.lru_cache(maxsize=64)
def _exact_sf(n: int) -> np.ndarray:
    """``P(T+ >= t)`` for t = 0..n(n+1)/2 under the null: the signed-rank statistic of n untied ranks."""
    top = n * (n + 1) // 2
    counts = np.zeros(top + 1)
    counts[0] = 1.0
    for r in range(1, n + 1):  # subsets of {1..n} by their sum
        counts[r:] = counts[r:] + counts[:-r].copy()
    pmf = counts / 2.0 ** n
    return np.cumsum(pmf[::-1])[::-1]


def bh_rows(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of each row of ``p`` ``(B, m)`` separately; NaN cells stay NaN and do not
    count (the same cells must be NaN in every row)."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p[0]) if len(p) else np.zeros(p.shape[1], bool)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[:, ok]
    order = np.argsort(pv, axis=1, kind="stable")
    ranked = np.take_along_axis(pv, order, axis=1) * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[:, ::-1], axis=1)[:, ::-1]
    out = np.empty_like(pv)
    np.put_along_axis(out, order, np.minimum(ranked, 1.0), axis=1)
    q[:, ok] = out
    return q


def base_rule(x: np.ndarray, alpha: float, min_ratio: float, ce_floor: float | np.ndarray) -> np.ndarray:
    """The driver rule on a batch of samples: ``x`` ``(B, n, L, E)`` per-input CE (NaN: not computed).

    Per sample: the paired test (:func:`signed_rank_greater`) of each expert's CE against its layer's
    median CE on the same input, BH over the sample's computed cells, ``q <= alpha``; mean CE ``>=
    min_ratio ×`` the layer's median mean CE; mean CE ``>= ce_floor`` (a number, or ``(L, 1)`` per layer).
    Returns ``(B, L, E)`` bool.
    """
    B, n, L, E = x.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # experts or layers not computed
        med_in = np.nanmedian(x, axis=3, keepdims=True)
        vals = np.nanmean(x, axis=1)  # (B, L, E)
        med = np.nanmedian(vals, axis=2, keepdims=True)
    p = signed_rank_greater((x - med_in).reshape(B, n, L * E))
    q = bh_rows(p).reshape(B, L, E)
    ok = ~np.isnan(vals)
    return ok & (q <= alpha) & (vals >= min_ratio * med) & (vals >= ce_floor)


def domain_seed(seed: int, domain: str) -> list[int]:
    """The RNG seed of one domain's resamples: the run's ``seed`` and a stable hash of the domain name."""
    return [int(seed), zlib.crc32(domain.encode())]


def half_samples(n: int, pairs: int, rng: np.random.Generator) -> np.ndarray:
    """``(2·pairs, ⌊n/2⌋)`` input indices: ``pairs`` complementary pairs of disjoint half-samples of n."""
    h = n // 2
    out = np.empty((2 * pairs, h), dtype=np.int64)
    for b in range(pairs):
        perm = rng.permutation(n)
        out[2 * b], out[2 * b + 1] = perm[:h], perm[h:2 * h]
    return out


@dataclass
class Stability:
    """Selection frequencies of one domain: ``frequency`` ``(L, E)`` (NaN: not computed), the mean number of
    experts a half-sample flags ``mean_selected``, the cells tested ``n_cells``, the half-sample size
    ``half_size`` and the number of half-samples ``n_samples``."""

    frequency: np.ndarray
    mean_selected: float
    n_cells: int
    half_size: int
    n_samples: int

    def false_bound(self, min_frequency: float) -> float:
        """Meinshausen–Bühlmann's bound on the expected number of false drivers at ``min_frequency`` (> 0.5):
        ``q̄² / ((2·min_frequency − 1)·p)``."""
        if self.n_cells == 0:
            return 0.0
        return self.mean_selected ** 2 / ((2 * min_frequency - 1) * self.n_cells)

    def expected_jaccard(self) -> float:
        """The Jaccard index expected between the base rule's sets on two independent half-samples, from the
        frequencies: ``Σπ² / Σ(2π − π²)`` (NaN when no expert is ever selected)."""
        f = np.nan_to_num(self.frequency.ravel())
        den = float((2 * f - f * f).sum())
        return float((f * f).sum() / den) if den > 0 else float("nan")


def selection_frequency(x: np.ndarray, pairs: int, alpha: float, min_ratio: float, ce_floor: float | np.ndarray,
                        rng: np.random.Generator, size: int | None = None, chunk: int = 64) -> Stability:
    """Selection frequency of every expert over ``pairs`` complementary pairs of half-samples of ``x``.

    ``x`` ``(N, L, E)`` one domain's per-input CE. ``size``: draw the pairs from a random subset of
    ``2·size`` inputs instead (half-samples of ``size``: the frequency curve at a smaller sample).
    """
    N, L, E = x.shape
    if size is not None and 2 * size < N:
        idx = np.stack([rng.permutation(N)[: 2 * size] for _ in range(pairs)])
        sub = np.concatenate([np.stack([row[:size], row[size:]]) for row in idx])
    else:
        sub = half_samples(N, pairs, rng)
    hits = np.zeros((L, E))
    n_sel = 0
    for s in range(0, len(sub), chunk):
        sel = base_rule(x[sub[s:s + chunk]], alpha, min_ratio, ce_floor)
        hits += sel.sum(axis=0)
        n_sel += int(sel.sum())
    computed = ~np.isnan(x).all(axis=0)
    freq = np.where(computed, hits / max(len(sub), 1), np.nan)
    return Stability(freq, n_sel / max(len(sub), 1), int(computed.sum()), int(sub.shape[1]), len(sub))


def inputs_for_stability(curve: Sequence[tuple[int, float]], target: float = REPLICATES, cap: int = 16
                         ) -> float | None:
    """Roughly how many inputs (half-sample size × 2) the expected Jaccard would reach ``target`` at: the
    line through the curve's points ``(half_size, expected Jaccard)`` in log2(half_size), extrapolated.
    None when the curve does not rise; ``inf`` when beyond ``cap`` × the largest size measured."""
    pts = [(m, j) for m, j in curve if m > 0 and np.isfinite(j)]
    if not pts:
        return None
    top_m, top_j = max(pts)
    if top_j >= target:
        return float(2 * top_m)
    if len(pts) < 2:
        return None
    xs, ys = np.log2([m for m, _ in pts]), np.array([j for _, j in pts])
    slope = float(np.polyfit(xs, ys, 1)[0])
    if slope <= 0:
        return None
    m_star = 2 ** (np.log2(top_m) + (target - top_j) / slope)
    return float("inf") if m_star > cap * top_m else float(2 * np.ceil(m_star))


__all__ = ["Stability", "base_rule", "bh_rows", "domain_seed", "half_samples", "inputs_for_stability",
           "selection_frequency", "signed_rank_greater"]
