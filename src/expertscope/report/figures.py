"""The paper's figures from saved tables, as PNG and SVG.

Every function takes DataFrames and an output directory, writes ``<name>.png`` and ``<name>.svg``
atomically and returns the written paths; empty or missing inputs return ``[]``. Figures are built on
:class:`matplotlib.figure.Figure` directly (rendered by the Agg and SVG backends), so nothing here touches
pyplot's global state or needs a display. Colours: the Okabe–Ito palette for categories and cividis for
magnitudes, both readable with colour-vision deficiencies and in greyscale print.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_path
from .findings import expert_types  # the classification behind Fig. 2 (and its reading)

#: Okabe & Ito (2008) colour-blind-safe palette (black last, yellow late: it prints faintly).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
SEQUENTIAL = "cividis"
TYPE_COLOURS = {"general": "#56B4E9", "domain": "#0072B2", "driver": "#D55E00", "both": "#CC79A7",
                "other": "#E69F00", "below uniform": "#DDDDDD"}
MAX_PANELS = 12

_RC: dict[Any, Any] = {  # rc names; matplotlib's stub spells every key as a Literal
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "svg.hashsalt": "expertscope", "svg.fonttype": "none", "figure.dpi": 100,
    # layouts are always named per figure; these two make set_layout_engine(None) mean "no engine" in _save
    "figure.autolayout": False, "figure.constrained_layout.use": False,
}


def _empty(df: pd.DataFrame | None, *cols: str) -> bool:
    return df is None or len(df) == 0 or any(c not in df.columns for c in cols)


def _figure(n_panels: int, ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0)) -> tuple[Any, list[Any]]:
    """A Figure with ``n_panels`` axes on a grid of at most ``ncols`` columns; unused axes removed."""
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def _save(fig: Any, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name.png`` (150 dpi) and ``name.svg`` atomically, cropped to hold every artist (legends
    included); no timestamps, so reruns give equal files."""
    import matplotlib as mpl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context(_RC):
        # One layout and one bounding box for both files (savefig would redo both per format). The box is
        # the tight one: it grows the saved area to hold every artist, so a figure legend wider than its
        # panels (the t-SNE map's clusters + "driver expert") is never clipped.
        fig.set_dpi(150)
        fig.draw_without_rendering()
        bbox = fig.get_tightbbox(fig._get_renderer()).padded(0.05)
        # No engine at all, not "none" (a placeholder engine): with any engine set, savefig draws the whole
        # figure once more before it renders, per format, to settle a layout that is already fixed.
        fig.set_layout_engine(None)
        for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            path = out / f"{name}.{fmt}"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=150, metadata=meta, facecolor="white", bbox_inches=bbox)
            paths.append(path)
    return paths


def _pick(values: Sequence[Any], limit: int = MAX_PANELS) -> tuple[list[Any], bool]:
    """At most ``limit`` values, evenly spaced, and whether some were left out."""
    values = list(values)
    if len(values) <= limit:
        return values, False
    idx = np.unique(np.linspace(0, len(values) - 1, limit).round().astype(int))
    return [values[i] for i in idx], True


def _colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _domains(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["domain"].astype(str)))


def _styled(build: Any) -> Any:
    """Run a figure builder with the package's rc settings (fonts, spines) in force."""
    import matplotlib as mpl

    with mpl.rc_context(_RC):
        return build()


# ----- Fig. 1 --------------------------------------------------------------------------------------------
def fig_cwas(domain_experts: pd.DataFrame | None, out_dir: str | Path, name: str = "fig1_cwas") -> list[Path]:
    """Fig. 1: CWAS of every expert per domain, one panel per MoE layer (at most 12, evenly spaced);
    domain experts starred."""
    df = domain_experts
    if _empty(df, "domain", "layer", "expert", "cwas"):
        return []
    assert df is not None
    layers, cut = _pick(sorted(df["layer"].unique()))
    domains = _domains(df)

    def build() -> Any:
        fig, axes = _figure(len(layers), ncols=3)
        for ax, layer in zip(axes, layers, strict=True):
            g = df[df["layer"] == layer]
            for j, d in enumerate(domains):
                r = g[g["domain"].astype(str) == d].sort_values("expert")
                ax.plot(r["expert"], r["cwas"], marker="o", ms=3, lw=1.2, color=_colour(j), label=d)
                if "is_domain_expert" in r.columns:
                    flag = r[r["is_domain_expert"].astype(bool)]
                    ax.scatter(flag["expert"], flag["cwas"], marker="*", s=110, color=_colour(j),
                               edgecolor="black", linewidth=0.6, zorder=3)
            if "uniform_rate" in g.columns and len(g):
                ax.axhline(float(g["uniform_rate"].iloc[0]), color="grey", ls=":", lw=1)
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("expert")
            ax.set_ylabel("CWAS  (1 − H)·A")
        handles, labels = axes[0].get_legend_handles_labels()
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], marker="*", ls="", ms=11, mfc="white", mec="black"),
                    Line2D([], [], color="grey", ls=":")]
        labels += ["domain expert", "uniform rate k/E"]
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
        fig.suptitle("Certainty-weighted activation score per expert" + (" (selected layers)" if cut else ""))
        return _save(fig, out_dir, name)

    return _styled(build)


