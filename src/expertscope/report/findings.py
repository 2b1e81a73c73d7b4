"""What a run found, per domain, in words and numbers: the record the report opens with.

:func:`findings` reads a run's tables (as :func:`expertscope.report.html.load_tables` returns them) and
returns one :class:`DomainFindings` per domain: the domain and driver experts that pass their rules, the
strongest of each with its interval, the causal-rate peak and the steering changes whose interval excludes
zero. Where nothing passes, it says so with the sample size and the smallest effect the rules could have
flagged, so a null is a statement, not an empty table. :func:`sentences` turns a record into plain lines.

Every sentence of the report lives here; :mod:`.html` only lays them out. Besides the findings record:
``read_<section>(table)`` gives a section's reading as :class:`Sentence` values (each names the domain it is
about, so the report's domain selector can show or hide it), :data:`CAPTIONS` the figure captions and
:func:`run_status` / :func:`status_sentence` the banner of a run that did not finish. Definitions:
docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..interventions.study import CONTROL_NAMES

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
    detectable_ce: float | None = None
    detectable_ce_by_layer: dict[int, float] = field(default_factory=dict)
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
        })


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


def _n(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    v = float(x)
    return f"{v:.{digits}g}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.{digits}f}"


def _ci(lo: float, hi: float, digits: int = 3) -> str:
    return "" if math.isnan(lo) or math.isnan(hi) else f" [{_n(lo, digits)}, {_n(hi, digits)}]"


def sentences(f: DomainFindings) -> list[str]:
    """The findings of one domain as plain sentences: what was found, then what was not, with sizes."""
    out: list[str] = []
    size = []
    if f.n_sequences is not None:
        size.append(f"{f.n_sequences} texts ({f.n_tokens} tokens) profiled")
    if f.n_inputs is not None:
        size.append(f"{f.n_inputs} inputs perturbed")
    if size:
        out.append("Sample: " + "; ".join(size) + ".")
    if f.n_domain_experts:
        best = "; ".join(
            f"layer {e['layer']} expert {e['expert']}: lift {_n(e['lift'], 2)}{_ci(e['lift_lo'], e['lift_hi'], 2)}, "
            f"activation {_n(e['activation_rate'])}, q = {_n(e['q_value'], 2)}" for e in f.domain_experts[:SHOWN])
        out.append(f"{f.n_domain_experts} domain expert(s). {_strongest(len(f.domain_experts))}: {best}.")
    elif f.n_domain_experts == 0:
        hw = (f" Activation rates are known to ±{_n(f.activation_halfwidth, 2)} (median 95% CI half-width), so "
              "differences smaller than that, or lifts below the rule's minimum, could not be flagged."
              if f.activation_halfwidth is not None else "")
        out.append(f"No domain experts: no expert passes the rule ({f.domain_rule or 'see settings'}).{hw}")
    if f.displaced:
        which = "; ".join(f"layer {e['layer']} expert {e['expert']} (A {_n(e['activation_rate'])} against a uniform "
                          f"{_n(e['uniform_rate'])}, lift {_n(e['lift'], 2)} against the layer's median "
                          f"{_n(e['layer_median_lift'], 2)})" for e in f.displaced)
        out.append(f"Displaced, not preferred: {which}. Each passes the significance, uniform and lift criteria, "
                   "but its lift comes from the other domains' own experts taking its slots, not from use in "
                   "this domain, so it is not counted as a domain expert.")
    if f.n_drivers:
        best = "; ".join(
            f"layer {e['layer']} expert {e['expert']}: CE {_n(e['ce'])}{_ci(e['ce_lo'], e['ce_hi'])} nats "
            f"({_n(e['ratio_to_median'], 2)}× its layer's median)" for e in f.drivers[:SHOWN])
        out.append(f"{f.n_drivers} driver expert(s). {_strongest(len(f.drivers))}: {best}.")
    elif f.n_drivers == 0:
        floor = f"; the floor is {_n(f.ce_floor)} nats" if f.ce_floor is not None else ""
        bars = ", ".join(f"layer {layer}: {_n(b)}" for layer, b in sorted(f.detectable_ce_by_layer.items()))
        det = (f"; a driver needs a mean CE of at least {_n(f.detectable_ce)} nats in some layer (the rule's bar per "
               f"layer, max(min_ratio × the layer's median, floor): {bars})" if f.detectable_ce is not None and bars
               else f"; with this sample the smallest mean CE the rule could flag is about {_n(f.detectable_ce)} nats"
               if f.detectable_ce is not None else "")
        out.append(f"No driver experts (largest mean CE {_n(f.largest_ce)} nats{floor}{det}). Nothing was steered "
                   "as this domain's drivers.")
    if f.causal_rate_peak is not None and f.n_drivers:
        out.append(f"Causal rate peaks at layer {f.causal_rate_peak['layer']}: "
                   f"{100 * f.causal_rate_peak['causal_rate']:.0f}% of tokens select a driver expert there.")
    if f.accuracy is not None:
        a = f.accuracy
        sat = " — saturated: steering can hardly move a task this close to its ceiling" if f.saturated else ""
        out.append(f"Unsteered accuracy {_n(a['accuracy'])}{_ci(a['ci_low'], a['ci_high'])} (n = {a['n']}){sat}.")
    for c in f.steering_changes:
        out.append(f"{c['condition'].replace('_', ' ')} changes accuracy by {c['delta']:+.3f}"
                   f"{_ci(c['delta_lo'], c['delta_hi'])} (95% paired-bootstrap CI excludes 0).")
    if f.steering_null:
        out.append("No change outside its 95% CI under: " + ", ".join(c.replace("_", " ") for c in f.steering_null)
                   + ".")
    for c in f.not_applicable:
        out.append(f"{c['condition'].replace('_', ' ')}: not applicable ({c['reason']}).")
    out += replication_sentences(f)
    return out + control_sentences(f)


# ----- controls, dose-response, selectivity (issue #18) ------------------------------------------------------
_KIND_NAME = {"domain": "domain experts", "driver": "drivers"}


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


def _sgn(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.3f}"


def _sci(lo: float, hi: float) -> str:
    return "" if math.isnan(lo) or math.isnan(hi) else f" [{lo:+.3f}, {hi:+.3f}]"


def _pv(p: float) -> str:
    return "–" if math.isnan(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def _position(c: dict[str, Any]) -> str:
    """Where the target's Δ lies among the control draws' Δ, in words."""
    m, r = c["control_draws"], c["control_rank"]
    if not m or math.isnan(r):
        return ""
    below = round((1 - r) * m)
    if r == 0:
        return f"below all {m} control sets"
    if below == 0:
        return f"at or above all {m} control sets"
    return f"below {below} of {m} control sets"


def control_sentences(f: DomainFindings) -> list[str]:
    """The control findings of one domain as sentences: the domain's fragility, for each kind whether its
    experts matter beyond the verdict controls (with intervals, tests, the corrected verdict and the control it
    names), where "up" lowered most targeted logits, and the selectivity verdict."""
    out: list[str] = []
    for fr in f.fragility:
        if not fr["control_draws"] and not fr["reference_draws"]:
            continue
        what = "masking" if fr["strength"] == "mask" else f"steering ({fr['strength']})"
        parts = []
        if fr["control_draws"]:
            parts.append(f"{_sgn(fr['control_delta'])} on average over {fr['control_draws']} sets of "
                         f"{CONTROL_NAMES.get(fr['control'], fr['control'])} (from {_sgn(fr['control_delta_min'])} "
                         f"to {_sgn(fr['control_delta_max'])})")
        if fr["reference_draws"]:
            parts.append(f"{_sgn(fr['reference_delta'])} over {fr['reference_draws']} sets of "
                         f"{CONTROL_NAMES.get(fr['reference'], fr['reference'])}")
        out.append(f"Fragility: {what} {fr['n_targets']} other experts of the layers of its "
                   f"{_KIND_NAME[fr['kind']]} changes {f.domain}'s accuracy by " + ", and by ".join(parts) + ".")
    for c in f.controls:
        name = _KIND_NAME[c["kind"]]
        if not c["applicable"]:
            out.append(f"Controls for its {name}: not applicable ({c['reason']}).")
            continue
        what = "Ablating (mask)" if c["strength"] == "mask" else f"Steering ({c['strength']})"
        s = (f"{what} its {c['n_targets']} {name} changes accuracy by {_sgn(c['delta'])}"
             f"{_sci(c['delta_lo'], c['delta_hi'])} (n = {c['n']}, McNemar p = {_pv(c['p_exact'])})")
        words = CONTROL_NAMES.get(c["control"], c["control"])
        if c["specific"] is None:
            s += f". No calibrated verdict ({c['control_reason'] or 'no control sets drawn'})."
        else:
            pos = _position(c)
            verdict = (f"specific beyond {words}" if c["specific"] else
                       f"not specific beyond {words} after the run's correction")
            s += (f"; beyond {words} (mean activation {_n(c['control_activation'], 2)} against the targets' "
                  f"{_n(c['target_activation'], 2)}): {_sgn(c['diff'])}{_sci(c['diff_lo'], c['diff_hi'])}, "
                  f"{pos} (set test p = {_pv(c['p_set'])}, item sign test p = {_pv(c['p_item'])}; BH q = "
                  f"{_pv(c['q_vs_control'])} over the run's {c['n_tests']} tests): {verdict}.")
        out.append(s)
        if c["specific_at"]:
            pts = "; ".join(f"{x['strength']} Δ {_sgn(x['delta'])}, beyond controls {_sgn(x['diff'])}"
                            f"{_sci(x['diff_lo'], x['diff_hi'])} (q = {_pv(x['q_vs_control'])})"
                            for x in c["specific_at"])
            out.append(f"Dose–response of its {name} ({', '.join(c['strengths'])}): specific beyond {words} at "
                       f"{pts}; not at the other strengths.")
        elif c["specific"] is not None:
            out.append(f"Dose–response of its {name} ({', '.join(c['strengths'])}): specific beyond {words} at no "
                       "strength after the run's correction.")
    for u in f.up_lowers:
        out.append(f"\"Up\" ({u['strength']}) lowered most of the {_KIND_NAME[u['kind']]}' logits: "
                   f"{100 * u['negative_share']:.0f}% of their logits on this domain are negative, and scaling a "
                   "negative logit by s > 1 moves it down.")
    for sv in f.selectivity:
        cells = "; ".join(f"{c['evaluated']} {_sgn(c['delta'])}{_sci(c['delta_lo'], c['delta_hi'])} (beyond "
                          f"controls {_sgn(c['norm_delta'])})" for c in sv["cells"])
        verdict = ("no verdict" if sv["selective"] is None else "selective" if sv["selective"] else "not selective")
        dd = (f"; double dissociation with {', '.join(sv['double_dissociation'])}" if sv["double_dissociation"]
              else "")
        out.append(f"Ablating its {_KIND_NAME[sv['kind']]}, Δ accuracy per evaluated domain: {cells}: {verdict} "
                   f"({sv['reason']}){dd}.")
    return out


def findings_record(tables: dict[str, pd.DataFrame], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The versioned findings record saved beside the report (``findings.json``)."""
    model = (manifest or {}).get("model")
    return {
        "version": FINDINGS_VERSION,
        "model": model.get("source") if isinstance(model, dict) else None,
        "domains": [f.to_dict() for f in findings(tables)],
        "beyond": beyond_findings(tables),
    }


