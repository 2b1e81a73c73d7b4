"""Does the driver rule replicate on the bundled demo? The numbers quoted in docs/methods.md ("Replication").

  PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/driver_replication.py --cache runs/ce_demo   # ~4 min once

1. CE of every (layer, expert) on the demo's validation domains, ``--inputs`` per domain (default 240),
   computed once and saved in ``--cache`` (reused on later runs; no steering anywhere).
2. The driver rule on inputs 1-120 (the run's default) and on held-out inputs 121-240, each split into two
   disjoint halves by the seeded text hash, over ``--seeds`` split seeds: per domain the Jaccard of the
   halves' driver sets on seed 0, its median over the seeds, and how many seeds reach 0.6; with the rule
   deciding on raw CE and on CE rounded to 1e-9 nats (``ce_decimals``, the default).
3. How often each expert is flagged over all the halves (which drivers are stable).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

import expertscope as es
from expertscope.causal.drivers import driver_experts, subset_effects
from expertscope.causal.effects import CausalEffects
from expertscope.config import DEMO_DOMAINS
from expertscope.data.sources import load_domains
from expertscope.stats.replication import halves_by_domain


def first(eff: CausalEffects, skip: int, n: int) -> CausalEffects:
    keep = np.zeros(len(eff.domain), bool)
    for d in eff.domains:
        idx = np.flatnonzero(eff.domain == d)
        keep[idx[skip:skip + n]] = True
    return subset_effects(eff, keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/ce_demo", help="directory for the saved CE (ce.parquet)")
    ap.add_argument("--inputs", type=int, default=240)
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    doms = load_domains(DEMO_DOMAINS, limit=max(300, args.inputs), seed=0)
    cache = Path(args.cache)
    if (cache / "ce.parquet").exists():
        eff = CausalEffects.load(cache)
    else:
        model = es.load_model("demo")
        eff = es.causal_effects(model, [d.head(args.inputs) for d in doms], batch_size=16)
        eff.save(cache)
    for skip, label in ((0, "inputs 1-120"), (120, "inputs 121-240 (held out)")):
        sub = first(eff, skip, 120)
        if len(sub.domain) < 3 * 120:
            continue
        for dec in (None, 9):
            J: dict[str, list[float]] = {d: [] for d in sub.domains}
            counts: dict[str, dict[tuple[int, int], int]] = {d: {} for d in sub.domains}
            for s in range(args.seeds):
                rep = es.replicate_drivers(sub, doms, seed=s, ce_decimals=dec, n_boot=0)
                for r in rep.summary.itertuples():
                    J[r.domain].append(float(r.jaccard))
                half = halves_by_domain(sub.domain, sub.text_index, doms, s)
                for h in (0, 1):
                    t = driver_experts(subset_effects(sub, half == h), ce_decimals=dec, n_boot=0).df
                    for row in t[t.is_driver].itertuples():
                        key = (int(row.layer), int(row.expert))
                        counts[row.domain][key] = counts[row.domain].get(key, 0) + 1
            print(f"== {label}, ce_decimals={dec}")
            for d, js in J.items():
                arr = np.array(js)
                share = {f"L{k[0]}E{k[1]}": round(v / (2 * args.seeds), 2)
                         for k, v in sorted(counts[d].items(), key=lambda kv: -kv[1])}
                print(f"  {d:10s} seed 0: {arr[0]:.2f}  median {np.nanmedian(arr):.2f}  >= 0.6 in "
                      f"{int((arr >= 0.6).sum())}/{len(arr)}   flagged in share of halves: {share}")


if __name__ == "__main__":
    main()
