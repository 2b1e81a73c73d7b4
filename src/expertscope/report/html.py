"""``report.html``: one self-contained file with a run's settings, tables, figures and a plain reading.

Figures are inlined as base64 PNG, styles are inline and a Content-Security-Policy forbids every fetch
except ``data:`` images, so the file opens offline and cannot reach the network. One short inline script
marks each image that decoded (``data-loaded="1"``) and the body with ``data-images-ok="n/N"``, so a
headless browser can check the page rendered.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import OutputError
from ..io import atomic_write, read_table, write_json
from .figures import expert_types, write_figures
from .findings import SATURATED, findings, findings_record, sentences, table_meta

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
    "routing_mi": ("routing_mi.parquet",),
}
FIGURE_DIR = "figures"

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1.2em;color:#1a1a1a;line-height:1.45;background:#fff}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:2px solid #0072B2;padding-bottom:.2em}
h3{margin-top:1.4em}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.92em;color:#333;margin-top:.3em}
.reading{background:#f3f7fb;border-left:4px solid #0072B2;padding:.5em .9em;margin:.6em 0}
.reading li{margin:.15em 0}table.tbl{border-collapse:collapse;font-size:.86em;margin:.5em 0 1em}
table.tbl th,table.tbl td{border:1px solid #ccc;padding:.2em .5em;text-align:right}
table.tbl th{background:#eef2f6}table.tbl td:first-child,table.tbl th:first-child{text-align:left}
.note{color:#555;font-size:.9em}dl.settings{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em}
dl.settings dt{font-weight:600}dl.settings dd{margin:0;font-family:ui-monospace,monospace;font-size:.9em}
nav a{margin-right:1em}
@media print{body{max-width:none}figure{break-inside:avoid}}
"""
_SCRIPT = (
    "window.addEventListener('load',function(){var im=document.images,ok=0;"
    "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){ok++;im[i].setAttribute('data-loaded','1');}"
    "else{im[i].setAttribute('data-loaded','0');}}"
    "document.body.setAttribute('data-images-ok',ok+'/'+im.length);});"
)


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


# ----- formatting ----------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "–"
    if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e5):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}".rstrip("0").rstrip(".") if "." in f"{v:.{digits}f}" else f"{v:.{digits}f}"


def _signed(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}"


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def table_html(df: pd.DataFrame | None, columns: list[str] | None = None, rows: int = 15) -> str:
    """The first ``rows`` rows of ``df`` (only ``columns`` that exist) as an escaped HTML table."""
    if df is None or not len(df):
        return "<p class='note'>(no rows)</p>"
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for r in df[cols].head(rows).itertuples(index=False):
        cells = []
        for v in r:
            if isinstance(v, bool | np.bool_):
                cells.append("yes" if v else "")
            elif isinstance(v, float | np.floating):
                cells.append(_num(v))
            else:
                cells.append(_e(v))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    more = f"<p class='note'>first {rows} of {len(df)} rows</p>" if len(df) > rows else ""
    return f"<table class='tbl'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _figure_html(paths: list[Path] | None, caption: str) -> str:
    png = next((p for p in paths or [] if p.suffix == ".png"), None)
    if png is None:
        return ""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}' "
            f"onload=\"this.setAttribute('data-loaded','1')\"><figcaption>{_e(caption)}</figcaption></figure>")


def _reading(lines: list[str]) -> str:
    lines = [x for x in lines if x]
    if not lines:
        return ""
    return "<div class='reading'><strong>Reading.</strong><ul>" + "".join(f"<li>{_e(x)}</li>" for x in lines) + \
        "</ul></div>"