# ----- replication -----------------------------------------------------------------------------------------
#: The Jaccard of the halves' sets at or above which a domain's experts are said to replicate (docs/methods.md).
REPLICATES = 0.6


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


def _names(experts: list[dict[str, Any]]) -> str:
    return ", ".join(f"L{e['layer']}E{e['expert']}" for e in experts)


def replication_sentences(f: DomainFindings) -> list[Sentence]:
    """One sentence per rule: the halves' sizes and Jaccard, which flagged experts were found in both halves,
    and, below :data:`REPLICATES`, that the set does not replicate."""
    out = []
    for label, r in (("Domain experts", f.domain_replication), ("Drivers", f.driver_replication)):
        if r is None:
            continue
        j = r["jaccard"]
        head = (f"{label} on two disjoint halves ({r['n_inputs_a']} and {r['n_inputs_b']} inputs, split by a hash of "
                f"the text): {r['n_half_a']} and {r['n_half_b']} found, {r['n_both']} in both")
        if j is None or (isinstance(j, float) and math.isnan(j)):
            out.append(Sentence(head + "; none in either half, so nothing to replicate.", f.domain))
            continue
        verdict = "replicates" if j >= REPLICATES else f"does not replicate (below {REPLICATES})"
        parts = [f"{head}; Jaccard {j:.2f}: the set {verdict}."]
        if r["replicated"]:
            parts.append(f"Found in both halves: {_names(r['replicated'])}.")
        if r["not_replicated"]:
            parts.append(f"Not in both: {_names(r['not_replicated'])}.")
        out.append(Sentence(" ".join(parts), f.domain))
    return out


