"""``report.html``: one self-contained, explorable file with a run's findings, figures, tables and settings.

Adding a section (the layout gives it the nav entry, domain selector, sorting, filtering and hover values):
  1. its sentences: ``read_<name>(table) -> list[Sentence]`` in sentences.py (all prose lives there);
  2. its paper figure: ``fig_<name>`` in figures.py, listed in ``write_figures`` (PNG + SVG files);
  3. here: ``_<name>_section(tables, figures) -> str`` joining ``figure()``, ``reading()``, ``heatmap()``,
     ``table_html()`` and ``note()`` blocks; 4. add ``("anchor", "Title", _<name>_section)`` to ``SECTIONS``.

Offline by construction: figures are inlined as base64 PNG, heatmaps as inline SVG, styles and one short
script are inline, and a Content-Security-Policy forbids every fetch except ``data:`` images. The script
(plain JS, no library) sorts a table when its header is clicked, filters rows (free text, ``column=value``,
``column>x``), shows the value of a heatmap cell under the mouse, and shows one domain or all from the
selector at the top. Without JavaScript every row and heatmap is still there. The script also marks each
image that decoded (``data-loaded="1"``) and the body with ``data-images-ok="n/N"`` and ``data-js="ready"``,
so a headless browser can check the page rendered.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import OutputError
from ..io import atomic_write, read_table, write_json, write_root
from .blocks import _e, _figure_html, _safe, details, figure, heatmap, note, reading, table_html
from .copy import CAPTIONS, NO_DRIVERS, SCALE_NOTE, report_intro
from .figures import write_figures
from .record import (
    MIN_PAIR_COUNT,
    beyond_findings,
    confirmed_cell,
    findings,
    findings_record,
    stable_cell,
    table_meta,
)
from .sentences import (
    Sentence,
    beyond_sentences,
    brief_sentences,
    confirmation_sentences,
    control_sentences,
    read_associations,
    read_causal_rate,
    read_domain_experts,
    read_drivers,
    read_expert_map,
    read_expert_types,
    read_positions,
    read_routing_mi,
    read_saturated,
    read_steering,
    read_sweep,
    replication_sentences,
)
from .status import status_sentence
from .views import steering_rows

#: Table key -> file names it may be saved under (searched in the run directory, then one level down).
TABLE_FILES: dict[str, tuple[str, ...]] = {
    "domain_experts": ("domain_experts.parquet",),
    "drivers": ("driver_experts.parquet", "drivers.parquet"),
    "causal_rate": ("causal_rate.parquet",),
    "ce": ("ce.parquet",),
    "positions": ("token_positions.parquet",),
    "associations": ("token_associations.parquet",),
    "steering": ("steering.parquet",),
    "steering_sweep": ("steering_sweep.parquet",),
    "steering_dose": ("steering_dose.parquet",),
    "steering_selectivity": ("steering_selectivity.parquet",),
    "routing_mi": ("routing_mi.parquet",),
    "replication": ("replication.parquet",),
    "coactivation": ("coactivation.parquet",),
    "transitions": ("transitions.parquet",),
    "paths": ("paths.parquet",),
    "routing_consistency": ("routing_consistency.parquet",),
    "importance": ("importance.parquet",),
    "routing_overlap": ("routing_overlap.parquet",),
    "confirmation": ("confirmation.parquet",),
    "phase_comparison": ("phase_comparison.parquet",),
}
FIGURE_DIR = "figures"

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _asset(name: str) -> str:
    """A file of ``report/assets`` (package data), to inline into the page."""
    from importlib.resources import files

    return (files(__package__) / "assets" / name).read_text(encoding="utf-8")


#: The page's style sheet and script (plain JS: sorting, filtering, paging, the domain selector, heatmap hover
#: values), inlined so the page needs nothing else.
_CSS = _asset("report.css")
_SCRIPT = _asset("report.js")


# ----- loading -------------------------------------------------------------------------------------------
def _find(run_dir: Path, name: str) -> Path | None:
    direct = run_dir / name
    if direct.exists():
        return direct
    nested = sorted(run_dir.glob(f"*/{name}"))
    return nested[0] if nested else None


def load_tables(run_dir: str | Path, problems: dict[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """Every table of :data:`TABLE_FILES` found in ``run_dir`` (plus each ``expert_map*.parquet`` as
    ``expert_map:<suffix>``); missing tables are left out. A table that exists but cannot be read is left out
    too, and recorded in ``problems`` as ``{file name: reason}``. Without a driver table, per-expert mean CE
    is derived from ``ce.parquet`` (no driver flags)."""
    run_dir = Path(run_dir)
    out: dict[str, pd.DataFrame] = {}
    problems = {} if problems is None else problems

    def read(path: Path) -> pd.DataFrame | None:
        try:
            df, meta = read_table(path)
            df.attrs["meta"] = meta  # rule texts and settings travel with the table
            return df
        except Exception as e:  # a half-written or foreign file must not stop the report: say why, go on
            problems[str(path.relative_to(run_dir))] = (str(e).splitlines() or [type(e).__name__])[0][:160]
            return None

    for key, names in TABLE_FILES.items():
        for name in names:
            path = _find(run_dir, name)
            if path is None:
                continue
            df = read(path)
            if df is not None:
                out[key] = df
                break
    for path in sorted(run_dir.glob("expert_map*.parquet")) + sorted(run_dir.glob("*/expert_map*.parquet")):
        suffix = path.stem[len("expert_map"):].lstrip("_-")
        key = f"expert_map:{suffix}" if suffix else "expert_map"
        if key not in out:
            df = read(path)
            if df is not None:
                out[key] = df
    if "drivers" not in out and "ce" in out and {"domain", "layer", "expert", "ce"} <= set(out["ce"].columns):
        out["drivers"] = (out["ce"].groupby(["domain", "layer", "expert"], sort=False)["ce"].mean()
                          .rename("ce_mean").reset_index())
    return out


_reading = reading  # the name sections used before; kept for sections written against it


# ----- the page ------------------------------------------------------------------------------------------
def _settings_html(manifest: dict[str, Any]) -> str:
    items: list[tuple[str, Any]] = []
    model = manifest.get("model") or {}
    if isinstance(model, dict):
        for k in ("source", "revision", "architecture", "families", "moe_layers", "dtype", "device"):
            if model.get(k) is not None:
                items.append((f"model.{k}", model[k]))
    for k in ("kind", "status", "created", "seed"):
        if manifest.get(k) is not None:
            items.append((k, manifest[k]))
    for k, v in (manifest.get("config") or {}).items():
        items.append((f"config.{k}", v))
    for k, v in (manifest.get("versions") or {}).items():
        items.append((f"version.{k}", v))
    stages = manifest.get("stages") or {}
    for k, v in stages.items():
        if isinstance(v, dict) and "seconds" in v:
            items.append((f"stage.{k}", f"{v.get('status', '')} {v['seconds']} s"))
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(json.dumps(v, default=str) if not isinstance(v, str) else v)}</dd>"
                   for k, v in items)
    return f"<dl class='settings'>{rows}</dl>"


def _association_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Table 3 layout: per domain and kind, the top tokens by lift (deduplicated across experts)."""
    rows = []
    for (d, kind), g in df.groupby(["domain", "kind"], sort=False):
        toks = g.sort_values("lift", ascending=False)["token"].drop_duplicates().head(8)
        rows.append({"domain": d, "expert": kind, "tokens": ", ".join(map(str, toks))})
    return pd.DataFrame(rows)


