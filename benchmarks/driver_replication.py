"""Do driver experts replicate? The numbers quoted in docs/methods.md ("Replication") and the README.

  PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/driver_replication.py            # ~6 min the first time

1. CE of every (layer, expert) on the validation domains of ``demo`` (``--inputs`` per domain, default 240)
   and of ``demo-deepseek`` (``--deepseek-inputs``, default 120), computed once and saved under ``--cache``
   (reused on later runs). Validation items only: no steering outcome is used anywhere.
2. The default driver rule (stability selection) on two disjoint halves of each domain's inputs, split by
   the seeded text hash, over ``--seeds`` split seeds: per domain the median Jaccard of the halves' sets,
   how many splits reach 0.6, how many experts the rule flags on all inputs (and the share of routed
   experts), and the run's sentence on stability and power.
3. For comparison, the same for the one-pass rule (``stability_pairs=0``, the previous default).

Targets (issue "discover on one sample, confirm on another"): demo halves of 120 inputs, Jaccard >= 0.6 in
every domain; demo-deepseek at most 10 % of routed experts flagged per domain and Jaccard >= 0.6.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

import expertscope as es
from expertscope.causal.drivers import driver_experts, subset_effects
from expertscope.causal.effects import CausalEffects
from expertscope.config import DEMO_DOMAINS
from expertscope.data.sources import load_domains
from expertscope.stats.replication import halves_by_domain
from expertscope.stats.rules import jaccard


def effects_of(model_name: str, n: int, cache: Path, doms: list) -> CausalEffects:
    path = cache / f"ce_{model_name}_{n}"
    if (path / "ce.parquet").exists():
        return CausalEffects.load(path)
    t = time.perf_counter()
    eff = es.causal_effects(es.load_model(model_name), [d.head(n) for d in doms], batch_size=16)
    eff.save(path)
    print(f"  (CE of {model_name} on {n} inputs per domain: {time.perf_counter() - t:.0f} s, saved in {path})")
    return eff


def report(name: str, eff: CausalEffects, doms: list, seeds: int, **rule: object) -> None:
    full = driver_experts(eff, n_boot=0, **rule)
    routed = eff.num_experts * len(eff.layers)
    J: dict[str, list[float]] = {d: [] for d in eff.domains}
    for s in range(seeds):
        half = halves_by_domain(eff.domain, eff.text_index, doms, s)
        tabs = [driver_experts(subset_effects(eff, half == h), n_boot=0, **rule) for h in (0, 1)]
        for d in eff.domains:
            J[d].append(jaccard(set(tabs[0].targets(d)), set(tabs[1].targets(d))))
    print(f"== {name}: {len(eff.domain) // len(eff.domains)} inputs per domain, halves of "
          f"{len(eff.domain) // len(eff.domains) // 2}, {seeds} splits")
    summary = {r["domain"]: r for r in full.summary()}
    for d, js in J.items():
        arr = np.array(js, dtype=float)
        n = len(full.targets(d))
        print(f"  {d:10s} halves' Jaccard median {np.nanmedian(arr):.2f}, >= 0.6 in {int((arr >= 0.6).sum())}/{seeds}; "
              f"{n} drivers on all inputs ({n / routed:.0%} of {routed} routed experts)")
        if summary[d].get("stability"):
            print(f"             {summary[d]['stability']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/bench_ce", help="directory for the saved CE")
    ap.add_argument("--inputs", type=int, default=240)
    ap.add_argument("--deepseek-inputs", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    doms = load_domains(DEMO_DOMAINS, limit=max(300, args.inputs, args.deepseek_inputs), seed=0)
    cache = Path(args.cache)
    for model_name, n in (("demo", args.inputs), ("demo-deepseek", args.deepseek_inputs)):
        eff = effects_of(model_name, n, cache, doms)
        report(f"{model_name}, default rule (stability selection)", eff, doms, args.seeds)
        report(f"{model_name}, one-pass rule (stability_pairs=0)", eff, doms, args.seeds, stability_pairs=0)


if __name__ == "__main__":
    main()