def _strongest(n: int) -> str:
    return "Strongest" if n <= SHOWN else f"Strongest {SHOWN} of {n} (all in findings.json)"


#: How many experts a sentence names; the record lists them all.
SHOWN = 3


# ----- beyond the paper: co-activation, paths, consistency, importance, routing overlap ---------------------
#: A pair (a, b) is read out only when at least this many tokens select both (lift from a handful is noise).
MIN_PAIR_COUNT = 20


def _spearman_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 500, seed: int = 0) -> tuple[float, float, float, int]:
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
            rho, lo, hi, n = _spearman_ci(x, g["activation_rate"].to_numpy(float))
            rec["vs_A"] = {"rho": rho, "ci_low": lo, "ci_high": hi, "n": n}
            if drivers is not None and {"ce_mean", "domain", "layer", "expert"} <= set(drivers.columns):
                j = g.merge(drivers[drivers["domain"] == d][["layer", "expert", "ce_mean"]], on=["layer", "expert"])
                rho, lo, hi, n = _spearman_ci(j["importance"].to_numpy(float), j["ce_mean"].to_numpy(float))
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


def _ci_opt(lo: float | None, hi: float | None, digits: int = 3) -> str:
    return "" if lo is None or hi is None else _ci(lo, hi, digits)


def beyond_sentences(rec: dict[str, Any]) -> dict[str, list[str]]:
    """Plain lines per part (``coactivation``, ``paths``, ``consistency``, ``importance``, ``routing_overlap``)."""
    out: dict[str, list[str]] = {}
    co = rec.get("coactivation")
    if co:
        lines = [f"{d}: experts {p['a']} and {p['b']} at layer {p['layer']} co-activate most above chance: "
                 f"P({p['b']}|{p['a']}) = {_n(p['p_b_given_a'])} against P({p['b']}) = {_n(p['p_b'])} "
                 f"(lift {_n(p['lift'], 2)}; {p['count']} of the {p['n_a']} tokens selecting {p['a']} also "
                 f"select {p['b']})." for d, p in co["strongest"].items()]
        if not co["strongest"]:
            lines.append(f"No pair of experts is selected together by {co['min_count']} tokens or more: too few to "
                         "read co-activation.")
        lines.append("Lift 1 is independence; within a layer a token's k experts are distinct, so P(a|a) is not shown.")
        out["coactivation"] = lines
    pa = rec.get("paths")
    if pa:
        u = pa.get("uniform_share")
        base = f" (uniform routing would give {_n(u, 2)} per path)" if u else ""
        out["paths"] = [f"{k}: the most frequent top-1 path is {v['path']}, taken by {v['share']:.1%} of tokens "
                        f"({v['count']}){base}." for k, v in pa["top"].items()]
    cs = rec.get("consistency")
    if cs:
        out["consistency"] = [
            f"{k}: I(S_l; S_l+1) = {_n(v['mi_bits'])} bits ({_n(v['mi_norm'], 2)} of the smaller entropy); "
            f"plug-in bias floor about {_n(v['bias_floor_bits'], 2)} bits"
            + (" — within the floor: no evidence of consistent routing."
               if v["mi_bits"] is not None and v["bias_floor_bits"] is not None
               and v["mi_bits"] <= v["bias_floor_bits"] else ".") for k, v in cs.items()]
    im = rec.get("importance")
    if im:
        if "not_applicable" in im:
            out["importance"] = [f"Output-aware importance: not applicable ({im['not_applicable']})."]
        else:
            lines = []
            for d, v in im.items():
                for key, label in (("vs_CE", "causal effect CE"), ("vs_A", "activation rate A")):
                    s = v.get(key)
                    if not s:
                        continue
                    if s["rho"] is None:
                        lines.append(f"{d}: rank correlation of w·‖f‖ with {label}: not measurable ({s['n']} cells).")
                        continue
                    null = s["ci_low"] is not None and s["ci_low"] <= 0 <= s["ci_high"]
                    lines.append(f"{d}: Spearman rank correlation of w·‖f‖ with {label}: {_n(s['rho'], 2)} "
                                 f"{_ci_opt(s['ci_low'], s['ci_high'], 2)} over {s['n']} experts"
                                 + (" — the interval includes 0: no association shown." if null else "."))
            out["importance"] = lines
    ov = rec.get("routing_overlap")
    if ov:
        lines = []
        for k, v in ov.items():
            d, c = k.split("/", 1)
            if not v["applicable"]:
                lines.append(f"{d}, {c.replace('_', ' ')}: not applicable ({v['reason']}).")
                continue
            lines.append(f"{d}, {c.replace('_', ' ')}: on average {v['mean_overlap']:.1%} of each token's selected "
                         f"experts stay the same; least at layer {v['lowest_layer']} ({v['lowest']:.1%}"
                         f"{_ci_opt(v['ci_low'], v['ci_high'], 3)}, {v['n_tokens']} tokens).")
        out["routing_overlap"] = lines
    return out