def _summary_html(tables: dict[str, pd.DataFrame]) -> str:
    """The answer first: one row per domain (sample sizes, domain experts, drivers and their stability, the
    unsteered accuracy, the ablations beyond controls with their verdicts, selectivity, confirmation), each
    cell linking to the section that details it."""
    fs = findings(tables)
    if not fs:
        return ""
    conf = tables.get("confirmation")

    def link(anchor: str, text: str) -> str:
        return f"<a href='#{anchor}'>{_e(text)}</a>" if text not in ("", "–") else "–"

    def verdict(f: Any, kind: str) -> str:
        c = next((c for c in f.controls if c["kind"] == kind), None)
        if c is None:
            return "–"
        if not c["applicable"]:
            return "not applicable"
        word = "no verdict" if c["specific"] is None else "specific" if c["specific"] else "not specific"
        return f"{c['diff']:+.2f} [{c['diff_lo']:+.2f}, {c['diff_hi']:+.2f}] {word}"

    head = ["domain", "texts / inputs / items", "domain experts", "drivers", "unsteered accuracy",
            "domain experts masked, beyond controls", "drivers masked, beyond controls", "selective",
            "confirmed"]
    rows = []
    for f in fs:
        acc = ("–" if f.accuracy is None else f"{f.accuracy['accuracy']:.2f}" + (" (saturated)" if f.saturated
                                                                                   else ""))
        n_items = "–" if f.accuracy is None else str(f.accuracy["n"])
        sample = " / ".join("–" if x is None else str(x) for x in (f.n_sequences, f.n_inputs)) + f" / {n_items}"
        drv = "–" if f.n_drivers is None else str(f.n_drivers)
        if f.driver_stable is not None:
            drv += f" ({stable_cell(f, long=True)})"
        sel = {sv["kind"]: sv["selective"] for sv in f.selectivity}
        selective = ", ".join(f"{_KIND_WORD[k]} {'yes' if sel[k] else 'no' if sel[k] is not None else '–'}"
                              for k in ("domain", "driver") if k in sel) or "–"
        confirmed = confirmed_cell(conf, f.domain)
        cells = [_e(f.domain), _e(sample), link("domain", "–" if f.n_domain_experts is None else
                                                 str(f.n_domain_experts)),
                 link("drivers", drv), link("steering", acc), link("controls", verdict(f, "domain")),
                 link("controls", verdict(f, "driver")), link("controls", selective), link("confirmation", confirmed)]
        rows.append(f"<tr data-domain='{_e(f.domain)}'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<div class='xt-wrap'><table class='summary'><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
            + "<p class='note'>Beyond controls: the change in accuracy when the set is masked, minus the mean change "
              "over equally busy control sets, with its 95% interval and the run's corrected verdict. confirmed: "
              "pre-registered predictions confirmed of those testable, per corpus (confirmation part; second "
              "corpus). Each cell links to its section.</p>")


