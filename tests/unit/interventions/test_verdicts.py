"""Calibrated verdicts (docs/methods.md, "Verdicts"): "specific" and "selective" fail for random sets and
pass for planted ones.

* deterministic fixtures of per-item correctness: the set-to-set spread decides (a target that is one more
  draw of a wide control distribution is not specific, though its item interval against the control mean
  excludes 0, as the old rule had it); a rounding residue is not "above 0";
* a simulated null of many conditions (items × heterogeneous sets): the false-"specific" rate is at most α,
  where the item-only interval of the old rule calls a large share specific;
* the positive control: a hand-built model in which known experts carry one domain; the whole pipeline
  (profile → domain experts → intervention study) finds them and calls them specific and selective, over
  seeds, and random sets not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as student_t

from expertscope.interventions.verdicts import (
    beyond_controls,
    excludes_zero,
    resolution,
    selectivity_verdict,
    specific_verdicts,
)
from expertscope.stats.rules import bootstrap_weights


def _knockout(n: int, lost: int, rng: np.random.Generator) -> np.ndarray:
    """All ``n`` items right except ``lost`` random ones."""
    out = np.ones(n)
    out[rng.choice(n, lost, replace=False)] = 0
    return out


def _weights(n: int) -> np.ndarray:
    return bootstrap_weights(n, 2000, np.random.default_rng(0))


def test_a_target_inside_a_wide_control_distribution_is_not_specific() -> None:
    """The target loses 30 of 60 items; eight control sets lose 6 to 30. Against the control *mean* the item
    interval excludes 0 (the old rule: specific); against the spread between sets it is one more draw."""
    rng = np.random.default_rng(1)
    n, base = 60, np.ones(60)
    controls = np.array([_knockout(n, k, rng) for k in (6, 18, 30, 12, 24, 9, 27, 15)])
    target = _knockout(n, 30, rng)
    b = beyond_controls(target, controls, base, _weights(n))
    assert b.diff_hi < 0  # the old, item-only rule would call this specific
    assert b.p_set > 0.05 and b.p > 0.05
    # by hand: t = (Δ_T − mean Δ_C) / (sd_C·√(1 + 1/m)), m − 1 df
    d_c = (controls - base).mean(1)
    t = (-0.5 - d_c.mean()) / (d_c.std(ddof=1) * np.sqrt(1 + 1 / 8))
    assert b.t == pytest.approx(t) and b.p_set == pytest.approx(2 * student_t.sf(abs(t), 7))
    assert b.rank == pytest.approx(1 / 8)  # one control draw (−30/60) is at or below the target
    _, specific = specific_verdicts(np.array([b.p]), np.array([b.diff_lo]), np.array([b.diff_hi]),
                                    np.array([b.tol]), 0.05)
    assert specific[0] is False


def test_a_target_beyond_a_narrow_control_distribution_is_specific() -> None:
    rng = np.random.default_rng(2)
    n, base = 60, np.ones(60)
    controls = np.array([_knockout(n, k, rng) for k in (2, 3, 1, 4, 2, 3, 2, 1)])
    target = _knockout(n, 30, rng)
    b = beyond_controls(target, controls, base, _weights(n))
    assert b.p_set < 1e-4 and b.p_item < 1e-3 and b.rank == 0.0
    _, specific = specific_verdicts(np.array([b.p]), np.array([b.diff_lo]), np.array([b.diff_hi]),
                                    np.array([b.tol]), 0.05)
    assert specific[0] is True


def test_no_verdict_from_fewer_than_three_draws_and_identical_draws_are_floored() -> None:
    n, base = 40, np.ones(40)
    rng = np.random.default_rng(3)
    b = beyond_controls(_knockout(n, 20, rng), np.ones((2, n)), base, _weights(n))
    assert np.isnan(b.p) and b.draws == 2
    # eight draws that change nothing: the spread is floored at one item (1/n), so a one-item loss is no news
    b = beyond_controls(_knockout(n, 1, rng), np.ones((8, n)), base, _weights(n))
    assert b.control_sd == 0 and b.p_set > 0.3


def test_a_rounding_residue_is_not_above_zero() -> None:
    """An interval [7.4e-18, 0.24] (a residue of [0, 0.24]) does not exclude 0; one item's worth does."""
    tol = resolution(60, 5)
    assert tol == pytest.approx(0.5 / 300)
    assert not excludes_zero(7.4e-18, 0.24, tol)
    assert excludes_zero(1 / 300, 0.24, tol) and excludes_zero(-0.3, -1 / 300, tol)
    q, specific = specific_verdicts(np.array([1e-6, np.nan]), np.array([7.4e-18, 0.1]), np.array([0.24, 0.2]),
                                    np.array([tol, tol]), 0.05)
    assert specific[0] is False  # q passes, the interval does not
    assert np.isnan(q[1]) and specific[1] != specific[1]  # not tested: no verdict (NaN), not counted


