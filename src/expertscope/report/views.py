"""Result tables as they are shown: each view reads a saved table (or a result record) and returns a
:class:`TableView`, a frame of display strings with its title and caption, so every number is formatted in
one place. ``expertscope`` prints these views as they are; the HTML report shares :func:`steering_rows`
(which conditions were not applicable and why, which domains are saturated).

What a run did not measure shows as a dash, not ``nan``: "–" in the domain-expert table, "—" in the steering
table, "-" in the driver and evaluation tables (the spellings the command line has always printed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .record import SATURATED

if TYPE_CHECKING:
    from ..causal.drivers import DriverTable
    from ..stats.domain_experts import DomainExpertTable


@dataclass(frozen=True)
class TableView:
    """A table as shown: ``rows`` holds one display string per cell, its columns named as printed."""

    title: str
    rows: pd.DataFrame
    caption: str | None = None
    left: tuple[str, ...] = ()
    """Columns holding text (names, lists) rather than numbers: shown left-aligned."""


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float | np.floating) and math.isnan(x))


def num(x: Any, spec: str = ".3f", missing: str = "—") -> str:
    """``x`` formatted with ``spec``; ``missing`` when it is None or NaN."""
    return missing if _missing(x) else format(x, spec)


def interval(lo: Any, hi: Any, spec: str = ".3f", missing: str = "—") -> str:
    """A confidence interval as ``[lo, hi]``; ``missing`` when either end is None or NaN."""
    return missing if _missing(lo) or _missing(hi) else f"[{lo:{spec}}, {hi:{spec}}]"


def effect(x: Any, lo: Any, hi: Any, missing: str = "—") -> str:
    """A signed change with its interval, ``+0.017 [+0.000, +0.050]`` (the change alone when the interval is
    missing); ``missing`` when the change is None or NaN."""
    return missing if _missing(x) else f"{x:+.3f} {interval(lo, hi, '+.3f', '')}".rstrip()


def _view(title: str, rows: Sequence[tuple[str, ...]], columns: tuple[str, ...], caption: str | None = None,
          left: tuple[str, ...] = ()) -> TableView:
    return TableView(title, pd.DataFrame(rows, columns=list(columns), dtype=object), caption, left)


# ----- domain and driver experts ----------------------------------------------------------------------------
def domain_expert_views(table: DomainExpertTable, top: int = 10) -> list[TableView]:
    """Per domain of ``table``, its ``top`` domain experts (most specific first): activation rate A, entropy H,
    CWAS, specificity, activation lift, A's 95% CI and the q-value; the title gives how many were found.
    What a run did not measure (entropy and CWAS of recorded routes: no gate weights) shows "–"."""
    columns = ("layer", "expert", "A", "H", "CWAS", "specificity", "lift", "A 95% CI", "q")
    numbers = (("activation_rate", ".3f"), ("entropy", ".3f"), ("cwas", ".3f"), ("specificity", "+.3f"),
               ("lift", ".2f"))
    views = []
    for dom in table.settings["domains"]:
        experts = table.experts(dom)
        rows = [(str(r.layer), str(r.expert), *(num(getattr(r, c, None), spec, "–") for c, spec in numbers),
                 interval(r.A_lo, r.A_hi, missing="–"), num(r.q_value, ".3g", missing="–"))
                for r in experts.head(top).itertuples()]
        views.append(_view(f"domain experts of {dom!r} ({len(experts)} found)", rows, columns))
    return views


def shared_experts_line(model_info: dict[str, Any]) -> str | None:
    """One line naming the model's always-on shared experts per layer (never domain or driver candidates);
    ``None`` when the model (``manifest["model"]``) has none."""
    from ..stats.shared import shared_counts

    counts = shared_counts(model_info)
    if not counts:
        return None
    where = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(counts.items()))
    return f"shared experts (always on, not candidates; rows marked shared in RoutingProfile.to_frame()): {where}"


def driver_view(table: DriverTable, causal_rate: pd.DataFrame, top: int = 3) -> TableView:
    """One row per (domain, layer): the ``top`` experts by mean CE (with their CE), the layer's driver
    threshold, its driver experts ("-" for none) and its causal rate (from ``causal_rate``; "-" if absent)."""
    rates = {(r.domain, int(r.layer)): r.causal_rate for r in causal_rate.itertuples()}
    rows = []
    for (d, layer), g in table.df.groupby(["domain", "layer"], sort=False):
        g = g.sort_values("ce_mean", ascending=False)
        best = ", ".join(f"{int(r.expert)} ({r.ce_mean:.3g})" for r in g.head(top).itertuples())
        drivers = ",".join(str(int(e)) for e in g[g["is_driver"]]["expert"]) or "-"
        rows.append((str(d), str(layer), best, f"{g['threshold'].iloc[0]:.3g}", drivers,
                     num(rates.get((d, int(layer))), missing="-")))
    return _view(f"Driver experts ({table.settings['rule_text']})", rows,
                 ("domain", "layer", "top experts (CE)", "threshold", "drivers", "causal rate"),
                 left=("domain", "top experts (CE)", "drivers"))


# ----- steering (Tables 1–2) --------------------------------------------------------------------------------
def steering_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The steering table with what a reader needs beside the numbers: ``status`` ("not applicable: <reason>"
    for a condition with nothing to measure, else "") and ``saturated`` (per domain: the unsteered accuracy
    is at least :data:`~.findings.SATURATED`; a saved flag is kept)."""
    st = table.copy()
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