# ----- Fig. 2 --------------------------------------------------------------------------------------------
def fig_expert_types(domain_experts: pd.DataFrame | None, out_dir: str | Path, drivers: pd.DataFrame | None = None,
                     name: str = "fig2_expert_types") -> list[Path]:
    """Fig. 2: (a) share of each domain's routed selections going to each expert type, (b) how many
    activated experts (A > k/E) of each type each domain has."""
    if _empty(domain_experts, "domain", "layer", "expert", "activation_rate"):
        return []
    assert domain_experts is not None
    typed = expert_types(domain_experts, drivers)
    domains = _domains(typed)
    order = ["general", "domain", "driver", "both", "other", "below uniform"]

    def build() -> Any:
        fig, (ax_a, ax_b) = _figure(2, ncols=2, panel=(5.2, 0.5 + 0.55 * max(3, len(domains))))
        share = typed.pivot_table(index="domain", columns="type", values="activation_rate", aggfunc="sum",
                                  fill_value=0.0).reindex(index=domains, columns=order, fill_value=0.0)
        share = share.div(share.sum(axis=1).replace(0, np.nan), axis=0).fillna(0.0)
        left = np.zeros(len(domains))
        for t in order:
            ax_a.barh(domains, share[t], left=left, color=TYPE_COLOURS[t], label=t, edgecolor="white", lw=0.5)
            left += share[t].to_numpy()
        ax_a.set_xlim(0, 1)
        ax_a.invert_yaxis()
        ax_a.set_xlabel("share of routed selections")
        ax_a.set_title("(a) activation share by expert type")
        counts = typed[typed["type"] != "below uniform"].groupby(["domain", "type"]).size().unstack(fill_value=0)
        counts = counts.reindex(index=domains, columns=order[:-1], fill_value=0)
        y = np.arange(len(domains))
        h = 0.8 / len(order[:-1])
        for j, t in enumerate(order[:-1]):
            ax_b.barh(y + (j - 2) * h, counts[t], height=h, color=TYPE_COLOURS[t], label=t)
        ax_b.set_yticks(y, domains)
        ax_b.invert_yaxis()
        ax_b.set_xlabel("activated experts (A > k/E), all layers")
        ax_b.set_title("(b) activated experts by type")
        fig.legend(*ax_a.get_legend_handles_labels(), loc="outside lower center", ncols=6, frameon=False)
        fig.suptitle("General, domain and driver experts")
        return _save(fig, out_dir, name)

    return _styled(build)


# ----- Fig. 3 and 6 --------------------------------------------------------------------------------------
def _per_layer_lines(ax: Any, df: pd.DataFrame, value: str, domains: list[str], style: str = "-") -> None:
    for j, d in enumerate(domains):
        r = df[df["domain"].astype(str) == d].sort_values("layer")
        ax.plot(r["layer"], r[value], marker="o", ms=4, lw=1.6, ls=style, color=_colour(j), label=d)
    layers = sorted(df["layer"].unique())
    if len(layers) <= 16:
        ax.set_xticks(layers)
    ax.set_xlabel("MoE layer")


def fig_causal_rate(causal_rate: pd.DataFrame | None, out_dir: str | Path, name: str = "fig3_causal_rate"
                    ) -> list[Path]:
    """Fig. 3: causal rate (share of a domain's tokens routed to at least one of its drivers) per layer."""
    if _empty(causal_rate, "domain", "layer", "causal_rate"):
        return []
    assert causal_rate is not None

    def build() -> Any:
        fig, (ax,) = _figure(1, panel=(6.4, 3.6))
        _per_layer_lines(ax, causal_rate, "causal_rate", _domains(causal_rate))
        ax.set_ylabel("causal rate")
        ax.set_ylim(bottom=0)
        ax.set_title("Layer-wise causal rate")
        ax.legend(title="domain", frameon=False)
        return _save(fig, out_dir, name)

    return _styled(build)


