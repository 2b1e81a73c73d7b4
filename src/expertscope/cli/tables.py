"""The tables the commands print (rich), from the run's saved tables and manifest."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rich.table import Table

from ._common import console, out_console

if TYPE_CHECKING:
    from ..report.views import TableView


def _views() -> ModuleType:
    """The report's table views, imported when a command prints (not for --help: they need pandas)."""
    from ..report import views

    return views


def print_views(*tables: TableView) -> None:
    """Print library table views (:mod:`expertscope.report.views`) as rich tables: text columns left-aligned,
    numbers right-aligned, each caption under its table."""
    for view in tables:
        t = Table(title=view.title, title_justify="left", caption=view.caption, caption_justify="left")
        for col in view.rows.columns:
            t.add_column(col, justify="left" if col in view.left else "right")
        for row in view.rows.itertuples(index=False):
            t.add_row(*row)
        out_console.print(t)


# ----- per command: what it prints when done (out, manifest, rows) -------------------------------------------
def run_summary(out: Path, manifest: dict[str, Any]) -> Table | None:
    """The end-of-run summary as one table, a row per domain: items per part, domain experts, drivers (and
    whether the set is stable at this sample size), and confirmed pre-registered predictions per corpus."""
    import dataclasses

    from ..io import read_json, read_table
    from ..report.record import DomainFindings, confirmed_cell, stable_cell

    stages = manifest.get("stages", {})
    dom = (stages.get("domain_experts") or {}).get("domain_experts") or {}
    drv = (stages.get("drivers") or {}).get("drivers") or {}
    parts: dict[str, dict[str, int]] = {}
    for st in stages.values():
        for part, doms in (st.get("items") or {}).items() if isinstance(st, dict) else ():
            for name, rec in doms.items():
                parts.setdefault(name, {})[part] = max(parts.get(name, {}).get(part, 0), int(rec["n"]))
    names = list(dict.fromkeys([*dom, *drv, *parts]))
    if not names:
        return None
    known = {f.name for f in dataclasses.fields(DomainFindings)}
    recorded = read_json(out / "findings.json", "findings")["domains"] if (out / "findings.json").exists() else []
    stable = {d["domain"]: stable_cell(DomainFindings(**{k: v for k, v in d.items() if k in known}))
              for d in recorded}
    conf = read_table(out / "confirmation.parquet")[0] if (out / "confirmation.parquet").exists() else None
    t = Table(title="Summary", title_justify="left",
              caption="items: discovery/training/confirmation. experts: domain experts. stable: is the driver set "
                      "stable at this sample size (else the inputs the power estimate asks for). confirmed: "
                      "pre-registered predictions confirmed of those testable, per corpus (confirmation part; "
                      "second corpus).", caption_justify="left")
    for col in ("domain", "items", "experts", "drivers", "stable", "confirmed"):
        t.add_column(col, justify="left" if col in ("domain", "stable") else "right", no_wrap=col != "stable")
    for name in names:
        p = parts.get(name, {})
        items = "/".join(str(p[k]) if k in p else "–" for k in ("discovery", "train", "confirm"))
        t.add_row(name, items, str(dom.get(name, "–")), str(drv.get(name, "–")), stable.get(name, "–"),
                  confirmed_cell(conf, name))
    return t


def show_run(out: Path, manifest: dict[str, Any], rows: int) -> None:
    table = run_summary(out, manifest)
    if table is not None:
        out_console.print(table)
    if (out / "report.html").exists():
        console.print(f"open {out / 'report.html'} in a browser")


def show_confirmation(out: Path, manifest: dict[str, Any], rows: int) -> None:
    """What ``confirm`` prints: each corpus's count of confirmed predictions and the confirmed ones in words."""
    from ..io import read_table
    from ..report.sentences import confirmation_sentences

    table, _ = read_table(out / "confirmation.parquet")
    for line in confirmation_sentences(table):
        out_console.print(line)
    if (out / "report.html").exists():
        console.print(f"open {out / 'report.html'} in a browser")


def show_profile(out: Path, manifest: dict[str, Any], rows: int) -> None:
    st = manifest["stages"]["profile"]
    console.print(f"profiled {sum(st['tokens'].values())} tokens over {len(st['tokens'])} domains → {out}")
    console.print("I(domain; selected expert) per layer \\[bits]: "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in st["routing_mi_bits"].items()))
    if any(st["truncated"].values()):
        console.print(f"[yellow]truncated to {st.get('max_length_used')} tokens:[/] {st['truncated']}")
    _show_phases(out, st.get("phases"))


