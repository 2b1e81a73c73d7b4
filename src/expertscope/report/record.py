"""What a run found, per domain, as data: the versioned findings record the report opens with.

:func:`findings` reads a run's tables (as :func:`expertscope.report.html.load_tables` returns them) and returns
one :class:`DomainFindings` per domain: the domain and driver experts that pass their rules, the strongest of
each with its interval, the causal-rate peak, the steering changes, the calibrated verdicts beyond controls,
the selectivity and the replication. Where nothing passes, it keeps the sample size and the smallest effect
the rules could have flagged, so that :mod:`.sentences` can say a null as a statement.
:func:`findings_record` is the same as JSON (``findings.json``); :func:`beyond_findings` the co-activation,
path, consistency, importance and routing-overlap findings. Definitions: docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..stats.rules import REPLICATES, is_stable, spearman_ci

#: 2: calibrated verdicts (the control a verdict beat, set and item tests, the run's number of tests), the
#: domain's fragility, displaced experts and the selectivity verdict with its reason.
FINDINGS_VERSION = 2

#: Accuracy at or above this on the unsteered model marks a task as saturated: steering can hardly move it.
SATURATED = 0.95

@dataclass
class DomainFindings:
    """The findings of one domain. Effect lists hold dicts with ``layer``, ``expert`` and the effect's size
    and interval; ``None`` marks a quantity the run did not measure."""

    domain: str
    n_sequences: int | None = None
    n_tokens: int | None = None
    domain_rule: str = ""
    n_domain_experts: int | None = None
    domain_experts: list[dict[str, Any]] = field(default_factory=list)
    activation_halfwidth: float | None = None
    driver_rule: str = ""
    n_inputs: int | None = None
    n_drivers: int | None = None
    drivers: list[dict[str, Any]] = field(default_factory=list)
    largest_ce: float | None = None
    ce_floor: float | None = None
    ce_noise: float | None = None
    """The CE rounding alone gives in the model's dtype (the numerical floor; None: not measured)."""
    ce_noise_dtype: str | None = None
    numerical_floor: str | None = None
    """The numerical floor in words: its size beside the rule's floor, and the layers where it was raised."""
    detectable_ce: float | None = None
    detectable_ce_by_layer: dict[int, float] = field(default_factory=dict)
    driver_stability: str | None = None
    driver_stable: bool | None = None
    """The driver set is stable at this sample size (None: not measured, or no expert ever flagged)."""
    driver_inputs_needed: float | None = None
    causal_rate_peak: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    saturated: bool = False
    steering_changes: list[dict[str, Any]] = field(default_factory=list)
    steering_null: list[str] = field(default_factory=list)
    not_applicable: list[dict[str, str]] = field(default_factory=list)
    domain_replication: dict[str, Any] | None = None
    driver_replication: dict[str, Any] | None = None
    controls: list[dict[str, Any]] = field(default_factory=list)
    fragility: list[dict[str, Any]] = field(default_factory=list)
    up_lowers: list[dict[str, Any]] = field(default_factory=list)
    selectivity: list[dict[str, Any]] = field(default_factory=list)
    displaced: list[dict[str, Any]] = field(default_factory=list)
    overlap: int = 0
    """Confirmation or training items that were also discovery items (a run with --allow-overlap)."""

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