# ----- readings (plain language from the numbers) --------------------------------------------------------
def read_domain_experts(df: pd.DataFrame) -> list[str]:
    """Per domain: how many domain experts, where they concentrate, and the strongest one."""
    out = []
    E = int(df["expert"].max()) + 1
    L = df["layer"].nunique()
    for d in dict.fromkeys(df["domain"].astype(str)):
        g = df[df["domain"].astype(str) == d]
        flag = g[g["is_domain_expert"].astype(bool)] if "is_domain_expert" in g.columns else g.iloc[:0]
        if not len(flag):
            out.append(f"In {d}, no expert passes the domain-expert rule at any of the {L} MoE layers.")
            continue
        per_layer = flag.groupby("layer").size()
        busiest = int(per_layer.idxmax())
        best = flag.sort_values("specificity", ascending=False).iloc[0]
        out.append(
            f"In {d}, {len(flag)} of {E * L} experts ({E} per layer × {L} layers) are domain experts; layer "
            f"{busiest} has the most ({int(per_layer.max())} of {E}). The strongest is expert {int(best.expert)} "
            f"at layer {int(best.layer)} (specificity {_signed(float(best.specificity))}, CWAS "
            f"{_num(best.cwas)}, activation rate {_pct(float(best.activation_rate))} against a uniform "
            f"{_pct(float(best.get('uniform_rate', float('nan'))))})."
        )
    return out


def read_expert_types(df: pd.DataFrame, drivers: pd.DataFrame | None) -> list[str]:
    """Per domain: the share of routed selections going to general, domain and driver experts."""
    typed = expert_types(df, drivers)
    out = []
    for d in dict.fromkeys(typed["domain"].astype(str)):
        g = typed[typed["domain"].astype(str) == d]
        tot = float(g["activation_rate"].sum()) or float("nan")
        share = {t: float(g.loc[g["type"] == t, "activation_rate"].sum()) / tot for t in
                 ("general", "domain", "driver", "both")}
        n = g[g["type"] != "below uniform"].groupby("type").size()
        out.append(
            f"In {d}, general experts take {_pct(share['general'])} of routed selections, domain experts "
            f"{_pct(share['domain'] + share['both'])} and driver experts {_pct(share['driver'] + share['both'])} "
            f"({int(n.get('general', 0))} general, {int(n.get('domain', 0) + n.get('both', 0))} domain and "
            f"{int(n.get('driver', 0) + n.get('both', 0))} driver experts among those activated above uniform)."
        )
    return out


def read_causal_rate(df: pd.DataFrame) -> list[str]:
    out = []
    for d in dict.fromkeys(df["domain"].astype(str)):
        g = df[df["domain"].astype(str) == d].dropna(subset=["causal_rate"])
        if not len(g):
            continue
        top = g.loc[g["causal_rate"].idxmax()]
        out.append(f"In {d}, the causal rate peaks at layer {int(top.layer)}: {_pct(float(top.causal_rate))} of "
                   f"its tokens are routed to at least one of that layer's driver experts (mean over layers "
                   f"{_pct(float(g['causal_rate'].mean()))}).")
    return out


def read_drivers(df: pd.DataFrame) -> list[str]:
    out = []
    for d in dict.fromkeys(df["domain"].astype(str)):
        g = df[df["domain"].astype(str) == d].dropna(subset=["ce_mean"])
        if not len(g):
            continue
        n_drv = int(g["is_driver"].astype(bool).sum()) if "is_driver" in g.columns else None
        top = g.loc[g["ce_mean"].idxmax()]
        lm = g.groupby("layer")["ce_mean"].mean()
        z = ""
        if {"layer_mean", "layer_sd"} <= set(g.columns) and float(top.layer_sd) > 0:
            z = f", {(float(top.ce_mean) - float(top.layer_mean)) / float(top.layer_sd):.1f} sd above its layer's mean"
        drv = f"{n_drv} driver experts; " if n_drv is not None else ""
        out.append(f"In {d}: {drv}the strongest single expert is expert {int(top.expert)} at layer "
                   f"{int(top.layer)} (CE {_num(top.ce_mean)} nats{z}); the mean CE per layer is highest at layer "
                   f"{int(lm.idxmax())} ({_num(lm.max())} nats) and lowest at layer {int(lm.idxmin())}.")
    return out