_KIND_WORD = {"domain": "domain experts", "driver": "drivers"}


def _findings_html(tables: dict[str, pd.DataFrame]) -> str:
    """Per domain, a few sentences: what was found and, in words, what was not (the detail is in the sections
    below, each sentence said once)."""
    parts = []
    for f in findings(tables):
        items = "".join(f"<li>{_e(x)}</li>" for x in brief_sentences(f))
        parts.append(f"<div class='domain-findings' data-domain='{_e(f.domain)}'><h3>{_e(f.domain)}</h3>"
                     f"<ul class='findings'>{items}</ul></div>")
    mi = tables.get("routing_mi")
    if mi is not None:
        parts.extend(f"<p>{_e(x)}</p>" for x in _safe(read_routing_mi, mi))
    return "".join(parts)


def _rule(df: pd.DataFrame) -> str:
    rule = table_meta(df).get("rule_text")
    return note(f"Rule: {rule}") if rule else ""


def _domain_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    dom, drv = tables.get("domain_experts"), tables.get("drivers")
    if dom is None or not len(dom):
        return ""
    key = "lift" if "lift" in dom.columns else "specificity"
    flagged = dom[dom["is_domain_expert"].astype(bool)] if "is_domain_expert" in dom.columns else dom
    cols = ["domain", "layer", "expert", "activation_rate", "A_lo", "A_hi", "lift", "lift_lo", "lift_hi",
            "entropy", "cwas", "specificity", "q_value"]
    return (figure(figures, "fig1_cwas") + reading(_safe(read_domain_experts, dom))
            + heatmap(dom, "activation_rate", label="activation rate A", flag="is_domain_expert",
                      flag_label="domain expert", caption=CAPTIONS["activation_heatmap"])
            + figure(figures, "fig2_expert_types") + reading(_safe(read_expert_types, dom, drv))
            + _rule(dom)
            + table_html(flagged.sort_values(["domain", key], ascending=[True, False]), cols, rows=20,
                         title=f"Domain experts (largest {'activation lift' if key == 'lift' else key} first)")
            + details(f"All {len(dom)} rows: every expert at every layer, per domain",
                      table_html(dom.sort_values(["domain", "layer", "expert"]),
                                 [*cols, "is_domain_expert", "is_general"], rows=20,
                                 source="domain_experts.parquet")))


def _driver_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    body = ""
    rate, drv = tables.get("causal_rate"), tables.get("drivers")
    if rate is not None:
        body += figure(figures, "fig3_causal_rate") + reading(_safe(read_causal_rate, rate))
    if drv is None or not len(drv):
        return body
    cols = ["domain", "layer", "expert", "ce_mean", "ce_lo", "ce_hi", "layer_median", "ratio", "q_value",
            "n_inputs", "is_driver"]
    body += (figure(figures, "fig6_causal_layers")
             + heatmap(drv, "ce_mean", label="CE", unit="nats", flag="is_driver", flag_label="driver",
                       caption=CAPTIONS["fig7_causal_heatmap"])
             + reading(_safe(read_drivers, drv)) + _rule(drv))
    floor = (table_meta(drv).get("numerical_floor") or {}).get("note")
    if floor:  # the dtype's rounding floor, once for the run
        body += note(str(floor))
    if "is_driver" in drv.columns:
        rows = drv[drv["is_driver"].fillna(False).astype(bool)].sort_values(["domain", "ce_mean"],
                                                                           ascending=[True, False])
        body += (table_html(rows, cols, rows=20, title="Driver experts (largest CE first)") if len(rows)
                 else note(NO_DRIVERS))
    return body + details(f"All {len(drv)} rows: the causal effect of every expert at every layer, per domain",
                          table_html(drv.sort_values(["domain", "ce_mean"], ascending=[True, False]), cols, rows=20,
                                     source="drivers.parquet"))