def _show_phases(out: Path, phases: dict[str, Any] | None) -> None:
    """The prompt-against-generated sentences, and where each phase's own profile is."""
    if not phases:
        return
    for sentence in phases["sentences"]:
        out_console.print(sentence)
    if phases.get("note"):
        console.print(f"[yellow]note:[/] {phases['note']}")
    out_console.print(f"each phase's profile: {out / 'phases' / 'prompt'}, {out / 'phases' / 'generated'} (every "
                      "command that reads a profile reads them); the comparison: phase_comparison.parquet")


def show_domains(out: Path, manifest: dict[str, Any], rows: int) -> None:
    from ..io import read_json
    from ..stats.domain_experts import DomainExpertTable

    table = DomainExpertTable.load(out / "domain_experts.parquet")
    print_views(*_views().domain_expert_views(table, rows))
    source = Path(manifest.get("fingerprint", {}).get("inputs", {}).get("dir") or out)
    shared = _views().shared_experts_line(manifest.get("model")
                                       or (read_json(source / "manifest.json", "manifest").get("model") or {}))
    if shared:
        out_console.print(shared)
    if table.settings.get("note"):
        console.print(f"[yellow]note:[/] {table.settings['note']}")
    out_console.print(f"wrote {out / 'domain_experts.parquet'} (rule: {table.settings['rule_text']})")


def show_drivers(out: Path, manifest: dict[str, Any], rows: int) -> None:
    import pandas as pd

    from ..causal.drivers import DriverTable

    table = DriverTable.load(out / "drivers.parquet")
    print_views(_views().driver_view(table, pd.read_parquet(out / "causal_rate.parquet"), top=rows))
    for r in table.summary():
        console.print(r["text"])
    for note in manifest["stages"].get("drivers", {}).get("engine_notes", []):
        console.print(f"[yellow]note:[/] {note}")


def show_steering(out: Path, manifest: dict[str, Any], rows: int) -> None:
    from ..interventions.steering_study import InterventionResult

    print_views(*_views().steering_views(InterventionResult.load(out).table))


def show_eval(out: Path | None, manifest: dict[str, Any], rows: int) -> None:
    st = manifest["stages"]["eval"]
    print_views(_views().eval_view(st["results"]))
    cut = {name: r["n_truncated"] for name, r in st["results"].items() if r.get("n_truncated")}
    if cut:
        out_console.print(f"[yellow]prompts cut from the left to fit the {st.get('context_length')}-token "
                          f"context:[/] {cut}")


def show_lm_eval(out: Path, manifest: dict[str, Any], rows: int) -> None:
    print_views(_views().lm_eval_view(manifest["stages"]["lm_eval"]["results"]))


def show_recorded_routes(out: Path, summary: dict[str, Any]) -> None:
    """What ``profile --routes`` prints: tokens, notes per domain, routing MI per layer, what is not applicable."""
    tokens = summary["tokens"]
    console.print(f"profiled {sum(tokens.values())} recorded tokens over {len(tokens)} domains → {out}")
    for name, notes in summary["notes"].items():
        for note in notes:
            console.print(f"[yellow]{name}:[/] {note}")
    console.print("I(domain; selected expert) per layer \\[bits]: "
                  + ", ".join(f"{layer}: {bits:.3f}" for layer, bits in summary["mi_bits"].items()))
    _show_phases(out, summary.get("phases"))
    console.print("not applicable from indices alone: entropy, CWAS, gate weights, importance, CE (no logits "
                  f"or model); next: expertscope domains {out}")


def show_plan(plan: Any) -> None:
    """What ``expertscope plan`` prints: the model's shape, a table of the stages, the total and how it was timed."""
    from rich.table import Table

    m = plan.model
    moe_layers = len(m.moe)
    experts = sorted({e for e, _ in m.moe.values()})
    top_k = sorted({k for _, k in m.moe.values()})
    out_console.print(f"{m.architecture}: {m.n_layers} layers ({moe_layers} MoE, {'/'.join(map(str, experts))} "
                      f"experts, top-{'/'.join(map(str, top_k))}), hidden {m.hidden}, {_count(m.params)} "
                      f"parameters ({_count(m.active_params)} active per token), {m.dtype}: "
                      f"{m.weights_gb:.2f} GB of weights")
    t = Table(show_lines=False)
    rows = plan.table()
    cols = ("stage", "inputs", "forward passes", "forward-equivalents", "memory GB", "time")
    for col in cols:
        t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=col == "stage")
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    out_console.print(t)
    for r in rows:
        if r["note"]:
            out_console.print(f"  {r['stage']}: {r['note']}")
    out_console.print(f"total: {_duration(plan.total_seconds)}; peak memory "
                      f"{max((s.memory_gb for s in plan.stages), default=m.weights_gb):.2f} GB")
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")


def _duration(s: float) -> str:
    from ..pipeline.plan import duration_text

    return duration_text(s)


def _count(n: float) -> str:
    from ..pipeline.plan import count_text

    return count_text(n)
