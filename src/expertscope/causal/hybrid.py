"""``method="hybrid"``: drivers as ``exact`` finds them, at a fraction of its cost.

``fast`` estimates every expert's CE; its scale is off (a first-order propagation: about 0.1–0.4 of the exact
CE on random deep models) but within a layer it ranks experts by the same contrast the driver rule reads (CE
against the layer's median). So:

1. **calibrate** — the last MoE layer is computed exactly in full (the cheapest layer to recompute: nothing
   after it), which gives the exact/fast ratio; in layers of at least 16 experts, the 2 experts nearest the
   layer's median fast CE too (its bulk's ratio: the median the rule compares against);
2. **screen** — an expert is a candidate when, for some domain, its fast mean CE could pass the driver rule with
   room to spare: at least ``min_ratio / margin`` × its layer's median fast CE, and at least ``ce_floor / margin``
   once scaled by the largest exact/fast ratio seen (``margin`` = 1.5; the driver rule the study uses,
   :class:`~expertscope.config.DriverConfig`, its defaults unless given);
3. **verify** — candidates are computed exactly; every other cell holds its fast CE scaled by its layer's
   exact/fast ratio (the median over the layer's verified experts; the calibration layer's otherwise), so the
   layer medians the rule compares against stay in exact units;
4. **repeat** — the study's driver rule is run on that table for every domain (all inputs; ``fdr``'s ratio and
   floor relaxed by ``margin``, ``z``'s bar lowered by it, ``top``'s largest): any flagged cell not yet exact is
   verified, until none is (at most 6 rounds).

A driver is then always an exactly computed expert; the table's ``exact`` mask says which cells were
(``settings["hybrid"]`` the rounds and the cells per round). ``hybrid_top`` (default 0) adds the top experts of
each layer by fast CE to the first round.
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


class Hybrid:
    """The screen-and-verify state of one ``hybrid`` call: ``ce`` ``(N, L, E)`` (exact where ``exact`` ``(L, E)``,
    scaled fast elsewhere); :meth:`rounds` yields the ``{layer: experts}`` to compute exactly next and
    :meth:`verified` takes their values."""

    def __init__(self, fast: np.ndarray, dom: np.ndarray, lays: list[int], per_layer: Mapping[int, Sequence[int]],
                 E_max: int, least: int = 0, rule: DriverConfig | None = None) -> None:
        self.fast, self.dom, self.lays, self.per_layer = fast, dom, lays, per_layer
        self.ce = fast.copy()
        self.exact = np.zeros((len(lays), E_max), bool)
        self.asked = np.zeros((len(lays), E_max), bool)
        for li, layer in enumerate(lays):
            self.asked[li, list(per_layer[layer])] = True
        self.least = least
        self.rule = rule if rule is not None else DriverConfig()
        self.log: list[dict[str, Any]] = []
        self.scale_hi = 1.0

    # ----- the rounds ------------------------------------------------------------------------------------
    def rounds(self) -> Iterator[dict[int, list[int]]]:
        """The cells to compute exactly, round by round (ends when every flagged cell is exact)."""
        last = len(self.lays) - 1
        first = self._cells(self._anchors(), extra={last: list(self.per_layer[self.lays[last]])})
        yield self._log("calibrate: the last MoE layer in full, and each layer's median experts by fast CE", first)
        want = self._screen() & ~self.exact
        if self.least:
            want |= self._top(self.least) & ~self.exact
        if want.any():
            yield self._log("screen: fast CE could pass the rule with room to spare", self._cells(want))
        for _ in range(MAX_ROUNDS):
            want = self._flagged() & ~self.exact
            if not want.any():
                return
            yield self._log("verify: flagged on the table, not yet exact", self._cells(want))

    def verified(self, exact_ce: np.ndarray, which: Mapping[int, Sequence[int]]) -> None:
        """Take the exact values of ``which`` and rescale the fast cells of every layer."""
        for layer, experts in which.items():
            li = self.lays.index(layer)
            ex = list(experts)
            self.ce[:, li, ex] = exact_ce[:, li, ex]
            self.exact[li, ex] = True
        self._rescale()

    # ----- internals -------------------------------------------------------------------------------------
    def _ratios(self) -> tuple[np.ndarray, np.ndarray]:
        """Per verified cell the exact/fast ratio of mean CE, and the cells it is defined for."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f = np.nanmean(self.fast, axis=0)
            e = np.nanmean(self.ce, axis=0)
            ok = self.exact & (f > 0) & np.isfinite(e)
            return np.where(ok, e / np.where(f > 0, f, 1.0), np.nan), ok

    def _rescale(self) -> None:
        ratio, ok = self._ratios()
        overall = float(np.nanmedian(ratio[ok])) if ok.any() else 1.0
        self.scale_hi = float(np.nanmax(ratio[ok])) if ok.any() else 1.0
        for li in range(len(self.lays)):
            layer_ok = ok[li]
            s = float(np.nanmedian(ratio[li, layer_ok])) if layer_ok.any() else overall
            rest = self.asked[li] & ~self.exact[li]
            self.ce[:, li, rest] = self.fast[:, li, rest] * s

    def _means(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per domain: its inputs' CE ``(n, L, E)`` and the mean ``(L, E)``."""
        out = []
        for d in dict.fromkeys(self.dom.tolist()):
            sub = x[self.dom == d]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out.append((sub, np.nanmean(sub, axis=0)))
        return out

    def _screen(self) -> np.ndarray:
        """Cells whose fast mean could pass the ratio and the floor with room to spare, for some domain."""
        r = self.rule
        out = np.zeros_like(self.asked)
        for _, f in self._means(self.fast):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(np.where(self.asked, f, np.nan), axis=1, keepdims=True)
            out |= self.asked & (f >= r.min_ratio / MARGIN * med) & (f * self.scale_hi * MARGIN >= r.ce_floor)
        return out

    def _flagged(self) -> np.ndarray:
        """Cells the study's driver rule (relaxed by the margin) flags on the current table, for some domain:
        ``fdr`` the base rule; ``z`` CE at least the layer mean + z / margin sd; ``top`` each layer's ``top``
        largest (their ties included)."""
        r = self.rule
        out = np.zeros_like(self.asked)
        for x, mean in self._means(self.ce):
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
            out |= sel & self.asked
        return out

    def _anchors(self) -> np.ndarray:
        """Per layer of at least :data:`ANCHOR_MIN_EXPERTS` experts, the :data:`ANCHORS` experts whose pooled fast
        mean is nearest the layer's median: computed exactly, they put the layer's bulk (hence its median) in
        exact units. Fewer experts: none (two of eight would cost a quarter of exact)."""
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
        out = np.zeros_like(self.asked)
        for _, f in self._means(self.fast):
            for li in range(len(self.lays)):
                vals = np.where(self.asked[li], np.nan_to_num(f[li], nan=-np.inf), -np.inf)
                out[li, np.argsort(-vals, kind="stable")[:n]] = True
        return out & self.asked

    def _cells(self, mask: np.ndarray, extra: Mapping[int, Sequence[int]] | None = None) -> dict[int, list[int]]:
        which: dict[int, list[int]] = {}
        for li, layer in enumerate(self.lays):
            ex = set(np.flatnonzero(mask[li]).tolist()) | set((extra or {}).get(layer, []))
            if ex:
                which[layer] = sorted(int(e) for e in ex)
        return which

    def _log(self, why: str, which: dict[int, list[int]]) -> dict[int, list[int]]:
        self.log.append({"round": why, "cells": int(sum(len(v) for v in which.values())), "layers": len(which)})
        return which

    def exact_sets(self) -> dict[str, list[int]]:
        """Per layer (as text), the experts computed exactly."""
        return {str(layer): np.flatnonzero(self.exact[li]).tolist() for li, layer in enumerate(self.lays)
                if self.exact[li].any()}

    def summary(self) -> dict[str, Any]:
        n = int(self.asked.sum())
        return {"rounds": self.log, "exact_cells": int(self.exact.sum()), "cells": n,
                "exact_share": round(float(self.exact.sum()) / max(n, 1), 4), "margin": MARGIN,
                "rule": {"alpha": self.rule.alpha, "min_ratio": self.rule.min_ratio, "ce_floor": self.rule.ce_floor},
                "note": "cells not computed exactly hold the fast CE scaled by their layer's exact/fast ratio"}


__all__ = ["MARGIN", "Hybrid"]
