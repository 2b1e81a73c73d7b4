"""Calibration of the intervention verdicts (docs/methods.md, "Verdicts"): how often random expert sets are
called "specific" or "selective" (negative controls), and how often planted carriers are found (positive
control).

Run: ``python benchmarks/calibrate_controls.py [--run runs/study] [--random-runs 5] [--workers 2]``.

1. **Exchangeable null** (no model runs): in a finished run's ``steering_arms.parquet``, every verdict
   control draw of every condition is taken in turn as the target and tested against the other draws, with
   the run's own test; each draw index is one pseudo-run, corrected by BH over its conditions like a real
   run. Selectivity likewise, from the draws also evaluated on the other domains.
2. **Random non-expert targets**: sets of random experts that are neither domain experts nor drivers of the
   domain, of the same layers and size as its domain experts, passed as that domain's targets to
   ``intervention_study`` (with its controls, its correction and its selectivity), ``--random-runs`` times
   with different seeds.
3. **Positive control**: the hand-built carrier model (``expertscope.testing.calibration.carrier_model``), whose
   carrier experts carry their domain: profile → domain experts → intervention study over seeds; the share of
   seeds in which every domain's carriers are found, specific and selective (power), at full and at half
   carriage.

Rates are printed with Wilson 95% intervals; "raw" is each condition's test at α before the run's
correction, "verdict" the corrected verdict the run reports. Run it on a quiet machine (it evaluates the
demo's steering arms many times; ``--random-runs 5`` takes about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def wilson(k: int, n: int) -> str:
    """``k/n = rate [lo, hi]`` with a Wilson 95% interval."""
    if n == 0:
        return "0/0"
    z, p = 1.96, k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return f"{k}/{n} = {p:.3f} [{max(0.0, mid - half):.3f}, {min(1.0, mid + half):.3f}]"


def _bits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8).astype(float) - 48.0


def exchangeable_null(run: Path, alpha: float, max_off: float, n_boot: int = 1000) -> dict[str, Any]:
    """Each verdict draw as the target against the other draws, per condition; BH per pseudo-run."""
    from expertscope.interventions.verdicts import beyond_controls, selectivity_verdict, specific_verdicts
    from expertscope.stats.rules import bootstrap_weights

    arms = pd.read_parquet(run / "steering_arms.parquet")
    if "role" not in arms.columns:
        raise SystemExit(f"{run} was made by an older expertscope (no verdict draws): run `make run` again")
    rows = []
    own = arms[arms["ablated"] == arms["domain"]]
    for (dom, kind, strength), g in own.groupby(["domain", "kind", "strength"], sort=False):
        draws = g[g["role"] == "verdict"].sort_values("draw")
        C = np.array([_bits(c) for c in draws["correct"]])
        # The test reads only differences between arms (Δ_T − Δ_C, their spread, T_i − mean C_i): any common
        # baseline cancels, so none is needed.
        b = np.ones(C.shape[1])
        w = bootstrap_weights(C.shape[1], n_boot, np.random.default_rng(0))
        for j in range(len(C)):
            r = beyond_controls(C[j], np.delete(C, j, 0), b, w)
            rows.append({"domain": dom, "kind": kind, "strength": strength, "draw": j, "p": r.p, "lo": r.diff_lo,
                         "hi": r.diff_hi, "tol": r.tol, "diff": r.diff})
    null = pd.DataFrame(rows)
    null["raw"] = (null["p"] <= alpha) & ((null["lo"] > null["tol"]) | (null["hi"] < -null["tol"]))
    null["specific"] = False
    for _, g in null.groupby("draw"):
        _, s = specific_verdicts(g["p"].to_numpy(), g["lo"].to_numpy(), g["hi"].to_numpy(), g["tol"].to_numpy(),
                                 alpha)
        null.loc[g.index, "specific"] = [bool(x) if x == x else False for x in s]
    # selectivity: the pseudo-target draw masked on every domain, normalised by the other draws there
    sel_calls = sel_n = 0
    off = arms[(arms["ablated"] != arms["domain"]) & (arms["role"] == "verdict")]
    for (abl, kind), g in off.groupby(["ablated", "kind"]):
        mask_null = null[(null["domain"] == abl) & (null["kind"] == kind) & (null["strength"] == "mask")]
        own_mask = own[(own["domain"] == abl) & (own["kind"] == kind) & (own["strength"] == "mask")
                       & (own["role"] == "verdict")].sort_values("draw")
        C_own = np.array([_bits(c) for c in own_mask["correct"]])
        n_off = int(g.groupby("domain").size().min())  # draws also ablated on the other domains
        for j in range(min(len(C_own), n_off)):
            own_norm = float(C_own[j].mean() - np.delete(C_own, j, 0).mean())
            spec = bool(mask_null[mask_null["draw"] == j]["specific"].iloc[0])
            offs = {}
            for dom, h in g.groupby("domain"):
                C = np.array([_bits(c) for c in h.sort_values("draw")["correct"]])
                offs[str(dom)] = float(C[j].mean() - np.delete(C, j, 0).mean())
            verdict, _ = selectivity_verdict(own_norm, spec, offs, max_off)
            sel_calls += int(verdict is True)
            sel_n += 1
    return {"null": null, "selective": (sel_calls, sel_n)}


def random_targets(run: Path, runs: int, workers: int, limit: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """``runs`` intervention studies whose targets are random non-expert sets shaped like each domain's
    domain experts: ``[(dose, selectivity)]``."""
    import torch

    import expertscope as es
    from expertscope.config import InterventionConfig
    from expertscope.execution import ModelSpec, make_executor
    from expertscope.interventions.steering_study import intervention_study

    torch.set_num_threads(1)
    table = pd.read_parquet(run / "domain_experts.parquet")
    drivers = pd.read_parquet(run / "drivers.parquet")
    model = es.load_model("demo")
    doms = [es.load_domain(f"{d}=synthetic:{d}@test", limit=limit) for d in ("emotion", "knowledge", "math")]
    flagged: dict[str, set[tuple[int, int]]] = {}
    for df, flag in ((table, "is_domain_expert"), (drivers, "is_driver")):
        for r in df[df[flag]].itertuples():
            flagged.setdefault(str(r.domain), set()).add((int(r.layer), int(r.expert)))
    E = {s.layer: s.num_experts for s in model.sites}
    ex = make_executor("process", ModelSpec("demo", threads=1), workers=workers) if workers > 1 else None
    out = []
    try:
        for seed in range(runs):
            g = np.random.default_rng(1000 + seed)
            fake = table.copy()
            fake["is_domain_expert"] = False
            for d in fake["domain"].unique():
                real = table[(table["domain"] == d) & table["is_domain_expert"]]
                for layer, n in real.groupby("layer").size().items():
                    pool = [e for e in range(E[int(layer)]) if (int(layer), e) not in flagged.get(str(d), set())]
                    for e in g.choice(pool, int(n), replace=False):
                        fake.loc[(fake["domain"] == d) & (fake["layer"] == layer) & (fake["expert"] == e),
                                 "is_domain_expert"] = True
            t = time.perf_counter()
            res = intervention_study(model, doms, fake, None, config=InterventionConfig(limit=limit, seed=seed,
                                                                                        finetune=False),
                                     executor=ex)
            print(f"  random targets, seed {seed}: {time.perf_counter() - t:.0f} s", flush=True)
            out.append((res.dose, res.selectivity))
    finally:
        if ex is not None and hasattr(ex, "close"):
            ex.close()
    return out


def positive_control(seeds: int, carried: float) -> tuple[int, int]:
    """Seeds in which every domain's carriers are found, specific under mask and selective."""
    import expertscope as es
    from expertscope.interventions.steering_study import intervention_study
    from expertscope.testing.calibration import CARRIERS, carrier_domains, carrier_model

    hits = 0
    for seed in range(seeds):
        moe = carrier_model(carried=carried, seed=seed)
        table = es.domain_experts(es.profile(moe, carrier_domains(40, seed=1000 + seed), batch_size=32),
                                  seed=seed).df
        res = intervention_study(moe, carrier_domains(60, seed=seed), table, None, seed=seed, finetune=False,
                                 batch_size=32)
        mask = res.dose[(res.dose["mode"] == "mask") & (res.dose["kind"] == "domain")].set_index("domain")
        sel = res.selectivity.groupby("ablated")["selective"].first()
        found = {d: tuple(sorted(table[(table.domain == d) & table.is_domain_expert].expert)) for d in CARRIERS}
        hits += all(found[d] == CARRIERS[d] and mask.loc[d, "specific"] == True and sel[d] == True  # noqa: E712
                    for d in CARRIERS)
    return hits, seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/study"), help="a finished `expertscope run` directory")
    ap.add_argument("--random-runs", type=int, default=5, help="studies with random non-expert targets (0: none)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for the random-target studies")
    ap.add_argument("--limit", type=int, default=60, help="test items per domain")
    ap.add_argument("--seeds", type=int, default=10, help="seeds of the positive control")
    args = ap.parse_args()
    if not (args.run / "steering_arms.parquet").exists():
        raise SystemExit(f"{args.run} holds no finished run: run `make run` (or pass --run DIR) first")
    from expertscope.config import InterventionConfig

    cfg = InterventionConfig()
    alpha, max_off = cfg.alpha, cfg.max_off_target

    print(f"== 1. exchangeable null: each verdict draw of {args.run} as the target ==")
    ex = exchangeable_null(args.run, alpha, max_off)
    null = ex["null"]
    print(f"  conditions: {len(null)} ({null['draw'].nunique()} pseudo-runs of {len(null) // null['draw'].nunique()})")
    print(f"  false 'specific', raw (each at alpha {alpha}): {wilson(int(null['raw'].sum()), len(null))}")
    print(f"  false 'specific', verdict (BH per pseudo-run): {wilson(int(null['specific'].sum()), len(null))}")
    for st, g in null.groupby("strength", sort=False):
        print(f"    {st:>8}: raw {wilson(int(g['raw'].sum()), len(g))}; "
              f"verdict {wilson(int(g['specific'].sum()), len(g))}")
    print(f"  false 'selective': {wilson(*ex['selective'])}")

    if args.random_runs:
        print(f"== 2. random non-expert targets ({args.random_runs} studies) ==")
        studies = random_targets(args.run, args.random_runs, args.workers, args.limit)
        dose = pd.concat([d for d, _ in studies])
        tested = dose[dose["p_vs_control"].notna()]
        raw = (tested["p_vs_control"] <= alpha) & ((tested["diff_lo"] > 0) | (tested["diff_hi"] < 0))
        spec = tested["specific"] == True  # noqa: E712
        print(f"  conditions: {len(tested)}")
        print(f"  false 'specific', raw: {wilson(int(raw.sum()), len(tested))}")
        print(f"  false 'specific', verdict: {wilson(int(spec.sum()), len(tested))}")
        for st, g in tested.groupby("strength", sort=False):
            r = (g["p_vs_control"] <= alpha) & ((g["diff_lo"] > 0) | (g["diff_hi"] < 0))
            print(f"    {st:>8}: raw {wilson(int(r.sum()), len(g))}; verdict "
                  f"{wilson(int((g['specific'] == True).sum()), len(g))}")  # noqa: E712
        sel = pd.concat([s.groupby(["kind", "ablated"])["selective"].first() for _, s in studies])
        print(f"  false 'selective': {wilson(int((sel == True).sum()), len(sel))}")  # noqa: E712
        old = ((tested["diff_lo"] > 0) | (tested["diff_hi"] < 0))
        print(f"  (the item-interval rule of the previous release on the same conditions: "
              f"{wilson(int(old.sum()), len(tested))})")

    if args.random_runs:
        k = ex["selective"][0] + int((sel == True).sum())  # noqa: E712
        print(f"  false 'selective', both nulls pooled: {wilson(k, ex['selective'][1] + len(sel))}")
    print(f"== 3. positive control: carrier model, {args.seeds} seeds ==")
    for carried in (1.0, 0.5):
        k, n = positive_control(args.seeds, carried)
        print(f"  carriers carry {carried:.0%} of their domain's cues: found, specific and selective in {wilson(k, n)}")


if __name__ == "__main__":
    main()
