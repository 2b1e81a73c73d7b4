"""Printing the steering study's tables (``expertscope steer-study``; the command is in :mod:`.commands`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from ._common import out_console

if TYPE_CHECKING:
    import pandas as pd


def print_steering(table: pd.DataFrame) -> None:
    """The Tables 1–2 rows per domain, with the paired-bootstrap CI of the change; a condition with nothing
    to measure shows "not applicable" and its reason; a saturated domain says so in its title."""
    for dom in table["domain"].unique():
        rows = table[table["domain"] == dom]
        first = rows.iloc[0]
        title = f"{dom} ({first['task']}, n={int(first['n'])})"
        if "saturated" in rows.columns and bool(first["saturated"]):
            title += " — saturated: the original accuracy leaves little room to improve"
        # Conditions with nothing to measure: "n/a" in the row, the reason once in the caption.
        reasons: dict[str, list[str]] = {}
        for r in rows.itertuples():
            if not getattr(r, "applicable", True):
                reasons.setdefault(str(r.reason), []).append(str(r.condition))
        caption = "; ".join(f"{', '.join(c)}: not applicable: {why}" for why, c in reasons.items()) or None
        t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
        for col in ("condition", "targets", "accuracy", "Δ acc [95% CI]", "weighted F1", "changed selections"):
            t.add_column(col, justify="right" if col != "condition" else "left")
        for r in rows.itertuples():
            if not getattr(r, "applicable", True):
                t.add_row(r.condition, "0", "n/a", "—", "—", "—")
                continue
            delta = "—" if r.condition == "original" else f"{r.delta:+.3f} [{r.delta_lo:+.3f}, {r.delta_hi:+.3f}]"
            f1 = "—" if r.weighted_f1 != r.weighted_f1 else f"{r.weighted_f1:.3f}"
            changed = "—" if r.changed_selections < 0 else str(int(r.changed_selections))
            t.add_row(r.condition, str(int(r.n_targets)), f"{r.accuracy:.3f}", delta, f1, changed)
        out_console.print(t)
