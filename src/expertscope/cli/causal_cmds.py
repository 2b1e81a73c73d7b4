"""Printing driver experts (``expertscope drivers``; the command itself is in :mod:`.commands`)."""

from __future__ import annotations

from typing import Any

from ._common import out_console


def print_drivers(table: Any, rate: Any, top: int = 3) -> None:
    """The top drivers of each (domain, layer) with the layer's threshold and causal rate."""
    from rich.table import Table

    t = Table(title=f"Driver experts ({table.settings['rule_text']})")
    for col in ("domain", "layer", "top experts (CE)", "threshold", "drivers", "causal rate"):
        t.add_column(col, justify="left" if col in ("domain", "top experts (CE)", "drivers") else "right")
    df = table.df
    rates = {(r.domain, int(r.layer)): r.causal_rate for r in rate.itertuples()}
    for (d, layer), g in df.groupby(["domain", "layer"], sort=False):
        g = g.sort_values("ce_mean", ascending=False)
        best = ", ".join(f"{int(r.expert)} ({r.ce_mean:.3g})" for r in g.head(top).itertuples())
        drv = ",".join(str(int(e)) for e in g[g["is_driver"]]["expert"]) or "-"
        cr = rates.get((d, int(layer)))
        t.add_row(str(d), str(layer), best, f"{g['threshold'].iloc[0]:.3g}", drv,
                  "-" if cr is None else f"{cr:.3f}")
    out_console.print(t)
