"""``compare.html``: several runs (one per model) side by side, where the paper compares its models.

For each run: its architecture (experts per layer, top-k, shared experts), the domain- and driver-expert
counts per domain, the unsteered accuracies, then the paper's comparisons — Figure 1 (CWAS per expert),
Figure 2 (expert types), Figure 3 (causal rate per layer), the routing mutual information per layer, and
Tables 1–2 (steering) with one block per model. Figures are written per run into ``<out>_figures/``;
one the run's own report drew from the same tables (or an earlier run of the comparison did) is copied.
The page is laid out like the report (:func:`~expertscope.report.html.page`): sortable, filterable tables, a
domain selector, hover values on the routing-MI heatmap, and a banner for each run that did not finish.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import OutputError
from ..io import atomic_write, write_json
from .blocks import _e, _figure_html, heatmap, table_html
from .copy import compare_intro
from .figures import fig_routing_mi, write_figures
from .html import FIGURE_DIR, STEERING_COLUMNS, load_tables, page
from .record import findings
from .status import status_sentence
from .views import steering_rows

#: The per-run figures of a comparison (Figures 1–3 of each run's report).
_COMPARED = ("fig1_cwas", "fig2_expert_types", "fig3_causal_rate")


def _label(manifest: dict[str, Any], run_dir: Path) -> str:
    model = manifest.get("model")
    src = model.get("source") if isinstance(model, dict) else None
    return str(src or run_dir.name)


def _arch_row(label: str, manifest: dict[str, Any]) -> dict[str, Any]:
    model = manifest.get("model")
    m: dict[str, Any] = model if isinstance(model, dict) else {}
    first = lambda d: next(iter((d or {}).values()), None)  # noqa: E731  (per-layer dicts: the first layer's)
    return {"model": label, "architecture": m.get("architecture"), "moe_layers": len(m.get("moe_layers") or []),
            "experts_per_layer": first(m.get("num_experts")), "top_k": first(m.get("top_k")),
            "shared_experts": first(m.get("num_shared_experts"))}


def _load(run_dir: Path) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    path = run_dir / "manifest.json"
    if not path.exists():
        raise OutputError(f"{run_dir} has no manifest.json: pass output directories of `expertscope run`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise OutputError(f"{path} is unreadable ({type(e).__name__}): rerun `expertscope run`") from e
    tables = load_tables(run_dir)
    if "domain_experts" not in tables:
        raise OutputError(f"{run_dir} has no domain_experts.parquet: finish that run first (--resume)")
    return manifest, tables


def summary_frame(runs: Sequence[tuple[str, dict[str, Any], dict[str, pd.DataFrame]]]) -> pd.DataFrame:
    """One row per (model, domain): experts found, drivers found, largest mean CE, unsteered accuracy."""
    rows = []
    for label, manifest, tables in runs:
        arch = _arch_row(label, manifest)
        for f in findings(tables):
            acc = f.accuracy or {}
            rows.append({**arch, "domain": f.domain, "domain_experts": f.n_domain_experts, "drivers": f.n_drivers,
                         "largest_mean_ce": f.largest_ce, "accuracy": acc.get("accuracy"),
                         "accuracy_lo": acc.get("ci_low"), "accuracy_hi": acc.get("ci_high")})
    return pd.DataFrame(rows)


def overlap_section(dirs: Sequence[Path], labels: Sequence[str]) -> str:
    """Routing overlap of the first run with each other run that kept per-token routes of the same texts
    (``|S1 ∩ S2| / k`` per layer, pooled over domains); a pair on different texts or models says so."""
    from ..errors import ExpertscopeError
    from ..stats.overlap import routing_overlap

    first = dirs[0] / "routes.safetensors"
    if not first.exists():
        return ""
    parts = []
    for d, label in zip(dirs[1:], labels[1:], strict=True):
        if not (d / "routes.safetensors").exists():
            continue
        try:
            t = routing_overlap(first, d / "routes.safetensors", n_boot=200)
        except ExpertscopeError as e:
            parts.append(f"<p class='note'>{_e(labels[0])} vs {_e(label)}: not compared ({_e(str(e))}).</p>")
            continue
        parts.append(f"<h3>{_e(labels[0])} vs {_e(label)}</h3>" + table_html(
            t, ["domain", "layer", "n_sequences", "n_tokens", "overlap", "ci_low", "ci_high", "changed",
                "n_unmatched"], rows=80))
    if not parts:
        return ""
    return ("<p class='note'>Mean share of each token's selected experts that both runs chose (|S1 ∩ S2| / k).</p>"
            + "".join(parts))


def compare(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``out`` (an HTML file) comparing the runs in ``run_dirs`` (at least two); returns its path. The file
    and its assets are written under their own directory's rules (never through a link below it)."""
    from ..io import write_root
    from ..validation import check_type

    check_type(out, (str, os.PathLike), "out", "a file path (e.g. 'compare.html')")
    with write_root(Path(out).parent):
        return _compare_impl(run_dirs, out)


