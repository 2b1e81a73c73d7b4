"""Calibration of the domain-expert rule: power on planted experts, false flags on null splits, and speed.

Prints the numbers measured in this run (the ones quoted in docs/methods.md):

  PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/calibrate_rules.py            # everything (~3-5 min)
  PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/calibrate_rules.py --quick    # 20 splits, no speed part

1. Power: tiny Mixtral models (real top-k routing) with 1, 2 or 3 experts planted in one layer of 8 (top-2)
   and of 60 (top-4), at several plant strengths (the planted logits rise by ``strength`` on domain A's
   tokens and fall by as much on B's; see ``expertscope.testing.calibration``); 60 texts per domain. For each: the
   planted experts found by the default rule (and by the old z rule), their activation rates, q-values,
   and the other flags (experts displaced by the plant, genuinely more active in B).
2. Null: random half-splits of the same texts, on an unplanted tiny model (E = 8 and E = 60) and on the
   bundled demo model (each synthetic domain's texts split in halves): the share of splits with any flag.
3. Speed: the default permutation test and its normal approximation on a synthetic profile the size of a
   real model's (3 domains × 300 sequences, 24 layers × 60 experts).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from expertscope.stats.domain_experts import domain_experts
from expertscope.stats.profile import RoutingProfile, profile
from expertscope.testing.calibration import null_splits, null_texts, planted_model, planted_profile, planted_result


def power(strengths: tuple[float, ...]) -> None:
    print("== power: planted experts for domain A at layer 1 (60 texts per domain) ==")
    print(f"{'E':>3} {'k':>2} {'plant':>5} {'strength':>8}  {'found':>5}  {'normal':>6}  {'z rule':>6}  "
          f"{'A rate in A':>16}  {'A rate in B':>16}  {'lift':>16}  {'max q':>7}  other flags (B, same layer)")
    for E, k in ((8, 2), (60, 4)):
        for strength in strengths:
            for n in (1, 2, 3):
                planted = list(range(n))
                prof = planted_profile(E, k, planted, strength=strength)
                r = planted_result(prof, planted, test="permutation")
                nr = planted_result(prof, planted, test="normal")
                z = planted_result(prof, planted, rule="z", n_perm=0, n_boot=0)
                print(f"{E:>3} {k:>2} {n:>5} {strength:>8.1f}  {len(r['found']):>3}/{n}  {len(nr['found']):>4}/{n}  "
                      f"{len(z['found']):>4}/{n}  {' '.join(f'{x:.2f}' for x in r['A_rate_in_A']):>16}  "
                      f"{' '.join(f'{x:.2f}' for x in r['A_rate_in_B']):>16}  "
                      f"{' '.join(f'{x:.1f}' for x in r['lift']):>16}  {max(r['q']):>7.1e}  "
                      f"{r['other_flags']} ({r['other_flags_B_same_layer']})")


def nulls(n_splits: int) -> None:
    print(f"\n== null: {n_splits} random half-splits of the same texts (share of splits with any flag) ==")
    for E, k in ((8, 2), (60, 4)):
        prof = profile(planted_model(E, k, [], strength=0.0), {"all": null_texts(120)}, batch_size=32)
        for test in ("permutation", "normal"):
            t0 = time.perf_counter()
            res = null_splits(prof, n_splits, test=test)
            print(f"tiny E={E:<2} top-{k} 120 texts, test={test:<11}: {sum(f > 0 for f in res.flags):>3}/{n_splits} "
                  f"splits flagged ({100 * res.false_flag_rate:.1f}%), {sum(res.flags)} flags in all, "
                  f"{time.perf_counter() - t0:.1f}s")
    try:
        import expertscope as es
        from expertscope.data.sources import load_domains

        moe = es.load_model("demo", dtype="float32")
        doms = load_domains(["emotion=synthetic:emotion@validation", "knowledge=synthetic:knowledge@validation",
                             "math=synthetic:math@validation"], limit=120)
    except Exception as exc:  # the demo model is optional here
        print(f"demo model: skipped ({exc})")
        return
    for d in doms:
        prof = profile(moe, [d], batch_size=16)
        t0 = time.perf_counter()
        res = null_splits(prof, n_splits)
        print(f"demo {d.name:<9} {len(d.texts)} texts (L={len(prof.layers)}, E={prof.num_experts}): "
              f"{sum(f > 0 for f in res.flags):>3}/{n_splits} splits flagged ({100 * res.false_flag_rate:.1f}%), "
              f"{time.perf_counter() - t0:.1f}s")
    full = profile(moe, doms, batch_size=16)
    t0 = time.perf_counter()
    table = domain_experts(full, n_boot=0)
    counts = {d: len(table.experts(d)) for d in table.settings["domains"]}
    z = domain_experts(full, rule="z", n_boot=0, n_perm=0)
    zc = {d: len(z.experts(d)) for d in z.settings["domains"]}
    print(f"demo, 3 domains × {len(doms[0].texts)} texts: domain experts (default rule) {counts}; z rule {zc}; "
          f"{time.perf_counter() - t0:.1f}s")


def speed(quick_speed: bool = True) -> None:
    print("\n== speed: synthetic profile, 3 domains × 300 sequences, 24 layers × 60 experts, top-4 ==")
    g = np.random.default_rng(0)
    L, E, k, D, S = 24, 60, 4, 3, 300
    prof = RoutingProfile(layers=list(range(L)), num_experts=E, top_k=k)
    base = g.dirichlet(np.ones(E) * 0.5, size=L) * k  # per-layer expert usage, a few busy experts
    for d in range(D):
        rate = base.copy()
        rate[:, d * 3:(d + 1) * 3] *= 2.5  # three specific experts per layer and domain
        rate = np.minimum(rate, 0.95)
        ntok = g.integers(50, 400, size=S)
        sel = g.binomial(ntok[:, None, None], np.broadcast_to(rate, (S, L, E)))
        h = sel * g.uniform(0.5, 1.0, size=sel.shape)
        prof.add(f"d{d}", list(range(S)), ntok, {"sel": sel.astype(np.int64), "h_bern": h, "h_eq1": h * 0.7,
                                                 "gate": sel * 0.3})
    raised = [np.minimum(base[:, d * 3:(d + 1) * 3] * 2.5, 0.95) for d in range(D)]
    detectable = sum(int(((r > k / E) & (r / base[:, d * 3:(d + 1) * 3] >= 1.5)).sum()) for d, r in enumerate(raised))
    print(f"{D * L * 3} cells raised 2.5x; {detectable} of them have a true rate above k/E and a true lift >= 1.5")
    tests = ("auto", "normal") if quick_speed else ("auto", "normal", "permutation")
    for test in tests:
        t0 = time.perf_counter()
        table = domain_experts(prof, test=test, n_boot=200)
        dt = time.perf_counter() - t0
        print(f"test={test:<11} (ran {table.settings['test']}): {dt:6.1f}s for {table.settings['n_tests']} cells, "
              f"n_perm={table.settings['n_perm']} (mean permutations per cell {table.df['n_perm_used'].mean():.0f}), "
              f"{int(table.df['is_domain_expert'].sum())} experts flagged")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 null splits, one strength, no speed part")
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--slow-permutation", action="store_true",
                    help="also time the full permutation test on the real-model-sized profile (many minutes)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    power((1.0,) if args.quick else (0.5, 1.0, 2.0))
    nulls(20 if args.quick else args.splits)
    if not args.quick:
        speed(quick_speed=not args.slow_permutation)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
