"""Every sentence of the report: the findings of a domain as plain lines (:func:`sentences`, with its
controls, replication and "beyond the paper" parts), and each section's reading (``read_<section>(table)``)
as :class:`Sentence` values, each naming the domain it is about so that the report's domain selector can show
or hide it. :mod:`.html` only lays them out; the numbers come from :mod:`.record`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..interventions.steering_study import CONTROL_NAMES
from ..stats.expert_types import drivers_measured, expert_types
from .record import REPLICATES, SATURATED, DomainFindings, _f, _flag, confirmed_cell


def _n(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    v = float(x)
    return f"{v:.{digits}g}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.{digits}f}"

def _ci(lo: float, hi: float, digits: int = 3) -> str:
    return "" if math.isnan(lo) or math.isnan(hi) else f" [{_n(lo, digits)}, {_n(hi, digits)}]"

def _headline(f: DomainFindings) -> list[tuple[str, str]]:
    """The findings of one domain before replication and controls, each sentence with its part: ``sample``,
    ``domain_experts``, ``displaced``, ``drivers``, ``stability``, ``causal_rate``, ``accuracy``, ``steering``,
    ``not_applicable``."""
    tagged: list[tuple[str, str]] = []

    def out(part: str, text: str) -> None:
        tagged.append((part, text))

    size = []
    if f.n_sequences is not None:
        size.append(f"{f.n_sequences} texts ({f.n_tokens} tokens) profiled")
    if f.n_inputs is not None:
        size.append(f"{f.n_inputs} inputs perturbed")
    if size:
        out("sample", "Sample: " + "; ".join(size) + ".")
    if f.n_domain_experts:
        best = "; ".join(
            f"layer {e['layer']} expert {e['expert']}: lift {_n(e['lift'], 2)}{_ci(e['lift_lo'], e['lift_hi'], 2)}, "
            f"activation {_n(e['activation_rate'])}, q = {_n(e['q_value'], 2)}" for e in f.domain_experts[:SHOWN])
        out("domain_experts", f"{f.n_domain_experts} domain expert(s). {_strongest(len(f.domain_experts))}: {best}.")
    elif f.n_domain_experts == 0:
        hw = (f" Activation rates are known to ±{_n(f.activation_halfwidth, 2)} (median 95% CI half-width), so "
              "differences smaller than that, or lifts below the rule's minimum, could not be flagged."
              if f.activation_halfwidth is not None else "")
        out("domain_experts", f"No domain experts: no expert passes the rule ({f.domain_rule or 'see settings'}).{hw}")
    if f.displaced:
        which = "; ".join(f"layer {e['layer']} expert {e['expert']} (A {_n(e['activation_rate'])} against a uniform "
                          f"{_n(e['uniform_rate'])}, lift {_n(e['lift'], 2)} against the layer's median "
                          f"{_n(e['layer_median_lift'], 2)})" for e in f.displaced)
        out("displaced", f"Displaced, not preferred: {which}. Each passes the significance, uniform and lift criteria, "
                   "but its lift comes from the other domains' own experts taking its slots, not from use in "
                   "this domain, so it is not counted as a domain expert.")
    if f.n_drivers:
        best = "; ".join(
            f"layer {e['layer']} expert {e['expert']}: CE {_n(e['ce'])}{_ci(e['ce_lo'], e['ce_hi'])} nats "
            f"({_n(e['ratio_to_median'], 2)}× its layer's median)" for e in f.drivers[:SHOWN])
        out("drivers", f"{f.n_drivers} driver expert(s). {_strongest(len(f.drivers))}: {best}.")
    elif f.n_drivers == 0:
        floor = f"; the floor is {_n(f.ce_floor)} nats" if f.ce_floor is not None else ""
        bars = ", ".join(f"layer {layer}: {_n(b)}" for layer, b in sorted(f.detectable_ce_by_layer.items()))
        det = (f"; a driver needs a mean CE of at least {_n(f.detectable_ce)} nats in some layer (the rule's bar per "
               f"layer, max(min_ratio × the layer's median, floor): {bars})" if f.detectable_ce is not None and bars
               else f"; with this sample the smallest mean CE the rule could flag is about {_n(f.detectable_ce)} nats"
               if f.detectable_ce is not None else "")
        out("drivers", f"No driver experts (largest mean CE {_n(f.largest_ce)} nats{floor}{det}). Nothing was steered "
                   "as this domain's drivers.")
    if f.numerical_floor:
        out("numerical_floor", f.numerical_floor)
    if f.driver_stability:
        out("stability", f"Stability: {f.driver_stability.split(': ', 1)[-1]}.")
    if f.causal_rate_peak is not None and f.n_drivers:
        out("causal_rate", f"Causal rate peaks at layer {f.causal_rate_peak['layer']}: "
                   f"{100 * f.causal_rate_peak['causal_rate']:.0f}% of tokens select a driver expert there.")
    if f.accuracy is not None:
        a = f.accuracy
        sat = " — saturated: steering can hardly move a task this close to its ceiling" if f.saturated else ""
        out("accuracy", f"Unsteered accuracy {_n(a['accuracy'])}{_ci(a['ci_low'], a['ci_high'])} (n = {a['n']}){sat}.")
    for c in f.steering_changes:
        out("steering", f"{c['condition'].replace('_', ' ')} changes accuracy by {c['delta']:+.3f}"
                   f"{_ci(c['delta_lo'], c['delta_hi'])} (95% paired-bootstrap CI excludes 0).")
    if f.steering_null:
        out("steering", "No change outside its 95% CI under: " + ", ".join(c.replace("_", " ") for c in f.steering_null)
                   + ".")
    for c in f.not_applicable:
        out("not_applicable", f"{c['condition'].replace('_', ' ')}: not applicable ({c['reason']}).")
    return tagged


def sentences(f: DomainFindings) -> list[str]:
    """The findings of one domain as plain sentences: what was found, then what was not, with sizes; then
    replication and the control findings."""
    return [text for _, text in _headline(f)] + replication_sentences(f) + control_sentences(f)

#: The parts of :func:`_headline` the brief findings keep.
_BRIEF = ("sample", "domain_experts", "drivers", "stability", "accuracy")


def brief_sentences(f: DomainFindings) -> list[str]:
    """The findings of one domain in a few sentences, for the top of the report: the sample, the domain
    experts, the drivers with their stability, the unsteered accuracy, and whether the experts matter beyond
    controls; the detail (every verdict, replication, dose–response) is said once, in its own section."""
    keep = [text for part, text in _headline(f) if part in _BRIEF]
    verdicts = []
    for c in f.controls:
        if not c["applicable"] or c["specific"] is None:
            continue
        name = _KIND_NAME[c["kind"]]
        what = "ablating" if c["strength"] == "mask" else f"steering ({c['strength']})"
        verdicts.append(f"{what} its {name}: {_sgn(c['diff'])}{_sci(c['diff_lo'], c['diff_hi'])} beyond "
                        f"{CONTROL_NAMES.get(c['control'], c['control'])}, "
                        + ("specific" if c["specific"] else "not specific"))
    if verdicts:
        keep.append("Beyond controls: " + "; ".join(verdicts) + ".")
    sel = [f"its {_KIND_NAME[sv['kind']]} are selective" for sv in f.selectivity if sv["selective"]]
    if sel:
        keep.append(" and ".join(sel).capitalize() + ".")
    return keep


# ----- controls, dose-response, selectivity (issue #18) ------------------------------------------------------
_KIND_NAME = {"domain": "domain experts", "driver": "drivers"}

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
            out.append(f"Dose–response of {f.domain}'s {name} ({', '.join(c['strengths'])}): specific beyond {words} "
                       f"at {pts}; not at the other strengths.")
        elif c["specific"] is not None:
            out.append(f"Dose–response of {f.domain}'s {name} ({', '.join(c['strengths'])}): specific beyond {words} "
                       "at no strength after the run's correction.")
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
    if f.overlap:  # every verdict of the domain says it was not tested on independent items
        caution = (f" Not an independent test: {f.overlap} of {f.domain}'s confirmation or training items were also "
                   "discovery items (--allow-overlap).")
        out = [x + caution if ("specific" in x or "selective" in x) and not x.startswith("Fragility") else x
               for x in out]
    return out

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
        head = (f"{f.domain}: {label.lower()} on two disjoint halves ({r['n_inputs_a']} and {r['n_inputs_b']} inputs, "
                f"split by a hash of the text): {r['n_half_a']} and {r['n_half_b']} found, {r['n_both']} in both")
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
        if not drivers_measured(df, drivers):  # routes only: say what was measured, not a 0 % of drivers
            out.append(Sentence(
                f"In {d}, general experts take {_pct(share['general'])} of routed selections and domain experts "
                f"{_pct(share['domain'])} ({int(n.get('general', 0))} general and {int(n.get('domain', 0))} domain "
                "experts among those activated above uniform); drivers were not measured (no causal effects).", d))
            continue
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
    rep = str(df["representation"].iloc[0]) if "representation" in df.columns and len(df) else ""
    what = f"From {rep} representations: " if rep else ""
    lines = [Sentence(f"{what}{len(df)} experts in {df['cluster'].nunique()} KMeans clusters.")]
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


__all__ = ["SHOWN", "Sentence", "beyond_sentences", "brief_sentences", "confirmation_sentences", "control_sentences",
           "format_number",
           "read_associations",
           "read_causal_rate", "read_domain_experts", "read_drivers", "read_expert_map",
           "read_expert_types", "read_positions", "read_routing_mi", "read_saturated", "read_steering",
           "read_sweep", "replication_sentences", "sentences"]

# ----- confirmation (pre-registered against observed) --------------------------------------------------------
def confirmation_sentences(table: pd.DataFrame) -> list[str]:
    """In words, per corpus: how many predictions were confirmed, went the other way, or were not confirmed,
    and each confirmed or opposite one with its effect beyond the controls."""
    out: list[str] = []
    if table is None or not len(table):
        return out
    for corpus, g in table.groupby("corpus", sort=False):
        counts = g["outcome"].value_counts()
        tested = int(len(g) - counts.get("not measured", 0))
        per = ", ".join(f"{d} {confirmed_cell(g, str(d))}" for d in dict.fromkeys(g["domain"].astype(str)))
        out.append(f"On {corpus}: {counts.get('confirmed', 0)} of {tested} pre-registered predictions confirmed "
                   f"({per}), {counts.get('opposite', 0)} opposite, {counts.get('not confirmed', 0)} not confirmed "
                   "(no effect beyond the controls)"
                   + (f", {counts.get('not measured', 0)} not measured" if counts.get("not measured", 0) else "")
                   + ".")
        for r in g[g["outcome"].isin(["confirmed", "opposite"])].itertuples():
            what = f"{r.domain} {'domain experts' if r.kind == 'domain' else 'drivers'} ({r.n_targets})"
            if r.strength == "selectivity":
                out.append(f"{what}: predicted {r.predicted}, observed {r.observed}: {r.outcome}.")
            else:
                out.append(f"{what} at {r.strength}: predicted {r.predicted}, observed {float(r.diff):+.3f} "
                           f"[{float(r.diff_lo):+.3f}, {float(r.diff_hi):+.3f}] beyond {r.control} "
                           f"(q {float(r.q_vs_control):.2g}): {r.outcome}.")
    return out