def _replication_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    """Replication: per rule and domain, the halves' sets and Jaccard; the sentences come from the findings."""

    rep = tables.get("replication")
    if rep is None:
        return ""
    summary = pd.DataFrame(table_meta(rep).get("summary") or [])
    body = reading(_safe(lambda: [x for f in findings(tables) for x in replication_sentences(f)]))
    if len(summary):
        body += table_html(summary, ["kind", "domain", "n_inputs_a", "n_inputs_b", "n_full", "n_half_a", "n_half_b",
                                     "n_both", "jaccard", "n_full_replicated"], rows=20,
                           title="Replication on disjoint halves (per rule and domain)")
    if len(rep):
        body += table_html(rep, ["kind", "domain", "layer", "expert", "in_full", "in_half_a", "in_half_b", "status"],
                           rows=20, title="Each expert flagged on all inputs or on a half",
                           source="replication.parquet")
    return body


def _phase_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    """Prompt against generated tokens (a profile with phases): a sentence per domain and the per-layer table."""
    from ..stats.phases import phase_sentences

    table = tables.get("phase_comparison")
    if table is None or not len(table):
        return ""
    body = reading(_safe(phase_sentences, table))
    why = table_meta(table).get("note")
    if why:
        body += note(str(why))
    return body + table_html(table, ["domain", "layer", "n_prompt", "n_generated", "usage_overlap", "overlap_lo",
                                     "overlap_hi", "overlap_if_same", "differs", "prompt_experts",
                                     "generated_experts", "shared_experts", "jaccard"], rows=60,
                             title="Per layer: share of expert selections in common (overlap), the floor phases "
                                   "routing alike stay above, and each phase's domain experts",
                             source="phase_comparison.parquet")


def _token_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    body = ""
    pos = tables.get("positions")
    if pos is not None and len(pos):
        body += (figure(figures, "fig4_positions") + reading(_safe(read_positions, pos))
                 + table_html(pos[pos["layer"].astype(str) == "all"],
                              ["domain", "bin", "n_trigger", "trigger_share", "n_tokens", "token_share", "ratio"],
                              rows=20, title="Relative positions of driver-triggering tokens (any layer)"))
    assoc = tables.get("associations")
    if assoc is not None and len(assoc):
        body += (table_html(_association_summary(assoc), rows=20,
                            title="Tokens associated with domain and driver experts (Table 3)")
                 + reading(_safe(read_associations, assoc))
                 + table_html(assoc, ["domain", "kind", "layer", "expert", "rank", "token_id", "token", "count",
                                      "p_expert_given_token", "p_expert", "lift"], rows=20,
                              title="Token–expert pairs", source="token_associations.parquet"))
    return body


def _map_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    body = ""
    for key in sorted(k for k in tables if k == "expert_map" or k.startswith("expert_map:")):
        fname = "fig5_expert_map" + ("" if key == "expert_map" else "_" + key.split(":", 1)[1])
        t = tables[key]
        rep = str(t["representation"].iloc[0]) if "representation" in t.columns and len(t) else "?"
        body += figure(figures, fname, rep=rep) + reading(_safe(read_expert_map, t))
    return body


def _routing_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    mi = tables.get("routing_mi")
    if mi is None or not len(mi):
        return ""
    return figure(figures, "fig_routing_mi") + table_html(mi, list(mi.columns), rows=20)


STEERING_COLUMNS = ["domain", "condition", "status", "mode", "scale", "n_targets", "n", "accuracy", "ci_low",
                    "ci_high", "weighted_f1", "delta", "delta_lo", "delta_hi", "saturated"]


def _steering_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    body = ""
    st = tables.get("steering")
    if st is not None and len(st):
        shown = steering_rows(st)
        body += figure(figures, "fig_steering") + reading(_safe(read_steering, st))
        if "saturated" in shown.columns and shown["saturated"].any():
            body += note(" ".join(read_saturated(list(dict.fromkeys(shown.loc[shown["saturated"], "domain"]
                                                                    .astype(str))))))
        body += table_html(shown, STEERING_COLUMNS, rows=20)
        if "mode" in st.columns and (st["mode"] == "scale").any():
            body += note(SCALE_NOTE)
    sw = tables.get("steering_sweep")
    if sw is not None and len(sw):
        body += figure(figures, "fig_steering_sweep") + reading(_safe(read_sweep, sw))
    return body


