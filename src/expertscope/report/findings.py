"""What a run found, per domain, in words and numbers: the record the report opens with.

:func:`findings` reads a run's tables (as :func:`expertscope.report.html.load_tables` returns them) and
returns one :class:`DomainFindings` per domain: the domain and driver experts that pass their rules, the
strongest of each with its interval, the causal-rate peak and the steering changes whose interval excludes
zero. Where nothing passes, it says so with the sample size and the smallest effect the rules could have
flagged, so a null is a statement, not an empty table. :func:`sentences` turns a record into plain lines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

FINDINGS_VERSION = 1

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
    causal_rate_peak: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    saturated: bool = False
    steering_changes: list[dict[str, Any]] = field(default_factory=list)
    steering_null: list[str] = field(default_factory=list)
    not_applicable: list[dict[str, str]] = field(default_factory=list)
    controls: list[dict[str, Any]] = field(default_factory=list)
    up_lowers: list[dict[str, Any]] = field(default_factory=list)
    selectivity: list[dict[str, Any]] = field(default_factory=list)

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


def _domain_part(f: DomainFindings, g: pd.DataFrame, meta: dict[str, Any], top: int) -> None:
    f.domain_rule = str(meta.get("rule_text", ""))
    if "n_sequences" in g.columns and len(g):
        f.n_sequences = int(g["n_sequences"].iloc[0])
    if "n_tokens" in g.columns and len(g):
        f.n_tokens = int(g["n_tokens"].iloc[0])
    flagged = g[_flag(g, "is_domain_expert")]
    f.n_domain_experts = len(flagged)
    key = "lift" if "lift" in g.columns else "specificity"
    for r in flagged.sort_values(key, ascending=False).head(top).to_dict("records"):
        f.domain_experts.append({
            "layer": int(r["layer"]), "expert": int(r["expert"]), "activation_rate": _f(r, "activation_rate"),
            "lift": _f(r, "lift"), "lift_lo": _f(r, "lift_lo"), "lift_hi": _f(r, "lift_hi"),
            "q_value": _f(r, "q_value"), "cwas": _f(r, "cwas"),
        })
    if {"A_lo", "A_hi"} <= set(g.columns):
        half = ((g["A_hi"] - g["A_lo"]) / 2).dropna()
        f.activation_halfwidth = float(half.median()) if len(half) else None


def _driver_part(f: DomainFindings, g: pd.DataFrame, meta: dict[str, Any], top: int) -> None:
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
        detect = float(medians.min()) * ratio
        f.detectable_ce = max(detect, f.ce_floor or 0.0)
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


def findings(tables: dict[str, pd.DataFrame], top: int = 3) -> list[DomainFindings]:
    """One :class:`DomainFindings` per domain of the run's tables (domain-expert table order)."""
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
            f"activation {_n(e['activation_rate'])}, q = {_n(e['q_value'], 2)}" for e in f.domain_experts)
        out.append(f"{f.n_domain_experts} domain expert(s). Strongest: {best}.")
    elif f.n_domain_experts == 0:
        hw = (f" Activation rates are known to ±{_n(f.activation_halfwidth, 2)} (median 95% CI half-width), so "
              "differences smaller than that, or lifts below the rule's minimum, could not be flagged."
              if f.activation_halfwidth is not None else "")
        out.append(f"No domain experts: no expert passes the rule ({f.domain_rule or 'see settings'}).{hw}")
    if f.n_drivers:
        best = "; ".join(
            f"layer {e['layer']} expert {e['expert']}: CE {_n(e['ce'])}{_ci(e['ce_lo'], e['ce_hi'])} nats "
            f"({_n(e['ratio_to_median'], 2)}× its layer's median)" for e in f.drivers)
        out.append(f"{f.n_drivers} driver expert(s). Strongest: {best}.")
    elif f.n_drivers == 0:
        floor = f"; the floor is {_n(f.ce_floor)} nats" if f.ce_floor is not None else ""
        det = (f"; with this sample the smallest mean CE the rule could flag is about {_n(f.detectable_ce)} nats"
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
    return out + control_sentences(f)


def findings_record(tables: dict[str, pd.DataFrame], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The versioned findings record saved beside the report (``findings.json``)."""
    model = (manifest or {}).get("model")
    return {
        "version": FINDINGS_VERSION,
        "model": model.get("source") if isinstance(model, dict) else None,
        "domains": [f.to_dict() for f in findings(tables)],
    }


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
    """Fill ``f.controls`` (per kind: the primary condition's Δ(target), controls and Δ − control with
    interval, and which strengths are specific), ``f.up_lowers`` (scale-up rows where most targeted logits
    are negative) and ``f.selectivity`` (the domain's row of the selectivity matrix) from the study's
    dose and selectivity tables."""
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
            spec = measured[measured["specific"].fillna(False).astype(bool)]
            f.controls.append({
                "kind": kind, "applicable": True, "strength": str(p["strength"]), "n": int(p["n"]),
                "n_targets": int(p["n_targets"]), "delta": _f(p, "delta"), "delta_lo": _f(p, "delta_lo"),
                "delta_hi": _f(p, "delta_hi"), "p_exact": _f(p, "p_exact"),
                "control_draws": int(p["control_draws"]) if p["control_draws"] == p["control_draws"] else 0,
                "control_delta": _f(p, "control_delta"), "control_delta_min": _f(p, "control_delta_min"),
                "control_delta_max": _f(p, "control_delta_max"), "busiest_delta": _f(p, "busiest_delta"),
                "diff": _f(p, "diff"), "diff_lo": _f(p, "diff_lo"), "diff_hi": _f(p, "diff_hi"),
                "p_vs_control": _f(p, "p_vs_control"), "q_vs_control": _f(p, "q_vs_control"),
                "specific": bool(p["specific"]) if p["specific"] == p["specific"] else None,
                "control_reason": str(p.get("control_reason", "") or ""),
                "specific_at": [{"strength": str(r["strength"]), "diff": _f(r, "diff"), "diff_lo": _f(r, "diff_lo"),
                                 "diff_hi": _f(r, "diff_hi")} for r in spec.to_dict("records")],
                "strengths": [str(x) for x in measured["strength"]],
            })
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
            cells = [{"evaluated": str(r["evaluated"]), "delta": _f(r, "delta"), "delta_lo": _f(r, "delta_lo"),
                      "delta_hi": _f(r, "delta_hi"), "gap": _f(r, "gap"), "gap_lo": _f(r, "gap_lo"),
                      "gap_hi": _f(r, "gap_hi")} for r in g.to_dict("records")]
            off = [c for c in cells if c["evaluated"] != f.domain]
            # Selective: own domain hurt more than every other, each gap's interval above 0.
            selective = bool(off) and all(c["gap_lo"] > 0 for c in off)
            dissociated = []
            for c in off:  # double dissociation: the other domain's experts hurt it more than they hurt this one
                back = sel[(sel["kind"] == kind) & (sel["ablated"].astype(str) == c["evaluated"])
                           & (sel["evaluated"].astype(str) == f.domain)]
                if c["gap_lo"] > 0 and len(back) and _f(back.iloc[0], "gap_lo") > 0:
                    dissociated.append(c["evaluated"])
            f.selectivity.append({"kind": kind, "cells": cells, "selective": selective,
                                  "double_dissociation": dissociated})


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.3f}"


def _sci(lo: float, hi: float) -> str:
    return "" if math.isnan(lo) or math.isnan(hi) else f" [{lo:+.3f}, {hi:+.3f}]"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def control_sentences(f: DomainFindings) -> list[str]:
    """The control findings of one domain as sentences: for each kind, whether its experts matter beyond
    matched controls (with intervals and exact tests), where "up" lowered most targeted logits, and the
    domain's row of the selectivity matrix."""
    out: list[str] = []
    for c in f.controls:
        name = _KIND_NAME[c["kind"]]
        if not c["applicable"]:
            out.append(f"Controls for its {name}: not applicable ({c['reason']}).")
            continue
        what = "Ablating (mask)" if c["strength"] == "mask" else f"Steering ({c['strength']})"
        s = (f"{what} its {c['n_targets']} {name} changes accuracy by {_signed(c['delta'])}"
             f"{_sci(c['delta_lo'], c['delta_hi'])} (n = {c['n']}, McNemar p = {_p(c['p_exact'])})")
        if c["control_draws"]:
            s += (f"; {c['control_draws']} matched random controls: mean {_signed(c['control_delta'])} (range "
                  f"{_signed(c['control_delta_min'])} to {_signed(c['control_delta_max'])})")
        if not math.isnan(c["busiest_delta"]):
            s += f"; the busiest non-target experts: {_signed(c['busiest_delta'])}"
        if c["specific"] is None:
            s += f". No controls, so no claim of specificity ({c['control_reason'] or 'none drawn'})."
        else:
            verdict = ("specific: the interval excludes 0" if c["specific"]
                       else "not specific: the interval includes 0, so these experts matter no more than random ones "
                            "at this sample size")
            s += (f". Beyond the random controls: {_signed(c['diff'])}{_sci(c['diff_lo'], c['diff_hi'])}, sign test "
                  f"p = {_p(c['p_vs_control'])} (BH q = {_p(c['q_vs_control'])} over all the run's strengths): "
                  f"{verdict}.")
        out.append(s)
        if c["specific_at"]:
            pts = "; ".join(f"{x['strength']} {_signed(x['diff'])}{_sci(x['diff_lo'], x['diff_hi'])}"
                            for x in c["specific_at"])
            out.append(f"Dose–response of its {name} ({', '.join(c['strengths'])}): specific beyond controls at "
                       f"{pts}; at the other strengths the interval includes 0.")
        elif c["specific"] is not None:
            out.append(f"Dose–response of its {name} ({', '.join(c['strengths'])}): at no strength does "
                       "Δ(target) − Δ(control) exclude 0.")
    for u in f.up_lowers:
        out.append(f"\"Up\" ({u['strength']}) lowered most of the {_KIND_NAME[u['kind']]}' logits: "
                   f"{100 * u['negative_share']:.0f}% of their logits on this domain are negative, and scaling a "
                   "negative logit by s > 1 moves it down.")
    for sv in f.selectivity:
        cells = "; ".join(f"{c['evaluated']} {_signed(c['delta'])}{_sci(c['delta_lo'], c['delta_hi'])}"
                          for c in sv["cells"])
        verdict = ("selective: its own domain loses more than every other (each gap's interval above 0)"
                   if sv["selective"] else "not selective: some other domain loses as much, within the intervals")
        dd = (f"; double dissociation with {', '.join(sv['double_dissociation'])}" if sv["double_dissociation"]
              else "")
        out.append(f"Ablating its {_KIND_NAME[sv['kind']]}, Δ accuracy per evaluated domain: {cells}: {verdict}{dd}.")
    return out


__all__ = ["SATURATED", "control_sentences", "controls_part", "DomainFindings", "findings", "findings_record", "sentences", "table_meta"]