# ----- section readings: every sentence of the report's sections ----------------------------------------
class Sentence(str):
    """A sentence of the report. ``domain`` names the domain it is about (``None``: the whole run), so the
    report's domain selector can show or hide it; otherwise it is a plain ``str``."""

    domain: str | None

    def __new__(cls, text: str, domain: str | None = None) -> Sentence:
        s = super().__new__(cls, text)
        s.domain = domain
        return s


def format_number(x: Any, digits: int = 3) -> str:
    """A number as the report prints it: below 1, ``digits`` significant figures (``0.00129``, ``6.6e-05``);
    from 1 on, ``digits`` decimals without trailing zeros (``11.019``, ``2``); ``–`` for a missing value."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "–"
    if v == 0 or math.isinf(v):
        return str(v) if math.isinf(v) else "0"
    if abs(v) < 1 or abs(v) >= 1e5:
        return f"{v:.{digits}g}"
    text = f"{v:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


_num = format_number


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _domain_names(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["domain"].astype(str)))


def _of(df: pd.DataFrame, d: str) -> pd.DataFrame:
    return df[df["domain"].astype(str) == d]


def read_domain_experts(df: pd.DataFrame) -> list[Sentence]:
    """Per domain: how many domain experts, the layer holding most, and the one with the largest lift (the
    order of the table below it)."""
    out = []
    E = int(df["expert"].max()) + 1
    L = df["layer"].nunique()
    key = "lift" if "lift" in df.columns else "specificity"
    for d in _domain_names(df):
        g = _of(df, d)
        flag = g[_flag(g, "is_domain_expert")]
        if not len(flag):
            out.append(Sentence(f"In {d}, no expert passes the domain-expert rule at any of the {L} MoE layers.", d))
            continue
        per_layer = flag.groupby("layer").size()
        best = flag.sort_values(key, ascending=False).iloc[0]
        name = "activation lift" if key == "lift" else "specificity"
        size = f"{name} {_num(best['lift'], 2)}" if key == "lift" else f"{name} {float(best[key]):+.2f}"
        uniform = f" against a uniform {_pct(_f(best, 'uniform_rate'))}" if "uniform_rate" in g.columns else ""
        out.append(Sentence(
            f"In {d}, {len(flag)} of {E * L} experts ({E} per layer × {L} layers) are domain experts; layer "
            f"{int(per_layer.idxmax())} has the most ({int(per_layer.max())} of {E}). The largest {name} "
            f"is expert {int(best['expert'])} at layer {int(best['layer'])} ({size}, CWAS {_num(best.get('cwas'))}, "
            f"activation rate {_pct(_f(best, 'activation_rate'))}{uniform}).", d))
    return out


def expert_types(domain_experts: pd.DataFrame, drivers: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each (domain, layer, expert) row of the domain-expert table with a ``type``.

    ``both``/``domain``/``driver``: flagged for this domain (driver flags from ``drivers`` when given, else
    the table's ``is_driver``); ``general``: the table's ``is_general``; ``other``: activated above uniform
    here but flagged for another domain; ``below uniform``: not activated above ``k/E`` in this domain.
    """
    df = domain_experts.copy()
    if drivers is not None and len(drivers) and {"domain", "layer", "expert", "is_driver"} <= set(drivers.columns):
        key = drivers[["domain", "layer", "expert", "is_driver"]].rename(columns={"is_driver": "_drv"})
        df = df.merge(key, on=["domain", "layer", "expert"], how="left")
        df["_drv"] = df["_drv"].fillna(False).astype(bool)
    else:
        df["_drv"] = df["is_driver"].astype(bool) if "is_driver" in df.columns else False
    dom = df["is_domain_expert"].astype(bool) if "is_domain_expert" in df.columns else pd.Series(False, df.index)
    gen = df["is_general"].astype(bool) if "is_general" in df.columns else pd.Series(False, df.index)
    uniform = df["uniform_rate"] if "uniform_rate" in df.columns else 0.0
    active = df["activation_rate"] > uniform
    df["type"] = np.select(
        [dom & df["_drv"], dom, df["_drv"], ~active, gen],
        ["both", "domain", "driver", "below uniform", "general"], default="other")
    return df.drop(columns="_drv")