def _clean(x: Any) -> Any:
    """JSON-ready: NaN → None, numpy scalars → Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x

def table_meta(df: pd.DataFrame | None) -> dict[str, Any]:
    """The settings a table was saved with (rule text, config), as :func:`~expertscope.report.html.load_tables`
    attaches them to ``df.attrs["meta"]``; ``{}`` when absent."""
    return dict(df.attrs.get("meta") or {}) if df is not None else {}

def _f(row: Any, name: str) -> float:
    v = row.get(name, float("nan")) if isinstance(row, dict | pd.Series) else getattr(row, name, float("nan"))
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")

def _flag(df: pd.DataFrame, column: str) -> pd.Series:
    return df[column].fillna(False).astype(bool) if column in df.columns else pd.Series(False, index=df.index)

def _domain_part(f: DomainFindings, g: pd.DataFrame, meta: dict[str, Any], top: int | None) -> None:
    f.domain_rule = str(meta.get("rule_text", ""))
    if "n_sequences" in g.columns and len(g):
        f.n_sequences = int(g["n_sequences"].iloc[0])
    if "n_tokens" in g.columns and len(g):
        f.n_tokens = int(g["n_tokens"].iloc[0])
    flagged = g[_flag(g, "is_domain_expert")]
    f.n_domain_experts = len(flagged)
    key = "lift" if "lift" in g.columns else "specificity"
    for r in flagged.sort_values(key, ascending=False).head(top).to_dict("records"):  # top None: all
        f.domain_experts.append({
            "layer": int(r["layer"]), "expert": int(r["expert"]), "activation_rate": _f(r, "activation_rate"),
            "lift": _f(r, "lift"), "lift_lo": _f(r, "lift_lo"), "lift_hi": _f(r, "lift_hi"),
            "q_value": _f(r, "q_value"), "cwas": _f(r, "cwas"),
        })
    for r in g[_flag(g, "is_displaced")].to_dict("records"):
        f.displaced.append({"layer": int(r["layer"]), "expert": int(r["expert"]),
                            "activation_rate": _f(r, "activation_rate"), "uniform_rate": _f(r, "uniform_rate"),
                            "lift": _f(r, "lift"), "layer_median_lift": _f(r, "layer_median_lift")})
    if {"A_lo", "A_hi"} <= set(g.columns):
        half = ((g["A_hi"] - g["A_lo"]) / 2).dropna()
        f.activation_halfwidth = float(half.median()) if len(half) else None

def _driver_part(f: DomainFindings, g: pd.DataFrame, meta: dict[str, Any], top: int | None) -> None:
    f.driver_rule = str(meta.get("rule_text", ""))
    g = g.dropna(subset=["ce_mean"])
    if not len(g):
        return
    if "n_inputs" in g.columns:
        f.n_inputs = int(g["n_inputs"].iloc[0])
    flagged = g[_flag(g, "is_driver")]
    f.n_drivers = len(flagged)
    f.largest_ce = float(g["ce_mean"].max())
    floor = meta.get("ce_floor", (meta.get("config") or {}).get("ce_floor"))
    f.ce_floor = float(floor) if floor is not None else None
    noise = meta.get("numerical_floor")
    if isinstance(noise, dict) and noise.get("note"):
        f.ce_noise, f.ce_noise_dtype = float(noise.get("max", 0.0)), str(noise.get("dtype", ""))
        f.numerical_floor = str(noise["note"])
    ratio = float((meta.get("config") or {}).get("min_ratio", meta.get("min_ratio", float("nan"))))
    # The driver table's own layer medians and ratios where it has them (what its rule used).
    medians = (g.groupby("layer")["layer_median"].first() if "layer_median" in g.columns
               else g.groupby("layer")["ce_mean"].median())
    if len(medians) and not math.isnan(ratio):
        # The bar each layer sets: max(min_ratio × the layer's median CE, floor) (the table's own threshold
        # where it has one); the smallest of them is the least a driver anywhere could have.
        bars = {int(layer): max(float(m) * ratio, f.ce_floor or 0.0) for layer, m in medians.items()}
        if "threshold" in g.columns and (meta.get("config") or {}).get("rule", "fdr") == "fdr":
            bars = {int(layer): float(t) for layer, t in g.groupby("layer")["threshold"].first().items()}
        f.detectable_ce_by_layer = bars
        f.detectable_ce = min(bars.values())
    for r in flagged.sort_values("ce_mean", ascending=False).head(top).to_dict("records"):
        med = float(medians.get(r["layer"], float("nan")))
        ratio_to_median = _f(r, "ce_mean") / med if med > 0 else float("nan")
        f.drivers.append({
            "layer": int(r["layer"]), "expert": int(r["expert"]), "ce": _f(r, "ce_mean"),
            "ce_lo": _f(r, "ce_lo"), "ce_hi": _f(r, "ce_hi"), "q_value": _f(r, "q_value"),
            "ratio_to_median": _f(r, "ratio") if "ratio" in r else ratio_to_median,
            "frequency": _f(r, "frequency") if "frequency" in r else None,
        })
    stab = (meta.get("stability") or {}).get(f.domain) or {}
    f.driver_stability = stab.get("text")
    f.driver_stable = is_stable(stab.get("expected_jaccard")) if stab else None
    need = stab.get("inputs_needed")
    f.driver_inputs_needed = None if need is None or not math.isfinite(float(need)) else float(need)

def _rate_part(f: DomainFindings, g: pd.DataFrame) -> None:
    g = g.dropna(subset=["causal_rate"])
    if len(g):
        top = g.loc[g["causal_rate"].idxmax()]
        f.causal_rate_peak = {"layer": int(top["layer"]), "causal_rate": float(top["causal_rate"])}

def _applicable(g: pd.DataFrame) -> pd.Series:
    """Rows that measured something: not marked not applicable and with a number."""
    ok = g["accuracy"].notna() if "accuracy" in g.columns else pd.Series(True, index=g.index)
    if "applicable" in g.columns:
        ok &= g["applicable"].fillna(True).astype(bool)
    return ok

def _steering_part(f: DomainFindings, g: pd.DataFrame) -> None:
    base = g[g["condition"] == "original"]
    if len(base):
        b = base.iloc[0]
        f.accuracy = {"accuracy": _f(b, "accuracy"), "ci_low": _f(b, "ci_low"), "ci_high": _f(b, "ci_high"),
                      "n": int(b["n"]) if "n" in g.columns else None}
        # The study's own label (its configured threshold) where the table has one.
        f.saturated = bool(b["saturated"]) if "saturated" in g.columns else _f(b, "accuracy") >= SATURATED
    rest = g[g["condition"] != "original"]
    ok = _applicable(rest)
    for r in rest[~ok].to_dict("records"):
        reason = r.get("note") or r.get("reason") or "no targets"
        f.not_applicable.append({"condition": str(r["condition"]), "reason": str(reason)})
    for r in rest[ok].to_dict("records"):
        lo, hi = _f(r, "delta_lo"), _f(r, "delta_hi")
        if math.isnan(lo) or math.isnan(hi):
            continue
        if lo > 0 or hi < 0:
            f.steering_changes.append({"condition": str(r["condition"]), "delta": _f(r, "delta"),
                                       "delta_lo": lo, "delta_hi": hi})
        else:
            f.steering_null.append(str(r["condition"]))

def findings(tables: dict[str, pd.DataFrame], top: int | None = None) -> list[DomainFindings]:
    """One :class:`DomainFindings` per domain of the run's tables (domain-expert table order). The expert
    lists hold every flagged expert, strongest first (``top``: keep only that many, e.g. for a preview)."""
    dom = tables.get("domain_experts")
    drv = tables.get("drivers")
    rate = tables.get("causal_rate")
    st = tables.get("steering")
    seen: dict[str, None] = {}
    for df in (dom, drv, st, tables.get("steering_dose")):
        if df is not None and "domain" in df.columns:
            seen.update(dict.fromkeys(df["domain"].astype(str)))
    names = list(seen)
    out = []
    for d in names:
        f = DomainFindings(domain=d)
        if dom is not None and len(dom):
            _domain_part(f, dom[dom["domain"].astype(str) == d], table_meta(dom), top)
        if drv is not None and len(drv) and "ce_mean" in drv.columns:
            _driver_part(f, drv[drv["domain"].astype(str) == d], table_meta(drv), top)
        if rate is not None and len(rate) and "causal_rate" in rate.columns:
            _rate_part(f, rate[rate["domain"].astype(str) == d])
        if st is not None and len(st) and "condition" in st.columns:
            _steering_part(f, st[st["domain"].astype(str) == d])
        replication_part(f, tables.get("replication"))
        controls_part(f, tables.get("steering_dose"), tables.get("steering_selectivity"))
        out.append(f)
    return out

def _primary(rows: pd.DataFrame) -> pd.Series | None:
    """The row a kind's verdict rests on: ablation (mask) when measured, else the ↓ strength nearest 1."""
    ok = rows[rows["applicable"].fillna(False).astype(bool)] if "applicable" in rows.columns else rows
    if not len(ok):
        return None
    mask = ok[ok["mode"] == "mask"]
    return mask.iloc[0] if len(mask) else ok.iloc[0]

