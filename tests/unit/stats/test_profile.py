"""Routing profiles and domain experts against naive per-token references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import expertscope as es
from expertscope.data.types import Domain, Example
from expertscope.models.model import MoEModel
from expertscope.testing import tiny_tokenizer

TEXTS = {
    "alpha": ["the cat sat", "a dog ran far away", "hello", "abc abc abc abc", "moe routing is fun"],
    "beta": ["1 + 2 = 3", "x = 42 * 7", "99 bottles", "0.5 - 0.25 = 0.25"],
}


def _moe(make_tiny, family: str = "qwen2_moe") -> MoEModel:
    return MoEModel.from_model(make_tiny(family), tokenizer=tiny_tokenizer())


def _naive(moe: MoEModel, texts: dict[str, list[str]]) -> dict:
    """Per-token Python loops over the routers' own outputs, one text at a time, no padding."""
    out = {}
    for name, items in texts.items():
        E, L = moe.num_experts, len(moe.layers)
        acc = {k: [[0.0] * E for _ in range(L)] for k in ("sel", "hb", "he")}
        n = 0
        for text in items:
            ids = moe.tokenizer(text, return_tensors="pt")["input_ids"]
            seen: dict[int, tuple] = {}
            handles = [
                s.module.register_forward_hook(lambda m, a, o, layer=s.layer, seen=seen: seen.__setitem__(layer, o))
                for s in moe.sites
            ]
            with torch.no_grad():
                moe.model(input_ids=ids)
            for h in handles:
                h.remove()
            n += ids.shape[1]
            for li, layer in enumerate(moe.layers):
                logits, _, idx = seen[layer]
                for t in range(ids.shape[1]):
                    chosen = [int(i) for i in idx[t]]
                    zs = [float(logits[t, i]) for i in chosen]
                    denom = sum(math.exp(z) for z in zs)
                    for i, z in zip(chosen, zs, strict=True):
                        p = math.exp(z) / denom
                        acc["sel"][li][i] += 1
                        acc["hb"][li][i] += 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)
                        acc["he"][li][i] += 0.0 if p == 0.0 else -p * math.log(p)
        out[name] = {"n": n, **{k: np.array(v) for k, v in acc.items()}}
    return out


