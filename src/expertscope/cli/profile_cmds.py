"""Printing domain experts (``expertscope domains``; the command itself is in :mod:`.commands`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from ._common import out_console

if TYPE_CHECKING:
    from ..stats.domain_experts import DomainExpertTable


def print_domain_experts(table: DomainExpertTable, top: int = 10) -> None:
    """A rich table of the top domain experts per domain."""
    for dom in table.settings["domains"]:
        rows = table.experts(dom).head(top)
        t = Table(title=f"domain experts of {dom!r} ({len(table.experts(dom))} found)", title_justify="left")
        for col in ("layer", "expert", "A", "H", "CWAS", "specificity", "lift", "A 95% CI", "q"):
            t.add_column(col, justify="right")
        for r in rows.itertuples():
            ci = "–" if r.A_lo != r.A_lo else f"[{r.A_lo:.3f}, {r.A_hi:.3f}]"
            q = "–" if r.q_value != r.q_value else f"{r.q_value:.3g}"
            t.add_row(str(r.layer), str(r.expert), f"{r.activation_rate:.3f}", f"{r.entropy:.3f}",
                      f"{r.cwas:.3f}", f"{r.specificity:+.3f}", f"{getattr(r, 'lift', float('nan')):.2f}", ci, q)
        out_console.print(t)


def print_shared_experts(model_info: dict) -> None:
    """One line naming the model's always-on shared experts (never domain or driver candidates), if any."""
    from ..stats.shared import shared_counts

    counts = shared_counts(model_info)
    if counts:
        where = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(counts.items()))
        out_console.print(f"shared experts (always on, not candidates; rows marked shared in "
                          f"RoutingProfile.to_frame()): {where}")