def read_expert_types(df: pd.DataFrame, drivers: pd.DataFrame | None = None) -> list[Sentence]:
    """Per domain: the share of routed selections going to general, domain and driver experts."""
    typed = expert_types(df, drivers)
    out = []
    for d in _domain_names(typed):
        g = _of(typed, d)
        tot = float(g["activation_rate"].sum()) or float("nan")
        share = {t: float(g.loc[g["type"] == t, "activation_rate"].sum()) / tot for t in
                 ("general", "domain", "driver", "both")}
        n = g[g["type"] != "below uniform"].groupby("type").size()
        # Each expert in one type: one that is both a domain and a driver expert counts once, as "both".
        out.append(Sentence(
            f"In {d}, general experts take {_pct(share['general'])} of routed selections, domain experts "
            f"{_pct(share['domain'])}, driver experts {_pct(share['driver'])} and experts that are both "
            f"{_pct(share['both'])} ({int(n.get('general', 0))} general, {int(n.get('domain', 0))} domain, "
            f"{int(n.get('driver', 0))} driver and {int(n.get('both', 0))} both, among those activated above "
            "uniform; no expert is counted twice).", d))
    return out


def read_causal_rate(df: pd.DataFrame) -> list[Sentence]:
    """Per domain: the layer where the causal rate peaks, and its mean over layers."""
    out = []
    for d in _domain_names(df):
        g = _of(df, d).dropna(subset=["causal_rate"])
        if not len(g):
            continue
        top = g.loc[g["causal_rate"].idxmax()]
        if float(top["causal_rate"]) == 0:
            out.append(Sentence(f"In {d}, no token selects a driver expert at any layer (causal rate 0).", d))
            continue
        out.append(Sentence(
            f"In {d}, the causal rate peaks at layer {int(top['layer'])}: {_pct(float(top['causal_rate']))} of its "
            f"tokens are routed to at least one of that layer's driver experts (mean over layers "
            f"{_pct(float(g['causal_rate'].mean()))}).", d))
    return out


def read_drivers(df: pd.DataFrame) -> list[Sentence]:
    """Per domain, from the driver table's own columns: how many experts pass the driver rule (``is_driver``)
    and at which layers, the strongest of them with its interval and its ratio to the layer's median (the
    table's ``ratio``), and the layers with the highest and lowest median CE (``layer_median``). Where no
    expert passes, the largest CE is named as what it is: not a driver."""
    out = []
    for d in _domain_names(df):
        g = _of(df, d).dropna(subset=["ce_mean"])
        if not len(g):
            continue
        medians = (g.groupby("layer")["layer_median"].first() if "layer_median" in g.columns
                   else g.groupby("layer")["ce_mean"].median())
        spread = (f" The median CE of a layer's experts is highest at layer {int(medians.idxmax())} "
                  f"({_num(medians.max())} nats) and lowest at layer {int(medians.idxmin())} "
                  f"({_num(medians.min())} nats).") if len(medians) > 1 else ""
        if "is_driver" not in g.columns:
            top = g.loc[g["ce_mean"].idxmax()]
            out.append(Sentence(
                f"In {d}, no driver rule was applied (no driver table); the largest mean CE is expert "
                f"{int(top['expert'])} at layer {int(top['layer'])} ({_num(top['ce_mean'])} nats).{spread}", d))
            continue
        flagged = g[_flag(g, "is_driver")]
        if not len(flagged):
            top = g.loc[g["ce_mean"].idxmax()]
            ratio = f", {_num(top['ratio'], 2)}× its layer's median" if "ratio" in g.columns else ""
            out.append(Sentence(
                f"In {d}, no expert passes the driver rule. The largest mean CE, {_num(top['ce_mean'])} nats (expert "
                f"{int(top['expert'])} at layer {int(top['layer'])}{ratio}), is not a driver.{spread}", d))
            continue
        best = flagged.loc[flagged["ce_mean"].idxmax()]
        ci = (f" [{_num(best['ce_lo'])}, {_num(best['ce_hi'])}]"
              if {"ce_lo", "ce_hi"} <= set(g.columns) and not math.isnan(_f(best, "ce_lo")) else "")
        ratio = f", {_num(best['ratio'], 2)}× its layer's median" if "ratio" in g.columns else ""
        q = (f", q = {_num(best['q_value'], 2)}" if "q_value" in g.columns and not math.isnan(_f(best, "q_value"))
             else "")
        per_layer = flagged.groupby("layer").size()
        where = ", ".join(f"{int(k)} ({int(v)})" for k, v in per_layer.items())
        out.append(Sentence(
            f"In {d}, {len(flagged)} of {len(g)} experts pass the driver rule, at layer(s) {where}. The strongest "
            f"driver is expert {int(best['expert'])} at layer {int(best['layer'])}: CE {_num(best['ce_mean'])}{ci} "
            f"nats{ratio}{q}.{spread}", d))
    return out