def read_positions(df: pd.DataFrame) -> list[str]:
    out = []
    g_all = df[df["layer"].astype(str) == "all"]
    for d in dict.fromkeys(g_all["domain"].astype(str)):
        g = g_all[g_all["domain"].astype(str) == d].sort_values("bin_index")
        n = int(g["n_trigger_total"].iloc[0]) if "n_trigger_total" in g.columns else 0
        if n == 0 or g["trigger_share"].isna().all():
            out.append(f"In {d}, no token selected a driver expert, so there is no position profile.")
            continue
        ratio = g["trigger_share"] / g["token_share"].replace(0, np.nan)
        hi = g.loc[ratio.idxmax()]
        first = g.iloc[0]
        out.append(
            f"In {d}, {_pct(float(first.trigger_share))} of the {n} driver-triggering tokens sit in the first fifth "
            f"of their sequence against {_pct(float(first.token_share))} of all tokens; the most over-represented "
            f"bin is {hi.bin} ({_pct(float(hi.trigger_share))} vs {_pct(float(hi.token_share))}, "
            f"×{float(ratio.max()):.2f})."
        )
    return out


def read_associations(df: pd.DataFrame) -> list[str]:
    out = []
    for (d, kind), g in df.groupby(["domain", "kind"], sort=False):
        best = g.sort_values("lift", ascending=False).iloc[0]
        toks = ", ".join(f"“{t}”" for t in g.sort_values("lift", ascending=False)["token"].drop_duplicates()[:5])
        out.append(f"In {d}, {kind} experts respond most to {toks}; the top pair is “{best.token}” with expert "
                   f"{int(best.expert)} at layer {int(best.layer)} (lift {float(best.lift):.2f}: selected for "
                   f"{_pct(float(best.p_expert_given_token))} of its {int(best['count'])} occurrences against "
                   f"{_pct(float(best.p_expert))} of all tokens).")
    return out


def read_expert_map(df: pd.DataFrame) -> list[str]:
    n_cl = df["cluster"].nunique()
    lines = [f"{len(df)} experts in {n_cl} KMeans clusters."]
    if "is_driver" in df.columns and df["is_driver"].astype(bool).any():
        drv = df[df["is_driver"].astype(bool)]
        counts = drv["cluster"].value_counts()
        c = int(counts.index[0])
        share_all = float((df["cluster"] == c).mean())
        lines.append(f"{int(counts.iloc[0])} of the {len(drv)} driver experts fall in cluster {c}, which holds "
                     f"{_pct(share_all)} of all experts; the drivers span {len(counts)} cluster(s).")
    return lines


def read_steering(df: pd.DataFrame) -> list[str]:
    out = []
    for d in dict.fromkeys(df["domain"].astype(str)):
        g = df[df["domain"].astype(str) == d]
        base = g[g["condition"] == "original"]
        if not len(base):
            continue
        b = base.iloc[0]
        parts = []
        for r in g[g["condition"] != "original"].itertuples():
            if "applicable" in g.columns and not bool(r.applicable):
                parts.append(f"{str(r.condition).replace('_', ' ')} not applicable ({getattr(r, 'reason', '')})")
            elif "delta" in g.columns and not math.isnan(float(r.delta)):
                ci = (f" (95% CI {_signed(float(r.delta_lo))} to {_signed(float(r.delta_hi))})"
                      if "delta_lo" in g.columns else "")
                parts.append(f"{str(r.condition).replace('_', ' ')} {_signed(float(r.delta))}{ci}")
        out.append(f"In {d}, accuracy is {_num(b.accuracy)} unsteered (n = {int(b.n) if 'n' in g.columns else '?'})"
                   + ("; changes: " + "; ".join(parts) if parts else "") + ".")
    return out


def read_sweep(df: pd.DataFrame) -> list[str]:
    out = []
    sc = df[df["sweep"] == "scale"] if "sweep" in df.columns else df
    for (d, t), g in sc.groupby(["domain", "targets"], sort=False):
        best = g.loc[g["accuracy"].idxmax()]
        one = g[np.isclose(g["scale"].astype(float), 1.0)]
        base = f" (unsteered {_num(one['accuracy'].iloc[0])})" if len(one) else ""
        out.append(f"In {d}, scaling the {t} experts gives the best accuracy at s = {_num(best.scale)}: "
                   f"{_num(best.accuracy)}{base}.")
    return out