def test_benjamini_hochberg_over_every_condition_decides() -> None:
    """Ten conditions at p = 0.01 pass BH at 0.05 together; one at 0.01 among 9 nulls at p = 0.9 does not
    (q = 0.1), though each alone would."""
    lo, hi, tol = np.full(10, 0.1), np.full(10, 0.2), np.full(10, 1e-3)
    q, s = specific_verdicts(np.full(10, 0.01), lo, hi, tol, 0.05)
    assert all(x is True for x in s)
    q, s = specific_verdicts(np.r_[0.01, np.full(9, 0.9)], lo, hi, tol, 0.05)
    assert q[0] == pytest.approx(0.1) and s[0] is False


@pytest.mark.parametrize("own, specific, off, expected", [
    (-0.5, True, {"b": -0.1, "c": 0.05}, True),     # others lose at most a fifth
    (-0.5, True, {"b": -0.2, "c": 0.0}, False),     # b loses 0.2 > 0.5 / 3
    (-0.5, False, {"b": 0.0}, False),               # not specific on its own domain
    (0.2, True, {"b": 0.0}, False),                 # a gain, not a loss
    (-0.5, None, {"b": 0.0}, None),                 # no verdict: no claim
])
def test_selectivity_rule(own: float, specific: bool | None, off: dict[str, float], expected: bool | None) -> None:
    verdict, why = selectivity_verdict(own, specific, off, 1 / 3)
    assert verdict is expected and why


