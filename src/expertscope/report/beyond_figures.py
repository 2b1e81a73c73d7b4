"""Figures of the controls (dose–response, selectivity) and beyond the paper (co-activation, paths, routing
overlap), from saved tables; the same conventions as :mod:`.paper_figures`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import figure_style as style
from .figure_style import (
    OKABE_ITO,
    TYPE_COLOURS,
    _colour,
    _domains,
    _empty,
    _figure,
    _pick,
    _shared_legend,
    _slug,
    _styled,
)


# ----- controls: dose-response and selectivity --------------------------------------------------------------
def fig_dose(dose: pd.DataFrame | None, out_dir: str | Path, name: str = "fig_dose") -> list[Path]:
    """One figure per domain (``<name>_<domain>``): Δ accuracy against steering strength (mask, scale
    factors, bias shifts) for its domain experts and drivers: the targets with their 95% interval beside
    the verdict's control sets (mean, bar = range over draws; equally busy by default) and the busiest
    control; a star marks a point the run's calibrated verdict calls specific. Returns every written path."""
    if _empty(dose, "domain", "kind", "strength", "delta"):
        return []
    assert dose is not None
    df = dose[dose["applicable"].fillna(False).astype(bool)] if "applicable" in dose.columns else dose
    paths: list[Path] = []
    for d in _domains(dose):
        g = df[df["domain"].astype(str) == d]
        kinds = [k for k in ("domain", "driver") if (g["kind"] == k).any()]
        if not kinds:
            continue

        def build(g: pd.DataFrame = g, kinds: list[str] = kinds, d: str = d) -> Any:
            fig, axes = _figure(len(kinds), ncols=2, panel=(5.0, 3.3))
            for ax, kind in zip(axes, kinds, strict=True):
                r = g[g["kind"] == kind]
                labels = list(r["strength"].astype(str))
                x = np.arange(len(labels))
                t = r["delta"].to_numpy(float)
                err = np.vstack([t - r["delta_lo"].to_numpy(float), r["delta_hi"].to_numpy(float) - t])
                ax.errorbar(x - 0.12, t, yerr=np.maximum(np.nan_to_num(err), 0), fmt="o", color=TYPE_COLOURS[kind],
                            capsize=2, label=f"{kind} experts (95% CI)")
                if "control_delta" in r.columns:
                    c = r["control_delta"].to_numpy(float)
                    cerr = np.vstack([c - r["control_delta_min"].to_numpy(float),
                                      r["control_delta_max"].to_numpy(float) - c])
                    which = str(r["control"].iloc[0]) if "control" in r.columns and len(r) else "random"
                    ax.errorbar(x + 0.12, c, yerr=np.maximum(np.nan_to_num(cerr), 0), fmt="s", color="0.45",
                                capsize=2, label=f"{'equally busy' if which == 'matched' else which} controls "
                                                 "(mean, range)")
                if "busiest_delta" in r.columns:
                    ax.plot(x + 0.24, r["busiest_delta"].to_numpy(float), "v", color=OKABE_ITO[1],
                            label="busiest non-target")
                if "specific" in r.columns:
                    spec = (r["specific"] == True).to_numpy(bool)  # noqa: E712  (True/False/NaN objects)
                    top = np.nanmax(np.r_[r["delta_hi"].to_numpy(float), 0.0]) + 0.03
                    for xi in x[spec]:
                        ax.text(xi, top, "*", ha="center", va="bottom", fontsize=13)
                    if spec.any():  # room for the stars inside the axes, under the title
                        lo, hi = ax.get_ylim()
                        ax.set_ylim(lo, max(hi, top + 0.12 * (hi - lo)))
                ax.axhline(0, color="grey", lw=0.8)
                ax.set_xticks(x, labels, rotation=30)
                ax.set_ylabel("Δ accuracy vs unsteered")
                ax.set_title(f"{d}: {kind} experts (n = {int(r['n'].max()) if r['n'].notna().any() else '?'})")
            _shared_legend(fig, axes, ncols=3)
            fig.suptitle(f"{d}: dose–response, targets beside controls (* specific: the run's corrected verdict)")
            return style.save_figure(fig, out_dir, f"{name}_{_slug(d)}")

        paths += _styled(build)
    return paths

