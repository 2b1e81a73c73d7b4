"""Print the README's "Results on the bundled demos" table from run directories written by `expertscope run`.

    python scripts/demo_results.py runs/study [runs/deepseek ...]

Every cell is read from the run's findings.json, manifest.json and routing_mi.parquet, so the README's
numbers are those of a run anyone can repeat (`make run`), never typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from expertscope.io import read_table


def _per_domain(doms: list[dict[str, Any]], cell: Any) -> str:
    return " / ".join(cell(d) for d in doms)


def _control(d: dict[str, Any], kind: str) -> str:
    """The primary (mask) control finding of one kind: Δ(target) − mean Δ(controls) [CI], its q-value over the
    run's tests, and whether the calibrated verdict calls it specific."""
    c = next((c for c in d.get("controls", []) if c["kind"] == kind), None)
    if c is None or not c.get("applicable"):
        return "n/a"
    if c.get("specific") is None:
        return "no verdict"
    diff = f"{_num(c['diff'], '+.2f')} [{_num(c['diff_lo'], '+.2f')}, {_num(c['diff_hi'], '+.2f')}]"
    q = c.get("q_vs_control")
    return diff + (f" q {_num(q, '.2g')}" if q is not None else "") + (" **specific**" if c["specific"] else "")


def _selective(d: dict[str, Any], kind: str) -> str:
    s = next((s for s in d.get("selectivity", []) if s["kind"] == kind), None)
    if s is None or s.get("selective") is None:
        return "–"
    return "**selective**" if s["selective"] else "no"


def _confirmed(c: dict[str, Any] | None) -> str:
    """``confirmed of tested`` per corpus, in the run's order."""
    if not c:
        return "–"
    cells = []
    for counts in c["outcomes"].values():
        tested = sum(v for k, v in counts.items() if k != "not measured")
        cells.append(f"{counts.get('confirmed', 0)} of {tested}")
    return "; ".join(cells)


def _jaccard(r: dict[str, Any] | None) -> str:
    j = None if r is None else r.get("jaccard")
    return "–" if j is None or (isinstance(j, float) and math.isnan(j)) else f"{j:.2f}"


def _num(x: Any, fmt: str) -> str:
    """``x`` formatted, or "–" for a value the run did not measure (None / NaN)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def column(run: Path) -> dict[str, str]:
    """One column of the table: the row label → the run's value."""
    f = json.loads((run / "findings.json").read_text())
    m = json.loads((run / "manifest.json").read_text())
    doms = f["domains"]
    best = max(((d["domain"], e) for d in doms for e in d["domain_experts"]), key=lambda t: t[1]["lift"],
               default=None)
    mi, _ = read_table(run / "routing_mi.parquet")
    st = m["stages"]
    return {
        "domains": " / ".join(d["domain"] for d in doms),
        "domain experts": _per_domain(doms, lambda d: str(d["n_domain_experts"])),
        "strongest domain expert (activation lift [95% CI], q)": "–" if best is None else (
            f"{best[0]}: layer {best[1]['layer']} expert {best[1]['expert']}, {best[1]['lift']:.2f} "
            f"[{_num(best[1].get('lift_lo'), '.2f')}, {_num(best[1].get('lift_hi'), '.2f')}], "
            f"q = {_num(best[1].get('q_value'), '.0e')}"),
        "driver experts": _per_domain(doms, lambda d: str(d["n_drivers"])),
        "largest mean CE at the decision positions, nats": _per_domain(
            doms, lambda d: _num(d.get("largest_ce"), ".3g")),
        "domain experts replicate on disjoint halves (Jaccard)": _per_domain(
            doms, lambda d: _jaccard(d.get("domain_replication"))),
        "drivers replicate on disjoint halves (Jaccard; target ≥ 0.6)": _per_domain(
            doms, lambda d: _jaccard(d.get("driver_replication"))),
        "routing MI per layer, bits": " / ".join(f"{x:.3f}" for x in mi.sort_values("layer")["mi_bits"]),
        "causal rate, peak layer": _per_domain(
            doms, lambda d: "–" if not d.get("causal_rate_peak") else
            f"{d['causal_rate_peak']['layer']}: {_num(d['causal_rate_peak']['causal_rate'], '.2f')}"),
        "unsteered accuracy (steering items)": _per_domain(
            doms, lambda d: "–" if not d.get("accuracy") else _num(d["accuracy"]["accuracy"], ".2f")),
        "domain experts masked, Δ beyond equally busy controls [95% CI], BH q": _per_domain(
            doms, lambda d: _control(d, "domain")),
        "drivers masked, Δ beyond equally busy controls [95% CI], BH q": _per_domain(
            doms, lambda d: _control(d, "driver")),
        "selective (domain experts / drivers)": _per_domain(
            doms, lambda d: f"{_selective(d, 'domain')}, {_selective(d, 'driver')}"),
        "drivers stable at this sample size? (inputs the power estimate asks for)": _per_domain(
            doms, lambda d: "–" if d.get("driver_stable") is None else "yes" if d["driver_stable"]
            else f"no ({_num(d.get('driver_inputs_needed'), '.0f')})"),
        "pre-registered predictions confirmed (confirmation part; second corpus)": _confirmed(f.get("confirmation")),
        "`expertscope run` wall time (steering stage)": (
            f"{_minutes(st['_total_seconds']['seconds'])} ({_minutes(st['steering']['seconds'])})"
            if "steering" in st and "_total_seconds" in st else "–"),
    }


def table(runs: list[Path]) -> str:
    cols = [column(r) for r in runs]
    names = [str((json.loads((r / "manifest.json").read_text()).get("model") or {}).get("source") or r.name)
             for r in runs]
    lines = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {row} | " + " | ".join(c[row] for c in cols) + " |" for row in cols[0]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of `expertscope run`")
    args = ap.parse_args(argv)
    missing = [r for r in args.runs if not (r / "findings.json").is_file()]
    if missing:
        print(f"error: {missing[0]} has no findings.json: run `expertscope run -o {missing[0]}` first", file=sys.stderr)
        return 2
    print(table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