def _safe(fn: Callable[..., list[str]], *args: Any) -> list[str]:
    try:
        return fn(*args)
    except Exception as e:  # a reading is a courtesy: never lose the report over one
        return [f"(no reading: {type(e).__name__})"]


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
        rows.append({"domain": d, "expert": kind, "tokens": ", ".join(toks)})
    return pd.DataFrame(rows)


def _findings_html(tables: dict[str, pd.DataFrame]) -> str:
    """Per domain: what was found and, in words, what was not (see :mod:`.findings`)."""
    parts = []
    for f in findings(tables):
        items = "".join(f"<li>{_e(x)}</li>" for x in sentences(f))
        parts.append(f"<h3>{_e(f.domain)}</h3><ul class='findings'>{items}</ul>")
    mi = tables.get("routing_mi")
    if mi is not None and len(mi) and "mi_bits" in mi.columns:
        top = mi.loc[mi["mi_bits"].idxmax()]
        parts.append(f"<p>Routing depends on the domain most at layer {int(top['layer'])}: I(domain; selected "
                     f"expert) = {_num(top['mi_bits'])} bits (mean over layers {_num(mi['mi_bits'].mean())}).</p>")
    return "".join(parts)


def _domain_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    dom, drv = tables.get("domain_experts"), tables.get("drivers")
    if dom is None or not len(dom):
        return ""
    body = _figure_html(figures.get("fig1_cwas"), "Figure 1. CWAS = (1 − H)·A of every expert, per layer and "
                        "domain; stars mark domain experts, the dotted line the uniform rate k/E.")
    body += _reading(_safe(read_domain_experts, dom))
    body += _figure_html(figures.get("fig2_expert_types"), "Figure 2. (a) Share of routed selections by expert "
                         "type; (b) number of activated experts of each type.")
    body += _reading(_safe(read_expert_types, dom, drv))
    top = dom[dom["is_domain_expert"].astype(bool)] if "is_domain_expert" in dom.columns else dom
    key = "lift" if "lift" in top.columns else "specificity"
    top = top.sort_values(["domain", key], ascending=[True, False])
    rule = table_meta(dom).get("rule_text")
    if rule:
        body += f"<p class='note'>Rule: {_e(rule)}</p>"
    body += "<h3>Domain experts (largest activation lift first)</h3>" + table_html(
        top, ["domain", "layer", "expert", "activation_rate", "A_lo", "A_hi", "lift", "lift_lo", "lift_hi",
              "entropy", "cwas", "specificity", "q_value", "is_driver"], rows=30)
    return body


def _driver_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    body = ""
    rate, drv = tables.get("causal_rate"), tables.get("drivers")
    if rate is not None:
        body += _figure_html(figures.get("fig3_causal_rate"), "Figure 3. Causal rate per layer: the share of a "
                             "domain's tokens whose selected experts include a driver expert of that layer.")
        body += _reading(_safe(read_causal_rate, rate))
    if drv is None or not len(drv):
        return body
    body += _figure_html(figures.get("fig6_causal_layers"), "Figure 6. Causal effect (KL of the clean to the "
                         "perturbed next-token distribution at the decision positions) per layer: mean and largest "
                         "over the experts.")
    body += _figure_html(figures.get("fig7_causal_heatmap"), "Figures 7–9. Causal effect of every expert at "
                         "every layer; darker is stronger, driver experts boxed.")
    body += _reading(_safe(read_drivers, drv))
    rule = table_meta(drv).get("rule_text")
    if rule:
        body += f"<p class='note'>Rule: {_e(rule)}</p>"
    if "is_driver" in drv.columns:
        rows = drv[drv["is_driver"].fillna(False).astype(bool)].sort_values(["domain", "ce_mean"],
                                                                           ascending=[True, False])
        body += "<h3>Driver experts (largest CE first)</h3>"
        body += table_html(rows, ["domain", "layer", "expert", "ce_mean", "ce_lo", "ce_hi", "layer_median",
                                  "ratio", "q_value", "n_inputs"], rows=30) if len(rows) else \
            "<p class='note'>No expert passes the driver rule in any domain; see the findings above.</p>"
    return body