def fig_selectivity(sel: pd.DataFrame | None, out_dir: str | Path, name: str = "fig_selectivity") -> list[Path]:
    """The selectivity matrix per kind: rows = the domain whose experts are ablated, columns = the domain
    evaluated; colour and text = Δ accuracy with its 95% interval. A selective domain has its most negative
    cell on the diagonal."""
    if _empty(sel, "kind", "ablated", "evaluated", "delta"):
        return []
    assert sel is not None
    kinds = [k for k in ("domain", "driver") if (sel["kind"] == k).any()]
    doms = list(dict.fromkeys(list(sel["evaluated"].astype(str))))

    def build() -> Any:
        fig, axes = _figure(len(kinds), ncols=2, panel=(1.6 * len(doms) + 1.8, 1.2 * len(doms) + 1.2))
        lim = max(0.05, float(np.nanmax(np.abs(sel["delta"].to_numpy(float)))))
        im = None
        for ax, kind in zip(axes, kinds, strict=True):
            g = sel[sel["kind"] == kind]
            rows = list(dict.fromkeys(g["ablated"].astype(str)))
            m = np.full((len(rows), len(doms)), np.nan)
            for r in g.itertuples():
                i, j = rows.index(str(r.ablated)), doms.index(str(r.evaluated))
                m[i, j] = r.delta
            im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
            for r in g.itertuples():  # each cell's text in the colour that reads on it
                i, j = rows.index(str(r.ablated)), doms.index(str(r.evaluated))
                ax.text(j, i, f"{r.delta:+.2f}\n[{r.delta_lo:+.2f}, {r.delta_hi:+.2f}]", ha="center", va="center",
                        fontsize=8, color=style.text_colour(im.cmap(im.norm(r.delta))))
            ax.set_xticks(range(len(doms)), doms)
            ax.set_yticks(range(len(rows)), rows)
            ax.set_xlabel("evaluated domain")
            ax.set_ylabel(f"{kind} experts ablated")
            ax.set_title(f"Δ accuracy, {kind} experts masked")
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.8, label="Δ accuracy")
        return style.save_figure(fig, out_dir, name)

    return _styled(build)