def read_positions(df: pd.DataFrame) -> list[Sentence]:
    """Per domain: where in their sequences the driver-triggering tokens sit, against all tokens."""
    out = []
    g_all = df[df["layer"].astype(str) == "all"]
    for d in _domain_names(g_all):
        g = _of(g_all, d).sort_values("bin_index" if "bin_index" in g_all.columns else "bin")
        n = int(g["n_trigger_total"].iloc[0]) if "n_trigger_total" in g.columns else 0
        if n == 0 or g["trigger_share"].isna().all():
            out.append(Sentence(f"In {d}, no token selected a driver expert, so there is no position profile.", d))
            continue
        ratio = g["trigger_share"] / g["token_share"].replace(0, np.nan)
        hi = g.loc[ratio.idxmax()]
        first = g.iloc[0]
        out.append(Sentence(
            f"In {d}, {_pct(float(first['trigger_share']))} of the {n} driver-triggering tokens sit in the first "
            f"fifth of their sequence against {_pct(float(first['token_share']))} of all tokens; the most "
            f"over-represented bin is {hi['bin']} ({_pct(float(hi['trigger_share']))} vs "
            f"{_pct(float(hi['token_share']))}, ×{float(ratio.max()):.2f}).", d))
    return out


def read_associations(df: pd.DataFrame) -> list[Sentence]:
    """Per domain and kind of expert: the tokens with the largest lift, and the top token–expert pair."""
    out = []
    for (d, kind), g in df.groupby(["domain", "kind"], sort=False):
        ranked = g.sort_values("lift", ascending=False)
        best = ranked.iloc[0]
        toks = ", ".join(f"“{t}”" for t in ranked["token"].drop_duplicates()[:5])
        out.append(Sentence(
            f"In {d}, {kind} experts respond most to {toks}; the top pair is “{best['token']}” with expert "
            f"{int(best['expert'])} at layer {int(best['layer'])} (lift {float(best['lift']):.2f}: selected for "
            f"{_pct(float(best['p_expert_given_token']))} of its {int(best['count'])} occurrences against "
            f"{_pct(float(best['p_expert']))} of all tokens).", str(d)))
    return out


def read_expert_map(df: pd.DataFrame) -> list[Sentence]:
    """How many clusters, and how the driver experts fall into them."""
    lines = [Sentence(f"{len(df)} experts in {df['cluster'].nunique()} KMeans clusters.")]
    if "is_driver" in df.columns and df["is_driver"].astype(bool).any():
        drv = df[df["is_driver"].astype(bool)]
        counts = drv["cluster"].value_counts()
        c = int(counts.index[0])
        lines.append(Sentence(
            f"{int(counts.iloc[0])} of the {len(drv)} driver experts fall in cluster {c}, which holds "
            f"{_pct(float((df['cluster'] == c).mean()))} of all experts; the drivers span {len(counts)} cluster(s)."))
    return lines


def _condition(name: Any) -> str:
    return str(name).replace("_", " ")


def _signed(x: float, digits: int = 3) -> str:
    """``+0.013`` / ``-0.004``; zero is ``0.000`` (never ``-0.000``)."""
    text = f"{x:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def read_steering(df: pd.DataFrame) -> list[Sentence]:
    """Per domain: the unsteered accuracy and each condition's change with its paired 95% interval, saying
    which intervals exclude zero."""
    out = []
    for d in _domain_names(df):
        g = _of(df, d)
        base = g[g["condition"] == "original"]
        if not len(base):
            continue
        b = base.iloc[0]
        parts, moved = [], []
        for r in g[g["condition"] != "original"].to_dict("records"):
            name = _condition(r["condition"])
            if "applicable" in g.columns and not bool(r["applicable"]):
                reason = r.get("reason") or r.get("note") or "no targets"
                parts.append(f"{name} not applicable ({reason})")
            elif "delta" in g.columns and not math.isnan(_f(r, "delta")):
                lo, hi = _f(r, "delta_lo"), _f(r, "delta_hi")
                ci = "" if math.isnan(lo) else f" [{_signed(lo)}, {_signed(hi)}]"
                parts.append(f"{name} {_signed(_f(r, 'delta'))}{ci}")
                if not math.isnan(lo) and (lo > 0 or hi < 0):
                    moved.append(name)
        n = int(b["n"]) if "n" in g.columns else "?"
        verdict = ""
        if parts and "delta_lo" in g.columns:
            verdict = (f" The interval excludes 0 for {', '.join(moved)} only." if moved else
                       " Every interval includes 0: no condition changed accuracy beyond what this sample resolves.")
        out.append(Sentence(f"In {d}, accuracy is {_num(b['accuracy'])} unsteered (n = {n})"
                            + ("; change under each condition, with its 95% paired-bootstrap interval: "
                               + "; ".join(parts) if parts else "") + "." + verdict, d))
    return out