def _compare_impl(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``out`` (an HTML file) comparing the runs in ``run_dirs`` (at least two); returns its path."""
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise OutputError("compare needs at least two run directories: pass e.g. runs/demo runs/demo-deepseek")
    runs = []
    for d in dirs:
        if not d.is_dir():
            raise OutputError(f"{d} is not a directory: pass output directories of `expertscope run`")
        manifest, tables = _load(d)
        runs.append((_label(manifest, d), manifest, tables))
    out = Path(out)
    fig_dir = out.with_name(out.stem + "_figures")
    mi_frames = []
    panels: dict[str, list[str]] = {"cwas": [], "types": [], "rate": []}
    subs: list[Path] = []
    for i, (label, _m, t) in enumerate(runs):
        sub = fig_dir / f"run{i}"
        # A figure the run's report drew from the same tables (or an earlier run here did) is copied, not drawn.
        figs = write_figures(t, sub, reuse_from=[dirs[i] / FIGURE_DIR, *subs], names=_COMPARED)
        subs.append(sub)
        panels["cwas"].append(_figure_html(figs.get("fig1_cwas"), f"Figure 1 — {label}: CWAS"))
        panels["types"].append(_figure_html(figs.get("fig2_expert_types"), f"Figure 2 — {label}: expert types"))
        panels["rate"].append(_figure_html(figs.get("fig3_causal_rate"), f"Figure 3 — {label}: causal rate per layer"))
        if t.get("routing_mi") is not None:
            mi_frames.append(t["routing_mi"].assign(model=label))
    summary = summary_frame(runs)
    sections = [("summary", "Summary", table_html(summary, rows=30))]
    for key, heading in (("cwas", "Domain experts (Figure 1)"), ("types", "Expert types (Figure 2)"),
                         ("rate", "Causal rate (Figure 3)")):
        sections.append((key, heading, "".join(panels[key])))
    if mi_frames:
        mi = pd.concat(mi_frames, ignore_index=True)
        sections.append(("mi", "Routing and the domain",
                         _figure_html(fig_routing_mi(mi, fig_dir), "I(domain; selected expert) per layer, per model")
                         + heatmap(mi, "mi_bits", label="I(domain; expert)", unit="bits",
                                   rows="model", cols="layer", by=None)
                         + table_html(mi, rows=30)))
    steer = []
    for label, _m, t in runs:
        st = t.get("steering")
        if st is not None and len(st):
            steer.append(table_html(steering_rows(st), [c for c in STEERING_COLUMNS if c not in ("mode", "scale")],
                                    rows=20, title=label))
    sections.append(("steering", "Steering (Tables 1–2)", "".join(steer)))
    overlap = overlap_section(dirs, [label for label, _, _ in runs])
    if overlap:
        sections.append(("overlap", "Routing overlap on the same texts", overlap))
    banners = [b for label, m, _ in runs if (b := status_sentence(m, run=label))]
    domains = list(dict.fromkeys(summary["domain"].astype(str))) if "domain" in summary.columns else []
    text = page("expertscope comparison", _e(compare_intro([label for label, _, _ in runs])), sections, domains,
                banners)
    with atomic_write(out) as fh:
        fh.write(text)
    write_json(out.with_suffix(".json"), {"version": 1, "runs": [str(d) for d in dirs],
                                          "summary": json.loads(summary.to_json(orient="records"))})
    return out


__all__ = ["compare", "overlap_section", "summary_frame"]
