"""Replication halves and Jaccard against independent references: the split recomputed from hashlib by
hand, the rules rerun on hand-built halves, set overlaps counted in plain loops."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import expertscope as es
import expertscope.causal as C
from expertscope.causal.drivers import replicate_drivers
from expertscope.stats.replication import Replication, replicate_domain_experts, split_halves

TEXTS = [f"text number {i} about {w}" for i, w in enumerate(["cats", "dogs", "maths", "sky", "sea"] * 9)]


def _naive_halves(texts: list[str], seed: int) -> list[int]:
    keyed = sorted(set(texts), key=lambda t: (hashlib.blake2b(f"{seed}\x00{t}".encode(), digest_size=8).digest(), t))
    first = set()
    count = 0
    for t in keyed:
        if count < (len(texts) + 1) // 2:
            first.add(t)
        count += texts.count(t)
    return [0 if t in first else 1 for t in texts]


def test_split_halves_by_hash_disjoint_balanced_and_order_free() -> None:
    half = split_halves(TEXTS, seed=3)
    assert half.tolist() == _naive_halves(TEXTS, 3)
    assert sorted(np.bincount(half).tolist()) == [22, 23]
    rev = split_halves(TEXTS[::-1], seed=3)
    assert rev.tolist() == half[::-1].tolist()  # a text's half does not depend on where it comes
    assert split_halves(TEXTS, seed=4).tolist() != half.tolist()
    dup = TEXTS[:10] + TEXTS[:3]  # repeats stay in one half: the halves share no text
    h = split_halves(dup, seed=0)
    assert h.tolist() == _naive_halves(dup, 0)
    assert not {t for t, x in zip(dup, h, strict=True) if x == 0} & {t for t, x in zip(dup, h, strict=True) if x == 1}


def _effects(seed: int = 0, n: int = 48, split_seed: int = 1) -> C.CausalEffects:
    """Two domains, 2 layers × 6 experts: 'a' has a driver (0, 1) on every input and one, (1, 4), on the
    inputs of the first half of texts ``a0, a1, ...`` only; 'b' has a driver (1, 2)."""
    g = np.random.default_rng(seed)
    ce = g.exponential(2e-4, size=(2 * n, 2, 6))
    ce[:n, 0, 1] += 0.05 + g.exponential(0.01, size=n)
    first = np.array(_naive_halves([f"a{i}" for i in range(n)], split_seed)) == 0
    ce[:n, 1, 4] += np.where(first, 0.03 + g.exponential(0.01, size=n), 0.0)
    ce[n:, 1, 2] += 0.02 + g.exponential(0.01, size=n)
    dom = np.array(["a"] * n + ["b"] * n, dtype=object)
    idx = np.r_[np.arange(n), np.arange(n)]
    return C.CausalEffects(ce=ce, domain=dom, text_index=idx, layers=[0, 1], exact=np.ones((2, 6), bool))


@pytest.mark.slow
def test_replicate_drivers_equals_the_rule_rerun_on_hand_built_halves() -> None:
    eff = _effects()
    texts = {"a": [f"a{i}" for i in range(48)], "b": [f"b{i}" for i in range(48)]}
    rep = replicate_drivers(eff, texts, seed=1, n_boot=0)
    full = C.driver_experts(eff, n_boot=0)
    for d in ("a", "b"):
        half = _naive_halves(texts[d], 1)
        sets = []
        for h in (0, 1):
            keep = np.array([x == h for x in half])
            sub = C.CausalEffects(ce=eff.ce[eff.domain == d][keep], domain=np.array([d] * int(keep.sum()), object),
                                  text_index=np.flatnonzero(keep), layers=[0, 1], exact=eff.exact)
            t = C.driver_experts(sub, n_boot=0).df
            sets.append({(int(r.layer), int(r.expert)) for r in t[t.is_driver].itertuples()})
        f = {(int(r.layer), int(r.expert)) for r in full.df[(full.df.domain == d) & full.df.is_driver].itertuples()}
        inter = [x for x in sets[0] if x in sets[1]]
        union = list(sets[0]) + [x for x in sets[1] if x not in sets[0]]
        s = rep.summary[rep.summary.domain == d].iloc[0]
        assert s.jaccard == pytest.approx(len(inter) / len(union))
        assert (s.n_half_a, s.n_half_b, s.n_both, s.n_full) == (len(sets[0]), len(sets[1]), len(inter), len(f))
        assert (s.n_inputs_a, s.n_inputs_b) == (half.count(0), half.count(1))
        rows = rep.df[rep.df.domain == d]
        assert {(int(r.layer), int(r.expert)) for r in rows.itertuples()} == f | sets[0] | sets[1]
        for r in rows.itertuples():
            key = (r.layer, r.expert)
            want = "both" if key in sets[0] and key in sets[1] else "one" if key in sets[0] or key in sets[1] \
                else "neither"
            assert r.status == want and r.in_full == (key in f)
            assert r.replicates == (key in f and want == "both")
    assert rep.replicated("driver", "a") == [(0, 1)] and rep.replicated("driver", "b") == [(1, 2)]
    a = rep.df[rep.df.domain == "a"].set_index(["layer", "expert"])
    assert a.loc[(1, 4), "status"] == "one" and a.loc[(1, 4), "in_half_a"]  # found where it was planted only
    assert rep.summary.set_index("domain").loc["a", "jaccard"] == pytest.approx(0.5)


def test_replication_round_trip_and_without_texts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    eff = _effects(seed=2)
    rep = replicate_drivers(eff, seed=0, n_boot=0)  # no texts: the input index is hashed
    assert rep.settings["driver"]["hashed"] == "index"
    idx_half = split_halves([f"#{i}" for i in range(48)], 0)
    assert rep.summary.iloc[0].n_inputs_a == int((idx_half == 0).sum())
    rep.save(tmp_path / "replication.parquet")
    back = Replication.load(tmp_path / "replication.parquet")
    assert back.df.equals(rep.df)
    np.testing.assert_allclose(back.summary["jaccard"].to_numpy(float), rep.summary["jaccard"].to_numpy(float))
    assert back.settings["driver"]["split_seed"] == 0


def _profile(n: int = 30, seed: int = 0) -> es.RoutingProfile:
    """Two domains, 1 layer × 8 experts, top-2; expert 3 is planted in 'x' (selected on most of its tokens)."""
    g = np.random.default_rng(seed)
    L, E = 1, 8
    prof = es.RoutingProfile(layers=[0], num_experts=E, top_k=2)
    for name, boost in (("x", 0.6), ("y", 0.0)):
        tok = g.integers(5, 15, size=n)
        p = np.full(E, 0.25)
        p[3] = min(0.95, 0.25 + boost)
        sel = np.stack([g.binomial(int(t), p) for t in tok]).reshape(n, L, E)
        h = sel * g.uniform(0.2, 0.9, size=sel.shape)
        prof.add(name, list(range(n)), tok, {"sel": sel, "h_bern": h, "h_eq1": h, "gate": sel * 0.5})
    return prof


def test_replicate_domain_experts_equals_the_rule_on_hand_built_half_profiles() -> None:
    prof = _profile()
    texts = {"x": [f"x text {i}" for i in range(30)], "y": [f"y text {i}" for i in range(30)]}
    rep = replicate_domain_experts(prof, texts, seed=2, n_boot=0)
    sets = []
    for h in (0, 1):
        sub = es.RoutingProfile(layers=[0], num_experts=8, top_k=2)
        for d in ("x", "y"):
            m = (prof.seq_domain == prof.domains.index(d))
            half = _naive_halves(texts[d], 2)
            keep = [i for i in range(30) if half[i] == h]
            sub.add(d, keep, prof.seq_tokens[m][keep],
                    {k: prof.seq_stats(k)[m][keep] for k in ("sel", "h_bern", "h_eq1", "gate")})
        t = es.domain_experts(sub, n_boot=0).df
        sets.append({(str(r.domain), int(r.layer), int(r.expert)) for r in t[t.is_domain_expert].itertuples()})
    for d in ("x", "y"):
        a = {k[1:] for k in sets[0] if k[0] == d}
        b = {k[1:] for k in sets[1] if k[0] == d}
        s = rep.summary[rep.summary.domain == d].iloc[0]
        if a | b:
            assert s.jaccard == pytest.approx(len(a & b) / len(a | b))
        else:
            assert np.isnan(s.jaccard)
    assert (0, 3) in rep.replicated("domain", "x")