def fig_routing_mi(routing_mi: pd.DataFrame | None, out_dir: str | Path, name: str = "fig_routing_mi"
                   ) -> list[Path]:
    """Mutual information I(domain; selected expert) per layer, in bits (one line per model if a ``model``
    column is present)."""
    if _empty(routing_mi, "layer", "mi_bits"):
        return []
    assert routing_mi is not None
    groups = list(routing_mi.groupby("model", sort=False)) if "model" in routing_mi.columns else [("", routing_mi)]

    def build() -> Any:
        fig, (ax,) = _figure(1, panel=(6.4, 3.4))
        for i, (label, g) in enumerate(groups):
            ax.plot(g["layer"], g["mi_bits"], marker="o", color=_colour(i), label=str(label) or None)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("I(domain; expert) [bits]")
        ax.set_ylim(bottom=0)
        ax.set_title("How much routing depends on the domain")
        if len(groups) > 1:
            ax.legend(title="model", frameon=False)
        return _save(fig, out_dir, name)

    return _styled(build)


def fig_causal_layers(drivers: pd.DataFrame | None, out_dir: str | Path, name: str = "fig6_causal_layers"
                      ) -> list[Path]:
    """Fig. 6: causal effect per layer per domain: (a) mean CE over the layer's experts, (b) the largest."""
    if _empty(drivers, "domain", "layer", "expert", "ce_mean"):
        return []
    assert drivers is not None
    agg = drivers.groupby(["domain", "layer"], sort=False)["ce_mean"].agg(["mean", "max"]).reset_index()
    domains = _domains(drivers)

    def build() -> Any:
        fig, (a, b) = _figure(2, ncols=2, panel=(5.0, 3.4))
        _per_layer_lines(a, agg, "mean", domains)
        a.set_ylabel("mean CE  KL(P‖Q) (nats)")
        a.set_title("(a) mean causal effect of the layer's experts")
        _per_layer_lines(b, agg, "max", domains)
        b.set_ylabel("largest CE (nats)")
        b.set_title("(b) strongest expert of the layer")
        fig.legend(*a.get_legend_handles_labels(), loc="outside lower center", ncols=len(domains), frameon=False)
        fig.suptitle("Layer-wise causal effects")
        return _save(fig, out_dir, name)

    return _styled(build)