def controls_part(f: DomainFindings, dose: pd.DataFrame | None, sel: pd.DataFrame | None) -> None:
    """Fill ``f.controls`` (per kind: the primary condition's Δ(target), its verdict controls, the reference
    controls, ``Δ − controls`` with interval, the tests and the calibrated verdict, and which strengths are
    specific), ``f.fragility`` (what steering control sets of those layers costs, per kind at the primary
    strength), ``f.up_lowers`` (scale-up rows where most targeted logits are negative) and ``f.selectivity``
    (the domain's row of the selectivity matrix with its verdict) from the study's dose and selectivity
    tables."""
    if dose is not None and len(dose) and {"kind", "diff_lo"} <= set(dose.columns):
        f.overlap = int((table_meta(dose).get("overlap") or {}).get(f.domain, 0))
        g = dose[dose["domain"].astype(str) == f.domain]
        for kind in ("domain", "driver"):
            rows = g[g["kind"] == kind]
            if not len(rows):
                continue
            p = _primary(rows)
            if p is None:
                reason = str(rows["reason"].iloc[0]) if "reason" in rows.columns else "no targets"
                f.controls.append({"kind": kind, "applicable": False, "reason": reason})
                continue
            measured = rows[rows["applicable"].fillna(False).astype(bool)]
            spec = measured[measured["specific"] == True]  # noqa: E712  (object column: True/False/NaN)
            control = str(p.get("control", "") or "")
            f.controls.append({
                "kind": kind, "applicable": True, "strength": str(p["strength"]), "n": int(p["n"]),
                "n_targets": int(p["n_targets"]), "delta": _f(p, "delta"), "delta_lo": _f(p, "delta_lo"),
                "delta_hi": _f(p, "delta_hi"), "p_exact": _f(p, "p_exact"), "control": control,
                "control_draws": _int(p, "control_draws"), "control_delta": _f(p, "control_delta"),
                "control_delta_min": _f(p, "control_delta_min"), "control_delta_max": _f(p, "control_delta_max"),
                "control_sd": _f(p, "control_sd"), "control_rank": _f(p, "control_rank"),
                "target_activation": _f(p, "target_activation"), "control_activation": _f(p, "control_activation"),
                "reference": str(p.get("reference", "") or ""), "reference_draws": _int(p, "reference_draws"),
                "reference_delta": _f(p, "reference_delta"), "busiest_delta": _f(p, "busiest_delta"),
                "diff": _f(p, "diff"), "diff_lo": _f(p, "diff_lo"), "diff_hi": _f(p, "diff_hi"),
                "t_vs_control": _f(p, "t_vs_control"), "p_set": _f(p, "p_set"), "p_item": _f(p, "p_item"),
                "p_vs_control": _f(p, "p_vs_control"), "q_vs_control": _f(p, "q_vs_control"),
                "n_tests": _int(p, "n_tests"),
                "specific": bool(p["specific"]) if p["specific"] == p["specific"] else None,
                "control_reason": str(p.get("control_reason", "") or ""),
                "specific_at": [{"strength": str(r["strength"]), "delta": _f(r, "delta"), "diff": _f(r, "diff"),
                                 "diff_lo": _f(r, "diff_lo"), "diff_hi": _f(r, "diff_hi"),
                                 "q_vs_control": _f(r, "q_vs_control")} for r in spec.to_dict("records")],
                "strengths": [str(x) for x in measured["strength"]],
            })
            f.fragility.append({"kind": kind, "strength": str(p["strength"]), "n_targets": int(p["n_targets"]),
                                "control": control, "control_draws": _int(p, "control_draws"),
                                "control_delta": _f(p, "control_delta"),
                                "control_delta_min": _f(p, "control_delta_min"),
                                "control_delta_max": _f(p, "control_delta_max"),
                                "reference": str(p.get("reference", "") or ""),
                                "reference_draws": _int(p, "reference_draws"),
                                "reference_delta": _f(p, "reference_delta")})
            up = measured[(measured["mode"] == "scale") & (measured["scale"] > 1)]
            for r in up.to_dict("records"):
                if _f(r, "negative_share") > 0.5:
                    f.up_lowers.append({"kind": kind, "strength": str(r["strength"]),
                                        "negative_share": _f(r, "negative_share")})
    if sel is not None and len(sel) and "ablated" in sel.columns:
        for kind in ("domain", "driver"):
            g = sel[(sel["kind"] == kind) & (sel["ablated"].astype(str) == f.domain)]
            if not len(g):
                continue
            cells: list[dict[str, Any]] = [
                {"evaluated": str(r["evaluated"]), "delta": _f(r, "delta"), "delta_lo": _f(r, "delta_lo"),
                 "delta_hi": _f(r, "delta_hi"), "norm_delta": _f(r, "norm_delta"), "norm_lo": _f(r, "norm_lo"),
                 "norm_hi": _f(r, "norm_hi"), "gap": _f(r, "gap"), "gap_lo": _f(r, "gap_lo"),
                 "gap_hi": _f(r, "gap_hi")} for r in g.to_dict("records")]
            verdict = g["selective"].iloc[0] if "selective" in g.columns else None
            selective = None if verdict is None or verdict != verdict else bool(verdict)
            dissociated = []
            for c in cells:  # double dissociation: both sets selective for their own domains
                back = sel[(sel["kind"] == kind) & (sel["ablated"].astype(str) == c["evaluated"])]
                if selective and c["evaluated"] != f.domain and len(back) and back["selective"].iloc[0] == True:  # noqa: E712
                    dissociated.append(c["evaluated"])
            f.selectivity.append({"kind": kind, "cells": cells, "selective": selective,
                                  "reason": str(g["selective_reason"].iloc[0]) if "selective_reason" in g.columns
                                  else "", "double_dissociation": dissociated})

