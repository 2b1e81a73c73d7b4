"""Findings match the tables they read: complete expert lists, the driver rule's bar per layer, each
expert's replication status, and Figure 2's reading counting every expert once. Tables go through the
same save → load_tables path a run uses; expected values are recomputed from the CE and flags by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import expertscope as es
import expertscope.causal as C
from expertscope.report.html import load_tables, read_expert_types
from expertscope.report.record import findings
from expertscope.report.sentences import sentences

DRIVERS = {"a": [(0, 1), (0, 5), (1, 2), (1, 6), (1, 7)], "b": [(1, 3)]}


def _effects(n: int = 24) -> tuple[C.CausalEffects, dict[str, list[str]]]:
    g = np.random.default_rng(5)
    ce = g.exponential(3e-4, size=(2 * n, 2, 8))
    ce[:n, 1] += 0.003  # a's layer 1: every expert moves the output, so its bar is 2 × ~0.003, above the floor
    for k, d in enumerate(("a", "b")):
        for layer, e in DRIVERS[d]:
            ce[k * n:(k + 1) * n, layer, e] += 0.01 * (1 + e) + g.exponential(0.002, size=n)
    dom = np.array(["a"] * n + ["b"] * n, dtype=object)
    eff = C.CausalEffects(ce=ce, domain=dom, text_index=np.r_[np.arange(n), np.arange(n)], layers=[0, 1],
                          exact=np.ones((2, 8), bool))
    return eff, {d: [f"{d} input {i}" for i in range(n)] for d in ("a", "b")}


def _profile(n: int = 30) -> tuple[es.RoutingProfile, dict[str, list[str]]]:
    g = np.random.default_rng(1)
    prof = es.RoutingProfile(layers=[0, 1], num_experts=8, top_k=2)
    for name in ("x", "y"):
        tok = g.integers(8, 16, size=n)
        p = np.full((2, 8), 0.2)
        if name == "x":
            p[0, [2, 4]] = 0.8
            p[1, [1, 6]] = 0.7
        sel = np.stack([g.binomial(int(t), p) for t in tok])
        h = sel * g.uniform(0.2, 0.9, size=sel.shape)
        prof.add(name, list(range(n)), tok, {"sel": sel, "h_bern": h, "h_eq1": h, "gate": sel * 0.5})
    return prof, {d: [f"{d} text {i}" for i in range(n)] for d in ("x", "y")}


@pytest.mark.slow
def test_findings_match_the_tables(tmp_path: Path) -> None:
    eff, texts = _effects()
    drv = C.driver_experts(eff, n_boot=200)
    drv.save(tmp_path / "drivers.parquet")
    prof, ptexts = _profile()
    dom = es.domain_experts(prof, n_boot=50)
    dom.save(tmp_path / "domain_experts.parquet")
    rep = es.Replication.concat([
        es.replicate_domain_experts(prof, ptexts, full=dom.df, n_boot=50),
        C.replicate_drivers(eff, texts, full=drv.df, n_boot=200)])
    rep.save(tmp_path / "replication.parquet")
    tables = load_tables(tmp_path)
    by = {f.domain: f for f in findings(tables)}

    # complete lists: every flagged expert, none cut at 3
    a = by["a"]
    flagged_a = {(int(r.layer), int(r.expert)) for r in drv.df[(drv.df.domain == "a") & drv.df.is_driver].itertuples()}
    assert len(flagged_a) >= 4 and a.n_drivers == len(flagged_a)
    assert {(e["layer"], e["expert"]) for e in a.drivers} == flagged_a
    flagged_x = dom.df[(dom.df.domain == "x") & dom.df.is_domain_expert]
    assert len(flagged_x) >= 4 and len(by["x"].domain_experts) == len(flagged_x) == by["x"].n_domain_experts
    assert "Strongest 3 of" in " ".join(sentences(a))

    # the bar per layer: max(2 × the median of the layer's mean CEs, 1e-3), from the CE itself
    for d in ("a", "b"):
        means = eff.ce[eff.domain == d].mean(axis=0)
        want = {layer: max(2 * float(np.median(means[li])), 1e-3) for li, layer in enumerate(eff.layers)}
        got = by[d].detectable_ce_by_layer
        assert got.keys() == want.keys()
        for layer in want:
            assert got[layer] == pytest.approx(want[layer], rel=1e-6)
        assert by[d].detectable_ce == pytest.approx(min(want.values()), rel=1e-6)
    assert max(by["a"].detectable_ce_by_layer.values()) > 1e-3  # not the floor everywhere

    # each listed expert carries its status in the halves, as the replication table has it
    for f, kind, listed in ((a, "driver", a.drivers), (by["x"], "domain", by["x"].domain_experts)):
        g = rep.df[(rep.df.kind == kind) & (rep.df.domain == f.domain)].set_index(["layer", "expert"])
        for e in listed:
            assert e["halves"] == g.loc[(e["layer"], e["expert"]), "status"]
        r = f.driver_replication if kind == "driver" else f.domain_replication
        s = rep.summary[(rep.summary.kind == kind) & (rep.summary.domain == f.domain)].iloc[0]
        assert r is not None and r["jaccard"] == pytest.approx(s.jaccard)
        assert {(x["layer"], x["expert"]) for x in r["replicated"]} == set(rep.replicated(kind, f.domain))
    text = " ".join(sentences(a))
    assert "two disjoint halves" in text and "Jaccard" in text


def test_expert_type_reading_counts_each_expert_once() -> None:
    import pandas as pd

    rows = []
    for e in range(6):
        rows.append({"domain": "a", "layer": 0, "expert": e, "activation_rate": 0.5, "uniform_rate": 0.25,
                     "is_domain_expert": e in (0, 1), "is_general": e in (3, 4), "is_driver": False})
    dom = pd.DataFrame(rows)
    drv = pd.DataFrame({"domain": "a", "layer": 0, "expert": range(6), "is_driver": [True, False, True] + [False] * 3})
    (line,) = read_expert_types(dom, drv)
    # expert 0 is both domain and driver: it counts once, as "both"; 1 domain, 2 driver, 3-4 general, 5 other
    assert "2 general, 1 domain, 1 driver and 1 both" in line
