"""The paper's figures (Figs. 1–7), the routing-MI curve and the steering figures, from saved tables.

Every function takes DataFrames and an output directory, writes ``<name>.png`` and ``<name>.svg``
(:func:`~.figure_style.save_figure`) and returns the written paths; empty or missing inputs return ``[]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..stats.expert_types import drivers_measured, expert_types  # the classification behind Fig. 2
from . import figure_style as style
from .figure_style import (
    SEQUENTIAL,
    TYPE_COLOURS,
    _colour,
    _domains,
    _empty,
    _figure,
    _pick,
    _shared_legend,
    _styled,
    integer_ticks,
)


# ----- Fig. 1 --------------------------------------------------------------------------------------------
def fig_cwas(domain_experts: pd.DataFrame | None, out_dir: str | Path, name: str = "fig1_cwas") -> list[Path]:
    """Fig. 1: CWAS of every expert per domain, one panel per MoE layer (at most 12, evenly spaced);
    domain experts starred."""
    df = domain_experts
    if _empty(df, "domain", "layer", "expert", "cwas"):
        return []
    assert df is not None
    if not df["cwas"].notna().any():  # recorded routes: no logits, so no CWAS; no empty axes
        return []
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
        return style.save_figure(fig, out_dir, name)

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
    if not drivers_measured(domain_experts, drivers):  # no causal effects: no driver type, not "0 %"
        order = [t for t in order if t not in ("driver", "both")]

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
            ax_b.barh(y + (j - (len(order) - 2) / 2) * h, counts[t], height=h, color=TYPE_COLOURS[t], label=t)
        ax_b.set_yticks(y, domains)
        ax_b.invert_yaxis()
        ax_b.set_xlabel("activated experts (A > k/E), all layers")
        ax_b.set_title("(b) activated experts by type")
        fig.legend(*ax_a.get_legend_handles_labels(), loc="outside lower center", ncols=6, frameon=False)
        fig.suptitle("General, domain and driver experts")
        return style.save_figure(fig, out_dir, name)

    return _styled(build)

# ----- Fig. 3 and 6 --------------------------------------------------------------------------------------
def _per_layer_lines(ax: Any, df: pd.DataFrame, value: str, domains: list[str], style: str = "-") -> None:
    for j, d in enumerate(domains):
        r = df[df["domain"].astype(str) == d].sort_values("layer")
        ax.plot(r["layer"], r[value], marker="o", ms=4, lw=1.6, ls=style, color=_colour(j), label=d)
    layers = sorted(df["layer"].unique())
    if len(layers) <= 16:
        ax.set_xticks(layers)
    else:
        integer_ticks(ax)
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
        return style.save_figure(fig, out_dir, name)

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
        style.integer_ticks(ax)
        ax.set_ylabel("I(domain; expert) [bits]")
        ax.set_ylim(bottom=0)
        ax.set_title("How much routing depends on the domain")
        if len(groups) > 1:
            ax.legend(title="model", frameon=False)
        return style.save_figure(fig, out_dir, name)

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
        return style.save_figure(fig, out_dir, name)

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
        return style.save_figure(fig, out_dir, name)

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
        return style.save_figure(fig, out_dir, name)

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
        return style.save_figure(fig, out_dir, name)

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
            for xi in xs[np.isfinite(acc) & (acc == 0)]:  # a measured zero: a visible mark, not a missing bar
                ax.plot([xi - w / 2, xi + w / 2], [0, 0], color=_colour(j), lw=3, solid_capstyle="butt")
                ax.text(xi, 0.02, "0", ha="center", va="bottom", fontsize=7, color="0.2")
        ax.set_xticks(x, domains)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title("Accuracy under steering (bars: 95% CI)")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="condition")
        return style.save_figure(fig, out_dir, name)

    return _styled(build)

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
        return style.save_figure(fig, out_dir, name)

    return _styled(build)


__all__ = ["fig_causal_heatmap", "fig_causal_layers", "fig_causal_rate", "fig_cwas", "fig_expert_map",
           "fig_expert_types", "fig_positions", "fig_routing_mi", "fig_steering", "fig_steering_sweep"]