def fig_causal_heatmap(drivers: pd.DataFrame | None, out_dir: str | Path, name: str = "fig7_causal_heatmap"
                       ) -> list[Path]:
    """Figs. 7–9: CE of every (layer, expert), one heatmap per domain (darker = stronger); drivers boxed."""
    if _empty(drivers, "domain", "layer", "expert", "ce_mean"):
        return []
    assert drivers is not None
    domains = _domains(drivers)
    layers = sorted(drivers["layer"].unique())
    E = int(drivers["expert"].max()) + 1

    def build() -> Any:
        from matplotlib.patches import Rectangle

        panel = (min(11.0, 1.6 + 0.28 * E), min(9.0, 1.2 + 0.32 * len(layers)))
        fig, axes = _figure(len(domains), ncols=1 if E > 24 else 2, panel=panel)
        for ax, d in zip(axes, domains, strict=True):
            g = drivers[drivers["domain"].astype(str) == d]
            grid = g.pivot_table(index="layer", columns="expert", values="ce_mean", aggfunc="mean")
            grid = grid.reindex(index=layers, columns=range(E))
            im = ax.imshow(grid.to_numpy(), aspect="auto", cmap=SEQUENTIAL + "_r", interpolation="nearest")
            fig.colorbar(im, ax=ax, label="CE (nats)", shrink=0.9)
            ax.set_yticks(range(len(layers)), [str(x) for x in layers])
            step = max(1, E // 16)
            ax.set_xticks(range(0, E, step))
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            ax.set_title(f"{d}")
            if "is_driver" in g.columns:
                lpos = {layer: i for i, layer in enumerate(layers)}
                for r in g[g["is_driver"].astype(bool)].itertuples():
                    ax.add_patch(Rectangle((r.expert - 0.5, lpos[r.layer] - 0.5), 1, 1, fill=False,
                                           edgecolor="#D55E00", lw=2.0))
        fig.suptitle("Expert-level causal effect across layers (driver experts boxed in orange)")
        return _save(fig, out_dir, name)

    return _styled(build)


# ----- Fig. 4 --------------------------------------------------------------------------------------------
def fig_positions(positions: pd.DataFrame | None, out_dir: str | Path, layer: str = "all",
                  name: str = "fig4_positions") -> list[Path]:
    """Fig. 4: share of driver-triggering tokens per relative-position bin, beside the share of all tokens
    (baseline), one panel per domain, for ``layer`` (``"all"``: triggering at any layer)."""
    if _empty(positions, "domain", "layer", "bin", "trigger_share", "token_share"):
        return []
    assert positions is not None
    df = positions[positions["layer"].astype(str) == str(layer)]
    if not len(df):
        return []
    domains = _domains(df)

    def build() -> Any:
        fig, axes = _figure(len(domains), ncols=3, panel=(4.2, 3.0))
        for ax, d in zip(axes, domains, strict=True):
            g = df[df["domain"].astype(str) == d].sort_values("bin_index" if "bin_index" in df.columns else "bin")
            y = np.arange(len(g))
            ax.barh(y - 0.2, g["trigger_share"].fillna(0), height=0.4, color="#D55E00",
                    label="driver-triggering tokens")
            ax.barh(y + 0.2, g["token_share"], height=0.4, color="#999999", label="all tokens (baseline)")
            ax.set_yticks(y, g["bin"].astype(str))
            ax.invert_yaxis()
            ax.set_xlabel("share of tokens")
            ax.set_ylabel("relative position t/T")
            n = int(g["n_trigger_total"].iloc[0]) if "n_trigger_total" in g.columns else None
            ax.set_title(f"{d}" + (f"  (n = {n} triggering)" if n is not None else ""))
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False)
        where = "any layer" if str(layer) == "all" else f"layer {layer}"
        fig.suptitle(f"Where driver-triggering tokens sit in the sequence ({where})")
        return _save(fig, out_dir, name)

    return _styled(build)


# ----- Fig. 5 --------------------------------------------------------------------------------------------
def fig_expert_map(expert_map: pd.DataFrame | None, out_dir: str | Path, name: str = "fig5_expert_map"
                   ) -> list[Path]:
    """Fig. 5: t-SNE map of expert representations coloured by KMeans cluster; driver experts as stars."""
    if _empty(expert_map, "layer", "expert", "x", "y", "cluster"):
        return []
    assert expert_map is not None
    df = expert_map
    rep = str(df["representation"].iloc[0]) if "representation" in df.columns else ""
    per_layer = "scope" in df.columns and str(df["scope"].iloc[0]) == "layer"
    groups, cut = _pick(sorted(df["layer"].unique())) if per_layer else ([None], False)

    def build() -> Any:
        from matplotlib.lines import Line2D

        fig, axes = _figure(len(groups), ncols=3, panel=(4.2, 3.6) if per_layer else (6.4, 5.0))
        clusters = sorted(df["cluster"].unique())
        for ax, layer in zip(axes, groups, strict=True):
            g = df if layer is None else df[df["layer"] == layer]
            drv = g["is_driver"].astype(bool) if "is_driver" in g.columns else pd.Series(False, g.index)
            for c in clusters:
                r = g[(g["cluster"] == c) & ~drv]
                ax.scatter(r["x"], r["y"], s=28, color=_colour(int(c)), alpha=0.85, edgecolor="white", lw=0.4)
            for c in clusters:
                r = g[(g["cluster"] == c) & drv]
                ax.scatter(r["x"], r["y"], s=180, marker="*", color=_colour(int(c)), edgecolor="black", lw=0.9,
                           zorder=3)
                if len(r) <= 12:
                    for p in r.itertuples():
                        ax.annotate(f"L{p.layer}·E{p.expert}", (p.x, p.y), xytext=(4, 4),
                                    textcoords="offset points", fontsize=8)
            ax.set_xlabel("t-SNE 1")
            ax.set_ylabel("t-SNE 2")
            ax.set_title(f"layer {layer}" if layer is not None else f"{len(g)} experts, all MoE layers")
        handles = [Line2D([], [], marker="o", ls="", color=_colour(int(c)), label=f"cluster {c}") for c in clusters]
        handles.append(Line2D([], [], marker="*", ls="", ms=13, mfc="white", mec="black", label="driver expert"))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
        fig.suptitle(f"Expert representations ({rep or 'router'}): t-SNE with KMeans clusters"
                     + (" (selected layers)" if cut else ""))
        return _save(fig, out_dir, name)

    return _styled(build)