def _targets(r: Any) -> str:
    n_par = getattr(r, "n_parameters", float("nan"))
    return (f"LoRA, {int(n_par):,} params" if not _missing(n_par)
            else "—" if _missing(r.n_targets) else str(int(r.n_targets)))


def steering_views(table: pd.DataFrame) -> list[TableView]:
    """Per domain, the steering conditions (Tables 1–2): targets (LoRA: its trained parameters), accuracy,
    the change against the original model and against the verdict's control sets with their paired-bootstrap
    95% CIs ("specific" when the run's calibrated verdict says so), weighted F1 and the changed expert
    selections. A
    condition with nothing to measure shows "n/a", its reason once in the caption; a saturated domain says
    so in its title."""
    st = steering_rows(table)
    columns = ("condition", "targets", "accuracy", "Δ acc [95% CI]", "Δ − controls [95% CI]", "weighted F1",
               "changed selections")
    views = []
    for dom in st["domain"].unique():
        g = st[st["domain"] == dom]
        first = g.iloc[0]
        title = f"{dom} ({first['task']}, n={int(first['n'])})"
        if bool(first.get("saturated", False)):
            title += " — saturated: the original accuracy leaves little room to improve"
        status = g["status"] if "status" in g.columns else pd.Series("", index=g.index)
        reasons: dict[str, list[str]] = {}
        for condition, why in zip(g["condition"], status, strict=True):
            if why:
                reasons.setdefault(why, []).append(str(condition))
        rows = []
        for r, why in zip(g.itertuples(), status, strict=True):
            if why:
                rows.append((r.condition, "0", "n/a", "—", "—", "—", "—"))
                continue
            specific = " specific" if getattr(r, "specific", False) == True else ""  # noqa: E712
            changed = r.changed_selections
            rows.append((r.condition, _targets(r), f"{r.accuracy:.3f}",
                         "—" if r.condition == "original" else effect(r.delta, r.delta_lo, r.delta_hi),
                         effect(getattr(r, "diff", None), getattr(r, "diff_lo", None), getattr(r, "diff_hi", None))
                         + ("" if _missing(getattr(r, "diff", None)) else specific),
                         num(r.weighted_f1), "—" if _missing(changed) or changed < 0 else str(int(changed))))
        caption = "; ".join(f"{', '.join(c)}: {why}" for why, c in reasons.items()) or None
        views.append(_view(title, rows, columns, caption, left=("condition",)))
    return views


# ----- evaluation -------------------------------------------------------------------------------------------
def eval_view(results: dict[str, dict[str, Any]]) -> TableView:
    """One row per scored domain of ``expertscope eval`` (``results.json``): task, n, accuracy with its Wilson
    95% CI, weighted F1 ("-" for tasks without one) and how many prompts were cut to fit the context."""
    rows = [(name, r["task"], str(r["n"]), f"{r['accuracy']:.3f}", interval(r["ci_low"], r["ci_high"]),
             num(r["weighted_f1"], missing="-"), str(r.get("n_truncated", 0))) for name, r in results.items()]
    return _view("Evaluation (accuracy with Wilson 95% CI)", rows,
                 ("domain", "task", "n", "accuracy", "95% CI", "weighted F1", "truncated"), left=("domain", "task"))


def lm_eval_view(results: dict[str, dict[str, Any]]) -> TableView:
    """One row per (task, metric) of an lm-evaluation-harness run, values to 4 decimals (sample sizes left out)."""
    rows = [(task, k, f"{v:.4f}") for task, r in results.items() for k, v in r.items() if k != "sample_len"]
    return _view("lm-eval", rows, ("task", "metric", "value"), left=("task", "metric"))


__all__ = ["TableView", "domain_expert_views", "driver_view", "effect", "eval_view", "interval", "lm_eval_view",
           "num", "shared_experts_line", "steering_rows", "steering_views"]
