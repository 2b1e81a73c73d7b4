"""``method="hybrid"``: drivers as ``exact`` finds them, at a fraction of its cost.

``fast`` estimates every expert's CE; its scale is off (a first-order propagation: about 0.1–0.4 of the exact
CE on random deep models) but within a layer it ranks experts by the same contrast the driver rule reads (CE
against the layer's median). So:

1. **calibrate** — the last MoE layer is computed exactly in full (the cheapest layer to recompute: nothing
   after it), which gives the exact/fast ratio; in layers of at least 16 experts, the 2 experts nearest the
   layer's median fast CE too (its bulk's ratio: the median the rule compares against);
2. **rescale** — every cell not computed exactly holds its fast CE × its layer's exact/fast ratio (the median
   over the layer's verified cells; the calibration layer's otherwise), so the table is in exact units;
3. **verify** — the study's driver rule (:class:`~expertscope.config.DriverConfig`, its defaults unless given)
   runs on that table per domain, relaxed by ``margin`` = 1.5 (``fdr``'s level × 1.5, its ratio and floor / 1.5;
   ``z``'s bar lowered; ``top``'s largest); a flagged cell not yet exact for that domain is computed exactly on
   that domain's inputs only (the rule reads one domain at a time). Where the rule itself flags a driver, the
   experts nearest its layer's median for that domain are verified too (the middle two; ± 1 more with fewer
   than 16 experts): the paired test and the ratio compare against that median, so it must be exact as well;
4. **repeat** — rescale and verify again, until nothing new is flagged (at most 6 rounds).

There is no separate screen on the fast CE: a cell "could pass the ratio" in about 3 of 8 experts of every
layer, while the relaxed rule (test, ratio and floor together) flags few. What this costs and how often it
agrees with ``exact``: ``benchmarks/bench_hybrid_drivers.py`` (docs/benchmarks.md, "Cheap drivers").

A driver is then always an exactly computed expert of its domain; the result's ``exact`` mask ``(N, L, E)``
says which cells were, per input (``settings["hybrid"]`` the rounds and the cells per round). ``hybrid_top``
(default 0) adds the top experts of each layer by fast CE to the first round.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..config import DriverConfig
from .stability import base_rule

#: How far a fast estimate may fall short of exact before a real driver would be missed.
MARGIN = 1.5
MAX_ROUNDS = 6
#: Experts nearest each layer's median fast CE computed exactly in the first round (layers of at least
#: ANCHOR_MIN_EXPERTS experts), so that the unverified cells' scale is the bulk's.
ANCHORS = 2
ANCHOR_MIN_EXPERTS = 16
#: In a layer of fewer experts holding a driver, this many experts on each side of the middle two are verified
#: too: with 8 experts the median is one of few values and a fast ranking misplaces it by one or two.
BAND_FEW = 1


class Hybrid:
    """The screen-and-verify state of one ``hybrid`` call: ``ce`` ``(N, L, E)`` (exact where verified for the
    input's domain, scaled fast elsewhere) and ``exact`` ``(D, L, E)`` (per domain, in first-seen order).
    :meth:`rounds` yields the cells ``(D, L, E)`` to compute exactly next, :meth:`cells` turns them into the
    exact engine's request and :meth:`verified` takes their values.

    The driver rule reads one domain's inputs at a time (its test, medians and floor), so a cell is verified
    only on the inputs of the domains it could be a driver of: a domain-specific candidate costs its domain's
    share of the inputs, not all of them."""

    def __init__(self, fast: np.ndarray, dom: np.ndarray, lays: list[int], per_layer: Mapping[int, Sequence[int]],
                 E_max: int, least: int = 0, rule: DriverConfig | None = None) -> None:
        self.fast, self.lays = fast, lays
        self.domains = list(dict.fromkeys(dom.tolist()))
        self.rows = [dom == d for d in self.domains]
        self.ce = fast.copy()
        self.exact = np.zeros((len(self.domains), len(lays), E_max), bool)
        self.asked = np.zeros((len(lays), E_max), bool)
        for li, layer in enumerate(lays):
            self.asked[li, list(per_layer[layer])] = True
        self.least = least
        self.rule = rule if rule is not None else DriverConfig()
        self.log: list[dict[str, Any]] = []

    # ----- the rounds ------------------------------------------------------------------------------------
    def rounds(self) -> Iterator[np.ndarray]:
        """The cells ``(D, L, E)`` to compute exactly, round by round (ends when every flagged cell, and the
        median experts of every layer holding a driver, are exact)."""
        first = self._anchors()
        first[-1] |= self.asked[-1]
        first = np.broadcast_to(first, self.exact.shape).copy()
        if self.least:
            first |= self._top(self.least)
        yield self._log("calibrate: the last MoE layer in full, and each layer's median experts by fast CE", first)
        for _ in range(MAX_ROUNDS):
            want = (self._flagged() | self._median_band(self._drivers())) & ~self.exact
            if not want.any():
                return
            yield self._log("verify: flagged on the table (relaxed rule), and the median experts of a layer "
                            "holding a driver; not yet exact", want)

    def cells(self, want: np.ndarray) -> tuple[dict[int, list[int]], np.ndarray]:
        """The exact engine's request for ``want`` ``(D, L, E)``: ``{layer: experts}`` (any domain) and the cells
        each input needs ``(N, L, E)`` (its domain's)."""
        which: dict[int, list[int]] = {}
        union = np.any(want, axis=0)
        for li, layer in enumerate(self.lays):
            ex = np.flatnonzero(union[li])
            if len(ex):
                which[layer] = ex.tolist()
        return which, self._per_input(want)

    def verified(self, exact_ce: np.ndarray, want: np.ndarray) -> None:
        """Take the exact values of the cells ``want`` ``(D, L, E)`` and rescale the fast cells of every layer."""
        take = self._per_input(want)
        self.ce = np.where(take, exact_ce, self.ce)
        self.exact |= want
        self._rescale()

    def exact_per_input(self) -> np.ndarray:
        """``(N, L, E)`` bool: the cells computed exactly, per input (its domain's)."""
        return self._per_input(self.exact)

    # ----- internals -------------------------------------------------------------------------------------
    def _per_input(self, per_domain: np.ndarray) -> np.ndarray:
        out = np.zeros(self.fast.shape, bool)
        for di, rows in enumerate(self.rows):
            out[rows] = per_domain[di]
        return out

    def _ratios(self) -> tuple[np.ndarray, np.ndarray]:
        """Per domain and verified cell the exact/fast ratio of mean CE ``(D, L, E)``, and where it is defined."""
        ratio = np.full(self.exact.shape, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for di, rows in enumerate(self.rows):
                f = np.nanmean(self.fast[rows], axis=0)
                e = np.nanmean(self.ce[rows], axis=0)
                ok = self.exact[di] & (f > 0) & np.isfinite(e)
                ratio[di] = np.where(ok, e / np.where(f > 0, f, 1.0), np.nan)
        return ratio, np.isfinite(ratio)

    def _rescale(self) -> None:
        """Every cell not exact for a domain: its fast CE × its layer's exact/fast ratio (the median over the
        layer's verified cells of every domain; over all layers' where the layer has none)."""
        ratio, ok = self._ratios()
        overall = float(np.nanmedian(ratio[ok])) if ok.any() else 1.0
        scale = np.array([float(np.nanmedian(ratio[:, li][ok[:, li]])) if ok[:, li].any() else overall
                          for li in range(len(self.lays))])
        rest = self.asked[None] & ~self.exact_per_input()
        self.ce = np.where(rest, self.fast * scale[None, :, None], self.ce)

    def _means(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per domain: its inputs' CE ``(n, L, E)`` and the mean ``(L, E)``."""
        out = []
        for rows in self.rows:
            sub = x[rows]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out.append((sub, np.nanmean(sub, axis=0)))
        return out

    def _drivers(self) -> np.ndarray:
        """Per domain, the cells the ``fdr`` rule itself (not relaxed, one pass) flags on the current table; none
        under the other rules (they read no median)."""
        r = self.rule
        out = np.zeros_like(self.exact)
        if r.rule != "fdr":
            return out
        for di, (x, _) in enumerate(self._means(self.ce)):
            out[di] = base_rule(x[None], r.alpha, r.min_ratio, r.ce_floor)[0] & self.asked
        return out

    def _median_band(self, cells: np.ndarray) -> np.ndarray:
        """Per domain, in each layer holding one of ``cells``: the experts whose mean CE on the current table
        is nearest the layer's median (the middle two, ± :data:`BAND_FEW` more in layers of fewer than
        :data:`ANCHOR_MIN_EXPERTS` experts): exact, they fix the median the rule compares that layer against."""
        out = np.zeros_like(self.exact)
        for di, (_, mean) in enumerate(self._means(self.ce)):
            for li in np.flatnonzero(cells[di].any(axis=1)):
                ex = np.flatnonzero(self.asked[li])
                order = ex[np.argsort(np.nan_to_num(mean[li, ex], nan=-np.inf), kind="stable")]
                band = BAND_FEW if len(ex) < ANCHOR_MIN_EXPERTS else 0
                lo, hi = max((len(ex) - 1) // 2 - band, 0), len(ex) // 2 + band
                out[di, li, order[lo : hi + 1]] = True
        return out

    def _flagged(self) -> np.ndarray:
        """Per domain, the cells the study's driver rule (relaxed by the margin) flags on the current table:
        ``fdr`` the base rule; ``z`` CE at least the layer mean + z / margin sd; ``top`` each layer's ``top``
        largest (their ties included)."""
        r = self.rule
        out = np.zeros_like(self.exact)
        for di, (x, mean) in enumerate(self._means(self.ce)):
            if r.rule == "fdr":
                sel = base_rule(x[None], min(1.0, r.alpha * MARGIN), r.min_ratio / MARGIN, r.ce_floor / MARGIN)[0]
            else:
                m = np.where(self.asked, np.nan_to_num(mean, nan=-np.inf), -np.inf)
                if r.rule == "z":
                    vals = np.where(self.asked, mean, np.nan)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        bar = np.nanmean(vals, axis=1, keepdims=True) + r.z / MARGIN * np.nanstd(vals, axis=1,
                                                                                               keepdims=True)
                else:
                    bar = -np.sort(-m, axis=1)[:, min(r.top, m.shape[1]) - 1:min(r.top, m.shape[1])]
                sel = m >= bar
            out[di] = sel & self.asked
        return out

    def _anchors(self) -> np.ndarray:
        """``(L, E)``: per layer of at least :data:`ANCHOR_MIN_EXPERTS` experts, the :data:`ANCHORS` experts whose
        pooled fast mean is nearest the layer's median: computed exactly, they put the layer's bulk (hence its
        median) in exact units. Fewer experts: none (two of eight would cost a quarter of exact)."""
        out = np.zeros_like(self.asked)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f = np.nanmean(self.fast, axis=0)
        for li in range(len(self.lays)):
            ex = np.flatnonzero(self.asked[li])
            if len(ex) < ANCHOR_MIN_EXPERTS:
                continue
            med = np.nanmedian(f[li, ex])
            out[li, ex[np.argsort(np.abs(f[li, ex] - med), kind="stable")[:ANCHORS]]] = True
        return out

    def _top(self, n: int) -> np.ndarray:
        out = np.zeros_like(self.exact)
        for di, (_, f) in enumerate(self._means(self.fast)):
            for li in range(len(self.lays)):
                vals = np.where(self.asked[li], np.nan_to_num(f[li], nan=-np.inf), -np.inf)
                out[di, li, np.argsort(-vals, kind="stable")[:n]] = True
        return out & self.asked

    def _log(self, why: str, want: np.ndarray) -> np.ndarray:
        self.log.append({"round": why, "cells": int(want.sum()), "layers": int(want.any(axis=(0, 2)).sum()),
                         "inputs_x_cells": int(self._per_input(want).sum())})
        return want

    def exact_sets(self) -> dict[str, dict[str, list[int]]]:
        """Per domain and layer (as text), the experts computed exactly."""
        return {d: {str(layer): np.flatnonzero(self.exact[di, li]).tolist() for li, layer in enumerate(self.lays)
                    if self.exact[di, li].any()} for di, d in enumerate(self.domains)}

    def summary(self) -> dict[str, Any]:
        n = int(self.asked.sum()) * len(self.domains)
        return {"rounds": self.log, "exact_cells": int(self.exact.sum()), "cells": n,
                "exact_share": round(float(self.exact.sum()) / max(n, 1), 4), "margin": MARGIN,
                "rule": {"alpha": self.rule.alpha, "min_ratio": self.rule.min_ratio, "ce_floor": self.rule.ce_floor},
                "note": "cells are (domain, layer, expert); a cell not computed exactly for a domain holds the fast "
                        "CE scaled by its layer's exact/fast ratio"}


__all__ = ["MARGIN", "Hybrid"]