def test_profile_matches_naive_per_token_loop(make_tiny) -> None:
    moe = _moe(make_tiny)
    prof = es.profile(moe, TEXTS, batch_size=3)
    ref = _naive(moe, TEXTS)
    n, tot = prof.totals()
    for d, name in enumerate(prof.domains):
        assert n[d] == ref[name]["n"]  # padding never counts
        np.testing.assert_array_equal(tot["sel"][d], ref[name]["sel"])
        np.testing.assert_allclose(tot["h_bern"][d], ref[name]["hb"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tot["h_eq1"][d], ref[name]["he"], rtol=1e-5, atol=1e-6)
    for entropy, key in (("bernoulli", "hb"), ("eq1", "he")):
        table = es.domain_experts(prof, rule="z", entropy=entropy, n_boot=0, n_perm=0)
        for row in table.df.itertuples():
            r = ref[row.domain]
            li = moe.layers.index(row.layer)
            A = r["sel"][li][row.expert] / r["n"]
            H = r[key][li][row.expert] / r["n"]
            assert row.activation_rate == pytest.approx(A, abs=1e-12)
            assert row.entropy == pytest.approx(H, rel=1e-5, abs=1e-6)
            assert row.cwas == pytest.approx((1 - H) * A, rel=1e-5, abs=1e-6)
    # specificity by hand for one cell
    df = table.df.set_index(["domain", "layer", "expert"])
    s_a, s_b = df.loc[("alpha", 0, 1), "cwas"], df.loc[("beta", 0, 1), "cwas"]
    assert df.loc[("alpha", 0, 1), "specificity"] == pytest.approx(s_a - s_b)


def test_profile_is_independent_of_padding_side_effects(make_tiny) -> None:
    moe = _moe(make_tiny, "mixtral")
    one = es.profile(moe, TEXTS, batch_size=1)
    many = es.profile(moe, TEXTS, batch_size=4)
    n1, t1 = one.totals()
    n4, t4 = many.totals()
    np.testing.assert_array_equal(n1, n4)
    np.testing.assert_array_equal(t1["sel"], t4["sel"])
    np.testing.assert_allclose(t1["h_bern"], t4["h_bern"], rtol=1e-5, atol=1e-6)


def test_merge_equals_union_exactly_and_roundtrips(make_tiny, tmp_path) -> None:
    moe = _moe(make_tiny)
    doms = [Domain(k, [Example(t) for t in v]) for k, v in TEXTS.items()]
    # Shards: the first half and the second half of every domain, batched identically to the union run.
    whole = es.RoutingProfile(layers=moe.layers, num_experts=moe.num_experts, top_k=moe.top_k)
    shard_a = es.RoutingProfile(layers=moe.layers, num_experts=moe.num_experts, top_k=moe.top_k)
    shard_b = es.RoutingProfile(layers=moe.layers, num_experts=moe.num_experts, top_k=moe.top_k)
    full = es.profile(moe, doms, batch_size=2)
    rows = full._compact()
    for i in range(len(rows["seq_id"])):
        args = (full.domains[rows["seq_domain"][i]], [int(rows["seq_id"][i])], rows["seq_tokens"][i:i + 1],
                {k: rows[k][i:i + 1] for k in ("sel", "h_bern", "h_eq1", "gate", "onorm")})
        whole.add(*args)
        (shard_a if i % 2 else shard_b).add(*args)
    merged = shard_a.merge(shard_b)
    for p in (whole, merged):
        assert sorted(p.domains) == sorted(full.domains)
    nw, tw = whole.totals()
    nm, tm = merged.totals()
    order = [merged.domains.index(d) for d in whole.domains]
    assert np.array_equal(nw, nm[order])
    for k in tw:
        assert np.array_equal(tw[k], tm[k][order]), k  # bit-identical
    merged.save(tmp_path / "p")
    back = es.RoutingProfile.load(tmp_path / "p")
    nb, tb = back.totals()
    assert back.domains == merged.domains and np.array_equal(nb, nm)
    for k in tm:
        assert np.array_equal(tb[k], tm[k])
    with pytest.raises(es.ExpertscopeError, match="merge disjoint shards"):
        merged.merge(shard_a)


def test_streaming_profile_keeps_totals_only(make_tiny, tmp_path) -> None:
    moe = _moe(make_tiny)
    lean = es.profile(moe, TEXTS, batch_size=2, keep_sequences=False)
    full = es.profile(moe, TEXTS, batch_size=2)
    nl, tl = lean.totals()
    nf, tf = full.totals()
    order = [full.domains.index(d) for d in lean.domains]
    np.testing.assert_array_equal(nl, nf[order])
    np.testing.assert_array_equal(tl["sel"], tf["sel"][order])
    np.testing.assert_allclose(tl["h_bern"], tf["h_bern"][order], rtol=1e-12)
    assert lean._rows == []
    lean.save(tmp_path / "lean")
    back = es.RoutingProfile.load(tmp_path / "lean")
    np.testing.assert_array_equal(back.totals()[1]["sel"], tl["sel"])
    with pytest.raises(es.ExpertscopeError, match="rule='fdr' needs"):
        es.domain_experts(lean, rule="fdr")


def test_truncation_is_counted(make_tiny) -> None:
    moe = _moe(make_tiny)
    prof = es.profile(moe, {"long": ["x" * 50, "short"], "other": ["abc"]}, max_length=10)
    assert prof.truncated == {"long": 1}
    n, _ = prof.totals()
    assert n[prof.domains.index("long")] == 10 + 6


def _planted_model(expert: int, layer: int) -> tuple[MoEModel, dict[str, list[str]]]:
    """Residual stream = token embedding (attention and experts zeroed); dim 0 of the embedding is +1 for
    letters and -1 for digits, and router row ``expert`` at ``layer`` reads dim 0 with a large weight."""
    from expertscope.testing import tiny_model

    model = tiny_model("mixtral", num_local_experts=8, num_experts_per_tok=2, seed=3)
    tok = tiny_tokenizer()
    with torch.no_grad():
        for lyr in model.model.layers:
            lyr.self_attn.o_proj.weight.zero_()
            lyr.mlp.experts.down_proj.zero_()
        gen = torch.Generator().manual_seed(0)
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=gen))  # varied tokens, so the second slot varies
        emb[:, 0] = 0.0
        for ch, i in tok.get_vocab().items():
            if len(ch) == 1 and ch.isalpha():
                emb[i, 0] = 3.0
            elif len(ch) == 1 and ch.isdigit():
                emb[i, 0] = -3.0
        emb[1, 0] = -3.0  # <s> looks like a digit
        router = model.model.layers[layer].mlp.gate.weight
        router.copy_(torch.randn(router.shape, generator=gen))
        router[:, 0] = 0.0
        router[expert].zero_()
        router[expert, 0] = 40.0
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma"]
    g = np.random.default_rng(0)
    texts = {
        "letters": ["".join(g.choice(list("abcdefghijklmnopqrstuvwxyz"), 12)) for _ in range(12)] + words,
        "digits": ["".join(g.choice(list("0123456789"), 12)) for _ in range(19)],
    }
    return MoEModel.from_model(model, tokenizer=tok), texts


