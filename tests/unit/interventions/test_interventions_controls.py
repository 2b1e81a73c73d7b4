"""Controls of the intervention study: matched random and busiest control sets, routing changes per real
token (independent of batch size), and the exact paired tests against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from expertscope.interventions.controls import (
    activation_rates,
    busiest_control,
    control_seed,
    matched_controls,
    random_controls,
    record_routing,
    routing_changes,
)
from expertscope.models.model import MoEModel
from expertscope.stats.rules import bh_qvalues as bh
from expertscope.stats.rules import mcnemar_exact, mean_ci, sign_test
from expertscope.testing import tiny_tokenizer


@pytest.mark.parametrize("seed", range(10))
def test_matched_controls_are_equally_busy_distinct_and_never_targets(seed: int) -> None:
    """Each partner is among the quarter (at least 3) of its layer's non-target experts nearest to its target in
    log activation, checked by sorting the candidates here; draws are distinct; a matched set is busier than a
    uniform one on average when the targets are the layer's busiest."""
    rng = np.random.default_rng(seed)
    num = {0: 8, 1: 16}
    act = {(lay, e): float(rng.uniform(0.01, 0.9)) for lay in num for e in range(num[lay])}
    busiest = {lay: sorted(range(num[lay]), key=lambda e: -act[(lay, e)])[:2] for lay in num}
    targets = [(lay, e) for lay in num for e in busiest[lay]]
    draws, reason = matched_controls(targets, act, num, 8, control_seed(seed, "d", "domain"))
    assert len(draws) == len(set(draws)) and (len(draws) == 8 or "distinct" in reason)
    for d in draws:
        assert not set(d) & set(targets) and sorted(lay for lay, _ in d) == sorted(lay for lay, _ in targets)
        for lay in num:
            others = [e for e in range(num[lay]) if e not in busiest[lay]]
            width = max(3, math.ceil(0.25 * len(others)))
            near = set()
            for t in busiest[lay]:
                key = math.log(act[(lay, t)] + 1e-4)
                ranked = sorted(others, key=lambda e: abs(math.log(act[(lay, e)] + 1e-4) - key))
                near |= set(ranked[:width])
            assert {e for la, e in d if la == lay} <= near
    uniform, _ = random_controls(targets, num, 8, control_seed(seed, "d", "domain"))
    mean = lambda sets: np.mean([act[x] for s in sets for x in s])  # noqa: E731
    assert mean(draws) > mean(uniform)


def test_matched_controls_need_activation_rates() -> None:
    draws, reason = matched_controls([(0, 1)], {}, {0: 8}, 4, control_seed(0, "d"))
    assert draws == [] and "no activation rates" in reason


@pytest.mark.parametrize("seed", range(20))
def test_random_controls_are_matched_and_never_targets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num = {1: 8, 2: 16, 3: 6}
    layers = rng.choice(list(num), size=rng.integers(1, 4), replace=True)
    targets = sorted({(int(lay), int(rng.integers(num[int(lay)]))) for lay in layers})
    draws, reason = random_controls(targets, num, 5, control_seed(seed, "math", "domain"))
    assert reason == "" and len(draws) == 5
    want = sorted(lay for lay, _ in targets)
    for d in draws:
        assert not set(d) & set(targets)  # never a target
        assert sorted(lay for lay, _ in d) == want  # one per target, in the target's layer
        assert len(set(d)) == len(d)
        assert all(0 <= e < num[lay] for lay, e in d)  # routed experts only (shared ones are numbered >= E)
    # distinct draws while the layers allow it
    possible = math.prod(math.comb(num[lay] - n, n) for lay, n in
                         pd.Series([lay for lay, _ in targets]).value_counts().items())
    assert len(set(draws)) == min(5, possible)
    again, _ = random_controls(targets, num, 5, control_seed(seed, "math", "domain"))
    assert again == draws  # seeded


def test_random_controls_without_room_say_why() -> None:
    draws, reason = random_controls([(0, 0), (0, 1), (0, 2)], {0: 4}, 5, control_seed(0))
    assert draws == [] and "no matched control" in reason


def test_busiest_control_uses_the_domain_activation_and_skips_targets_and_shared() -> None:
    # A table as the domain-expert stage writes it: shared experts numbered E.. with activation 1.0.
    rows = []
    for layer in (1, 2):
        for e in range(6):
            rows.append({"domain": "math", "layer": layer, "expert": e, "shared": False,
                         "activation_rate": [0.1, 0.5, 0.3, 0.45, 0.2, 0.05][e] + 0.01 * layer})
        rows.append({"domain": "math", "layer": layer, "expert": 6, "shared": True, "activation_rate": 1.0})
        rows.append({"domain": "emotion", "layer": layer, "expert": 0, "shared": False, "activation_rate": 0.99})
    act = activation_rates(pd.DataFrame(rows), "math")
    assert (1, 6) not in act and act[(1, 0)] == pytest.approx(0.11)
    busy, reason = busiest_control([(1, 1), (2, 1), (2, 4)], act, {1: 6, 2: 6})
    # layer 1: most active non-target is 3 (0.46); layer 2: 3 (0.47) then 2 (0.32); expert 1 is a target
    assert reason == "" and busy == ((1, 3), (2, 2), (2, 3))


