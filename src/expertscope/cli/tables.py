"""The tables the commands print (rich), from the run's saved tables and manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from ._common import console, out_console


def table_of(title: str, columns: Sequence[str], left: Sequence[str] = (), caption: str | None = None) -> Table:
    """An empty rich table: ``columns`` right-justified except those in ``left``."""
    t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    return t


def print_domain_experts(table: Any, top: int = 10) -> None:
    """The top domain experts per domain."""
    for dom in table.settings["domains"]:
        t = table_of(f"domain experts of {dom!r} ({len(table.experts(dom))} found)",
                     ("layer", "expert", "A", "H", "CWAS", "specificity", "lift", "A 95% CI", "q"))
        for r in table.experts(dom).head(top).itertuples():
            ci = "–" if r.A_lo != r.A_lo else f"[{r.A_lo:.3f}, {r.A_hi:.3f}]"
            q = "–" if r.q_value != r.q_value else f"{r.q_value:.3g}"
            t.add_row(str(r.layer), str(r.expert), f"{r.activation_rate:.3f}", f"{r.entropy:.3f}",
                      f"{r.cwas:.3f}", f"{r.specificity:+.3f}", f"{getattr(r, 'lift', float('nan')):.2f}", ci, q)
        out_console.print(t)


def print_shared_experts(model_info: dict[str, Any]) -> None:
    """One line naming the model's always-on shared experts (never domain or driver candidates), if any."""
    from ..stats.shared import shared_counts

    counts = shared_counts(model_info)
    if counts:
        where = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(counts.items()))
        out_console.print(f"shared experts (always on, not candidates; rows marked shared in "
                          f"RoutingProfile.to_frame()): {where}")


def print_drivers(table: Any, rate: Any, top: int = 3) -> None:
    """The top drivers of each (domain, layer) with the layer's threshold and causal rate."""
    t = table_of(f"Driver experts ({table.settings['rule_text']})",
                 ("domain", "layer", "top experts (CE)", "threshold", "drivers", "causal rate"),
                 left=("domain", "top experts (CE)", "drivers"))
    rates = {(r.domain, int(r.layer)): r.causal_rate for r in rate.itertuples()}
    for (d, layer), g in table.df.groupby(["domain", "layer"], sort=False):
        g = g.sort_values("ce_mean", ascending=False)
        best = ", ".join(f"{int(r.expert)} ({r.ce_mean:.3g})" for r in g.head(top).itertuples())
        drv = ",".join(str(int(e)) for e in g[g["is_driver"]]["expert"]) or "-"
        cr = rates.get((d, int(layer)))
        t.add_row(str(d), str(layer), best, f"{g['threshold'].iloc[0]:.3g}", drv, "-" if cr is None else f"{cr:.3f}")
    out_console.print(t)


def print_steering(table: Any) -> None:
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
        t = table_of(title, ("condition", "targets", "accuracy", "Δ acc [95% CI]", "Δ − random control [95% CI]",
                             "weighted F1", "changed selections"), left=("condition",), caption=caption)
        for r in rows.itertuples():
            if not getattr(r, "applicable", True):
                t.add_row(r.condition, "0", "n/a", "—", "—", "—", "—")
                continue
            delta = "—" if r.condition == "original" else f"{r.delta:+.3f} [{r.delta_lo:+.3f}, {r.delta_hi:+.3f}]"
            diff = getattr(r, "diff", float("nan"))
            vs = "—" if diff != diff else (f"{diff:+.3f} [{r.diff_lo:+.3f}, {r.diff_hi:+.3f}]"
                                           + (" specific" if getattr(r, "specific", False) is True else ""))
            f1 = "—" if r.weighted_f1 != r.weighted_f1 else f"{r.weighted_f1:.3f}"
            changed = r.changed_selections
            changed_s = "—" if changed != changed or changed < 0 else str(int(changed))
            n_par = getattr(r, "n_parameters", float("nan"))
            targets = (f"LoRA, {int(n_par):,} params" if n_par == n_par
                       else "—" if r.n_targets != r.n_targets else str(int(r.n_targets)))
            t.add_row(r.condition, targets, f"{r.accuracy:.3f}", delta, vs, f1, changed_s)
        out_console.print(t)