def _token_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    body = ""
    pos = tables.get("positions")
    if pos is not None and len(pos):
        body += _figure_html(figures.get("fig4_positions"), "Figure 4. Relative position t/T of tokens that select "
                             "a driver expert at any layer, against all tokens (baseline).")
        body += _reading(_safe(read_positions, pos))
        body += table_html(pos[pos["layer"].astype(str) == "all"],
                           ["domain", "bin", "n_trigger", "trigger_share", "n_tokens", "token_share", "ratio"], 30)
    assoc = tables.get("associations")
    if assoc is not None and len(assoc):
        body += "<h3>Tokens associated with domain and driver experts (Table 3)</h3>"
        body += table_html(_association_summary(assoc), rows=40)
        body += _reading(_safe(read_associations, assoc))
        body += table_html(assoc, ["domain", "kind", "layer", "expert", "rank", "token_id", "token", "count",
                                   "p_expert_given_token", "p_expert", "lift"], rows=30)
    return body


def _map_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    body = ""
    for key in sorted(k for k in tables if k == "expert_map" or k.startswith("expert_map:")):
        fname = "fig5_expert_map" + ("" if key == "expert_map" else "_" + key.split(":", 1)[1])
        t = tables[key]
        rep = str(t["representation"].iloc[0]) if "representation" in t.columns and len(t) else "?"
        body += _figure_html(figures.get(fname), f"Figure 5. t-SNE of expert representations ({rep}), KMeans "
                             "clusters by colour, driver experts as stars.")
        body += _reading(_safe(read_expert_map, t))
    return body


def _routing_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    mi = tables.get("routing_mi")
    if mi is None or not len(mi):
        return ""
    body = _figure_html(figures.get("fig_routing_mi"), "Mutual information between the domain and the selected "
                        "expert, per layer (bits; the expert drawn uniformly from each token's selected set).")
    return body + table_html(mi, list(mi.columns), rows=64)


def _steering_table(st: pd.DataFrame) -> pd.DataFrame:
    """The steering table as shown: not-applicable rows keep their reason and show no numbers."""
    st = st.copy()
    if "applicable" in st.columns:
        na = ~st["applicable"].fillna(True).astype(bool)
        col = "reason" if "reason" in st.columns else "note"
        reason = st[col] if col in st.columns else pd.Series("no targets", index=st.index)
        st["status"] = np.where(na, "not applicable: " + reason.fillna("no targets").astype(str), "")
    if "accuracy" in st.columns and "condition" in st.columns:
        if "saturated" not in st.columns:
            base = st[st["condition"] == "original"].set_index("domain")["accuracy"]
            st["saturated"] = (st["domain"].map(base) >= SATURATED).fillna(False)
        st["saturated"] = st["saturated"].fillna(False).astype(bool)
    return st


def _steering_section(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]]) -> str:
    body = ""
    st = tables.get("steering")
    if st is not None and len(st):
        shown = _steering_table(st)
        body += _figure_html(figures.get("fig_steering"), "Accuracy under each steering condition (95% CIs); "
                             "conditions without targets are not applicable and not drawn.")
        body += _reading(_safe(read_steering, st))
        if "saturated" in shown.columns and shown["saturated"].any():
            names = ", ".join(dict.fromkeys(shown.loc[shown["saturated"], "domain"].astype(str)))
            body += (f"<p class='note'><strong>Saturated:</strong> {_e(names)} (unsteered accuracy ≥ "
                     f"{SATURATED}); a null there says little about the experts.</p>")
        body += table_html(shown, ["domain", "condition", "status", "mode", "scale", "n_targets", "n", "accuracy",
                                   "ci_low", "ci_high", "weighted_f1", "delta", "delta_lo", "delta_hi", "saturated"],
                           rows=40)
        if "mode" in st.columns and (st["mode"] == "scale").any():
            body += ("<p class='note'>Scale mode multiplies router logits by s: a negative logit scaled by s &gt; 1 "
                     "moves down, not up.</p>")
    sw = tables.get("steering_sweep")
    if sw is not None and len(sw):
        body += _figure_html(figures.get("fig_steering_sweep"), "Accuracy against the steering scale (and the "
                             "number of targeted experts), shaded 95% CIs.")
        body += _reading(_safe(read_sweep, sw))
    return body