def test_planted_domain_expert_is_found_exactly() -> None:
    moe, texts = _planted_model(expert=5, layer=1)
    prof = es.profile(moe, texts, batch_size=8)
    table = es.domain_experts(prof, rule="z", n_boot=200, n_perm=200)
    found = table.experts("letters")
    at_layer = found[found["layer"] == 1]
    assert at_layer["expert"].tolist() == [5]
    row = at_layer.iloc[0]
    assert row.activation_rate > 0.9 and row.A_lo <= row.activation_rate <= row.A_hi
    assert row.p_value < 0.01 and row.q_value < 0.05
    digits = table.df[(table.df.domain == "digits") & (table.df.layer == 1) & (table.df.expert == 5)].iloc[0]
    assert not digits.is_domain_expert and digits.activation_rate < 0.1
    fdr = es.domain_experts(prof, rule="fdr", n_boot=0)
    assert 5 in fdr.experts("letters").query("layer == 1")["expert"].tolist()
    assert table.settings["config"]["z"] == 2.0 and "mean + 2.0 sd" in table.settings["rule_text"]


def test_bh_qvalues_match_hand_computation() -> None:
    from expertscope.stats.domain_experts import bh_qvalues

    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    # sorted: .01 (r1) .03 (r2) .04 (r3) .5 (r4); m=4 -> .04, .06, .0533, .5 -> monotone: .04 .0533 .0533 .5
    np.testing.assert_allclose(bh_qvalues(p)[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert np.isnan(bh_qvalues(p)[4])


def test_domain_experts_needs_two_domains(make_tiny) -> None:
    moe = _moe(make_tiny)
    prof = es.profile(moe, {"only": ["abc", "def"]})
    one = es.domain_experts(prof, n_boot=50)  # A/H/CWAS only, with a note: lift needs two domains
    assert "at least 2 domains" in one.settings["note"] and not one.df["is_domain_expert"].any()
    assert one.df["lift"].isna().all() and one.df["activation_rate"].between(0, 1).all()
    with pytest.raises(es.ExpertscopeError, match="not a valid option"):
        es.domain_experts(prof, entropy="shannon")


def test_profile_config_and_keywords_follow_one_rule(make_tiny) -> None:
    moe = _moe(make_tiny)
    texts = {"a": ["abc", "de"], "b": ["xyz"]}
    ref = es.profile(moe, texts, batch_size=1)
    same = es.profile(moe, texts, config=es.ProfileConfig(batch_size=1), batch_size=1)  # agreeing: fine
    np.testing.assert_array_equal(ref.totals()[1]["sel"], same.totals()[1]["sel"])
    assert same.config["batch_size"] == 1
    with pytest.raises(es.ConfigError, match=r"contradicts config\.batch_size"):
        es.profile(moe, texts, config=es.ProfileConfig(batch_size=2), batch_size=4)
    with pytest.raises(es.ConfigError, match="unknown ProfileConfig setting 'batchsize'"):
        es.profile(moe, texts, batchsize=4)


def _naive_gate_mean(moe: MoEModel, texts: list[str]) -> np.ndarray:
    """Mean gate weight of each (layer, expert) over the tokens that select it, one text at a time."""
    L, E = len(moe.layers), moe.num_experts
    wsum, cnt = np.zeros((L, E)), np.zeros((L, E))
    for text in texts:
        ids = moe.tokenizer(text, return_tensors="pt")["input_ids"]
        with es.RouterHooks(moe, record=True) as h, torch.no_grad():
            moe.model(input_ids=ids)
        for li, layer in enumerate(moe.layers):
            call = h.calls[layer][0]
            for t in range(call.indices.shape[0]):
                for i, w in zip(call.indices[t].tolist(), call.weights[t].tolist(), strict=True):
                    wsum[li, i] += w
                    cnt[li, i] += 1
    with np.errstate(invalid="ignore"):
        return np.where(cnt > 0, wsum / np.maximum(cnt, 1), np.nan)


def test_to_frame_matches_naive_loop_and_works_for_one_domain(make_tiny) -> None:
    moe = _moe(make_tiny)  # qwen2_moe: one always-on shared expert per layer
    E, L = moe.num_experts, len(moe.layers)
    ref = _naive(moe, TEXTS)
    frame = es.profile(moe, TEXTS, batch_size=2).to_frame()
    routed = frame[~frame["shared"]].set_index(["domain", "layer", "expert"])
    A = {d: ref[d]["sel"] / ref[d]["n"] for d in TEXTS}
    for d in TEXTS:
        other = next(o for o in TEXTS if o != d)
        for li, layer in enumerate(moe.layers):
            rows = routed.loc[(d, layer)].sort_index()
            np.testing.assert_allclose(rows["activation_rate"], A[d][li])
            np.testing.assert_allclose(rows["entropy"], ref[d]["hb"][li] / ref[d]["n"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(rows["cwas"], (1 - ref[d]["hb"][li] / ref[d]["n"]) * A[d][li],
                                       rtol=1e-5, atol=1e-7)
            with np.errstate(invalid="ignore", divide="ignore"):
                want_lift = np.where((A[d][li] == 0) & (A[other][li] == 0), np.nan, A[d][li] / A[other][li])
            np.testing.assert_allclose(rows["lift"], want_lift)
        np.testing.assert_allclose(routed.loc[d]["gate_mean"].to_numpy().reshape(L, E),
                                   _naive_gate_mean(moe, TEXTS[d]), rtol=1e-5, atol=1e-6)
    shared = frame[frame["shared"]]
    assert len(shared) == len(TEXTS) * L and (shared["expert"] == E).all()  # numbered after the routed experts
    assert (shared["activation_rate"] == 1.0).all() and shared[["entropy", "cwas", "lift"]].isna().all().all()
    # A single domain: every statistic is there, lift is NaN (no other domain to compare with).
    one = es.profile(moe, {"alpha": TEXTS["alpha"]}, batch_size=2).to_frame(entropy="eq1", shared=False)
    assert len(one) == L * E and not one["shared"].any()
    np.testing.assert_allclose(one["entropy"].to_numpy().reshape(L, E), ref["alpha"]["he"] / ref["alpha"]["n"],
                               rtol=1e-5, atol=1e-7)
    assert one["lift"].isna().all() and one["activation_rate"].notna().all()