def _controls_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    """Do the named experts matter beyond matched controls: the dose–response per domain, the selectivity
    matrix, and the rows behind them (sentences come from :func:`.findings.control_sentences`)."""

    dose, sel = tables.get("steering_dose"), tables.get("steering_selectivity")
    if dose is None or not len(dose):
        return ""
    meta = (dose.attrs.get("meta") or {}) if hasattr(dose, "attrs") else {}
    n_tests = int(dose["n_tests"].dropna().iloc[0]) if "n_tests" in dose.columns and dose["n_tests"].notna().any() \
        else None
    body = ("<p class='note'>Every targeted condition is paired with control sets of the same layers and size: "
            "by default <em>equally busy</em> ones (non-target experts whose activation rate in the domain is close "
            "to the targets'), several seeded draws, which carry the verdict; random sets of those layers and the "
            "busiest non-target experts are shown as references. A condition is <strong>specific</strong> only when "
            "the target's Δ lies outside the control draws' spread (a prediction test over sets) and beyond them "
            "item by item (a sign test), corrected by Benjamini–Hochberg over every condition the run tests"
            + (f" ({n_tests} here)" if n_tests else "") + ", and the interval of Δ(target) − mean Δ(controls) "
            "excludes 0 beyond the data's resolution. A set is <strong>selective</strong> when it is specific on "
            "its own domain and no other domain loses more than "
            f"{float(meta.get('max_off_target') or 1 / 3):.2g} × as much beyond the same controls. The false "
            "rates of both words on random sets are measured (docs/methods.md, \"Verdicts\").</p>")
    for f in findings(tables):
        lines = [Sentence(x, f.domain) for x in control_sentences(f)]
        if lines:
            body += f"<h3>{_e(f.domain)}</h3>" + reading(lines)
    paths = figures.get("fig_dose") or []
    for png in [p for p in paths if p.suffix == ".png"]:
        body += _figure_html([png], f"Dose–response ({png.stem.removeprefix('fig_dose_')}): Δ accuracy of the "
                             "targets (95% CI) beside the verdict's control sets (mean and range over draws) and the "
                             "busiest non-target experts; * marks strengths called specific (the run's corrected "
                             "verdict).")
    cols = ["domain", "kind", "strength", "n_targets", "n", "delta", "delta_lo", "delta_hi", "p_exact",
            "negative_share", "control", "control_draws", "control_delta", "control_delta_min", "control_delta_max",
            "reference_delta", "busiest_delta", "diff", "diff_lo", "diff_hi", "control_rank", "p_set", "p_item",
            "q_vs_control", "specific", "changed_selections", "routed_tokens"]
    shown = dose[dose["applicable"].fillna(False).astype(bool)] if "applicable" in dose.columns else dose
    body += "<h3>Dose–response with controls</h3>" + table_html(shown, [c for c in cols if c in dose.columns],
                                                                 rows=200)
    if sel is not None and len(sel):
        body += _figure_html(figures.get("fig_selectivity"), "Selectivity: Δ accuracy of each evaluated domain "
                             "(columns) when a domain's experts are masked (rows), with 95% CIs; the verdict reads "
                             "the same cells beyond the controls (norm_delta in the table).")
        body += "<h3>Selectivity matrix</h3>" + table_html(sel, list(sel.columns), rows=100)
    return body