# ----- steering ------------------------------------------------------------------------------------------
def fig_steering(steering: pd.DataFrame | None, out_dir: str | Path, name: str = "fig_steering") -> list[Path]:
    """Accuracy per domain under each steering condition, with 95% CIs (the paper's Tables 1–2 as bars)."""
    if _empty(steering, "domain", "condition", "accuracy"):
        return []
    assert steering is not None
    domains = _domains(steering)
    conditions = list(dict.fromkeys(steering["condition"].astype(str)))

    def build() -> Any:
        fig, (ax,) = _figure(1, panel=(max(6.0, 1.3 * len(domains) * len(conditions) / 2.5), 3.8))
        w = 0.8 / len(conditions)
        x = np.arange(len(domains))
        for j, c in enumerate(conditions):
            r = steering[steering["condition"].astype(str) == c].set_index("domain").reindex(domains)
            acc = r["accuracy"].to_numpy(dtype=float)
            err = None
            if {"ci_low", "ci_high"} <= set(r.columns):
                err = np.vstack([acc - r["ci_low"].to_numpy(float), r["ci_high"].to_numpy(float) - acc])
                err = np.where(np.isfinite(err), np.maximum(err, 0), 0)
            xs = x + (j - (len(conditions) - 1) / 2) * w
            ax.bar(xs, acc, width=w, yerr=err, capsize=2,
                   color=_colour(j), label=c.replace("_", " "), error_kw={"lw": 0.8})
            for xi in xs[~np.isfinite(acc)]:  # a condition with no targets: say so, draw no bar
                ax.text(xi, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
        ax.set_xticks(x, domains)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title("Accuracy under steering (bars: 95% CI)")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="condition")
        return _save(fig, out_dir, name)

    return _styled(build)


