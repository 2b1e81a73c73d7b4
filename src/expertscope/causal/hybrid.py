"""``method="hybrid"``: drivers as ``exact`` finds them, at a fraction of its cost.

``fast`` estimates every expert's CE; its scale is off (a first-order propagation: about 0.1–0.4 of the exact
CE on random deep models) but within a layer it ranks experts by the same contrast the driver rule reads (CE
against the layer's median). So:

1. **calibrate** — the last MoE layer is computed exactly in full (the cheapest layer to recompute: nothing
   after it), which gives the exact/fast ratio; in layers of at least 16 experts, the 2 experts nearest the
   layer's median fast CE too, on the probe inputs (its bulk's ratio: the median the rule compares against);
2. **rescale** — every cell not computed exactly holds its fast CE × a predicted exact/fast ratio, so the table
   is in exact units. fast spreads a layer's cells wider than exact does (its per-cell error is noise, and the
   cells fast puts high are partly high by noise: on the benchmark's 32 × 8 models, cells at > 1.3× their
   layer's median fast mean are overstated by 1.2× on average), so the ratio is not one per layer but
   ``exp(a_l + (β − 1)·c)``, with ``c`` the cell's log fast domain mean less its layer's median, ``β`` the
   within-layer slope of exact on fast in logs (:meth:`Hybrid.slope`: pooled over every layer and domain with
   two or more cells computed, bounded to [:data:`SLOPE_MIN`, 1]) and ``a_l`` the layer's intercept (the median
   over its computed cells; over all layers' where it has none);
3. **probe** — the study's driver rule (:class:`~expertscope.config.DriverConfig`, its defaults unless given)
   runs on that table per domain, relaxed by :data:`MARGIN` = 1.5 (``fdr``'s level × 1.5, its ratio and floor
   / 1.5; ``z``'s bar lowered; ``top``'s largest); a flagged cell is first computed exactly on its domain's
   *probe* inputs only (a seeded quarter of them, at least 4; the rule reads one domain at a time). Its other
   inputs then hold their fast CE × the cell's own exact/fast ratio on the probe (on the benchmark's models only
   a little closer than the layer's ratio: 1.32-1.45x off at the 90th percentile against 1.46-1.48x), and a
   quarter of its inputs are exact;
4. **verify** — a cell the rule relaxed by :data:`PROBED_MARGIN` still flags after its probe is computed exactly
   on half its domain's inputs (:data:`HALF_SHARE`, the probe's among them), and, if still flagged there, on the
   rest. Where a decision is within :data:`BAND_MARGIN` of the rule's bars (the rule relaxed by it flags the cell,
   the rule raised by it does not; a driver or not), the experts nearest its layer's median for that domain are
   probed (the middle two; with fewer than 16 experts ± 1 more, and every expert whose estimate is within
   :data:`BAND_MARGIN` of the median). A driver the raised rule still flags keeps its layer's median estimated,
   as a cell the relaxed rule does not flag does: no error within the margin could undo either decision (until
   2026-12 every driver's layer was probed: 0.01-0.05 of exact's cost on the benchmark's 32 x 8 models, no driver
   set changed on eight replayed seeds). Where a decision *about a cell already exact on half its domain's
   inputs* is still within :data:`FULL_BAND_MARGIN` of the bars, the probed median experts of its layer follow it
   to that half, and where the cell is exact on all of them, to all: the paired test and the ratio compare against
   that median, so there it must be exact as well. (A decision about a cell still estimated waits for the cell:
   most such decisions are the estimate's noise, and the cell's own verification settles them first.)
5. **repeat** — rescale, probe and verify again, until nothing new is asked (at most :data:`MAX_ROUNDS` rounds).

There is no separate screen on the fast CE: a cell "could pass the ratio" in about 3 of 8 experts of every
layer, while the relaxed rule (test, ratio and floor together) flags few. What this costs and how often it
agrees with ``exact``: ``benchmarks/bench_hybrid_drivers.py`` (docs/benchmarks.md, "Cheap drivers").

A driver is then always an expert computed exactly on every input of its domain; the result's ``exact`` mask
``(N, L, E)`` says which cells were, per input (a probed cell on its probe inputs only); ``settings["hybrid"]``
the rounds and the cells per round. ``hybrid_top`` (default 0) adds the top experts of each layer by fast CE
to the first round.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..config import DriverConfig
from .stability import base_rule

#: The relaxation under which a cell on the fast table (× its layer's ratio) is probed.
MARGIN = 1.5
MAX_ROUNDS = 24
#: A flagged cell is first computed on this share of its domain's inputs (at least PROBE_MIN; the inputs are a
#: seeded draw per domain, the same for every cell).
PROBE_SHARE = 0.25
PROBE_MIN = 4
#: The relaxation for a probed cell, whose other inputs hold fast x its own probe ratio: on the benchmark's random
#: 32 x 8 models that estimate of a domain mean above 1.2x its layer's median is off by a factor of 1.12-1.15 at
#: the median and 1.32-1.45 at the 90th percentile (docs/benchmarks.md, "Cheap drivers"). 1.25 until 2026-12:
#: drivers whose probe understated them 1.41x and 1.55x were missed on fresh seeds.
PROBED_MARGIN = 1.4
#: A cell still flagged after its probe is computed on this share of its domain's inputs before the rest (a seeded
#: draw per domain holding the probe inputs): a cell the half clears costs half its domain, not all of it.
HALF_SHARE = 0.5
#: The least within-layer slope of exact on fast (in logs) the rescaling takes (:meth:`Hybrid.slope`).
SLOPE_MIN = 0.5
#: A layer's median experts are probed where a decision there is within this factor of the rule's bars.
BAND_MARGIN = 1.25
#: ... and computed on all inputs where a decision about a cell exact on all its domain's inputs is within this
#: factor (elsewhere their probe stands in).
FULL_BAND_MARGIN = 1.25
#: Experts nearest each layer's median fast CE computed exactly in the first round (layers of at least
#: ANCHOR_MIN_EXPERTS experts), so that the unverified cells' scale is the bulk's.
ANCHORS = 2
ANCHOR_MIN_EXPERTS = 16
#: In a layer of fewer experts holding a near decision, this many experts on each side of the middle two are verified
#: too (and every expert estimated within BAND_MARGIN of the median): with 8 experts the median is one of few values
#: and a fast ranking misplaces it by one or two.
BAND_FEW = 1


class Hybrid:
    """The screen-probe-and-verify state of one ``hybrid`` call: ``ce`` ``(N, L, E)`` (exact where computed, fast
    × the cell's or its layer's exact/fast ratio elsewhere) and ``done`` ``(N, L, E)`` (computed exactly, per
    input). :meth:`rounds` yields the cells each input needs next ``(N, L, E)``, :meth:`which` turns them into
    the exact engine's ``{layer: experts}`` and :meth:`verified` takes their values.

    The driver rule reads one domain's inputs at a time (its test, medians and floor), so a cell is computed
    only on the inputs of the domains it could be a driver of: a domain-specific candidate costs its domain's
    share of the inputs (a quarter of that while it is only probed), not all of them."""

    def __init__(self, fast: np.ndarray, dom: np.ndarray, lays: list[int], per_layer: Mapping[int, Sequence[int]],
                 E_max: int, least: int = 0, rule: DriverConfig | None = None) -> None:
        self.fast, self.lays = fast, lays
        self.domains = list(dict.fromkeys(dom.tolist()))
        self.rows = [dom == d for d in self.domains]
        self.ce = fast.copy()
        self.done = np.zeros(fast.shape, bool)
        self.asked = np.zeros((len(lays), E_max), bool)
        for li, layer in enumerate(lays):
            self.asked[li, list(per_layer[layer])] = True
        self.least = least
        self.rule = rule if rule is not None else DriverConfig()
        self.probe = np.zeros(len(dom), bool)
        self.half = np.zeros(len(dom), bool)
        g = np.random.default_rng(self.rule.seed)  # the driver rule's seed: one run, one draw
        for rows in self.rows:  # each domain's probe inputs and its half: a seeded draw, the same for every cell
            idx = g.permutation(np.flatnonzero(rows))
            n = min(len(idx), max(PROBE_MIN, int(np.ceil(PROBE_SHARE * len(idx)))))
            self.probe[idx[:n]] = True
            self.half[idx[:max(n, int(np.ceil(HALF_SHARE * len(idx))))]] = True  # the probe's inputs among them
        self.beta = 1.0
        self.centred = self._centred_fast()  # fast does not change between rounds
        self.log: list[dict[str, Any]] = []

    # ----- the rounds ------------------------------------------------------------------------------------
    @property
    def exact(self) -> np.ndarray:
        """``(D, L, E)`` bool: the cells computed exactly on every input of the domain."""
        return np.stack([self.done[rows].all(axis=0) for rows in self.rows])

    @property
    def probed(self) -> np.ndarray:
        """``(D, L, E)`` bool: the cells computed exactly on (at least) the domain's probe inputs."""
        return np.stack([self.done[rows & self.probe].all(axis=0) for rows in self.rows])

    @property
    def halved(self) -> np.ndarray:
        """``(D, L, E)`` bool: the cells computed exactly on (at least) the domain's half inputs."""
        return np.stack([self.done[rows & self.half].all(axis=0) for rows in self.rows])

    def rounds(self) -> Iterator[np.ndarray]:
        """The cells each input needs computed exactly ``(N, L, E)``, round by round (ends when every flagged
        cell has been probed, every cell still flagged after its probe and after its half, and the median experts
        of every layer holding a near decision about such a cell, are exact on all their domain's inputs)."""
        probe, half = self.probe[:, None, None], self.half[:, None, None]
        last = np.zeros_like(self.asked)
        last[-1] = self.asked[-1]
        first = last | (self._anchors() & probe)  # (N, L, E): the last layer on every input, anchors on the probe
        if self.least:
            first |= self._per_input(self._top(self.least))
        yield self._log("calibrate: the last MoE layer in full, each layer's median experts by fast CE on the probe "
                        "inputs", first & ~self.done)
        for _ in range(MAX_ROUNDS):
            probed, halved, exact = self.probed, self.halved, self.exact
            # the rule on this round's table, once per margin (several of them are equal)
            flagged = {m: self._flagged(m) for m in {MARGIN, PROBED_MARGIN, BAND_MARGIN, FULL_BAND_MARGIN}}
            tight = {m: self._tight(m) for m in {BAND_MARGIN, FULL_BAND_MARGIN}}
            # a layer holding a decision within BAND_MARGIN of the rule's bars (a driver's too): its median experts
            # probed; a decision within FULL_BAND_MARGIN about a cell exact on half (all) of its domain's inputs
            # takes them to that half (to all)
            band = self._median_band(flagged[BAND_MARGIN] & ~tight[BAND_MARGIN])
            near = flagged[FULL_BAND_MARGIN] & ~tight[FULL_BAND_MARGIN]
            to_half = (flagged[PROBED_MARGIN] | self._median_band(near & halved)) & probed & ~halved
            to_all = (flagged[PROBED_MARGIN] | self._median_band(near & exact)) & halved & ~exact
            ask = (self._per_input((flagged[MARGIN] | band) & ~probed) & probe) | \
                (self._per_input(to_half) & half) | self._per_input(to_all)
            ask &= ~self.done
            if not ask.any():
                return
            yield self._log("probe what the relaxed rule flags; what it still flags, on half its domain's inputs, then "
                            "on the rest; the median experts of a layer holding a near decision probed, of a layer "
                            "holding one about a cell exact on half (all) its inputs on that half (all)", ask)

    def which(self, ask: np.ndarray) -> dict[int, list[int]]:
        """The exact engine's request ``{layer: experts}`` for ``ask`` ``(N, L, E)`` (any input)."""
        union = np.any(ask, axis=0)
        out: dict[int, list[int]] = {}
        for li, layer in enumerate(self.lays):
            ex = np.flatnonzero(union[li])
            if len(ex):
                out[layer] = ex.tolist()
        return out

    def verified(self, exact_ce: np.ndarray, ask: np.ndarray) -> None:
        """Take the exact values of the cells ``ask`` ``(N, L, E)`` and rescale every other cell."""
        self.ce = np.where(ask, exact_ce, self.ce)
        self.done |= ask
        self._rescale()

    def exact_per_input(self) -> np.ndarray:
        """``(N, L, E)`` bool: the cells computed exactly, per input."""
        return self.done.copy()

    # ----- internals -------------------------------------------------------------------------------------
    def _per_input(self, per_domain: np.ndarray) -> np.ndarray:
        """``(D, L, E)`` per domain → ``(N, L, E)``: each input takes its domain's row (any dtype)."""
        out = np.zeros(self.fast.shape, per_domain.dtype)
        for di, rows in enumerate(self.rows):
            out[rows] = per_domain[di]
        return out

    def _ratios(self) -> np.ndarray:
        """Per domain and cell the exact/fast ratio of its summed CE over the inputs computed exactly ``(D, L, E)``
        (NaN: none computed, or no fast CE there)."""
        ratio = np.full((len(self.domains), *self.asked.shape), np.nan)
        for di, rows in enumerate(self.rows):
            done = self.done[rows]
            f = np.where(done, np.nan_to_num(self.fast[rows]), 0.0).sum(axis=0)
            e = np.where(done, np.nan_to_num(self.ce[rows]), 0.0).sum(axis=0)
            ok = done.any(axis=0) & (f > 0)
            ratio[di] = np.where(ok, e / np.where(ok, f, 1.0), np.nan)
        return ratio

    def _centred_fast(self) -> np.ndarray:
        """Per domain and cell, its log fast domain mean less its layer's median ``(D, L, E)`` (NaN: no fast CE)."""
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.stack([np.nanmean(self.fast[rows], axis=0) for rows in self.rows])
            logs = np.log(np.where(self.asked[None] & (means > 0), means, np.nan))
            return logs - np.nanmedian(logs, axis=2, keepdims=True)

    @staticmethod
    def slope(log_ratio: np.ndarray, centred: np.ndarray) -> float:
        """β, the within-layer slope of log exact on log fast, from the cells computed: ``log_ratio`` and
        ``centred`` ``(D, L, E)`` (NaN: no ratio). The least-squares slope of ``log_ratio`` on ``centred`` with each
        (domain, layer) of two or more such cells centred on its own means, plus 1, bounded to
        [:data:`SLOPE_MIN`, 1] (1: no such layer)."""
        ok = np.isfinite(log_ratio) & np.isfinite(centred)
        sxy = sxx = 0.0
        for d, li in zip(*np.nonzero(ok.sum(axis=2) >= 2), strict=True):
            m = ok[d, li]
            x, y = centred[d, li, m], log_ratio[d, li, m]
            x, y = x - x.mean(), y - y.mean()
            sxy, sxx = sxy + float(x @ y), sxx + float(x @ x)
        if sxx <= 0:
            return 1.0
        return float(min(1.0, max(SLOPE_MIN, 1.0 + sxy / sxx)))

    def _rescale(self) -> None:
        """Every input's cell not computed exactly: its fast CE × that cell's exact/fast ratio on the domain's
        inputs computed exactly (a probe), else × ``exp(a_l + (β − 1)·c)`` (the module's step 2: ``c`` the cell's
        centred log fast mean, ``a_l`` the median over the layer's cells with a ratio, of every domain, of
        ``log ratio − (β − 1)·c``; over all layers' where the layer has none)."""
        ratio = self._ratios()
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = np.log(ratio)
        self.beta = self.slope(log_ratio, self.centred)
        c = np.nan_to_num(self.centred, nan=0.0)
        icpt = np.where(np.isfinite(log_ratio), log_ratio - (self.beta - 1.0) * c, np.nan)
        known = np.isfinite(icpt)
        overall = float(np.median(icpt[known])) if known.any() else 0.0
        layer = np.array([float(np.median(icpt[:, li][known[:, li]])) if known[:, li].any() else overall
                          for li in range(len(self.lays))])
        predicted = np.exp(layer[None, :, None] + (self.beta - 1.0) * c)
        scale = self._per_input(np.where(np.isfinite(ratio), ratio, predicted))
        rest = self.asked[None] & ~self.done
        self.ce = np.where(rest, self.fast * scale, self.ce)

    def _means(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per domain: its inputs' CE ``(n, L, E)`` and the mean ``(L, E)``."""
        out = []
        for rows in self.rows:
            sub = x[rows]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out.append((sub, np.nanmean(sub, axis=0)))
        return out

    def _median_band(self, cells: np.ndarray) -> np.ndarray:
        """Per domain, in each layer holding one of ``cells``: the experts whose mean CE on the current table
        is nearest the layer's median (the middle two), exact, fix the median the rule compares that layer
        against. In layers of fewer than :data:`ANCHOR_MIN_EXPERTS` experts, where one misplaced value moves the
        median, also :data:`BAND_FEW` more on each side and every expert whose mean is within :data:`BAND_MARGIN`
        of the median: an estimate that far off may be a median expert's (on fresh 32 x 8 seeds, experts at the
        median's 1.05x estimated at 0.76x and 0.78x were left out of the middle four, and a ratio of 1.89x became
        2.19x)."""
        out = np.zeros_like(self.exact)
        for di, (_, mean) in enumerate(self._means(self.ce)):
            for li in np.flatnonzero(cells[di].any(axis=1)):
                ex = np.flatnonzero(self.asked[li])
                m = np.nan_to_num(mean[li, ex], nan=-np.inf)
                order = ex[np.argsort(m, kind="stable")]
                few = len(ex) < ANCHOR_MIN_EXPERTS
                band = BAND_FEW if few else 0
                lo, hi = max((len(ex) - 1) // 2 - band, 0), len(ex) // 2 + band
                out[di, li, order[lo : hi + 1]] = True
                if few:
                    med = float(np.median(m))
                    out[di, li, ex[(m >= med / BAND_MARGIN) & (m <= med * BAND_MARGIN)]] = True
        return out

    def _tight(self, margin: float) -> np.ndarray:
        """Per domain, the cells the ``fdr`` rule flags with its bars raised by ``margin`` (level / margin, ratio
        and floor × margin): decisions no error within the margin could undo. Other rules: their flags."""
        r = self.rule
        if r.rule != "fdr":
            return self._flagged(1.0)
        out = np.zeros_like(self.exact)
        for di, (x, _) in enumerate(self._means(self.ce)):
            out[di] = base_rule(x[None], r.alpha / margin, r.min_ratio * margin, r.ce_floor * margin)[0] & self.asked
        return out

    def _flagged(self, margin: float = MARGIN) -> np.ndarray:
        """Per domain, the cells the study's driver rule (relaxed by the margin) flags on the current table:
        ``fdr`` the base rule; ``z`` CE at least the layer mean + z / margin sd; ``top`` each layer's ``top``
        largest (their ties included)."""
        r = self.rule
        out = np.zeros_like(self.exact)
        for di, (x, mean) in enumerate(self._means(self.ce)):
            if r.rule == "fdr":
                sel = base_rule(x[None], min(1.0, r.alpha * margin), r.min_ratio / margin, r.ce_floor / margin)[0]
            else:
                m = np.where(self.asked, np.nan_to_num(mean, nan=-np.inf), -np.inf)
                if r.rule == "z":
                    vals = np.where(self.asked, mean, np.nan)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        bar = np.nanmean(vals, axis=1, keepdims=True) + r.z / margin * np.nanstd(vals, axis=1,
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

    def _log(self, why: str, ask: np.ndarray) -> np.ndarray:
        self.log.append({"round": why, "beta": round(self.beta, 4), "inputs_x_cells": int(ask.sum()),
                         "inputs": int(ask.any(axis=(1, 2)).sum()),
                         "layers": int(ask.any(axis=(0, 2)).sum()),
                         "cells": int(np.any([ask[rows].any(axis=0) for rows in self.rows], axis=0).sum())})
        return ask

    def exact_sets(self) -> dict[str, dict[str, list[int]]]:
        """Per domain and layer (as text), the experts computed exactly."""
        return {d: {str(layer): np.flatnonzero(self.exact[di, li]).tolist() for li, layer in enumerate(self.lays)
                    if self.exact[di, li].any()} for di, d in enumerate(self.domains)}

    def summary(self) -> dict[str, Any]:
        n = int(self.asked.sum()) * len(self.domains)
        exact, probed = self.exact, self.probed
        per_input = int(self.asked.sum()) * len(self.done)
        return {"rounds": self.log, "exact_cells": int(exact.sum()), "probed_only_cells": int((probed & ~exact).sum()),
                "cells": n, "exact_share": round(float(self.done.sum()) / max(per_input, 1), 4),
                "probe_inputs": int(self.probe.sum()), "half_inputs": int(self.half.sum()), "margin": MARGIN,
                "beta": round(self.beta, 4),
                "rule": {"alpha": self.rule.alpha, "min_ratio": self.rule.min_ratio, "ce_floor": self.rule.ce_floor},
                "note": "cells are (domain, layer, expert); exact_share is the share of (input, layer, expert) cells "
                        "computed exactly; a cell not computed exactly on an input holds its fast CE × the cell's "
                        "exact/fast ratio on its domain's inputs computed, or the ratio predicted from its layer's "
                        "and its fast mean's place in the layer (beta: the within-layer slope of exact on fast)"}


__all__ = ["BAND_MARGIN", "FULL_BAND_MARGIN", "HALF_SHARE", "MARGIN", "PROBED_MARGIN", "PROBE_SHARE", "SLOPE_MIN",
           "Hybrid"]