def read_sweep(df: pd.DataFrame) -> list[Sentence]:
    """Per domain and target kind: the scale with the best accuracy, and whether any scale's accuracy lies
    outside the unsteered (s = 1) accuracy's 95% interval."""
    out = []
    sc = df[df["sweep"] == "scale"] if "sweep" in df.columns else df
    for (d, t), g in sc.groupby(["domain", "targets"], sort=False):
        best = g.loc[g["accuracy"].idxmax()]
        one = g[np.isclose(g["scale"].astype(float), 1.0)]
        if len(one) and np.isclose(float(best["scale"]), 1.0):
            text, after = f"In {d}, no scale of the {t} experts beats the unsteered accuracy of", ""
        else:
            text, after = (f"In {d}, scaling the {t} experts gives the best accuracy at s = {_num(best['scale'])}: "
                           f"{_num(best['accuracy'])} against"), " unsteered"
        if len(one) and {"ci_low", "ci_high"} <= set(g.columns):
            u = one.iloc[0]
            lo, hi = _f(u, "ci_low"), _f(u, "ci_high")
            outside = g[(g["accuracy"] < lo) | (g["accuracy"] > hi)]
            where = ("outside it: " + ", ".join(
                f"s = {_num(r['scale'])} ({_num(r['accuracy'], 4)}, {'below' if r['accuracy'] < lo else 'above'})"
                for r in outside.to_dict("records")) if len(outside)
                else f"all {len(g)} scales lie inside it, so the sweep shows no effect this sample can resolve")
            text += f" {_num(u['accuracy'])}{after} (95% CI [{_num(lo, 4)}, {_num(hi, 4)}]); {where}"
        elif len(one):
            text += f" {_num(one['accuracy'].iloc[0])}{after}"
        out.append(Sentence(text + ".", str(d)))
    return out


def read_routing_mi(df: pd.DataFrame) -> list[Sentence]:
    """The layer where routing depends most on the domain, with the estimate's bias where the table has it."""
    if not len(df) or "mi_bits" not in df.columns:
        return []
    top = df.loc[df["mi_bits"].idxmax()]
    bias = ""
    if "mi_bias_bits" in df.columns and not math.isnan(_f(top, "mi_bias_bits")):
        below = int((df["mi_bits"] <= df["mi_bias_bits"]).sum())
        bias = (f" The plug-in estimate's upward bias is about {_num(top['mi_bias_bits'])} bits"
                + (f"; {below} layer(s) do not exceed it, so their MI cannot be told from none." if below else "."))
    return [Sentence(f"Routing depends on the domain most at layer {int(top['layer'])}: I(domain; selected expert) = "
                     f"{_num(top['mi_bits'])} bits (mean over layers {_num(df['mi_bits'].mean())}).{bias}")]


def read_saturated(domains: list[str]) -> list[Sentence]:
    """The note under the steering table naming saturated tasks."""
    if not domains:
        return []
    return [Sentence(f"Saturated: {', '.join(domains)} (unsteered accuracy ≥ {SATURATED}); a null there says little "
                     "about the experts.")]


#: How to use the explorable page, said once at its top (report and comparison).
HOW_TO_READ = ("This file is self-contained and works offline: click a column header to sort, type in a table's "
               "box to filter, hover a heatmap cell for its value, and pick a domain at the top to show only its "
               "results.")


def report_intro(model: str, created: str) -> str:
    """The report's opening line."""
    return f"What gets activated: domain and driver experts of {model}. Generated {created}. {HOW_TO_READ}"


def compare_intro(models: list[str]) -> str:
    """The comparison's opening line."""
    return f"{', '.join(models)}, side by side. {HOW_TO_READ}"


#: What the report says of a whole section that has nothing to show.
NO_DRIVERS = "No expert passes the driver rule in any domain; see the findings above."
#: Steering in scale mode multiplies logits: the sign matters (docs/methods.md §5).
SCALE_NOTE = "Scale mode multiplies router logits by s: a negative logit scaled by s > 1 moves down, not up."

#: Figure captions, by figure name (the names :func:`~expertscope.report.figures.write_figures` returns).
CAPTIONS: dict[str, str] = {
    "fig1_cwas": "Figure 1. CWAS = (1 − H)·A of every expert, per layer and domain; stars mark domain experts, "
                 "the dotted line the uniform rate k/E.",
    "fig2_expert_types": "Figure 2. (a) Share of routed selections by expert type; (b) number of activated "
                         "experts of each type.",
    "fig3_causal_rate": "Figure 3. Causal rate per layer: the share of a domain's tokens whose selected experts "
                        "include a driver expert of that layer.",
    "fig4_positions": "Figure 4. Relative position t/T of tokens that select a driver expert at any layer, "
                      "against all tokens (baseline).",
    "fig5_expert_map": "Figure 5. t-SNE of expert representations ({rep}), KMeans clusters by colour, driver "
                       "experts as stars.",
    "fig6_causal_layers": "Figure 6. Causal effect (KL of the clean to the perturbed next-token distribution at "
                          "the decision positions) per layer: mean and largest over the experts.",
    "fig7_causal_heatmap": "Figures 7–9. Causal effect of every expert at every layer; darker is stronger, driver "
                           "experts boxed. Hover a cell for its value; the PNG and SVG for papers are in figures/.",
    "activation_heatmap": "Activation rate A of every expert at every layer; darker is more often selected, "
                          "domain experts boxed. Hover a cell for its value.",
    "fig_routing_mi": "Mutual information between the domain and the selected expert, per layer (bits; the "
                      "expert drawn uniformly from each token's selected set).",
    "fig_steering": "Accuracy under each steering condition (95% CIs); conditions without targets are not "
                    "applicable and not drawn.",
    "fig_steering_sweep": "Accuracy against the steering scale (and the number of targeted experts), shaded 95% "
                          "CIs.",
}


