"""Tokens (docs/methods.md §6): relative-position bins and token–expert associations against hand-computed
cases, and the recording pass on a tiny model."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from expertscope.causal.drivers import causal_rate
from expertscope.errors import ConfigError
from expertscope.models.hooks import RouterHooks
from expertscope.models.model import MoEModel
from expertscope.stats.tokens import (
    BIN_LABELS,
    TokenRecord,
    associations_from_record,
    flagged_experts,
    position_bin,
    position_bins,
    position_profile,
    record_tokens,
)
from expertscope.testing import tiny_tokenizer


def _record() -> TokenRecord:
    """Domain a: sequences of T=5 and T=3; domain b: one of T=4. Layers 0 and 3, k=2."""
    seq_lengths = [("a", 0, 5), ("a", 1, 3), ("b", 0, 4)]
    dom, seq, pos, length = [], [], [], []
    for name, s, T in seq_lengths:
        for t in range(T):
            dom.append(0 if name == "a" else 1)
            seq.append(s)
            pos.append(t)
            length.append(T)
    # (N=12, L=2, k=2) selections, one row per token in the order above.
    selected = np.array([
        [[1, 0], [2, 3]],   # a0 t0: driver at layer 0 (1) and layer 3 (2)
        [[0, 3], [0, 1]],   # a0 t1: none
        [[1, 2], [0, 3]],   # a0 t2: layer 0
        [[0, 2], [2, 0]],   # a0 t3: layer 3
        [[3, 0], [1, 3]],   # a0 t4: none
        [[1, 3], [1, 0]],   # a1 t0: layer 0
        [[0, 3], [0, 1]],   # a1 t1: none
        [[2, 0], [3, 2]],   # a1 t2: layer 3
        [[1, 2], [1, 3]],   # b0 t0: expert 1 is not b's driver: none
        [[0, 1], [1, 2]],   # b0 t1: none
        [[2, 3], [0, 1]],   # b0 t2: layer 3 (0)
        [[0, 2], [0, 3]],   # b0 t3: layer 3
    ], dtype=np.int32)
    return TokenRecord(domains=["a", "b"], layers=[0, 3], domain=np.array(dom, np.int32), seq=np.array(seq),
                       position=np.array(pos, np.int32), length=np.array(length, np.int32),
                       token_id=np.arange(12), selected=selected)


DRIVERS = pd.DataFrame({"domain": ["a", "a", "b", "b"], "layer": [0, 3, 3, 0], "expert": [1, 2, 0, 3],
                        "is_driver": [True, True, True, False]})


def test_position_bin_is_exact_floor_of_five_t_over_T():
    t = np.array([0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 6, 0])
    T = np.array([5, 5, 5, 5, 5, 3, 3, 3, 4, 4, 4, 4, 7, 1])
    # Hand values: t/T = 0, .2, .4, .6, .8 | 0, 1/3, 2/3 | 0, .25, .5, .75 | 6/7 | 0
    assert position_bin(t, T).tolist() == [0, 1, 2, 3, 4, 0, 1, 3, 0, 1, 2, 3, 4, 0]
    # Every (t, T) up to T=60 agrees with exact rational arithmetic; r < 1 always, so bin 4's closed end is moot.
    for T_ in range(1, 61):
        ts = np.arange(T_)
        want = [min(int(Fraction(int(x), T_) * 5), 4) for x in ts]
        assert position_bin(ts, np.full(T_, T_)).tolist() == want
        assert all(Fraction(int(x), T_) < 1 for x in ts)


def test_position_bins_hand_computed():
    df = position_bins(_record(), DRIVERS)
    assert list(df["bin"].unique()) == list(BIN_LABELS)
    assert set(df["layer"]) == {"0", "3", "all"}

    def row(domain: str, layer: str) -> pd.DataFrame:
        return df[(df["domain"] == domain) & (df["layer"] == layer)].sort_values("bin_index")

    # Domain a bins: T=5 -> 0,1,2,3,4; T=3 -> 0,1,3. Baseline counts [2,2,1,2,1] of 8.
    a0 = row("a", "0")
    assert a0["n_tokens"].tolist() == [2, 2, 1, 2, 1]
    np.testing.assert_allclose(a0["token_share"], np.array([2, 2, 1, 2, 1]) / 8)
    # Layer 0 triggers: a0 t0 (bin 0), a0 t2 (bin 2), a1 t0 (bin 0) -> [2,0,1,0,0] of 3.
    assert a0["n_trigger"].tolist() == [2, 0, 1, 0, 0]
    np.testing.assert_allclose(a0["trigger_share"], np.array([2, 0, 1, 0, 0]) / 3)
    np.testing.assert_allclose(a0["trigger_rate"], [1.0, 0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(a0["ratio"], (np.array([2, 0, 1, 0, 0]) / 3) / (np.array([2, 2, 1, 2, 1]) / 8))
    # Layer 3 triggers: a0 t0 (bin 0), a0 t3 (bin 3), a1 t2 (bin 3) -> [1,0,0,2,0].
    assert row("a", "3")["n_trigger"].tolist() == [1, 0, 0, 2, 0]
    # Any layer: a0 t0, t2, t3, a1 t0, t2 -> bins 0,2,3,0,3 -> [2,0,1,2,0] of 5.
    a_all = row("a", "all")
    assert a_all["n_trigger"].tolist() == [2, 0, 1, 2, 0]
    assert (a_all["n_trigger_total"] == 5).all() and (a_all["n_tokens_total"] == 8).all()
    # Domain b: T=4 -> bins 0,1,2,3 (bin 4 empty). Expert 1 at layer 0 is a's driver only, expert 3 not flagged.
    b0 = row("b", "0")
    assert b0["n_trigger"].sum() == 0 and b0["trigger_share"].isna().all()
    assert b0["n_tokens"].tolist() == [1, 1, 1, 1, 0]
    b3 = row("b", "3")
    assert b3["n_trigger"].tolist() == [0, 0, 1, 1, 0]
    np.testing.assert_allclose(b3["trigger_share"], [0, 0, 0.5, 0.5, 0])
    assert np.isnan(b3["trigger_rate"].iloc[4])  # no tokens in bin 4
    # Shares sum to one wherever anything triggers.
    sums = df.dropna(subset=["trigger_share"]).groupby(["domain", "layer"])["trigger_share"].sum()
    np.testing.assert_allclose(sums, 1.0)


def test_position_bins_without_drivers_and_dict_input():
    empty = position_bins(_record(), pd.DataFrame(columns=["domain", "layer", "expert", "is_driver"]))
    assert (empty["n_trigger"] == 0).all()
    as_dict = position_bins(_record(), {"a": {0: {1}, 3: {2}}, "b": {3: {0}}})
    pd.testing.assert_frame_equal(as_dict, position_bins(_record(), DRIVERS))


def _assoc_record() -> TokenRecord:
    """One domain, 10 tokens, one layer: ids 10 "the", 11 " the" (another id), 12 "cat", 13 "sum"."""
    ids = np.array([10, 11, 10, 12, 12, 13, 13, 13, 12, 10])
    sel_e5 = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0], bool)  # which tokens select expert 5
    selected = np.where(sel_e5[:, None, None], [[5, 0]], [[1, 0]]).astype(np.int32)
    return TokenRecord(domains=["d"], layers=[2], domain=np.zeros(10, np.int32), seq=np.zeros(10, np.int64),
                       position=np.arange(10, dtype=np.int32), length=np.full(10, 10, np.int32), token_id=ids,
                       selected=selected, token_strings={10: "the", 11: " the", 12: "cat", 13: "sum"})


def test_associations_hand_computed():
    rec = _assoc_record()
    experts = pd.DataFrame({"domain": ["d"], "layer": [2], "expert": [5], "kind": ["driver"]})
    df = associations_from_record(rec, experts, min_count=2, top=10)
    # Keyed by token id. P(5) = 5/10. id 13 "sum": 3 occurrences, 2 select -> 2/3, lift 4/3; id 10 "the":
    # 3, 1 -> 1/3, lift 2/3; id 12 "cat": 3, 1 -> lift 2/3 (tie with id 10: same count, smaller id first);
    # id 11 " the" occurs once (< min_count 2), and is not merged into id 10 although it decodes alike.
    assert df["token_id"].tolist() == [13, 10, 12]
    assert df["token"].tolist() == ["sum", "the", "cat"]
    assert df["count"].tolist() == [3, 3, 3]
    assert df["n_selected"].tolist() == [2, 1, 1]
    np.testing.assert_allclose(df["p_expert_given_token"], [2 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(df["p_expert"], 0.5)
    np.testing.assert_allclose(df["lift"], [4 / 3, 2 / 3, 2 / 3])
    assert df["rank"].tolist() == [1, 2, 3]
    assert (df["kind"] == "driver").all()
    # min_count 1 lets id 11 in: 1 occurrence, selected -> p 1, lift 2, the top token, with its own string.
    top1 = associations_from_record(rec, experts, min_count=1, top=1)
    assert top1[["token_id", "token", "lift"]].values.tolist() == [[11, " the", 2.0]]
    assert associations_from_record(rec, experts, min_count=4).empty  # no id occurs 4 times
    # An expert that is never selected, or an unknown domain/layer, gives no rows.
    none = pd.DataFrame({"domain": ["d", "x", "d"], "layer": [2, 2, 7], "expert": [3, 5, 5]})
    assert associations_from_record(rec, none, min_count=1).empty
    with pytest.raises(ConfigError):
        associations_from_record(rec, experts, min_count=0)


def test_flagged_experts_from_tables():
    dom = pd.DataFrame({"domain": ["a", "a"], "layer": [0, 1], "expert": [2, 3], "is_domain_expert": [True, False]})
    drv = pd.DataFrame({"domain": ["a"], "layer": [1], "expert": [0], "is_driver": [True]})
    out = flagged_experts(dom, drv)
    assert out.to_dict("records") == [{"domain": "a", "layer": 0, "expert": 2, "kind": "domain"},
                                      {"domain": "a", "layer": 1, "expert": 0, "kind": "driver"}]
    assert flagged_experts(None, None).empty


@pytest.fixture
def tiny_moe(make_tiny) -> MoEModel:
    return MoEModel.from_model(make_tiny("mixtral"), tiny_tokenizer(), verify=False)


TEXTS = {"a": ["hello world", "abc", "the cat sat on the mat"], "b": ["1+2=3", "sum of 4 and 5 is 9!"]}


def test_record_tokens_matches_router_hooks(tiny_moe: MoEModel):
    rec = record_tokens(tiny_moe, TEXTS, batch_size=2)
    tok = tiny_moe.tokenizer
    lengths = [len(tok(t)["input_ids"]) for texts in TEXTS.values() for t in texts]
    assert rec.num_tokens == sum(lengths)
    assert rec.selected.shape == (sum(lengths), len(tiny_moe.layers), 2)
    # One text alone, unpadded, gives the same selections as its rows in the batched record.
    enc = tok(["the cat sat on the mat"], return_tensors="pt")
    with RouterHooks(tiny_moe, record=True) as hooks, torch.no_grad():
        tiny_moe.model(**enc, use_cache=False)
    rows = (rec.domain == 0) & (rec.seq == 2)
    assert rec.position[rows].tolist() == list(range(enc["input_ids"].shape[1]))
    assert (rec.length[rows] == enc["input_ids"].shape[1]).all()
    assert rec.token_id[rows].tolist() == enc["input_ids"][0].tolist()
    for j, layer in enumerate(tiny_moe.layers):
        got = np.sort(rec.selected[rows, j], axis=1)
        want = np.sort(hooks.calls[layer][0].indices.numpy(), axis=1)
        np.testing.assert_array_equal(got, want)
    assert rec.token_strings[int(enc["input_ids"][0, 2])] == "h"


def test_position_profile_agrees_with_causal_rate(tiny_moe: MoEModel):
    drivers = pd.DataFrame({"domain": ["a", "a", "b"], "layer": [0, 1, 2], "expert": [1, 3, 0],
                            "is_driver": [True, True, True], "ce_mean": [0.3, 0.2, 0.1]})
    rec = record_tokens(tiny_moe, TEXTS, batch_size=4)
    pos = position_profile(tiny_moe, TEXTS, drivers, record=rec)
    # Independent reference: a token-by-token loop over the record with exact fractions for the bin.
    drv = {(r.domain, r.layer): set() for r in drivers.itertuples()}
    for r in drivers.itertuples():
        drv[(r.domain, r.layer)].add(r.expert)
    want: dict[tuple[str, str, int], int] = {}
    for i in range(rec.num_tokens):
        dom = rec.domains[int(rec.domain[i])]
        b = min(int(Fraction(int(rec.position[i]), int(rec.length[i])) * 5), 4)
        hits = [layer for j, layer in enumerate(rec.layers)
                if drv.get((dom, layer), set()) & {int(e) for e in rec.selected[i, j]}]
        for layer in [str(x) for x in hits] + (["all"] if hits else []):
            want[(dom, layer, b)] = want.get((dom, layer, b), 0) + 1
    got = {(r.domain, r.layer, r.bin_index): r.n_trigger for r in pos.itertuples() if r.n_trigger}
    assert got == want and sum(want.values()) > 0
    per_layer = pos[pos["layer"] != "all"].groupby(["domain", "layer"])["n_trigger"].sum()
    rate = causal_rate(tiny_moe, TEXTS, drivers, batch_size=3)
    for r in rate.itertuples():
        assert per_layer[(r.domain, str(r.layer))] == r.n_driver_tokens
