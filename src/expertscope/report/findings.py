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


# ----- beyond the paper: co-activation, paths, consistency, importance, routing overlap ---------------------
#: A pair (a, b) is read out only when at least this many tokens select both (lift from a handful is noise).
MIN_PAIR_COUNT = 20


def _spearman_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 500, seed: int = 0) -> tuple[float, float, float, int]:
    """Spearman's rho of ``x`` and ``y`` (finite pairs), a 95% bootstrap interval over cells, and n."""
    from scipy.stats import spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(ok.sum())
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), float("nan"), n
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(float(spearmanr(x[i], y[i]).statistic))
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan")))
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


__all__ = ["SATURATED", "DomainFindings", "beyond_findings", "beyond_sentences", "findings", "findings_record",
           "sentences", "table_meta"]