#: The report's sections in order: findings first, settings last.
SECTIONS: list[tuple[str, str, Callable[[dict[str, pd.DataFrame], dict[str, list[Path]]], str]]] = [
    ("domain", "Domain experts", _domain_section),
    ("drivers", "Driver experts", _driver_section),
    ("routing", "Routing and the domain", _routing_section),
    ("tokens", "Tokens", _token_section),
    ("map", "Expert map", _map_section),
    ("steering", "Steering", _steering_section),
]


def build_html(manifest: dict[str, Any], tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]],
               title: str = "expertscope report") -> str:
    """The report page as a string (pure: no I/O beyond reading the figure files)."""
    sec: list[str] = []
    nav: list[str] = []

    def section(anchor: str, heading: str, body: str) -> None:
        if body.strip():
            nav.append(f"<a href='#{anchor}'>{_e(heading)}</a>")
            sec.append(f"<section id='{anchor}'><h2>{_e(heading)}</h2>{body}</section>")

    section("findings", "Findings", _findings_html(tables))
    for anchor, heading, build in SECTIONS:
        section(anchor, heading, build(tables, figures))
    section("settings", "Run settings", _settings_html(manifest))
    model = manifest.get("model")
    source = model.get("source", "the model") if isinstance(model, dict) else "the model"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='note'>What gets activated: domain and driver experts of "
        f"{_e(source)}"
        f". Generated {_e(manifest.get('created', ''))}; this file is self-contained and works offline.</p>"
        f"<nav>{''.join(nav)}</nav>{''.join(sec)}<script>{_SCRIPT}</script></body></html>\n"
    )


def report(run_dir: str | Path, out: str | Path | None = None, problems: dict[str, str] | None = None) -> Path:
    """Build ``run_dir/report.html`` (or ``out``) from the run's saved tables; figures are (re)written to
    ``run_dir/figures/`` as PNG and SVG. Returns the report's path. Tables that exist but cannot be read are
    recorded in ``problems`` (``{file: reason}``) and left out of the report.

    Raises :class:`OutputError` if ``run_dir`` lacks ``manifest.json`` or a readable ``domain_experts.parquet``,
    or if ``out`` is a directory.
    """
    from ..validation import check_type

    check_type(run_dir, (str, os.PathLike), "run_dir", "a path (the output directory of `expertscope run`)")
    if out is not None:
        check_type(out, (str, os.PathLike), "out", "a path (e.g. 'report.html')")
    problems = {} if problems is None else problems
    if out is not None and Path(out).is_dir():
        raise OutputError(f"--out {out} is a directory: pass a file path, e.g. {Path(out) / 'report.html'}")
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
    if "domain_experts" not in tables:
        raise OutputError(f"{run_dir} has no domain_experts.parquet: run the study (or `expertscope domains "
                          f"{run_dir}`) before building the report")
    figures = write_figures(tables, run_dir / FIGURE_DIR)
    page = build_html(manifest, tables, figures)
    target = Path(out) if out is not None else run_dir / "report.html"
    write_json(target.with_name("findings.json"), findings_record(tables, manifest))
    with atomic_write(target) as fh:
        fh.write(page)
    return target


__all__ = ["TABLE_FILES", "build_html", "load_tables", "report", "table_html"]
