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
    detectable_ce_by_layer: dict[int, float] = field(default_factory=dict)
    causal_rate_peak: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    saturated: bool = False
    steering_changes: list[dict[str, Any]] = field(default_factory=list)
    steering_null: list[str] = field(default_factory=list)
    not_applicable: list[dict[str, str]] = field(default_factory=list)
    domain_replication: dict[str, Any] | None = None
    driver_replication: dict[str, Any] | None = None

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
    for df in (dom, drv, st):
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
    return out


def findings_record(tables: dict[str, pd.DataFrame], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The versioned findings record saved beside the report (``findings.json``)."""
    model = (manifest or {}).get("model")
    return {
        "version": FINDINGS_VERSION,
        "model": model.get("source") if isinstance(model, dict) else None,
        "domains": [f.to_dict() for f in findings(tables)],
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


def replication_sentences(f: DomainFindings) -> list[str]:
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
            out.append(head + "; none in either half, so nothing to replicate.")
            continue
        verdict = "replicates" if j >= REPLICATES else f"does not replicate (below {REPLICATES})"
        parts = [f"{head}; Jaccard {j:.2f}: the set {verdict}."]
        if r["replicated"]:
            parts.append(f"Found in both halves: {_names(r['replicated'])}.")
        if r["not_replicated"]:
            parts.append(f"Not in both: {_names(r['not_replicated'])}.")
        out.append(" ".join(parts))
    return out


def _strongest(n: int) -> str:
    return "Strongest" if n <= SHOWN else f"Strongest {SHOWN} of {n} (all in findings.json)"


#: How many experts a sentence names; the record lists them all.
SHOWN = 3

__all__ = ["REPLICATES", "SATURATED", "SHOWN", "DomainFindings", "findings", "findings_record",
           "replication_part", "replication_sentences", "sentences", "table_meta"]
