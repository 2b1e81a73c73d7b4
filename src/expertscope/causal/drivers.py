"""Driver experts and the causal rate (definitions and defaults in ``docs/methods.md``).

A driver expert of domain ``D`` at layer ``l`` (default ``rule="fdr"``) passes all three of: a one-sided
Wilcoxon signed-rank test across D's inputs that ``CE_{l,i}(X)`` exceeds the median CE of layer ``l``'s
experts on the same input, with Benjamini–Hochberg over D's L·E cells (``q <= alpha``); ``CE_{l,i}(D) >=
min_ratio ×`` the layer's median ``CE(D)``; and ``CE_{l,i}(D) >= ce_floor`` nats. The causal rate of layer
``l`` on ``D``: the fraction of ``D``'s real tokens whose selected set at ``l`` holds at least one driver
expert of that layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import DriverConfig, resolve_config
from ..io import read_table, write_table
from ..models.model import MoEModel
from ..routing import DomainInput, domain_texts, routing_pass
from ..stats.replication import Replication, compare_sets, flagged_sets, half_sizes, halves_by_domain
from ..stats.rules import bh_qvalues, bh_text, bootstrap_ci, is_stable, passes, rule_text, z_rule_text
from .effects import CausalEffects
from .noise import floor_note
from .stability import Stability, domain_seed, inputs_for_stability, selection_frequency, signed_rank_greater

TABLE_VERSION = 2


@dataclass
class DriverTable:
    """One row per (domain, layer, expert); ``settings`` holds the rule, thresholds and the CE settings.

    Columns: ``ce_mean`` (mean CE over the domain's inputs, nats) with its bootstrap interval ``ce_lo``,
    ``ce_hi``; ``ce_sd``, ``n_inputs``; ``layer_median``, ``layer_mean``, ``layer_sd`` of the layer's mean
    CEs; ``ratio`` = ``ce_mean / layer_median``; ``p_value``, ``q_value`` of the paired test; ``threshold``
    (the CE a driver needs: ``max(min_ratio·layer_median, ce_floor)``, or the z/top threshold); which
    criteria passed (``pass_test``, ``pass_ratio``, ``pass_floor``); ``is_driver``; ``rank`` in its layer.
    """

    df: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def drivers(self, domain: str | None = None) -> pd.DataFrame:
        """Rows flagged as drivers (of ``domain`` if given), largest CE first."""
        rows = self.df[self.df["is_driver"]]
        if domain is not None:
            rows = rows[rows["domain"] == domain]
        return rows.sort_values(["domain", "ce_mean"], ascending=[True, False])

    def targets(self, domain: str) -> list[tuple[int, int]]:
        """``(layer, expert)`` pairs of ``domain``'s drivers, for steering (``[]`` when it has none)."""
        return [(int(r.layer), int(r.expert)) for r in self.drivers(domain).itertuples()]

    def by_layer(self, domain: str) -> dict[int, set[int]]:
        """``{layer: {driver experts}}`` of ``domain`` (every layer present, possibly empty)."""
        out: dict[int, set[int]] = {int(x): set() for x in self.df["layer"].unique()}
        for layer, expert in self.targets(domain):
            out[layer].add(expert)
        return out

    def summary(self, top: int = 3) -> list[dict[str, Any]]:
        """Per domain: ``domain, n_drivers, n_inputs, largest_ce`` (the largest mean CE of any expert, nats),
        ``ce_floor``, ``strongest`` (up to ``top`` drivers as ``{layer, expert, ce_mean, ce_lo, ce_hi, q_value}``)
        and ``text``, one sentence saying what was found — or "no driver experts (largest mean CE x nats)";
        with stability selection, ``stability`` (a sentence: is the set stable at this sample size, and how
        many inputs would make it so), ``inputs_needed`` and ``expected_jaccard``.
        """
        cfg = self.settings.get("config", {})
        floor = cfg.get("ce_floor") if cfg.get("rule", "fdr") == "fdr" else None  # only the default rule has one
        out = []
        for d in dict.fromkeys(self.df["domain"].tolist()):
            g = self.df[self.df["domain"] == d]
            drv = self.drivers(d)
            largest = float(np.nanmax(g["ce_mean"])) if g["ce_mean"].notna().any() else float("nan")
            strongest = [
                {"layer": int(r.layer), "expert": int(r.expert), "ce_mean": float(r.ce_mean),
                 "ce_lo": float(getattr(r, "ce_lo", np.nan)), "ce_hi": float(getattr(r, "ce_hi", np.nan)),
                 "q_value": float(getattr(r, "q_value", np.nan))}
                for r in drv.head(top).itertuples()
            ]
            n_in = int(g["n_inputs"].max()) if len(g) else 0
            if strongest:
                parts = []
                for x in strongest:
                    ci = "" if np.isnan(x["ce_lo"]) else f" [{x['ce_lo']:.3g}, {x['ce_hi']:.3g}]"
                    parts.append(f"layer {x['layer']} expert {x['expert']}: CE {x['ce_mean']:.3g}{ci} nats")
                text = (f"{d}: {len(drv)} driver expert{'s' if len(drv) != 1 else ''} over {n_in} inputs; "
                        f"strongest {'; '.join(parts)}")
            else:
                text = f"{d}: no driver experts (largest mean CE {largest:.3g} nats over {n_in} inputs"
                text += f"; floor {floor:g} nats)" if floor is not None else ")"
            stab = self.settings.get("stability", {}).get(d, {})
            out.append({"domain": d, "n_drivers": len(drv), "n_inputs": n_in, "largest_ce": largest,
                        "ce_floor": floor, "strongest": strongest, "text": text,
                        "stability": stab.get("text"), "inputs_needed": stab.get("inputs_needed"),
                        "expected_jaccard": stab.get("expected_jaccard")})
        return out

    def save(self, path: str | Path) -> None:
        write_table(path, self.df, meta={"table": "driver_experts", "version": TABLE_VERSION, **self.settings})

    @classmethod
    def load(cls, path: str | Path) -> DriverTable:
        df, meta = read_table(path)
        return cls(df, meta)


def paired_median_test(ce: np.ndarray) -> np.ndarray:
    """One-sided Wilcoxon signed-rank p-values that an expert's CE exceeds its layer's median, per input.

    ``ce`` ``(N, L, E)`` CE per input (NaN: not computed). For each (l, i), the differences
    ``CE_{l,i}(X) - median_j CE_{l,j}(X)`` over the N inputs are tested for a positive location
    (:func:`expertscope.causal.stability.signed_rank_greater`: zero differences ranked and split half to each
    side, mid-ranks for ties, tie-corrected normal approximation). Returns ``(L, E)``: 1 where every
    difference is 0, NaN where the expert was not computed.
    """
    N, L, E = ce.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(ce, axis=2, keepdims=True)
    return signed_rank_greater((ce - med).reshape(N, L * E)).reshape(L, E)


def bootstrap_mean_ci(x: np.ndarray, n_boot: int, ci: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean over axis 0: :func:`expertscope.stats.rules.bootstrap_ci` (kept
    under this name for callers of the first version)."""
    return bootstrap_ci(x, n_boot, ci, rng)


def driver_experts(effects: CausalEffects, config: DriverConfig | None = None, **overrides: Any) -> DriverTable:
    """Flag driver experts per (domain, layer) from the per-input CE of ``effects``.

    ``rule="fdr"`` (default) needs all three (columns ``pass_test``, ``pass_ratio``, ``pass_floor``): the
    paired one-sided Wilcoxon test of ``CE_{l,i}(X)`` against the median CE of layer l's experts on the same
    input, BH over the domain's L·E computed cells, ``q <= alpha``; ``ce_mean >= min_ratio × layer_median``;
    ``ce_mean >= ce_floor`` nats. ``rule="z"`` (the first version): ``ce_mean >= layer_mean + z·layer_sd``
    (ddof=0, ``layer_sd > 0``); capped: among E values the largest z is sqrt(E-1) and at most E/(1+z²)
    experts can reach z (E = 8, z = 2: at most one per layer). ``rule="top"``: the ``top`` largest of each
    layer. ``config`` or keyword overrides of :class:`DriverConfig` (both at once must agree).
    Every row carries a bootstrap CI of its mean CE; :meth:`DriverTable.summary` says per domain what was
    found or that nothing was.
    """
    from ..validation import check_type

    check_type(effects, CausalEffects, "effects", "CausalEffects (es.causal_effects(...) or CausalEffects.load)")
    cfg = resolve_config(DriverConfig, config, overrides)
    df = effects.mean_by_domain()
    noise = effects.settings.get("numerical_floor") or {}
    # The floor per layer: the rule's, raised to the dtype's rounding level where that is higher.
    floor = np.array([[max(cfg.ce_floor, float((noise.get("per_layer") or {}).get(str(la),
                                                (noise.get("per_layer") or {}).get(la, 0.0))))]
                      for la in effects.layers])  # (L, 1)
    rng = np.random.default_rng(cfg.seed)
    L, E = len(effects.layers), effects.num_experts
    parts = []
    stability: dict[str, dict[str, Any]] = {}
    for d in effects.domains:
        x = effects.ce[effects.domain == d]  # (N_D, L, E)
        g = df[df["domain"] == d].copy()  # rows in (layer, expert) order, as mean_by_domain builds them
        if cfg.ce_decimals is not None:
            # Decide on CE rounded to a stated precision: differences far below it (the torch thread count
            # changes CE by < 1e-12 nats) then cannot reorder ranks or cross a bar.
            x = np.round(x, cfg.ce_decimals)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: experts not asked for
                g["ce_mean"] = np.nanmean(x, axis=0).ravel()
                g["ce_sd"] = np.nanstd(x, axis=0).ravel()
        vals = g["ce_mean"].to_numpy().reshape(L, E)
        ok = ~np.isnan(vals)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # layers with no computed expert
            mu = np.nanmean(vals, axis=1, keepdims=True)
            sd = np.nanstd(vals, axis=1, keepdims=True)
            med = np.nanmedian(vals, axis=1, keepdims=True)
        p = paired_median_test(x)
        q = bh_qvalues(p)
        pass_test = q <= cfg.alpha
        pass_ratio = ok & (vals >= cfg.min_ratio * med)
        pass_floor = ok & (vals >= floor)
        freq = np.full((L, E), np.nan)
        if cfg.rule == "fdr":
            thr = np.maximum(cfg.min_ratio * med, floor)
            is_drv = passes({"test": pass_test, "ratio": pass_ratio, "floor": pass_floor})
            if cfg.stability_pairs > 0:
                freq, stability[d] = _stability(x, cfg, d, floor)
                is_drv = ok & (np.nan_to_num(freq) >= cfg.min_frequency)
        elif cfg.rule == "z":
            thr = mu + cfg.z * sd
            is_drv = ok & (vals >= thr) & (sd > 0)
        else:
            srt = -np.sort(-np.where(ok, vals, -np.inf), axis=1)
            thr = srt[:, min(cfg.top, E) - 1 : min(cfg.top, E)]
            is_drv = ok & (vals >= thr) & (vals > 0)
        lo, hi = bootstrap_ci(x.reshape(len(x), L * E), cfg.n_boot, cfg.ci, rng)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(med > 0, vals / np.where(med > 0, med, 1.0), np.where(vals > 0, np.inf, np.nan))
        cols = {
            "ce_lo": lo, "ce_hi": hi, "layer_mean": np.broadcast_to(mu, (L, E)),
            "layer_sd": np.broadcast_to(sd, (L, E)),
            "layer_median": np.broadcast_to(med, (L, E)), "ratio": ratio, "p_value": p, "q_value": q,
            "threshold": np.broadcast_to(thr, (L, E)), "pass_test": pass_test, "pass_ratio": pass_ratio,
            "pass_floor": pass_floor, "frequency": freq, "is_driver": is_drv,
        }
        for k, v in cols.items():
            g[k] = np.asarray(v).ravel()
        g["rank"] = g.groupby("layer")["ce_mean"].rank(ascending=False, method="min").astype("Int64")
        parts.append(g)
    out = pd.concat(parts, ignore_index=True)
    cols_out = ["domain", "layer", "expert", "ce_mean", "ce_lo", "ce_hi", "ce_sd", "n_inputs", "layer_median",
                "layer_mean", "layer_sd", "ratio", "p_value", "q_value", "threshold", "pass_test", "pass_ratio",
                "pass_floor", "frequency", "is_driver", "rank", "exact"]
    if cfg.rule == "fdr":
        text = rule_text(
            bh_text(cfg.alpha, L * E, "a one-sided Wilcoxon signed-rank test of CE against the layer's median CE "
                    "on the same input (per domain)"),
            f"CE(D) >= {cfg.min_ratio} x the layer's median CE(D)", f"CE(D) >= {cfg.ce_floor:g} nats")
        if cfg.stability_pairs > 0:
            text = (f"flagged in >= {cfg.min_frequency:.0%} of {2 * cfg.stability_pairs} half-samples of the inputs "
                    f"(stability selection) by: {text}")
    elif cfg.rule == "z":
        text = z_rule_text("CE(D)", E, cfg.z)
    else:
        text = f"the {cfg.top} largest CE(D) of each layer"
    settings = {
        "numerical_floor": {**noise, "note": floor_note(noise, cfg.ce_floor)} if noise else None,
        "rule": cfg.rule, "config": cfg.to_dict(), "z": cfg.z if cfg.rule == "z" else None,
        "top": cfg.top if cfg.rule == "top" else None, "rule_text": text,
        "causal_effects": effects.settings, "stability": stability,
    }
    table = DriverTable(out[cols_out], settings)
    table.settings["summary"] = [{k: v for k, v in r.items() if k != "strongest"} for r in table.summary()]
    return table


def _stability(x: np.ndarray, cfg: DriverConfig, domain: str, floor: np.ndarray | float | None = None
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Selection frequencies ``(L, E)`` of one domain's CE ``x`` ``(N, L, E)`` and what the findings say of
    them: the false-driver bound, the expected Jaccard of two half-samples, and its curve over smaller samples
    (half-samples of N/8, N/4, N/2) with the inputs it suggests would make the set stable."""
    rng = np.random.default_rng(domain_seed(cfg.seed, domain))
    args = (cfg.stability_pairs, cfg.alpha, cfg.min_ratio, cfg.ce_floor if floor is None else floor)
    main: Stability = selection_frequency(x, *args, rng=rng)
    curve = []
    for size in (len(x) // 8, len(x) // 4):
        if size >= 4:
            curve.append((size, selection_frequency(x, *args, rng=rng, size=size).expected_jaccard()))
    curve.append((main.half_size, main.expected_jaccard()))
    needed = inputs_for_stability(curve)
    info = {"n_inputs": len(x), "half_size": main.half_size, "n_samples": main.n_samples,
            "mean_selected": main.mean_selected, "n_cells": main.n_cells,
            "false_bound": main.false_bound(cfg.min_frequency), "expected_jaccard": main.expected_jaccard(),
            "curve": [[int(m), float(j)] for m, j in curve], "inputs_needed": needed}
    info["text"] = stability_text(domain, info)
    return main.frequency, info


def stability_text(domain: str, info: Mapping[str, Any]) -> str:
    """One sentence: is ``domain``'s driver set stable at its sample size, and roughly how many inputs would
    make it so (from the expected Jaccard of the rule on two half-samples, ``info`` of :func:`_stability`)."""
    n, m, j = info["n_inputs"], info["half_size"], info["expected_jaccard"]
    bound = f"; at most {info['false_bound']:.2g} false drivers expected (Meinshausen-Buhlmann bound)"
    if is_stable(j) is None:
        return f"{domain}: no expert is flagged in any half-sample of {m} of its {n} inputs"
    head = f"two half-samples of {m} inputs flag sets with Jaccard {j:.2f} expected"
    if is_stable(j):
        return f"{domain}: the driver set is stable at {n} inputs ({head}){bound}"
    need = info.get("inputs_needed")
    sizes = ", ".join(str(int(s)) for s, _ in info["curve"])
    if need is None:
        tail = f"the expected Jaccard does not rise over half-samples of {sizes}: more inputs alone may not settle it"
    elif not np.isfinite(need):
        tail = f"the trend over half-samples of {sizes} suggests more than {16 * n} inputs"
    else:
        tail = f"the trend over half-samples of {sizes} suggests about {int(need)} inputs"
    return f"{domain}: the driver set is not yet stable at {n} inputs ({head}); {tail}{bound}"


# ----- replication ---------------------------------------------------------------------------------
def subset_effects(effects: CausalEffects, keep: np.ndarray) -> CausalEffects:
    """The inputs of ``effects`` where ``keep`` ``(N,)`` is True (layers, exact mask and settings kept)."""
    exact = effects.exact if effects.exact.ndim == 2 else effects.exact[keep]
    return CausalEffects(ce=effects.ce[keep], domain=effects.domain[keep], text_index=effects.text_index[keep],
                         layers=list(effects.layers), exact=exact, settings=dict(effects.settings))


def replicate_drivers(
    effects: CausalEffects, texts: Any = None, config: DriverConfig | None = None, seed: int = 0,
    full: pd.DataFrame | None = None, **overrides: Any,
) -> Replication:
    """Driver experts (:func:`driver_experts`, same ``config``/overrides) on all inputs of ``effects`` and on
    two disjoint halves of each domain's inputs, split by a seeded hash of their texts
    (:func:`expertscope.stats.replication.split_halves`).

    ``texts``: ``{domain: texts}`` or the perturbed domains, indexed like ``effects.text_index`` (without
    them the split hashes the input index). ``full``: the driver table of all inputs already computed (rows
    with ``domain, layer, expert, is_driver``); computed when None. Returns a
    :class:`~expertscope.stats.replication.Replication` of kind ``"driver"``: each expert flagged on all
    inputs or on either half with its status in the halves (both / one / neither), and per domain the
    halves' Jaccard.
    """
    half = halves_by_domain(effects.domain, effects.text_index, texts, seed)
    tables = [driver_experts(subset_effects(effects, half == h), config, **overrides) for h in (0, 1)]
    full_df = driver_experts(effects, config, **overrides).df if full is None else full
    df, summary = compare_sets("driver", flagged_sets(full_df, "is_driver"),
                               [flagged_sets(t.df, "is_driver") for t in tables], half_sizes(effects.domain, half))
    settings = {"driver": {"split_seed": seed, "rule_text": tables[0].settings.get("rule_text", ""),
                           "config": tables[0].settings.get("config", {}),
                           "hashed": "index" if texts is None else "text"}}
    return Replication(df, summary, settings)


# ----- causal rate ---------------------------------------------------------------------------------
def causal_rate_from_selections(
    selections: Mapping[int, np.ndarray | torch.Tensor], drivers: Mapping[int, Iterable[int]]
) -> dict[int, tuple[int, int]]:
    """Per layer ``(tokens whose selected set holds >= 1 driver, tokens)``.

    ``selections[layer]`` ``(N, k)`` the selected expert ids of N real tokens; ``drivers[layer]`` the driver
    experts of that layer (missing or empty: none).
    """
    out = {}
    for layer, sel in selections.items():
        s = np.asarray(sel.cpu() if isinstance(sel, torch.Tensor) else sel)
        d = np.fromiter(drivers.get(layer, ()), dtype=np.int64)
        hit = np.isin(s, d).any(axis=1) if s.size else np.zeros(0, bool)
        out[layer] = (int(hit.sum()), int(s.shape[0]))
    return out


def causal_rate(
    model: MoEModel,
    domains: DomainInput,
    drivers: DriverTable | pd.DataFrame,
    batch_size: int = 8,
    max_length: int | None = 512,
    limit: int | None = None,
) -> pd.DataFrame:
    """Causal rate per (domain, layer) from one routing pass over each domain's texts.

    Returns ``domain, layer, n_tokens, n_driver_tokens, causal_rate, n_drivers, drivers``; a domain's drivers
    are those of ``drivers`` with the same domain name (a layer without drivers has rate 0).
    """
    from ..validation import check_type

    check_type(model, MoEModel, "model", "an MoEModel (es.load_model(...))")
    check_type(getattr(drivers, "df", drivers), pd.DataFrame, "drivers", "a DriverTable (es.driver_experts(...))")
    table = drivers if isinstance(drivers, DriverTable) else DriverTable(drivers)
    texts_by_domain = domain_texts(domains, limit)
    known = set(table.df["domain"])
    drv = {name: table.by_layer(name) if name in known else {} for name in texts_by_domain}
    counts = {name: {layer: [0, 0] for layer in model.layers} for name in texts_by_domain}
    for routed in routing_pass(model, texts_by_domain, batch_size, max_length):
        real = routed.real()
        sel = {layer: call.indices[real] for layer, call in routed.calls.items()}
        for layer, (hit, n) in causal_rate_from_selections(sel, drv[routed.domain]).items():
            counts[routed.domain][layer][0] += hit
            counts[routed.domain][layer][1] += n
    rows = []
    for name in texts_by_domain:
        for layer in model.layers:
            hit, n = counts[name][layer]
            ds = sorted(drv[name].get(layer, set()))
            rows.append({"domain": name, "layer": layer, "n_tokens": n, "n_driver_tokens": hit,
                         "causal_rate": hit / n if n else float("nan"), "n_drivers": len(ds),
                         "drivers": ",".join(map(str, ds))})
    return pd.DataFrame(rows)


def spearman_by_layer(a: CausalEffects, b: CausalEffects) -> pd.DataFrame:
    """Spearman rank correlation of domain-mean CE between two results, per (domain, layer)."""
    from scipy.stats import spearmanr

    ma, mb = a.mean_by_domain(), b.mean_by_domain()
    m = ma.merge(mb, on=["domain", "layer", "expert"], suffixes=("_a", "_b"))
    rows = []
    for (d, layer), g in m.groupby(["domain", "layer"], sort=False):
        x, y = g["ce_mean_a"].to_numpy(), g["ce_mean_b"].to_numpy()
        ok = ~(np.isnan(x) | np.isnan(y))
        rho = spearmanr(x[ok], y[ok]).statistic if ok.sum() > 2 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0 \
            else float("nan")
        rows.append({"domain": d, "layer": int(layer), "spearman": float(rho), "n_experts": int(ok.sum())})
    return pd.DataFrame(rows)


__all__: Sequence[str] = ("DriverTable", "bootstrap_mean_ci", "causal_rate", "causal_rate_from_selections",
                          "driver_experts", "paired_median_test", "replicate_drivers", "spearman_by_layer",
                          "subset_effects")