# ----- beyond the paper: co-activation, paths, routing overlap ---------------------------------------------
def pooled_lift(coactivation: pd.DataFrame, layer: Any, num_experts: int) -> np.ndarray:
    """``(E, E)`` lift ``P(b | a) / P(b)`` at ``layer`` with every domain's tokens pooled (NaN on the diagonal
    and where ``a`` is never selected)."""
    g = coactivation[coactivation["layer"] == layer]
    E = num_experts
    C = np.zeros((E, E))
    np.add.at(C, (g["expert_a"].to_numpy(int), g["expert_b"].to_numpy(int)), g["count"].to_numpy(float))
    first = g.drop_duplicates(["domain", "expert_a"])
    n = np.zeros(E)
    np.add.at(n, first["expert_a"].to_numpy(int), first["n_a"].to_numpy(float))
    N = float(g.drop_duplicates("domain")["n_tokens"].sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        lift = (C / n[:, None]) / (n / N)[None, :]
    np.fill_diagonal(lift, np.nan)
    return lift

def fig_coactivation(coactivation: pd.DataFrame | None, out_dir: str | Path, name: str = "fig_coactivation"
                     ) -> list[Path]:
    """Co-activation lift ``P(b | a) / P(b)`` per layer (domains pooled), log2 colour scale centred on
    independence (lift 1, white); the diagonal is blank."""
    if _empty(coactivation, "layer", "expert_a", "expert_b", "count", "n_a", "n_tokens"):
        return []
    assert coactivation is not None
    layers, cut = _pick(sorted(coactivation["layer"].unique()))
    E = int(max(coactivation["expert_a"].max(), coactivation["expert_b"].max())) + 1

    def build() -> Any:
        fig, axes = _figure(len(layers), ncols=min(4, len(layers)), panel=(3.3, 3.0))
        im = None
        for ax, layer in zip(axes, layers, strict=True):
            with np.errstate(divide="ignore", invalid="ignore"):
                grid = np.log2(pooled_lift(coactivation, layer, E))
            im = ax.imshow(np.clip(grid, -3, 3), cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("expert b")
            ax.set_ylabel("expert a")
        if im is not None:
            fig.colorbar(im, ax=axes, label="log2 lift of P(b|a) over P(b)", shrink=0.8)
        fig.suptitle("Which experts a token selects together" + (" (first layers shown)" if cut else ""))
        return style.save_figure(fig, out_dir, name)

    return _styled(build)

def fig_paths(paths: pd.DataFrame | None, out_dir: str | Path, name: str = "fig_paths", top: int = 5
              ) -> list[Path]:
    """Path diagram: per domain, the ``top`` most frequent top-1 expert paths from the first start layer,
    drawn through (layer, expert) with line width proportional to the share of tokens taking them."""
    if _empty(paths, "domain", "start_layer", "layers", "path", "share"):
        return []
    assert paths is not None
    domains, _ = _pick(_domains(paths))

    def build() -> Any:
        fig, axes = _figure(len(domains), ncols=min(3, len(domains)), panel=(4.0, 3.2))
        for ax, d in zip(axes, domains, strict=True):
            g = paths[paths["domain"].astype(str) == d]
            g = g[g["start_layer"] == g["start_layer"].min()].sort_values("share", ascending=False).head(top)
            wmax = float(g["share"].max()) if len(g) else 1.0
            for i, r in enumerate(g.itertuples()):
                xs = [int(x) for x in str(r.layers).split(">")]
                ys = [int(x) for x in str(r.path).split(">")]
                ax.plot(xs, ys, marker="o", color=_colour(i), lw=1 + 7 * float(r.share) / max(wmax, 1e-12),
                        alpha=0.8, label=f"{r.path}  {float(r.share):.1%}")
            ax.set_title(d)
            ax.set_xlabel("MoE layer")
            ax.set_ylabel("top-1 expert")
            style.integer_ticks(ax, x=True, y=True)
            ax.legend(frameon=False, fontsize=7, loc="best")
        fig.suptitle("Most frequent expert paths (top-1 expert per layer)")
        return style.save_figure(fig, out_dir, name)

    return _styled(build)

def fig_routing_overlap(overlap: pd.DataFrame | None, out_dir: str | Path, name: str = "fig_routing_overlap"
                        ) -> list[Path]:
    """Routing overlap ``|S1 ∩ S2| / k`` with the unsteered model per layer, one line per intervention, one
    panel per domain, 95% intervals shaded."""
    if _empty(overlap, "domain", "condition", "layer", "overlap"):
        return []
    assert overlap is not None
    ok = overlap[overlap["applicable"].astype(bool)] if "applicable" in overlap.columns else overlap
    if not len(ok):
        return []
    domains, _ = _pick(_domains(ok))

    def build() -> Any:
        fig, axes = _figure(len(domains), ncols=min(3, len(domains)), panel=(4.0, 3.0))
        for ax, d in zip(axes, domains, strict=True):
            g = ok[ok["domain"].astype(str) == d]
            for i, (cond, h) in enumerate(g.groupby("condition", sort=False)):
                h = h.sort_values("layer")
                ax.plot(h["layer"], h["overlap"], marker="o", color=_colour(i), label=str(cond))
                if {"ci_low", "ci_high"} <= set(h.columns):
                    ax.fill_between(h["layer"], h["ci_low"], h["ci_high"], color=_colour(i), alpha=0.2, lw=0)
            ax.set_ylim(0, 1.02)
            ax.set_title(d)
            ax.set_xlabel("MoE layer")
            style.integer_ticks(ax)
            ax.set_ylabel("overlap with unsteered")
            ax.legend(frameon=False, fontsize=8)
        fig.suptitle("How far the interventions moved the routing")
        return style.save_figure(fig, out_dir, name)

    return _styled(build)


__all__ = ["fig_coactivation", "fig_dose", "fig_paths", "fig_routing_overlap", "fig_selectivity", "pooled_lift"]