def _beyond_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    """Co-activation, paths, routing consistency, output-aware importance and routing overlap (docs/methods.md §9)."""

    lines = beyond_sentences(beyond_findings(tables))
    body = ""
    co = tables.get("coactivation")
    if co is not None and len(co):
        body += "<h3>Co-activation</h3>" + _figure_html(figures.get("fig_coactivation"), (
            "Co-activation lift P(b|a)/P(b) per layer, all domains pooled: red pairs are selected together more "
            "often than independence predicts, blue less."))
        body += reading(lines.get("coactivation", []))
        top = co[co["count"] >= MIN_PAIR_COUNT].sort_values("lift", ascending=False)
        body += table_html(top, ["domain", "layer", "expert_a", "expert_b", "count", "n_a", "p_b_given_a", "p_b",
                                 "lift"], rows=12)
    pa = tables.get("paths")
    if pa is not None and len(pa):
        body += "<h3>Expert paths</h3>" + _figure_html(figures.get("fig_paths"), (
            "The most frequent top-1 expert paths through consecutive MoE layers, line width by share of tokens."))
        body += reading(lines.get("paths", []))
        body += table_html(pa[pa["rank"] <= 3], ["domain", "layers", "rank", "path", "count", "share"], rows=24)
    cs = tables.get("routing_consistency")
    if cs is not None and len(cs):
        body += "<h3>Routing consistency</h3>" + reading(lines.get("consistency", []))
        body += table_html(cs, list(cs.columns), rows=40)
    im = tables.get("importance")
    if im is not None and len(im):
        body += "<h3>Output-aware importance</h3>" + reading(lines.get("importance", []))
        if im["importance"].notna().any():
            body += table_html(im.sort_values("importance", ascending=False), list(im.columns), rows=12)
    ov = tables.get("routing_overlap")
    if ov is not None and len(ov):
        body += "<h3>How far the interventions moved the routing</h3>" + _figure_html(
            figures.get("fig_routing_overlap"), "Share of each token's selected experts unchanged by the "
            "intervention (|S1 ∩ S2| / k) per layer, with 95% intervals over texts.")
        body += reading(lines.get("routing_overlap", []))
        body += table_html(ov, ["domain", "condition", "reason", "layer", "n_tokens", "overlap", "ci_low", "ci_high",
                                "changed"], rows=40)
    return body


def _confirmation_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    """Pre-registered against observed: hypotheses.json's predictions beside what each confirmation corpus showed."""
    conf = tables.get("confirmation")
    if conf is None or not len(conf):
        return ""
    sealed = str(table_meta(conf).get("hypotheses_hash") or "")
    body = ("<p>Before any confirmation item was evaluated, the run wrote <code>hypotheses.json</code>"
            + (f" (SHA-256 {_e(sealed[:12])}…)" if sealed else "") + ": per domain and kind, the exact expert set "
            "found on the discovery items, the predicted change in accuracy at each strength (masking and "
            "down-weighting lower it, up-weighting raises it) and the predicted selectivity. Each prediction is "
            "tested on items that never found it, with the calibrated verdict: <strong>confirmed</strong> when the "
            "effect is specific beyond equally busy control experts in the predicted direction, "
            "<strong>opposite</strong> when specific the other way, <strong>not confirmed</strong> when no effect "
            "beyond the controls. <code>expertscope confirm</code> tests the same file on new data or another "
            "checkpoint.</p>")
    body += reading([Sentence(x) for x in confirmation_sentences(conf)])
    cols = ["corpus", "domain", "kind", "strength", "n_targets", "predicted", "observed", "outcome", "n", "delta",
            "delta_lo", "delta_hi", "diff", "diff_lo", "diff_hi", "q_vs_control", "control", "note"]
    return body + table_html(conf, [c for c in cols if c in conf.columns], rows=200)


_OPTION = re.compile(r"(--[a-z][a-z-]*)")  # a command-line option in a banner: kept on one line
Section = Callable[[dict[str, pd.DataFrame], dict[str, list[Path]]], str]

#: The report's sections in order (after the findings; settings last): anchor, title, builder.
SECTIONS: list[tuple[str, str, Section]] = [
    ("domain", "Domain experts", _domain_section),
    ("drivers", "Driver experts", _driver_section),
    ("replication", "Replication", _replication_section),
    ("routing", "Routing and the domain", _routing_section),
    ("phases", "Prompt against generated tokens", _phase_section),
    ("tokens", "Tokens", _token_section),
    ("map", "Expert map", _map_section),
    ("steering", "Steering", _steering_section),
    ("controls", "Beyond controls: dose–response and selectivity", _controls_section),
    ("confirmation", "Confirmation: pre-registered against observed", _confirmation_section),
    ("beyond", "Co-activation, paths and routing changes", _beyond_section),
]


_ALWAYS_OPEN = ("summary", "findings")
_FIGURE = re.compile(r"<figure><img alt='(.*?)'(.*?)<figcaption>(.*?)</figcaption></figure>", re.S)
_PAPER_NUMBER = re.compile(r"^(Figures?) (\d+(?:–\d+)?)\. ")