#: What a table column holds, shown when the reader points at its header (definitions: docs/methods.md).
COLUMN_HELP: dict[str, str] = {
    "domain": "the domain (data set) the row is about",
    "layer": "MoE layer index",
    "expert": "expert index within the layer",
    "activation_rate": "A: share of the domain's tokens that select the expert",
    "A_lo": "lower end of A's 95% bootstrap interval",
    "A_hi": "upper end of A's 95% bootstrap interval",
    "lift": "activation lift: A in this domain over its mean A in the other domains",
    "lift_lo": "lower end of the lift's 95% bootstrap interval",
    "lift_hi": "upper end of the lift's 95% bootstrap interval",
    "entropy": "H: routing entropy, the mean over the domain's tokens of h(p̃), bits",
    "cwas": "CWAS = (1 − H)·A",
    "specificity": "CWAS in this domain minus its mean in the other domains",
    "q_value": "Benjamini–Hochberg adjusted p-value of the rule's test",
    "is_domain_expert": "passes the domain-expert rule",
    "is_general": "activated above uniform in some domain, and neither a domain nor a driver expert",
    "is_driver": "passes the driver rule",
    "ce_mean": "causal effect CE: mean over inputs of KL(P‖Q) at the decision positions, Q with the expert's "
               "router logit raised, nats",
    "ce_lo": "lower end of the CE's 95% bootstrap interval",
    "ce_hi": "upper end of the CE's 95% bootstrap interval",
    "layer_median": "median CE of the layer's experts",
    "ratio": "CE over the layer's median CE",
    "n_inputs": "inputs perturbed",
    "causal_rate": "share of the domain's tokens that select a driver expert of the layer",
    "mi_bits": "I(domain; selected expert), bits",
    "accuracy": "accuracy on the domain's test items",
    "ci_low": "lower end of the 95% interval",
    "ci_high": "upper end of the 95% interval",
    "delta": "change in accuracy against the unsteered model",
    "delta_lo": "lower end of the change's 95% paired-bootstrap interval",
    "delta_hi": "upper end of the change's 95% paired-bootstrap interval",
    "saturated": f"unsteered accuracy at or above the saturation threshold ({SATURATED} by default)",
    "n_targets": "experts steered",
    "n": "test items",
    "trigger_share": "share of the driver-triggering tokens in this position bin",
    "token_share": "share of all tokens in this position bin",
    "p_expert_given_token": "P(expert | token)",
    "p_expert": "P(expert) over all tokens",
}


# ----- run status: the banner of a run that did not finish ------------------------------------------------
#: The stages of ``expertscope run`` in order (``pipeline.PIPELINE.study()``; a test keeps the two equal). Used
#: for manifests that do not list their ``planned_stages``.
STUDY_STAGES = ("profile", "coactivation", "drivers", "domain_experts", "replication", "causal_rate", "tokens",
                "expert_map", "steering", "routing_overlap", "report")


@dataclass
class RunStatus:
    """A run's manifest status: ``finished`` stages (recorded complete) and ``missing`` ones (planned, not
    finished; the report stage itself left out). ``complete`` is the manifest's ``status == "complete"``."""

    status: str
    complete: bool
    finished: list[str]
    missing: list[str]


def run_status(manifest: dict[str, Any]) -> RunStatus:
    """What :func:`status_sentence` needs from a manifest. Planned stages come from the manifest's
    ``planned_stages``, else (a study) :data:`STUDY_STAGES`; a run of another kind without that list has no
    known missing stages."""
    status = str(manifest.get("status") or "unknown")
    raw = manifest.get("stages")
    stages: dict[str, Any] = raw if isinstance(raw, dict) else {}
    finished = [k for k, v in stages.items()
                if not k.startswith("_") and isinstance(v, dict) and v.get("status") == "complete"]
    planned = manifest.get("planned_stages")
    if not isinstance(planned, list):
        planned = list(STUDY_STAGES) if manifest.get("kind", "study") == "study" else []
    missing = [str(s) for s in planned if s not in finished and s != "report"]
    return RunStatus(status, status == "complete", finished, missing)


def status_sentence(manifest: dict[str, Any], run: str | None = None) -> str | None:
    """The banner of a run whose manifest is not ``complete``: its status and the stages it did not finish;
    ``None`` for a complete run."""
    st = run_status(manifest)
    if st.complete:
        return None
    who = f"Run {run}" if run else "This run"
    if st.missing:
        what = (f"stage{'s' if len(st.missing) > 1 else ''} {', '.join(st.missing)} did not finish, so "
                f"{'their sections are' if len(st.missing) > 1 else 'its section is'} missing and the findings "
                "are partial")
    elif st.finished:
        what = f"only {', '.join(st.finished)} finished; the findings may be partial"
    else:
        what = "no stage is recorded as finished; the findings may be partial"
    return (f"{who} is not complete (manifest status “{st.status}”): {what}. Finish it with the command that "
            "started it and --resume, then rebuild the report.")


__all__ = [
    "CAPTIONS",
    "COLUMN_HELP",
    "HOW_TO_READ",
    "NO_DRIVERS",
    "REPLICATES",
    "SATURATED",
    "SCALE_NOTE",
    "SHOWN",
    "STUDY_STAGES",
    "DomainFindings",
    "RunStatus",
    "Sentence",
    "beyond_findings",
    "beyond_sentences",
    "compare_intro",
    "control_sentences",
    "controls_part",
    "expert_types",
    "findings",
    "findings_record",
    "format_number",
    "read_associations",
    "read_causal_rate",
    "read_domain_experts",
    "read_drivers",
    "read_expert_map",
    "read_expert_types",
    "read_positions",
    "read_routing_mi",
    "read_saturated",
    "read_steering",
    "read_sweep",
    "replication_part",
    "replication_sentences",
    "report_intro",
    "run_status",
    "sentences",
    "status_sentence",
    "table_meta",
]
