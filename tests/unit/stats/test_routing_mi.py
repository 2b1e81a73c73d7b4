"""Mutual information I(domain; selected expert) against a hand computation and a per-token brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from expertscope.errors import DataError
from expertscope.stats.profile import STAT_NAMES, RoutingProfile
from expertscope.stats.routing_mi import mutual_information_from_counts, routing_mutual_information


def test_hand_computed_two_domains_two_experts() -> None:
    # Domain a: 3 tokens all choose expert 0; domain b: 1 token chooses expert 1 (k = 1).
    # p(D) = (3/4, 1/4); expert = domain exactly, so I = H(D) = h(1/4) bits and mi_normalised = 1.
    sel = np.array([[[3, 0]], [[0, 1]]])
    df = mutual_information_from_counts(sel, np.array([3, 1]), top_k=1)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert df["mi_bits"].iloc[0] == pytest.approx(h)
    assert df["mi_normalised"].iloc[0] == pytest.approx(1.0)


def test_hand_computed_top2_partial_overlap() -> None:
    # k = 2, E = 3, equal token counts. Domain a selects {0,1} always, b selects {1,2} always.
    # p(e|a) = (.5,.5,0), p(e|b) = (0,.5,.5), p(e) = (.25,.5,.25): H(e) = 1.5, H(e|D) = 1 -> I = 0.5 bit.
    sel = np.array([[[10, 10, 0]], [[0, 10, 10]]])
    df = mutual_information_from_counts(sel, np.array([10, 10]), top_k=2)
    assert df["mi_bits"].iloc[0] == pytest.approx(0.5)
    assert df["mi_normalised"].iloc[0] == pytest.approx(0.5)  # H(domain) = 1 bit
    # Identical routing in both domains: no information.
    same = mutual_information_from_counts(np.array([[[5, 5, 0]], [[7, 7, 0]]]), np.array([5, 7]), top_k=2)
    assert same["mi_bits"].iloc[0] == pytest.approx(0.0, abs=1e-12)


def _brute_force_mi(choices: dict[str, list[np.ndarray]], E: int) -> float:
    """MI of the joint (domain, expert) table built token by token: each of a token's k experts gets 1/k."""
    domains = sorted(choices)
    joint = np.zeros((len(domains), E))
    for d, name in enumerate(domains):
        for token_sets in choices[name]:
            for chosen in token_sets:
                for e in chosen:
                    joint[d, e] += 1.0 / len(chosen)
    joint /= joint.sum()
    pd_, pe = joint.sum(1), joint.sum(0)
    mi = 0.0
    for d in range(joint.shape[0]):
        for e in range(E):
            if joint[d, e] > 0:
                mi += joint[d, e] * math.log2(joint[d, e] / (pd_[d] * pe[e]))
    return mi


def test_profile_mi_matches_per_token_brute_force() -> None:
    rng = np.random.default_rng(0)
    L, E, k = 3, 6, 2
    prof = RoutingProfile(layers=[1, 3, 5], num_experts=E, top_k=k)
    per_layer: list[dict[str, list[np.ndarray]]] = [{} for _ in range(L)]
    for d, (name, n_seq) in enumerate((("x", 4), ("y", 7), ("z", 2))):
        bias = np.zeros(E)
        bias[d * 2] = 2.0  # each domain prefers its own expert, so the MI is clearly positive
        for s in range(n_seq):
            n_tok = int(rng.integers(1, 9))
            sel = np.zeros((1, L, E), np.int64)
            for layer in range(L):
                sets = []
                for _ in range(n_tok):
                    logits = rng.normal(size=E) + bias * (layer + 1) / L
                    chosen = np.argsort(-logits)[:k]
                    sel[0, layer, chosen] += 1
                    sets.append(chosen)
                per_layer[layer].setdefault(name, []).append(np.array(sets))
            stats = {st: np.zeros((1, L, E)) for st in STAT_NAMES}
            stats["sel"] = sel
            prof.add(name, [s], np.array([n_tok]), stats)
    df = routing_mutual_information(prof)
    assert list(df["layer"]) == [1, 3, 5]
    for layer in range(L):
        expected = _brute_force_mi(per_layer[layer], E)
        assert expected > 0.01
        assert df["mi_bits"].iloc[layer] == pytest.approx(expected, rel=1e-9)
    assert (df["mi_normalised"] <= 1).all()
    assert (df["mi_bits"] <= df["h_domain_bits"] + 1e-12).all()


def test_single_domain_normalised_is_nan_and_empty_raises() -> None:
    df = mutual_information_from_counts(np.array([[[2, 2]]]), np.array([2]), top_k=2)
    assert df["mi_bits"].iloc[0] == 0.0 and math.isnan(df["mi_normalised"].iloc[0])
    with pytest.raises(DataError):
        mutual_information_from_counts(np.zeros((1, 1, 2)), np.array([0]), top_k=1)