def number_figures(sections: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Number the page's figures in the order they appear (``Figure 1.``, ``Figure 2.``, …); a figure of the
    paper keeps its own number in words (``Figure 4 (the paper's Figure 6).``)."""
    n = 0

    def one(m: re.Match[str]) -> str:
        nonlocal n
        n += 1
        caption = m.group(3)
        paper = _PAPER_NUMBER.match(caption)
        if paper:
            caption = f"Figure {n} (the paper's {paper.group(1)} {paper.group(2)}). " + caption[paper.end():]
        else:
            caption = f"Figure {n}. {caption}"
        return f"<figure><img alt='{caption}'{m.group(2)}<figcaption>{caption}</figcaption></figure>"

    return [(a, h, _FIGURE.sub(one, body)) for a, h, body in sections]


def page(title: str, intro: str, sections: Sequence[tuple[str, str, str]], domains: Sequence[str] = (),
         banners: Sequence[str] = ()) -> str:
    """The whole page: ``title``, an ``intro`` line, a ``banner`` per warning (e.g. an incomplete run), a
    sticky bar with the nav and the domain selector, and each non-empty ``(anchor, heading, body)`` section.
    Shared by the report and :mod:`.compare`."""
    shown = [(a, h, b) for a, h, b in sections if b.strip()]
    nav = "".join(f"<a href='#{_e(a)}'>{_e(h)}</a>" for a, h, _ in shown)
    select = ""
    if len(domains) > 1:
        opts = "".join(f"<option value='{_e(d)}'>{_e(d)}</option>" for d in domains)
        select = (f"<label>Domain <select id='domain-select'><option value=''>all domains</option>{opts}</select>"
                  "</label>")
    warn = "".join("<div class='banner' role='alert'><strong>Incomplete run.</strong> "
                   + _OPTION.sub(r"<code>\1</code>", _e(b)) + "</div>" for b in banners)
    # The answer (summary, findings) stays open; every detail section folds (open to start with).
    body = "".join(f"<section id='{_e(a)}'><h2>{_e(h)}</h2>{b}</section>" if a in _ALWAYS_OPEN else
                   f"<section id='{_e(a)}'><details open><summary><h2>{_e(h)}</h2></summary>{b}</details></section>"
                   for a, h, b in shown)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='note'>{intro}</p>{warn}"
        f"<header class='top'><nav>{nav}</nav>{select}</header>{body}<script>{_SCRIPT}</script></body></html>\n"
    )


def _domains(tables: dict[str, pd.DataFrame]) -> list[str]:
    seen: dict[str, None] = {}
    for df in tables.values():
        if df is not None and "domain" in df.columns:
            seen.update(dict.fromkeys(df["domain"].astype(str)))
    return list(seen)


def build_html(manifest: dict[str, Any], tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]],
               title: str = "expertscope report") -> str:
    """The report page as a string (pure: no I/O beyond reading the figure files)."""
    unmeasurable = (manifest.get("model") or {}).get("not_applicable") if isinstance(manifest.get("model"), dict) \
        else None
    said_once = "" if not unmeasurable else note(
        "This run profiled recorded routes (expert indices from a serving engine). Not measurable from routes, "
        "and so not shown anywhere below: " + "; ".join(f"{k} ({v})" for k, v in unmeasurable.items()) + ".")
    recorded: dict[str, Any] = manifest["recorded"] if isinstance(manifest.get("recorded"), dict) else {}
    met = [f"{d}: " + ", ".join(f"{q} {n}" for q, n in (rec.get("quirks") or {}).items() if n)
           for d, rec in recorded.items() if isinstance(rec, dict) and any((rec.get("quirks") or {}).values())]
    if met:
        from ..integrations.engine_routes import QUIRKS

        said_once += note("Engine quirks met and handled: " + "; ".join(met) + ". Rules: "
                          + "; ".join(f"{k}: {v}" for k, v in QUIRKS.items()) + ".")
    sections = [("summary", "Summary", _summary_html(tables)),
                ("findings", "Findings", said_once + _findings_html(tables))]
    sections += [(anchor, heading, build(tables, figures)) for anchor, heading, build in SECTIONS]
    sections = number_figures(sections)
    sections.append(("settings", "Run settings", _settings_html(manifest)))
    model = manifest.get("model")
    source = model.get("source", "the model") if isinstance(model, dict) else "the model"
    intro = _e(report_intro(str(source), str(manifest.get("created", ""))))
    banner = status_sentence(manifest)
    return page(title, intro, sections, _domains(tables), [banner] if banner else [])


def confirmation_page(manifest: dict[str, Any], tables: dict[str, pd.DataFrame]) -> str:
    """The page of an ``expertscope confirm`` run: the confirmation, the steering rows behind it, the settings."""
    dose = tables.get("steering_dose")
    cols = ["domain", "kind", "strength", "n_targets", "n", "delta", "delta_lo", "delta_hi", "control",
            "control_draws", "control_delta", "diff", "diff_lo", "diff_hi", "p_set", "p_item", "q_vs_control",
            "specific"]
    sections = [("confirmation", "Confirmation: pre-registered against observed", _confirmation_section(tables, {})),
                ("controls", "Steering with controls", "" if dose is None else
                 table_html(dose, [c for c in cols if c in dose.columns], rows=200)),
                ("settings", "Run settings", _settings_html(manifest))]
    model = manifest.get("model")
    source = model.get("source", "the model") if isinstance(model, dict) else "the model"
    return page("expertscope confirmation", _e(report_intro(str(source), str(manifest.get("created", "")))),
                sections, _domains(tables))