def _shared_legend(fig: Any, axes: Sequence[Any], ncols: int) -> None:
    """One legend below the panels with each label once (the first panel's handle), none when no panel
    has a labelled artist."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols, frameon=False)


def fig_steering_sweep(sweep: pd.DataFrame | None, out_dir: str | Path, name: str = "fig_steering_sweep"
                       ) -> list[Path]:
    """Accuracy against the steering scale (and, if swept, the number of targeted experts), per domain;
    lines per target kind (domain / driver experts), shaded 95% CIs."""
    if _empty(sweep, "domain", "targets", "scale", "accuracy"):
        return []
    assert sweep is not None
    df = sweep if "sweep" in sweep.columns else sweep.assign(sweep="scale")
    domains = _domains(df)
    kinds = [s for s in ("scale", "count") if (df["sweep"] == s).any()]
    if not kinds:
        return []

    def build() -> Any:
        fig, axes = _figure(len(domains) * len(kinds), ncols=len(domains), panel=(4.2, 3.1))
        i = 0
        for kind in kinds:
            xcol = "scale" if kind == "scale" else "n_targets"
            for d in domains:
                ax = axes[i]
                i += 1
                g = df[(df["domain"].astype(str) == d) & (df["sweep"] == kind)]
                for j, t in enumerate(["domain", "driver"]):
                    r = g[g["targets"].astype(str) == t].sort_values(xcol)
                    if not len(r):
                        continue
                    col = TYPE_COLOURS[t]
                    ax.plot(r[xcol], r["accuracy"], marker="os"[j], lw=1.6, color=col, label=f"{t} experts")
                    if {"ci_low", "ci_high"} <= set(r.columns):
                        ax.fill_between(r[xcol], r["ci_low"], r["ci_high"], color=col, alpha=0.15, lw=0)
                if kind == "scale":
                    ax.axvline(1.0, color="grey", ls=":", lw=1)
                ax.set_xlabel("scale s" if kind == "scale" else "targeted experts (strongest first)")
                ax.set_ylabel("accuracy")
                ax.set_title(f"{d}: {'scale' if kind == 'scale' else 'number of experts'} sweep")
        _shared_legend(fig, axes, ncols=2)
        fig.suptitle("Accuracy against steering strength")
        return _save(fig, out_dir, name)

    return _styled(build)


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
                ax.axhline(0, color="grey", lw=0.8)
                ax.set_xticks(x, labels, rotation=30)
                ax.set_ylabel("Δ accuracy vs unsteered")
                ax.set_title(f"{d}: {kind} experts (n = {int(r['n'].max()) if r['n'].notna().any() else '?'})")
            _shared_legend(fig, axes, ncols=3)
            fig.suptitle(f"{d}: dose–response, targets beside controls (* specific: the run's corrected verdict)")
            return _save(fig, out_dir, f"{name}_{_slug(d)}")

        paths += _styled(build)
    return paths


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


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
                ax.text(j, i, f"{r.delta:+.2f}\n[{r.delta_lo:+.2f}, {r.delta_hi:+.2f}]", ha="center", va="center",
                        fontsize=7.5)
            im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
            ax.set_xticks(range(len(doms)), doms)
            ax.set_yticks(range(len(rows)), rows)
            ax.set_xlabel("evaluated domain")
            ax.set_ylabel(f"{kind} experts ablated")
            ax.set_title(f"Δ accuracy, {kind} experts masked")
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.8, label="Δ accuracy")
        return _save(fig, out_dir, name)

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
        return _save(fig, out_dir, name)

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
            ax.legend(frameon=False, fontsize=7, loc="best")
        fig.suptitle("Most frequent expert paths (top-1 expert per layer)")
        return _save(fig, out_dir, name)

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
            ax.set_ylabel("overlap with unsteered")
            ax.legend(frameon=False, fontsize=8)
        fig.suptitle("How far the interventions moved the routing")
        return _save(fig, out_dir, name)

    return _styled(build)


# ----- all -----------------------------------------------------------------------------------------------
#: The figures of a report: ``(name, draw, the tables it draws)``; ``draw(first table, out_dir, *the others)``.
_FIGURES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("fig1_cwas", fig_cwas, ("domain_experts",)),
    ("fig2_expert_types", fig_expert_types, ("domain_experts", "drivers")),
    ("fig3_causal_rate", fig_causal_rate, ("causal_rate",)),
    ("fig4_positions", fig_positions, ("positions",)),
    ("fig6_causal_layers", fig_causal_layers, ("drivers",)),
    ("fig7_causal_heatmap", fig_causal_heatmap, ("drivers",)),
    ("fig_steering", fig_steering, ("steering",)),
    ("fig_routing_mi", fig_routing_mi, ("routing_mi",)),
    ("fig_steering_sweep", fig_steering_sweep, ("steering_sweep",)),
    ("fig_dose", fig_dose, ("steering_dose",)),
    ("fig_selectivity", fig_selectivity, ("steering_selectivity",)),
    ("fig_coactivation", fig_coactivation, ("coactivation",)),
    ("fig_paths", fig_paths, ("paths",)),
    ("fig_routing_overlap", fig_routing_overlap, ("routing_overlap",)),
]

#: Where a figure directory records what each figure was drawn from (see :func:`write_figures`).
FIGURE_INDEX = ".figures.json"


def _source_digest() -> str:
    """What the drawing depends on besides the tables: this module and the findings it classifies with (their
    source), and the versions of matplotlib, numpy and pandas."""
    import hashlib

    import matplotlib as mpl

    from . import findings

    h = hashlib.sha256(f"{mpl.__version__}|{np.__version__}|{pd.__version__}".encode())
    for mod_file in (__file__, findings.__file__):
        h.update(Path(mod_file).read_bytes())
    return h.hexdigest()


def _timeless(meta: Any) -> Any:
    """``meta`` without what says when or how long rather than what: wall times (``seconds``, ``*_s``,
    ``*_seconds``) and timestamps (``created``), at any depth."""
    if isinstance(meta, dict):
        return {k: _timeless(v) for k, v in meta.items() if not (
            k in ("seconds", "created") or str(k).endswith(("_s", "_seconds")))}
    if isinstance(meta, (list, tuple)):
        return [_timeless(v) for v in meta]
    return meta


def _table_digest(df: pd.DataFrame | None) -> str:
    """A content hash of a table: columns, dtypes, index, every value and its metadata (``attrs``: a rule's
    settings read back from the file, less its wall times: a stage rerun to the same values keeps its
    figures); ``"none"`` for a missing table."""
    import hashlib

    if df is None:
        return "none"
    h = hashlib.sha256(repr([(str(c), str(t)) for c, t in df.dtypes.items()]).encode())
    h.update(repr((len(df), sorted(_timeless(df.attrs).items(), key=lambda kv: str(kv[0])))).encode())
    try:
        h.update(pd.util.hash_pandas_object(df, index=True).to_numpy().tobytes())
    except TypeError:  # a cell pandas cannot hash (a list): its text stands in
        h.update(df.to_csv().encode())
    return h.hexdigest()


def _read_index(fig_dir: Path) -> dict[str, Any]:
    import json

    try:
        index = json.loads((fig_dir / FIGURE_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _kept(fig_dir: Path, index: dict[str, Any], name: str, key: str) -> dict[str, str] | None:
    """``{file name: digest}`` of figure ``name`` in ``fig_dir`` if it was drawn from ``key`` and its files are
    unchanged since."""
    from ..fingerprint import file_digest

    entry = index.get(name)
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("files"), dict):
        return None
    files: dict[str, str] = entry["files"]
    ok = all((fig_dir / f).is_file() and file_digest(fig_dir / f) == d for f, d in files.items())
    return files if ok and files else None


def _figure_key(source: str, name: str, digests: list[str]) -> str:
    import hashlib

    return hashlib.sha256("|".join([source, name, *digests]).encode()).hexdigest()


def write_figures(tables: dict[str, pd.DataFrame | None], out_dir: str | Path,
                  reuse_from: str | Path | Sequence[str | Path] | None = None,
                  names: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Every figure whose tables are present (of ``names`` only, if given). ``tables`` keys:
    ``domain_experts``, ``drivers``, ``causal_rate``, ``positions``, ``expert_map`` (or ``expert_map:<name>``
    for several), ``steering``, ``steering_sweep``, ... Returns ``{figure name: written paths}`` for the
    figures written.

    Nothing is drawn twice: ``out_dir/.figures.json`` records, per figure, a hash of the tables it was drawn
    from (and of the drawing code and versions) and of the files written. A figure whose inputs are unchanged
    and whose files are intact is kept as it is; one found so in a ``reuse_from`` directory (another figure
    directory, e.g. the run's own; the first that has it) is copied. Everything else is drawn.
    """
    import shutil

    from ..fingerprint import file_digest
    from ..io import write_json

    out = Path(out_dir)
    jobs = list(_FIGURES)
    for key in sorted(k for k in tables if k == "expert_map" or k.startswith("expert_map:")):
        fname = "fig5_expert_map" + ("" if key == "expert_map" else "_" + key.split(":", 1)[1])
        jobs.append((fname, functools.partial(fig_expert_map, name=fname), (key,)))
    if names is not None:
        jobs = [job for job in jobs if job[0] in names]
    source = _source_digest()
    here = _read_index(out)
    sources = [reuse_from] if isinstance(reuse_from, (str, Path)) else list(reuse_from or [])
    others = [(d, _read_index(d)) for d in map(Path, sources) if d != out]
    index: dict[str, Any] = {}
    result: dict[str, list[Path]] = {}
    for fname, draw, inputs in jobs:
        dfs = [tables.get(k) for k in inputs]
        if all(df is None for df in dfs):
            continue
        key = _figure_key(source, fname, [_table_digest(df) for df in dfs])
        files = _kept(out, here, fname, key)
        for other, there in others:
            if files is not None:
                break
            files = _kept(other, there, fname, key)
            for f in files or {}:
                with atomic_path(out / f) as tmp:
                    shutil.copyfile(other / f, tmp)
        if files is None:
            files = {p.name: file_digest(p) for p in draw(dfs[0], out, *dfs[1:])}
        if files:
            result[fname] = [out / f for f in files]
            index[fname] = {"key": key, "files": files}
    if index or here:
        write_json(out / FIGURE_INDEX, index)
    return result


__all__ = [
    "FIGURE_INDEX",
    "OKABE_ITO",
    "expert_types",
    "fig_causal_heatmap",
    "fig_causal_layers",
    "fig_causal_rate",
    "fig_coactivation",
    "fig_cwas",
    "fig_dose",
    "fig_expert_map",
    "fig_expert_types",
    "fig_paths",
    "fig_positions",
    "fig_routing_mi",
    "fig_routing_overlap",
    "fig_selectivity",
    "fig_steering",
    "fig_steering_sweep",
    "write_figures",
]