# ----- per command: what it prints when done (out, manifest, rows) -------------------------------------------
def show_run(out: Path, manifest: dict[str, Any], rows: int) -> None:
    for key, what in (("domain_experts", "domain experts"), ("drivers", "driver experts")):
        counts = manifest["stages"].get(key, {}).get(key)
        if counts:
            console.print(f"{what} per domain: {counts}")
    if (out / "report.html").exists():
        console.print(f"open {out / 'report.html'} in a browser")


def show_profile(out: Path, manifest: dict[str, Any], rows: int) -> None:
    st = manifest["stages"]["profile"]
    console.print(f"profiled {sum(st['tokens'].values())} tokens over {len(st['tokens'])} domains → {out}")
    console.print("I(domain; selected expert) per layer \\[bits]: "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in st["routing_mi_bits"].items()))
    if any(st["truncated"].values()):
        console.print(f"[yellow]truncated to {st.get('max_length_used')} tokens:[/] {st['truncated']}")


def show_domains(out: Path, manifest: dict[str, Any], rows: int) -> None:
    from ..io import read_json
    from ..stats.domain_experts import DomainExpertTable

    table = DomainExpertTable.load(out / "domain_experts.parquet")
    print_domain_experts(table, rows)
    source = Path(manifest.get("fingerprint", {}).get("inputs", {}).get("dir") or out)
    print_shared_experts(manifest.get("model") or (read_json(source / "manifest.json", "manifest").get("model") or {}))
    if table.settings.get("note"):
        console.print(f"[yellow]note:[/] {table.settings['note']}")
    out_console.print(f"wrote {out / 'domain_experts.parquet'} (rule: {table.settings['rule_text']})")


def show_drivers(out: Path, manifest: dict[str, Any], rows: int) -> None:
    import pandas as pd

    from ..causal.drivers import DriverTable

    table = DriverTable.load(out / "drivers.parquet")
    print_drivers(table, pd.read_parquet(out / "causal_rate.parquet"), top=rows)
    for r in table.summary():
        console.print(r["text"])
    for note in manifest["stages"].get("drivers", {}).get("engine_notes", []):
        console.print(f"[yellow]note:[/] {note}")


def show_steering(out: Path, manifest: dict[str, Any], rows: int) -> None:
    from ..interventions.study import InterventionResult

    print_steering(InterventionResult.load(out).table)


def show_eval(out: Path | None, manifest: dict[str, Any], rows: int) -> None:
    st = manifest["stages"]["eval"]
    t = table_of("Evaluation (accuracy with Wilson 95% CI)", ("domain", "task", "n", "accuracy", "95% CI",
                                                              "weighted F1", "truncated"), left=("domain", "task"))
    for name, r in st["results"].items():
        f1 = "-" if r["weighted_f1"] is None else f"{r['weighted_f1']:.3f}"
        t.add_row(name, r["task"], str(r["n"]), f"{r['accuracy']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", f1,
                  str(r.get("n_truncated", 0)))
    out_console.print(t)
    cut = {name: r["n_truncated"] for name, r in st["results"].items() if r.get("n_truncated")}
    if cut:
        out_console.print(f"[yellow]prompts cut from the left to fit the {st.get('context_length')}-token "
                          f"context:[/] {cut}")


def show_lm_eval(out: Path, manifest: dict[str, Any], rows: int) -> None:
    t = table_of("lm-eval", ("task", "metric", "value"), left=("task", "metric"))
    for task, r in manifest["stages"]["lm_eval"]["results"].items():
        for k, v in r.items():
            if k != "sample_len":
                t.add_row(task, k, f"{v:.4f}")
    out_console.print(t)


def show_recorded_routes(out: Path, summary: dict[str, Any]) -> None:
    """What ``profile --routes`` prints: tokens, notes per domain, routing MI per layer, what is not applicable."""
    tokens = summary["tokens"]
    console.print(f"profiled {sum(tokens.values())} recorded tokens over {len(tokens)} domains → {out}")
    for name, notes in summary["notes"].items():
        for note in notes:
            console.print(f"[yellow]{name}:[/] {note}")
    console.print("I(domain; selected expert) per layer [bits]: "
                  + ", ".join(f"{layer}: {bits:.3f}" for layer, bits in summary["mi_bits"].items()))
    console.print("not applicable from indices alone: entropy, CWAS, gate weights, importance, CE (no logits "
                  f"or model); next: expertscope domains {out}")
