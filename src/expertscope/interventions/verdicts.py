"""Calibrated verdicts of the intervention study (docs/methods.md, "Verdicts"): is a steered expert set
*specific* (its effect beyond what control sets of the same layers do) and *selective* (its domain pays, the
others do not)?

Two sources of chance stand between a target's Δ and a verdict, and the test covers both:

* **set to set**: control sets of the same size and layers differ among themselves, under ablation by a lot
  (masking one random set of 4 experts can cost 0.02, the next 0.48). :func:`beyond_controls` compares the
  target's Δ with the distribution of the control draws' Δ on the same items: a two-sided prediction test,
  ``t = (Δ_T − mean Δ_C) / (s_C·√(1 + 1/m))`` against Student's t with ``m − 1`` degrees of freedom (the target
  is one more draw when it is no different from a control; ``s_C`` is floored at one item's worth, ``1/n``);
* **item to item**: the paired sign test of the per-item difference ``T_i − mean_c C_ci``.

A condition's p-value is the larger of the two (an intersection-union test: it rejects only when both do), and
the run's p-values are corrected together (Benjamini–Hochberg over every tested condition). A set is
*specific* when its q-value is at most ``alpha`` **and** the bootstrap interval of ``Δ_T − mean Δ_C`` excludes
0 by more than the data's resolution (:func:`resolution`), never by a rounding residue.

*Selective* (:func:`selectivity_verdict`) is judged on control-normalised effects (``Δ(T_i on j) − mean
Δ(C_i on j)``): the set is specific under ablation on its own domain with a harmful normalised effect, and no
other domain's normalised harm exceeds ``max_off_target`` (⅓) of it. A selective set is specific first, so
random sets are called selective at most as often as they are called specific.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..stats.rules import bh_qvalues, mean_ci, sign_test

#: Fewer distinct control draws than this give no verdict (no spread to compare with).
MIN_DRAWS = 3

__all__ = ["MIN_DRAWS", "BeyondControls", "beyond_controls", "excludes_zero", "resolution",
           "selectivity_verdict", "specific_verdicts"]


def resolution(n: int, m: int) -> float:
    """Half the smallest step of a mean difference ``Δ_T − mean Δ_C`` over ``n`` items and ``m`` control
    draws (it moves in steps of ``1/(n·m)``): a bound closer to 0 than this is 0."""
    return 0.5 / max(n * max(m, 1), 1)


def excludes_zero(lo: float, hi: float, tol: float) -> bool:
    """Whether the interval ``[lo, hi]`` lies clear of 0 by more than ``tol`` (NaN bounds: False)."""
    if math.isnan(lo) or math.isnan(hi):
        return False
    return lo > tol or hi < -tol


@dataclass(frozen=True)
class BeyondControls:
    """The target against its control draws on the same items (one condition).

    ``diff`` is ``Δ_T − mean Δ_C`` with its item-bootstrap interval; ``control_sd`` the spread of the draws'
    Δ (ddof=1, before the ``1/n`` floor); ``t`` the prediction statistic and ``p_set`` its two-sided
    p-value (``m − 1`` df); ``p_item`` the sign test of ``T_i − mean_c C_ci``; ``p`` the larger of the two;
    ``rank`` the share of control draws whose Δ is at or below the target's (0: below all of them).
    """

    draws: int
    control_delta: float
    control_min: float
    control_max: float
    control_sd: float
    diff: float
    diff_lo: float
    diff_hi: float
    t: float
    p_set: float
    p_item: float
    p: float
    rank: float
    tol: float


def beyond_controls(target: np.ndarray, controls: np.ndarray, base: np.ndarray, weights: np.ndarray,
                    ci: float = 0.95) -> BeyondControls:
    """Test the target arm against ``m`` control draws on the same ``n`` items.

    ``target`` ``(n,)``, ``controls`` ``(m, n)`` and ``base`` ``(n,)`` are per-item scores (0/1 correctness);
    ``weights`` ``(n_boot, n)`` the item resampling for the interval. With fewer than :data:`MIN_DRAWS` draws
    the p-values are NaN (no verdict).
    """
    target, base = np.asarray(target, float), np.asarray(base, float)
    controls = np.asarray(controls, float).reshape(-1, len(target))
    m, n = controls.shape
    d_t = float((target - base).mean()) if n else float("nan")
    d_c = (controls - base).mean(axis=1) if n else np.zeros(m)
    nan = float("nan")
    per_item = target - controls.mean(axis=0) if m else np.full(n, np.nan)
    diff, lo, hi = mean_ci(per_item, weights, ci) if m else (nan,) * 3
    mean, low, high, rank = ((float(d_c.mean()), float(d_c.min()), float(d_c.max()),
                              float((d_c <= d_t + 1e-12).mean())) if m else (nan,) * 4)
    if m < MIN_DRAWS or n == 0:
        return BeyondControls(m, mean, low, high, nan, diff, lo, hi, nan, nan, nan, nan, rank, resolution(n, m))
    from scipy.stats import t as student_t

    sd = float(d_c.std(ddof=1))
    spread = max(sd, 1.0 / n) * math.sqrt(1.0 + 1.0 / m)  # floor: one item's worth
    t = (d_t - mean) / spread
    p_set = float(min(1.0, 2.0 * student_t.sf(abs(t), m - 1)))
    p_item = sign_test(per_item)[0]
    return BeyondControls(m, mean, low, high, sd, diff, lo, hi, float(t), p_set, p_item, max(p_set, p_item), rank,
                          resolution(n, m))


def specific_verdicts(p: np.ndarray, lo: np.ndarray, hi: np.ndarray, tol: np.ndarray, alpha: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(q, specific)`` for every tested condition of a run at once: BH q-values of ``p`` (NaN: not tested,
    not counted) and ``specific = q ≤ alpha`` and the interval clear of 0 by more than ``tol`` (NaN where
    untested)."""
    p = np.asarray(p, float)
    q = bh_qvalues(p)
    out = np.full(len(p), np.nan, dtype=object)
    for i in range(len(p)):
        if not math.isnan(q[i]):
            out[i] = bool(q[i] <= alpha and excludes_zero(float(lo[i]), float(hi[i]), float(tol[i])))
    return q, out


def selectivity_verdict(own: float, own_specific: bool | None, off: Mapping[str, float], max_off_target: float
                        ) -> tuple[bool | None, str]:
    """Whether ablating a set is selective for its domain, and why, from control-normalised effects.

    ``own``: ``Δ(T on its domain) − mean Δ(controls on it)``; ``own_specific``: that condition's calibrated
    verdict (None: none); ``off``: the same normalised effect on each other domain. Selective: specific, a
    harm (``own < 0``), and every other domain's harm at most ``max_off_target`` × the own harm (a gain there
    passes).
    """
    if own_specific is None or math.isnan(own) or not off:
        return None, "no calibrated verdict on its own domain" if off else "no other domain evaluated"
    if not own_specific:
        return False, "not specific on its own domain"
    if own >= 0:
        return False, "ablation did not harm its own domain beyond controls"
    worst_name, worst = min(off.items(), key=lambda kv: kv[1])
    if math.isnan(worst):
        return None, f"no normalised effect on {worst_name}"
    if worst < own * max_off_target:  # both negative: the other domain loses more than the allowed share
        return False, (f"{worst_name} loses {-worst:.3f} beyond controls, more than {max_off_target:.2g} × its own "
                       f"{-own:.3f}")
    return True, f"every other domain loses at most {max_off_target:.2g} × its own {-own:.3f} beyond controls"