def _int(row: Any, name: str) -> int:
    v = _f(row, name)
    return 0 if math.isnan(v) else int(v)

def findings_record(tables: dict[str, pd.DataFrame], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The versioned findings record saved beside the report (``findings.json``)."""
    model = (manifest or {}).get("model")
    return {
        "version": FINDINGS_VERSION,
        "model": model.get("source") if isinstance(model, dict) else None,
        "domains": [f.to_dict() for f in findings(tables)],
        "beyond": beyond_findings(tables),
        "confirmation": confirmation_findings(tables.get("confirmation")),
    }


def confirmed_counts(conf: pd.DataFrame | None, domain: str | None = None) -> list[tuple[str, int, int]]:
    """Per corpus, in the table's order: ``(corpus, predictions confirmed, predictions testable)`` of one domain
    (or all); a prediction is testable unless its outcome is ``not measured``."""
    if conf is None or not len(conf):
        return []
    g = conf if domain is None else conf[conf["domain"].astype(str) == domain]
    out = []
    for corpus, h in g.groupby("corpus", sort=False):
        tested = h[h["outcome"] != "not measured"]
        out.append((str(corpus), int((tested["outcome"] == "confirmed").sum()), len(tested)))
    return out


def confirmed_cell(conf: pd.DataFrame | None, domain: str) -> str:
    """``"2/8; 0/6"``: a domain's confirmed of testable predictions per corpus (``"–"`` when none)."""
    return "; ".join(f"{c}/{n}" for _, c, n in confirmed_counts(conf, domain)) or "–"


def stable_cell(f: DomainFindings, long: bool = False) -> str:
    """Is the domain's driver set stable (``"yes"``), or not with the inputs the power estimate asks for."""
    if f.driver_stable is None:
        return "–"
    if f.driver_stable:
        return "stable" if long else "yes"
    need = f.driver_inputs_needed
    if need is None:
        return "not stable" if long else "no"
    return f"not stable; ~{need:.0f} inputs" if long else f"no (~{need:.0f})"


def confirmation_findings(conf: pd.DataFrame | None) -> dict[str, Any] | None:
    """The confirmation table in the findings: the hypotheses' hash, the outcome counts per corpus, and every row
    (pre-registered against observed); None when the run has none."""
    if conf is None:
        return None
    counts = {str(c): {str(k): int(v) for k, v in g["outcome"].value_counts().items()}
              for c, g in conf.groupby("corpus", sort=False)}
    return {"hypotheses_hash": table_meta(conf).get("hypotheses_hash"), "outcomes": counts,
            "rows": _clean(conf.to_dict("records"))}

# ----- replication -----------------------------------------------------------------------------------------

def replication_part(f: DomainFindings, rep: pd.DataFrame | None) -> None:
    """Each listed expert's status in the two halves (``halves``: both / one / neither, or None when the run
    has no replication table) and, per rule, the halves' Jaccard and the experts found in both."""
    if rep is None or "kind" not in rep.columns:
        return
    summary = pd.DataFrame(table_meta(rep).get("summary") or [])
    for kind, listed, attr in (("domain", f.domain_experts, "domain_replication"),
                               ("driver", f.drivers, "driver_replication")):
        g = rep[(rep["kind"] == kind) & (rep["domain"].astype(str) == f.domain)]
        s = summary[(summary["kind"] == kind) & (summary["domain"].astype(str) == f.domain)] if len(summary) \
            else summary
        if not len(s):
            continue
        row = s.iloc[0]
        status = {(int(r.layer), int(r.expert)): str(r.status) for r in g.itertuples()}
        for e in listed:
            e["halves"] = status.get((e["layer"], e["expert"]), "neither")
        full = g[g["in_full"].astype(bool)]
        setattr(f, attr, {
            "jaccard": _f(row, "jaccard"), "n_inputs_a": int(row["n_inputs_a"]), "n_inputs_b": int(row["n_inputs_b"]),
            "n_half_a": int(row["n_half_a"]), "n_half_b": int(row["n_half_b"]), "n_both": int(row["n_both"]),
            "replicated": [{"layer": int(r.layer), "expert": int(r.expert)} for r in full.itertuples()
                           if r.status == "both"],
            "not_replicated": [{"layer": int(r.layer), "expert": int(r.expert), "halves": str(r.status)}
                               for r in full.itertuples() if r.status != "both"],
        })

# ----- beyond the paper: co-activation, paths, consistency, importance, routing overlap ---------------------
#: A pair (a, b) is read out only when at least this many tokens select both (lift from a handful is noise).
MIN_PAIR_COUNT = 20

def beyond_findings(tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """The co-activation, path, consistency, importance and routing-overlap findings as data (per domain
    where it applies); parts whose tables are missing are left out."""
    out: dict[str, Any] = {}
    co = tables.get("coactivation")
    if co is not None and len(co):
        strong = co[(co["count"] >= MIN_PAIR_COUNT) & np.isfinite(co["lift"])]
        pairs = {}
        for d, g in strong.groupby("domain", sort=False):
            r = g.loc[g["lift"].idxmax()]
            pairs[str(d)] = {"layer": int(r["layer"]), "a": int(r["expert_a"]), "b": int(r["expert_b"]),
                             "p_b_given_a": float(r["p_b_given_a"]), "p_b": float(r["p_b"]),
                             "lift": float(r["lift"]), "n_a": int(r["n_a"]), "count": int(r["count"])}
        out["coactivation"] = {"min_count": MIN_PAIR_COUNT, "strongest": pairs}
    paths = tables.get("paths")
    if paths is not None and len(paths):
        meta = table_meta(paths)
        E = meta.get("num_experts")
        m = meta.get("path_length")
        top = paths[paths["rank"] == 1]
        out["paths"] = {"uniform_share": (float(E) ** -float(m)) if E and m else None,
                        "top": {str(r.domain) + "/" + str(r.layers): {"path": r.path, "share": float(r.share),
                                                                       "count": int(r.count)}
                                for r in top.itertuples()}}
    cons = tables.get("routing_consistency")
    if cons is not None and len(cons):
        E = table_meta(cons).get("num_experts") or table_meta(tables.get("paths")).get("num_experts")
        rows = {}
        for r in cons.itertuples():
            floor = ((E - 1) ** 2 / (2 * r.n_tokens * math.log(2))) if E and r.n_tokens else float("nan")
            rows[f"{r.domain}/{r.layer}>{r.next_layer}"] = {"mi_bits": float(r.mi_bits), "mi_norm": float(r.mi_norm),
                                                             "bias_floor_bits": float(floor)}
        out["consistency"] = rows
    imp = tables.get("importance")
    if imp is not None and len(imp) and imp["importance"].notna().any():
        drivers = tables.get("drivers")
        per: dict[str, Any] = {}
        for d, g in imp.groupby("domain", sort=False):
            x = g["importance"].to_numpy(float)
            rec: dict[str, Any] = {}
            rho, lo, hi, n = spearman_ci(x, g["activation_rate"].to_numpy(float))
            rec["vs_A"] = {"rho": rho, "ci_low": lo, "ci_high": hi, "n": n}
            if drivers is not None and {"ce_mean", "domain", "layer", "expert"} <= set(drivers.columns):
                j = g.merge(drivers[drivers["domain"] == d][["layer", "expert", "ce_mean"]], on=["layer", "expert"])
                rho, lo, hi, n = spearman_ci(j["importance"].to_numpy(float), j["ce_mean"].to_numpy(float))
                rec["vs_CE"] = {"rho": rho, "ci_low": lo, "ci_high": hi, "n": n}
            per[str(d)] = rec
        out["importance"] = per
    elif imp is not None and len(imp):
        out["importance"] = {"not_applicable": (table_meta(imp).get("not_applicable") or {}).get(
            "importance", "not computed in this run")}
    ov = tables.get("routing_overlap")
    if ov is not None and len(ov):
        moved: dict[str, dict[str, Any]] = {}
        for (d, c), g in ov.groupby(["domain", "condition"], sort=False):
            if not bool(g["applicable"].iloc[0]):
                moved[f"{d}/{c}"] = {"applicable": False, "reason": str(g["reason"].iloc[0])}
                continue
            low = g.loc[g["overlap"].idxmin()]
            moved[f"{d}/{c}"] = {"applicable": True, "mean_overlap": float(g["overlap"].mean()),
                                "lowest_layer": int(low["layer"]), "lowest": float(low["overlap"]),
                                "ci_low": float(low["ci_low"]), "ci_high": float(low["ci_high"]),
                                "n_tokens": int(low["n_tokens"])}
        out["routing_overlap"] = moved
    return _clean(out)


__all__ = ["FINDINGS_VERSION", "MIN_PAIR_COUNT", "REPLICATES", "SATURATED", "DomainFindings", "beyond_findings",
           "controls_part", "findings", "findings_record", "replication_part", "table_meta"]