def test_controls_on_a_model_with_shared_experts(make_tiny) -> None:
    """DeepSeek-V3 has a shared expert: controls come from the router's routed experts only."""
    moe = MoEModel.from_model(make_tiny("deepseek_v3"))
    num = {s.layer: s.num_experts for s in moe.sites}
    assert all(s.num_shared >= 1 for s in moe.sites)
    targets = [(moe.layers[0], 2), (moe.layers[-1], 5)]
    draws, _ = random_controls(targets, num, 5, control_seed(3))
    for d in draws:
        assert all(e < num[lay] for lay, e in d) and not set(d) & set(targets)


def test_sign_and_mcnemar_tests_against_hand_computation() -> None:
    # 7 items lost, 1 gained, 12 unchanged: p = 2 * (C(8,0) + C(8,1)) / 2^8 = 18/256
    before = np.array([1] * 7 + [0] + [1] * 6 + [0] * 6)
    after = np.array([0] * 7 + [1] + [1] * 6 + [0] * 6)
    p, gained, lost = mcnemar_exact(before, after)
    assert (gained, lost) == (1, 7) and p == pytest.approx(18 / 256)
    # 10 of 10 in one direction: 2 / 2^10
    assert sign_test(np.r_[np.ones(10), np.zeros(5)])[0] == pytest.approx(2 / 1024)
    # balanced: p capped at 1; nothing changed: 1
    assert sign_test([1, -1, 1, -1])[0] == 1.0 and sign_test([0, 0])[0] == 1.0
    # fractional differences (target minus mean of controls) count by sign
    assert sign_test([0.4, -0.2, 0.6, 0.2, 0.0])[1:] == (3, 1)
    # against scipy's exact binomial test
    from scipy.stats import binomtest

    for pos, neg in ((3, 11), (9, 2), (0, 6)):
        d = np.r_[np.ones(pos), -np.ones(neg)]
        assert sign_test(d)[0] == pytest.approx(binomtest(pos, pos + neg, 0.5).pvalue)


def test_mean_ci_and_bh_by_hand() -> None:
    d = np.array([1.0, 0.0, -1.0, 1.0])
    idx = np.array([[0, 0, 0, 0], [2, 2, 2, 2], [0, 1, 2, 3]])  # three resamples, as item indices
    counts = np.stack([np.bincount(r, minlength=4) for r in idx])  # ... and as the counts mean_ci takes
    m, lo, hi = mean_ci(d, counts, ci=0.5)
    assert m == 0.25 and lo == pytest.approx(np.percentile([1.0, -1.0, 0.25], 25))
    assert hi == pytest.approx(np.percentile([1.0, -1.0, 0.25], 75))
    q = bh([0.01, 0.04, float("nan"), 0.03])
    assert q[0] == pytest.approx(0.03) and q[1] == pytest.approx(0.04) and q[3] == pytest.approx(0.04)
    assert math.isnan(q[2])


@pytest.mark.parametrize("mode", ["mask", "scale"])
def test_changed_selections_do_not_depend_on_batch_size(mode: str, make_tiny) -> None:
    from expertscope.interventions import steer

    moe = MoEModel.from_model(make_tiny("mixtral", initializer_range=0.3), tokenizer=tiny_tokenizer())
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(3, 128, size=int(rng.integers(3, 30)))) for _ in range(16)]
    targets = [(0, 1), (2, 3)]
    counts = []
    for bs in (1, 16):
        ref = record_routing(moe, seqs, batch_size=bs)
        rec = record_routing(moe, seqs, batch_size=bs,
                             steering=steer(moe, targets, scale=3.0, mode=mode, count_changes=False))
        counts.append(routing_changes(ref, rec))
        assert ref.n_tokens == sum(len(s) for s in seqs)
    assert counts[0] == counts[1]
    changed, routed = counts[0]
    assert routed == sum(len(s) for s in seqs) * len(moe.layers) and 0 < changed < routed
    # by hand: one sequence alone, token by token against the unsteered run
    import torch

    from expertscope.models.hooks import RouterHooks

    def sel(ids: list[int], steered: bool) -> dict[int, torch.Tensor]:
        cm = steer(moe, targets, scale=3.0, mode=mode, count_changes=False) if steered else None
        with (cm if cm is not None else torch.no_grad()), RouterHooks(moe, record=True) as h, torch.no_grad():
            moe.model(input_ids=torch.tensor([ids]))
        return {lay: c[0].indices.sort(-1).values for lay, c in h.calls.items()}

    by_hand = 0
    for s in seqs:
        a, b = sel(s, False), sel(s, True)
        by_hand += sum(int((a[lay] != b[lay]).any(-1).sum()) for lay in a)
    assert by_hand == changed


def test_negative_share_counts_the_targets_logits(make_tiny) -> None:
    import torch

    from expertscope.models.hooks import RouterHooks

    moe = MoEModel.from_model(make_tiny("mixtral", initializer_range=0.3), tokenizer=tiny_tokenizer())
    seqs = [[5, 9, 11, 40], [7, 8]]
    rec = record_routing(moe, seqs, batch_size=2)
    neg = total = 0
    for s in seqs:
        with RouterHooks(moe, record=True) as h, torch.no_grad():
            moe.model(input_ids=torch.tensor([s]))
        for lay, e in ((0, 1), (2, 3)):
            z = h.calls[lay][0].logits[:, e]
            neg += int((z < 0).sum())
            total += len(s)
    assert rec.negative_share([(0, 1), (2, 3)]) == pytest.approx(neg / total)