def _simulated_condition(rng: np.random.Generator, n: int = 60, m: int = 8, planted: float = 0.0,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One condition: ``m + 1`` expert sets drawn from one distribution of set effects (a set's loss rate is
    Beta-distributed: most sets cost little, some a lot, as under ablation), the first being the target.
    Each item is lost with its set's rate scaled by the item's fragility; the target also loses a further
    ``planted`` share of the items (its own effect)."""
    base = np.ones(n)
    fragility = rng.beta(0.7, 0.7, size=n)
    rates = rng.beta(0.6, 2.5, size=m + 1)
    arms = (rng.random((m + 1, n)) > rates[:, None] * 2 * fragility[None, :]).astype(float)
    arms[0] *= rng.random(n) >= planted
    return arms[0], arms[1:], base


def test_false_specific_rate_on_a_simulated_null_is_at_most_alpha() -> None:
    """400 null conditions: the target is one more draw of the controls' distribution. The calibrated test
    calls at most α of them specific (before any correction); the old item-only interval calls far more."""
    rng = np.random.default_rng(7)
    w = _weights(60)
    calls, old = [], []
    for _ in range(400):
        target, controls, base = _simulated_condition(rng)
        b = beyond_controls(target, controls, base, w)
        calls.append(b.p <= 0.05 and excludes_zero(b.diff_lo, b.diff_hi, b.tol))
        old.append(b.diff_lo > 0 or b.diff_hi < 0)
    assert np.mean(calls) <= 0.05
    assert np.mean(old) >= 0.3  # why the set-to-set spread must be in the test


def test_power_on_a_simulated_planted_effect() -> None:
    rng = np.random.default_rng(8)
    w = _weights(60)
    """The target loses a further 80% of the items: found in at least 80% of 100 conditions (the spread of
    the control sets, sd about 0.2 here, is what it must stand out from)."""
    p = [beyond_controls(*_simulated_condition(rng, planted=0.8), weights=w).p for _ in range(100)]
    assert np.mean(np.array(p) <= 0.05) >= 0.8


# ----- the positive control: a model whose carriers are known ----------------------------------------------
def _study(seed: int, table: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Profile → domain experts (unless ``table`` is given) → intervention study on the carrier model:
    ``(domain-expert table, dose table, selectivity table)``; the selectivity's control-normalised effects are
    checked against the arms table's per-item correctness on the way."""
    import expertscope as es
    from expertscope.interventions.steering_study import intervention_study
    from expertscope.testing.calibration import carrier_domains, carrier_model

    moe = carrier_model(seed=seed)
    discover = carrier_domains(n_items=40, seed=1000 + seed)
    confirm = carrier_domains(n_items=60, seed=seed)
    if table is None:
        table = es.domain_experts(es.profile(moe, discover, batch_size=32), seed=seed).df
    res = intervention_study(moe, confirm, table, None, seed=seed, finetune=False, n_boot=300, batch_size=32,
                             dose_scales=(0.5,), dose_biases=())
    _check_normalised(res.selectivity, res.arms)
    return table, res.dose, res.selectivity


def _check_normalised(sel: pd.DataFrame, arms: pd.DataFrame) -> None:
    """Each cell's ``norm_delta`` is the target arm's accuracy minus the mean accuracy of the verdict draws
    ablated on that domain, recomputed here from the arms' per-item correctness strings."""
    def acc(rows: pd.DataFrame) -> list[float]:
        return [float(np.mean([int(c) for c in r])) for r in rows["correct"]]

    for r in sel.itertuples():
        a = arms[(arms["kind"] == r.kind) & (arms["ablated"] == r.ablated) & (arms["domain"] == r.evaluated)
                 & (arms["strength"] == "mask")]
        target, draws = a[a["arm"] == "target"], a[a["role"] == "verdict"]
        assert len(target) == 1 and len(draws) == r.control_draws
        assert r.norm_delta == pytest.approx(acc(target)[0] - np.mean(acc(draws)))


@pytest.mark.slow
def test_planted_carriers_are_found_specific_and_selective_over_seeds() -> None:
    from expertscope.testing.calibration import CARRIERS

    hits = []
    for seed in range(5):
        table, dose, sel = _study(seed)
        found = {d: tuple(sorted(table[(table.domain == d) & table.is_domain_expert].expert)) for d in CARRIERS}
        mask = dose[(dose["mode"] == "mask") & (dose["kind"] == "domain")].set_index("domain")
        selective = sel.groupby("ablated")["selective"].first()
        hits.append(all(found[d] == CARRIERS[d] and mask.loc[d, "specific"] == True  # noqa: E712
                        and selective[d] == True for d in CARRIERS))  # noqa: E712
        # verdicts name their control, and the controls were matched (equally busy: unused by the domain)
        assert (mask["control"] == "matched").all() and (mask["control_draws"] >= 3).all()
    assert np.mean(hits) >= 0.8


@pytest.mark.slow
def test_random_sets_on_the_carrier_model_are_neither_specific_nor_selective() -> None:
    """Non-carrier sets of the same size as targets: masking them costs their domain nothing beyond
    controls, so no verdict is "specific" or "selective"."""
    from expertscope.testing.calibration import CARRIERS

    rng = np.random.default_rng(0)
    calls = sel_calls = tested = 0
    for seed in range(3):
        rows = []
        for d, carriers in CARRIERS.items():
            others = [e for e in range(8) if e not in carriers]
            for e in rng.choice(others, 2, replace=False):
                rows.append({"domain": d, "layer": 0, "expert": int(e), "is_domain_expert": True,
                             "specificity": 0.1, "activation_rate": 0.0})
            rows += [{"domain": d, "layer": 0, "expert": e, "is_domain_expert": False, "specificity": 0.0,
                      "activation_rate": 0.5 if e in carriers else 0.0} for e in range(8)
                     if e not in {r["expert"] for r in rows if r["domain"] == d}]
        _, dose, sel = _study(seed, pd.DataFrame(rows))
        tested += int(dose["p_vs_control"].notna().sum())
        calls += int((dose["specific"] == True).sum())  # noqa: E712  (object column of True/False/NaN)
        sel_calls += int((sel.groupby("ablated")["selective"].first() == True).sum())  # noqa: E712
    assert tested >= 12 and calls == 0 and sel_calls == 0