def report(run_dir: str | Path, out: str | Path | None = None, problems: dict[str, str] | None = None, *,
           lock: bool = False) -> Path:
    """Build ``run_dir/report.html`` (or ``out``) from the run's saved tables; figures are written to
    ``run_dir/figures/`` as PNG and SVG (with ``out``: ``<out stem>_figures/`` and ``<out stem>.findings.json``
    beside it, nothing in the run), drawing only those whose tables changed (see
    :func:`~expertscope.report.figures.write_figures`; with ``out`` the run's own unchanged figures are copied).
    Returns the report's path. Tables that exist but cannot be read are
    recorded in ``problems`` (``{file: reason}``) and left out of the report. A run whose manifest is not
    ``complete`` gets a banner naming the stages that did not finish. ``lock=True`` (``expertscope report``)
    holds the run's writer lock while writing into it, so a run another process is writing is refused (a
    study writing its own report holds the lock already); with ``out`` nothing is written into the run.

    Raises :class:`OutputError` if ``run_dir`` lacks ``manifest.json`` or a readable ``domain_experts.parquet``,
    if ``out`` is a directory or cannot be written, or if the run is locked by another process.
    """
    from ..rundir import check_out_file, lock_dir
    from ..validation import check_type

    check_type(run_dir, (str, os.PathLike), "run_dir", "a path (the output directory of `expertscope run`)")
    if out is not None:
        check_type(out, (str, os.PathLike), "out", "a path (e.g. 'report.html')")
        check_out_file(out)
    elif lock:
        with lock_dir(run_dir):
            return report(run_dir, problems=problems)
    if out is not None:  # the file the caller chose, and its own assets beside it: checked against that directory
        with write_root(Path(out).parent):
            return _report(run_dir, out, problems)
    return _report(run_dir, out, problems)


def _report(run_dir: str | Path, out: str | Path | None, problems: dict[str, str] | None) -> Path:
    problems = {} if problems is None else problems
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OutputError(f"{run_dir} is not a directory: pass the output directory of `expertscope run`")
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise OutputError(f"{run_dir} has no manifest.json: pass the output directory of `expertscope run`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8-sig"))
    except (ValueError, OSError) as e:
        raise OutputError(f"{manifest_path} is unreadable ({type(e).__name__}): rerun `expertscope run`") from None
    if not isinstance(manifest, dict):
        raise OutputError(f"{manifest_path} is not a run manifest (a JSON {type(manifest).__name__}): pass the "
                          "output directory of `expertscope run`")
    tables = load_tables(run_dir, problems)
    bad = next((f for f in problems if Path(f).name == "domain_experts.parquet"), None)
    if "domain_experts" not in tables and bad is not None:
        raise OutputError(f"{run_dir / bad} cannot be read ({problems[bad]}): rerun the domain-expert stage "
                          f"(`expertscope run --resume` or `expertscope domains {run_dir}`)")
    target = Path(out) if out is not None else run_dir / "report.html"
    if "domain_experts" not in tables and "confirmation" in tables:  # `expertscope confirm`: its own page
        findings_name = "findings.json" if out is None else f"{target.stem}.findings.json"
        write_json(target.with_name(findings_name), findings_record(tables, manifest))
        with atomic_write(target) as fh:
            fh.write(confirmation_page(manifest, tables))
        return target
    if "domain_experts" not in tables:
        raise OutputError(f"{run_dir} has no domain_experts.parquet: run the study (or `expertscope domains "
                          f"{run_dir}`) before building the report")
    # With ``out`` the report writes only that file and its own assets named after it (never into the run,
    # never over a neighbour's findings.json).
    fig_dir = run_dir / FIGURE_DIR if out is None else target.with_name(f"{target.stem}_figures")
    figures = write_figures(tables, fig_dir, reuse_from=run_dir / FIGURE_DIR)
    text = build_html(manifest, tables, figures)
    findings = "findings.json" if out is None else f"{target.stem}.findings.json"
    write_json(target.with_name(findings), findings_record(tables, manifest))
    with atomic_write(target) as fh:
        fh.write(text)
    return target


__all__ = ["SECTIONS", "TABLE_FILES", "build_html", "details", "figure", "heatmap", "load_tables", "note",
           "page", "reading", "report", "table_html"]
