"""Independent checks of the rules' numbers: brute force, direct loops and naive forwards, not the code's
own output. z threshold and its cap, permutation p-values, bootstrap CIs, the driver rule and the causal
rate end to end, and the steering transforms."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import expertscope as es
import expertscope.causal as C
from expertscope.causal.drivers import bootstrap_mean_ci
from expertscope.config import DriverConfig
from expertscope.errors import ConfigError
from expertscope.models.hooks import RouterHooks
from expertscope.models.model import MoEModel
from expertscope.stats.domain_experts import group_statistics, permutation_pvalues
from expertscope.testing import tiny_model, tiny_tokenizer
from oracles.stats import bh_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _profile_from(tok: np.ndarray, sel: np.ndarray, h: np.ndarray, labels: list[str], L: int, E: int,
                  top_k: int = 2) -> es.RoutingProfile:
    prof = es.RoutingProfile(layers=list(range(L)), num_experts=E, top_k=top_k)
    for name in dict.fromkeys(labels):
        idx = [i for i, x in enumerate(labels) if x == name]
        prof.add(name, list(range(len(idx))), tok[idx],
                 {"sel": sel[idx].reshape(-1, L, E), "h_bern": h[idx].reshape(-1, L, E),
                  "h_eq1": h[idx].reshape(-1, L, E), "gate": sel[idx].reshape(-1, L, E) * 0.5})
    return prof


def _naive_spec(tok: list[float], sel: list[list[float]], h: list[list[float]], lab: list[int], D: int) -> list:
    """Specificity of CWAS per (domain, cell) with plain Python sums."""
    C_ = len(sel[0])
    out = []
    for d in range(D):
        row = []
        for c in range(C_):
            S = []
            for k in range(D):
                n = sum(t for t, g in zip(tok, lab, strict=True) if g == k)
                s = sum(x[c] for x, g in zip(sel, lab, strict=True) if g == k)
                hh = sum(x[c] for x, g in zip(h, lab, strict=True) if g == k)
                S.append((1 - hh / n) * (s / n))
            row.append(S[d] - sum(S[k] for k in range(D) if k != d) / (D - 1))
        out.append(row)
    return out


# ----- z threshold and its cap -------------------------------------------------------------------------
def test_z_threshold_by_hand_and_the_documented_cap() -> None:
    g = np.random.default_rng(1)
    L, E, S = 2, 8, 12
    tok = g.integers(5, 20, size=S).astype(np.int64)
    sel = np.stack([g.binomial(t, g.uniform(0, 0.5, size=L * E)) for t in tok]).astype(np.int64)
    h = sel * g.uniform(0, 1, size=sel.shape)
    labels = ["a"] * 6 + ["b"] * 6
    table = es.domain_experts(_profile_from(tok, sel, h, labels, L, E), rule="z", z=2.0, n_boot=0, n_perm=0)
    df = table.df
    for _key, grp in df.groupby(["domain", "layer"]):
        spec = list(grp.sort_values("expert")["specificity"])
        mean = sum(spec) / E
        sd = math.sqrt(sum((x - mean) ** 2 for x in spec) / E)  # ddof = 0
        assert grp["spec_threshold"].iloc[0] == pytest.approx(mean + 2.0 * sd, rel=1e-12, abs=1e-15)
        flagged = grp[grp.is_domain_expert]
        assert len(flagged) <= E // (1 + 2.0**2)  # at most one of 8 can reach z = 2
    # The cap itself: the largest z among E values is sqrt(E-1) (one value apart from E-1 equal ones), and
    # no vector has more than E/(1+z^2) values at or above mean + z sd.
    for E_ in (4, 8, 60):
        onehot = np.zeros(E_)
        onehot[0] = 1
        assert (onehot[0] - onehot.mean()) / onehot.std() == pytest.approx(math.sqrt(E_ - 1))
        for z in (1.0, 2.0):
            cap = E_ / (1 + z * z)
            for _ in range(300):
                x = g.standard_normal(E_) * (g.uniform(size=E_) < 0.3) + (g.uniform(size=E_) < 0.2) * 5
                if x.std() == 0:
                    continue
                assert ((x - x.mean()) / x.std() >= z - 1e-12).sum() <= cap + 1e-9
            # the bound is reached: m equal values on top of E-m equal ones with m = E/(1+z^2)
            m = int(cap)
            if m >= 1 and m == cap:
                y = np.r_[np.ones(m), np.zeros(E_ - m)]
                assert ((y - y.mean()) / y.std() >= z - 1e-12).sum() == m


# ----- permutation p-values against enumeration ----------------------------------------------------------
@pytest.mark.parametrize("sizes", [(4, 4), (2, 2, 2)])
def test_permutation_pvalues_match_brute_force_enumeration(sizes: tuple[int, ...]) -> None:
    g = np.random.default_rng(7)
    D, N, Cc = len(sizes), sum(sizes), 5
    tok = g.integers(3, 12, size=N).astype(float)
    sel = np.stack([g.binomial(int(t), g.uniform(0.05, 0.9, size=Cc)) for t in tok]).astype(float)
    h = sel * g.uniform(0, 1, size=sel.shape)
    labels = np.repeat(np.arange(D), sizes)
    obs = np.array(_naive_spec(tok.tolist(), sel.tolist(), h.tolist(), labels.tolist(), D))
    # every distinct labeling with the same group sizes, each equally likely under the null
    perms = sorted(set(itertools.permutations(labels.tolist())))
    ge = np.zeros((D, Cc))
    for p in perms:
        st = np.array(_naive_spec(tok.tolist(), sel.tolist(), h.tolist(), list(p), D))
        ge += st >= obs - 1e-12
    exact = ge / len(perms)
    # the vectorised statistic equals the naive one
    spec, _ = group_statistics(tok, sel, h, labels[None], D, conditional=False)
    np.testing.assert_allclose(spec[0], obs, rtol=1e-10, atol=1e-12)
    p_mc, _, n_done = permutation_pvalues(tok, sel, h, labels, D, False, 20000, np.random.default_rng(0),
                                          stop=10**9)
    assert (n_done == 20000).all()
    # Monte Carlo p = (1 + #exceed) / (1 + n) is within binomial error of the exact enumeration p
    np.testing.assert_allclose(p_mc, exact, atol=0.012)
    # the normal approximation sits near the exact p where the null is not too discrete
    p_norm, _, _ = permutation_pvalues(tok, sel, h, labels, D, False, 5000, np.random.default_rng(0), test="normal")
    assert np.corrcoef(p_norm.ravel(), exact.ravel())[0, 1] > 0.9
    # and domain_experts reports exactly these p-values for the same seed's stream
    prof = _profile_from(tok.astype(np.int64), sel.astype(np.int64), h,
                         [f"d{x}" for x in labels], 1, Cc)
    table = es.domain_experts(prof, n_boot=0, n_perm=20000, perm_stop=10**9, seed=3)
    got = table.df.sort_values(["domain", "expert"])["p_value"].to_numpy().reshape(D, Cc)
    np.testing.assert_allclose(got, exact, atol=0.012)


def test_too_few_permutations_for_bh_are_refused() -> None:
    g = np.random.default_rng(0)
    tok = g.integers(3, 9, size=8)
    sel = np.stack([g.binomial(int(t), 0.3, size=8) for t in tok]).astype(np.int64)
    prof = _profile_from(tok, sel, sel * 0.5, ["a"] * 4 + ["b"] * 4, 1, 8)
    with pytest.raises(ConfigError, match="too few for 16 tests"):
        es.domain_experts(prof, n_perm=100)
    with pytest.raises(ConfigError, match="contradicts"):
        es.domain_experts(prof, es.DomainExpertConfig(rule="z"), rule="fdr")
    assert es.domain_experts(prof, n_boot=0).settings["n_perm"] == math.ceil(20 * 16 / 0.05)


# ----- bootstrap CIs by direct loops ---------------------------------------------------------------------
def test_bootstrap_cis_match_an_independent_naive_bootstrap() -> None:
    """The A and lift intervals against a naive bootstrap written here, with its own random draws (not the
    implementation's): both estimate the same percentiles, so they agree within Monte Carlo error."""
    g = np.random.default_rng(3)
    L, E = 1, 4
    sizes = {"a": 5, "b": 6}
    tok = g.integers(3, 15, size=11).astype(np.int64)
    sel = np.stack([g.binomial(int(t), g.uniform(0.1, 0.9, size=L * E)) for t in tok]).astype(np.int64)
    h = sel * g.uniform(0, 1, size=sel.shape)
    labels = ["a"] * 5 + ["b"] * 6
    n_boot = 4000
    table = es.domain_experts(_profile_from(tok, sel, h, labels, L, E), n_boot=n_boot, n_perm=0, rule="z", seed=11)
    rng = np.random.default_rng(12345)  # independent draws
    A_b = {}
    start = 0
    for d, n in sizes.items():
        rows = []
        for _ in range(n_boot):
            # a resample: n sequences of the domain drawn with replacement, one by one
            seqs = [start + int(rng.integers(n)) for _ in range(n)]
            ntok = sum(int(tok[s]) for s in seqs)
            rows.append([sum(int(sel[s, c]) for s in seqs) / ntok for c in range(E)])
        A_b[d] = np.array(rows)
        start += n
    df = table.df.set_index(["domain", "expert"])
    for d in sizes:
        lo, hi = np.percentile(A_b[d], [2.5, 97.5], axis=0)
        for e in range(E):
            tol = 0.08 * (hi[e] - lo[e]) + 1e-9  # Monte Carlo error of a 2.5 % quantile of a lumpy bootstrap
            assert abs(df.loc[(d, e), "A_lo"] - lo[e]) <= tol
            assert abs(df.loc[(d, e), "A_hi"] - hi[e]) <= tol
    # lift resamples: the ratio of the two domains' resampled rates
    lift = A_b["a"] / A_b["b"]
    lo, hi = np.percentile(lift, [2.5, 97.5], axis=0)
    for e in range(E):
        tol = 0.08 * (hi[e] - lo[e])
        assert abs(df.loc[("a", e), "lift_lo"] - lo[e]) <= tol
        assert abs(df.loc[("a", e), "lift_hi"] - hi[e]) <= tol
    # the tolerance can fail: a 90 % interval instead of the 95 % one lies outside it
    lo90, hi90 = np.percentile(A_b["a"], [5, 95], axis=0)
    lo, hi = np.percentile(A_b["a"], [2.5, 97.5], axis=0)
    assert any(abs(lo90[e] - lo[e]) > 0.08 * (hi[e] - lo[e]) or abs(hi90[e] - hi[e]) > 0.08 * (hi[e] - lo[e])
               for e in range(E))


def test_bootstrap_mean_ci_loop_and_coverage() -> None:
    x = np.random.default_rng(0).normal(size=(40, 3))
    lo, hi = bootstrap_mean_ci(x, 500, 0.95, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    counts = rng.multinomial(40, np.full(40, 1 / 40), size=500)
    means = np.array([[sum(x[i, c] * counts[b, i] for i in range(40)) / 40 for c in range(3)] for b in range(500)])
    np.testing.assert_allclose(lo, np.percentile(means, 2.5, axis=0), rtol=1e-12)
    np.testing.assert_allclose(hi, np.percentile(means, 97.5, axis=0), rtol=1e-12)
    # statistical check: the interval of a normal sample's mean covers the true mean ~95% of the time
    g = np.random.default_rng(1)
    y = g.normal(size=(400, 30, 1))
    cover = 0
    for i in range(400):
        a, b = bootstrap_mean_ci(y[i], 400, 0.95, g)
        cover += bool(a[0] <= 0.0 <= b[0])
    assert 0.88 <= cover / 400 <= 0.99


# ----- driver rule and causal rate end to end against naive forwards -------------------------------------
TEXTS = {
    "alpha": ["the cat sat on it", "a dog ran far", "hello there", "abc abc abc", "moe routing", "one two three",
              "sky is blue", "red green", "tiny model", "quick fox", "lazy dog here", "hi all", "a b c d",
              "good day", "words only", "plain text"],
    "beta": ["1 + 2 = 3", "x = 42 * 7", "99 bottles", "0.5 - 0.25", "7 * 8 = 56", "12 / 4 = 3", "2 ^ 10",
             "3.14159", "100 - 1", "5 + 5 + 5", "8 8 8 8", "6 * 7", "10 + 20", "3 - 1 = 2", "4 / 2", "9 * 9"],
}
LAYERS = (1, 2)  # CE of these layers only (BH then counts 16 cells)


def _driver_model() -> MoEModel:
    model = tiny_model("mixtral", seed=0, initializer_range=0.3, num_local_experts=8)
    with torch.no_grad():
        down = model.model.layers[1].mlp.experts.down_proj
        down *= 0.2
        down[5] *= 40.0  # expert 5's output dominates layer 1's: a change in its gate weight moves the output
    return MoEModel.from_model(model, tokenizer=tiny_tokenizer())


def _naive_ce(moe: MoEModel, text: str) -> np.ndarray:
    """KL(P || Q) at the last token, one full forward per (layer, expert) with +1 on that logit everywhere."""
    ids = moe.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = F.log_softmax(moe.model(input_ids=ids).logits[0, -1].double(), -1)
    out = np.zeros((len(LAYERS), moe.num_experts))
    for li, layer in enumerate(LAYERS):
        for e in range(moe.num_experts):
            def bump(site: Any, z: torch.Tensor, e: int = e) -> torch.Tensor:
                z = z.clone()
                z[:, e] += 1.0
                return z

            with RouterHooks(moe, transforms={layer: bump}), torch.no_grad():
                q = F.log_softmax(moe.model(input_ids=ids).logits[0, -1].double(), -1)
            out[li, e] = max(0.0, float((p.exp() * (p - q)).sum()))
    return out


@pytest.mark.slow
def test_driver_rule_and_causal_rate_match_naive_loops() -> None:
    from scipy.stats import wilcoxon

    moe = _driver_model()
    res = C.causal_effects(moe, TEXTS, batch_size=4, layers=list(LAYERS))
    for d, texts in TEXTS.items():  # the engine against one full forward per (layer, expert), 4 texts each
        naive = np.stack([_naive_ce(moe, t) for t in texts[:4]])
        np.testing.assert_allclose(res.ce[res.domain == d][:4], naive, rtol=1e-4, atol=1e-6)
    table = C.driver_experts(res, n_boot=200, stability_pairs=0)  # the one-pass rule, checked by hand
    E = moe.num_experts
    for d in TEXTS:
        # The rule by hand, on the CE just checked against the naive loop (the engine's values, so that
        # rounding noise in near-zero CEs cannot reorder Wilcoxon ranks): per input, each expert against its
        # layer's median; Wilcoxon; BH over the domain's cells; ratio and floor.
        ce = np.round(res.ce[res.domain == d], 9)  # the rule decides on CE rounded to 1e-9 nats (ce_decimals)
        pvals, cells = [], []
        for li, layer in enumerate(LAYERS):
            for e in range(E):
                diffs = np.array([ce[x, li, e] - float(np.median(ce[x, li])) for x in range(len(ce))])
                # exact without zeros or ties, else zeros split and the tie-corrected normal approximation
                clean = len(diffs) <= 50 and (diffs != 0).all() and len(np.unique(np.abs(diffs))) == len(diffs)
                method = {"method": "exact"} if clean else {"method": "approx", "correction": False}
                pvals.append(float(wilcoxon(diffs, alternative="greater", zero_method="zsplit", **method).pvalue)
                             if diffs.any() else 1.0)
                cells.append((layer, e))
        q = dict(zip(cells, bh_reference(pvals), strict=True))
        p = dict(zip(cells, pvals, strict=True))
        got = table.df[table.df.domain == d].set_index(["layer", "expert"])
        mean = ce.mean(axis=0)
        for li, layer in enumerate(LAYERS):
            for e in range(E):
                row = got.loc[(layer, e)]
                assert row.p_value == pytest.approx(p[(layer, e)], rel=1e-9)
                assert row.q_value == pytest.approx(q[(layer, e)], rel=1e-9)
                med = float(np.median(mean[li]))
                expect = q[(layer, e)] <= 0.05 and mean[li, e] >= 2 * med and mean[li, e] >= 1e-3
                assert bool(row.is_driver) == expect, (d, layer, e)
                assert row.ce_lo <= row.ce_mean <= row.ce_hi
    assert (1, 5) in table.targets("alpha") and (1, 5) in table.targets("beta")
    assert (table.drivers()["ce_mean"] >= 1e-3).all()
    # causal rate: a naive per-text routing pass counting tokens whose selection holds a driver
    rate = C.causal_rate(moe, TEXTS, table)
    for d, texts in TEXTS.items():
        drv = table.by_layer(d)
        hit = dict.fromkeys(moe.layers, 0)
        n = 0
        for t in texts:
            ids = moe.tokenizer(t, return_tensors="pt")["input_ids"]
            with RouterHooks(moe, record=True) as hooks, torch.no_grad():
                moe.model(input_ids=ids)
            n += ids.shape[1]
            for layer in moe.layers:
                for row in hooks.calls[layer][0].indices.tolist():
                    hit[layer] += any(e in drv.get(layer, ()) for e in row)
        for layer in moe.layers:  # layer 0 has no CE, hence no drivers and rate 0
            r = rate[(rate.domain == d) & (rate.layer == layer)].iloc[0]
            assert r.n_tokens == n and r.n_driver_tokens == hit[layer]
            assert r.causal_rate == pytest.approx(hit[layer] / n)


def test_no_drivers_is_said_in_words_and_steers_nothing() -> None:
    from scipy.stats import wilcoxon

    ce = np.full((6, 2, 4), 1e-5)
    ce[:, 1, 2] = 5e-4  # clearly the largest, yet below the 1e-3 floor
    eff = C.CausalEffects(ce=ce, domain=np.array(["math"] * 6, dtype=object), text_index=np.arange(6),
                          layers=[0, 1], exact=np.ones((2, 4), bool))
    table = C.driver_experts(eff)
    assert table.targets("math") == [] and not table.df["is_driver"].any()
    row = table.df[(table.df.layer == 1) & (table.df.expert == 2)].iloc[0]
    assert row.pass_ratio and not row.pass_floor
    (s,) = table.summary()
    assert s["n_drivers"] == 0 and s["largest_ce"] == pytest.approx(5e-4)
    assert "no driver experts (largest mean CE 0.0005 nats" in s["text"]
    above = C.driver_experts(eff, ce_floor=1e-4, stability_pairs=0)  # a lower floor passes all three... but n=6:
    # six tied positive differences: the tie-corrected normal approximation (scipy's zsplit/approx), above
    # BH's alpha/8 for 8 cells: still none
    ref = wilcoxon(ce[:, 1, 2] - np.median(ce[:, 1], axis=1), zero_method="zsplit", method="approx",
                   correction=False, alternative="greater").pvalue
    assert above.df.loc[(above.df.layer == 1) & (above.df.expert == 2), "p_value"].iloc[0] == pytest.approx(ref)
    assert 0.05 / 8 < ref < 0.05
    assert above.targets("math") == []
    # with stability selection, half-samples of 3 inputs can never pass the test: no driver either
    assert C.driver_experts(eff, ce_floor=1e-4).targets("math") == []
    with pytest.raises(ConfigError, match="contradicts"):
        C.driver_experts(eff, DriverConfig(rule="z"), rule="fdr")
    with pytest.raises(ConfigError, match="not a valid option"):
        C.driver_experts(eff, rule="median")


# ----- steering transforms --------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "s"), [("scale", 1.3), ("scale", 0.7), ("bias", 1.3), ("bias", 0.7)])
def test_steering_records_exact_transform_on_targets_only(mode: str, s: float) -> None:
    moe = MoEModel.from_model(tiny_model("mixtral", seed=2, num_local_experts=8), tokenizer=tiny_tokenizer())
    targets = ((0, 1), (0, 6), (2, 3))
    inputs: dict[int, torch.Tensor] = {}
    handles = [site.module.register_forward_pre_hook(
        lambda m, a, layer=site.layer: inputs.__setitem__(layer, a[0].detach().clone())) for site in moe.sites]
    ids = moe.tokenizer(["steer these tokens", "and these"], return_tensors="pt", padding=True)
    try:
        with es.steer(moe, targets, scale=s, mode=mode), RouterHooks(moe, record=True) as rec, torch.no_grad():
            moe.model(**ids)
    finally:
        for h in handles:
            h.remove()
    for site in moe.sites:
        # the logits the router would compute from the input it actually received in the steered run
        z = F.linear(inputs[site.layer].reshape(-1, inputs[site.layer].shape[-1]), site.module.weight).float()
        got = rec.calls[site.layer][0].logits
        expect = z.clone()
        for layer, e in targets:
            if layer == site.layer:
                expect[:, e] = s * z[:, e] if mode == "scale" else z[:, e] + math.log(s)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
        others = [e for e in range(8) if (site.layer, e) not in targets]
        assert torch.equal(got[:, others], z[:, others])  # untouched: bit-identical


def test_equal_gate_expert_has_zero_cwas_but_stays_visible_by_lift() -> None:
    """An expert every token of A selects with weight exactly ½ (h(½) = 1 bit): CWAS = 0 in A by definition,
    so the CWAS test cannot see it; its activation lift and activation q-value do."""
    g = np.random.default_rng(0)
    L, E, n = 1, 8, 20
    tok = g.integers(5, 15, size=2 * n).astype(np.int64)
    sel = np.stack([g.binomial(int(t), 0.25, size=E) for t in tok]).astype(np.int64)
    h = sel * g.uniform(0.3, 0.9, size=sel.shape)
    sel[:n, 3] = tok[:n]  # A: expert 3 on every token ...
    h[:n, 3] = tok[:n] * 1.0  # ... with p~ = 1/2, so h = 1 on each
    sel[n:, 3] = 0  # B never selects it
    h[n:, 3] = 0.0
    table = es.domain_experts(_profile_from(tok, sel, h, ["A"] * n + ["B"] * n, L, E), n_boot=200)
    row = table.df[(table.df.domain == "A") & (table.df.expert == 3)].iloc[0]
    assert row.activation_rate == 1.0 and row.cwas == 0.0 and row.lift == np.inf
    assert not row.pass_test and not row.is_domain_expert  # the CWAS specificity test: not significant
    assert row.activation_q <= 0.05 and row.pass_lift and row.pass_uniform  # but plainly visible


# ----- stats/rules.py: BH, bootstrap, paired differences, pass flags --------------------------------------
def test_bh_qvalues_by_hand_and_against_a_naive_loop() -> None:
    from expertscope.stats.rules import bh_qvalues

    # by hand: m = 4, sorted p 0.01, 0.02, 0.03, 0.5 → p·m/rank = 0.04, 0.04, 0.04, 0.5 (monotone from the top)
    q = bh_qvalues([0.03, 0.5, 0.01, 0.02, float("nan")])
    np.testing.assert_allclose(q[:4], [0.04, 0.5, 0.04, 0.04])
    assert np.isnan(q[4])
    # a step-up case: 0.04·2/1 = 0.08 > 0.045·2/2 = 0.045, so the smaller p gets q = 0.045 too
    np.testing.assert_allclose(bh_qvalues([0.04, 0.045]), [0.045, 0.045])
    g = np.random.default_rng(4)
    p = g.uniform(size=(3, 7)) ** 3
    p[0, 0] = p[1, 1]  # a tie
    np.testing.assert_allclose(bh_qvalues(p), np.array(bh_reference(p.ravel().tolist())).reshape(3, 7), rtol=1e-12)
    # passing cells are exactly the BH step-up set: reject the k smallest, k = max{i: p_(i) <= i·alpha/m}
    alpha, flat = 0.1, np.sort(p.ravel())
    k = max([i for i in range(1, flat.size + 1) if flat[i - 1] <= i * alpha / flat.size], default=0)
    assert int((bh_qvalues(p) <= alpha).sum()) == k


def _exact_bootstrap_quantiles(x: np.ndarray, probs: list[float]) -> list[float]:
    """Quantiles of the exact bootstrap distribution of the mean: every multiset of n draws, with its
    multinomial probability (an enumeration, not a sample)."""
    n = len(x)
    atoms: dict[float, float] = {}
    for counts in itertools.product(range(n + 1), repeat=n):
        if sum(counts) != n:
            continue
        prob = math.factorial(n) / math.prod(math.factorial(c) for c in counts) / n**n
        m = round(sum(c * v for c, v in zip(counts, x, strict=True)) / n, 12)
        atoms[m] = atoms.get(m, 0.0) + prob
    values = sorted(atoms)
    cdf = np.cumsum([atoms[v] for v in values])
    return [values[int(np.searchsorted(cdf, pr))] for pr in probs]


def test_bootstrap_ci_against_the_exact_bootstrap_distribution() -> None:
    from expertscope.stats.rules import bootstrap_ci

    x = np.array([0.0, 1.0, 3.0, 7.0, 20.0])  # skewed: the percentile interval is not symmetric
    lo, hi = bootstrap_ci(x, n_boot=40000, ci=0.95, rng=1)
    lo_a, lo_b, hi_a, hi_b = _exact_bootstrap_quantiles(x, [0.02, 0.03, 0.97, 0.98])
    assert lo_a <= float(lo) <= lo_b and hi_a <= float(hi) <= hi_b
    # columns share one draw of items; a NaN column gives NaN; n_boot = 0 gives NaN
    two = np.stack([x, 2 * x, np.r_[x[:4], np.nan]], axis=1)
    lo2, hi2 = bootstrap_ci(two, n_boot=40000, ci=0.95, rng=1)
    np.testing.assert_allclose(lo2[:2], [lo, 2 * lo], rtol=1e-12)
    assert np.isnan(lo2[2]) and np.isnan(hi2[2])
    assert np.isnan(bootstrap_ci(x, n_boot=0)[0])


def test_paired_bootstrap_diff_resamples_items_jointly() -> None:
    from expertscope.stats.rules import bootstrap_ci, paired_bootstrap_diff

    g = np.random.default_rng(0)
    shared = g.normal(size=60) * 5  # a large per-item effect common to both: pairing removes it
    a = shared + g.normal(size=60) * 0.1
    b = shared + 0.3 + g.normal(size=60) * 0.1
    est, lo, hi = paired_bootstrap_diff(a, b, n_boot=4000, rng=2)
    assert est == pytest.approx(float(np.mean(b - a)))
    assert lo < 0.3 < hi and hi - lo < 0.15  # unpaired, the interval would be ~100x wider
    # the same items resampled for a and b: the interval is that of the per-item differences
    lo_d, hi_d = bootstrap_ci(b - a, n_boot=4000, rng=2)
    assert (lo, hi) == (float(lo_d), float(hi_d))
    # the exact bootstrap quantiles of the differences bracket it (a tiny case, enumerated)
    a5, b5 = np.array([1.0, 0, 1, 1, 0]), np.array([1.0, 1, 1, 0, 1])
    _, lo5, hi5 = paired_bootstrap_diff(a5, b5, n_boot=40000, rng=3)
    q = _exact_bootstrap_quantiles(b5 - a5, [0.02, 0.03, 0.97, 0.98])
    assert q[0] <= lo5 <= q[1] and q[2] <= hi5 <= q[3]
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap_diff(a5, b5[:4])


def test_passes_jaccard_and_z_cap() -> None:
    from expertscope.stats.rules import jaccard, passes, z_cap, z_rule_text

    flags = {"a": np.array([True, True, False, True]), "b": np.array([True, False, False, True]),
             "c": np.array([False, True, True, True])}
    assert passes(flags).tolist() == [False, False, False, True]
    assert jaccard({(0, 1), (1, 2), (3, 4)}, [(1, 2), (3, 4), (2, 2)]) == pytest.approx(2 / 4)
    assert math.isnan(jaccard(set(), set())) and jaccard({(0, 0)}, set()) == 0.0
    assert z_cap(8, 2.0) == pytest.approx(1.6)
    assert "8/(1+2.0^2) = 1.60" in z_rule_text("CE(D)", 8, 2.0)


def test_driver_decisions_ignore_differences_far_below_the_stated_precision() -> None:
    """CE on a 1e-4 grid (many tied differences) plus jitter of 1e-13 nats, the size of the change the torch
    thread count makes: with the default ce_decimals = 9 every p, q and flag is identical; deciding on the
    raw values (ce_decimals=None), the jitter breaks ties and moves p-values."""
    g = np.random.default_rng(0)
    ce = g.integers(0, 6, size=(30, 2, 8)) * 1e-4
    ce[:, 0, 3] += 3e-3
    ce[:, 1, 5] += 1e-3 * (g.uniform(size=30) < 0.8)
    jitter = ce + g.uniform(-1e-13, 1e-13, size=ce.shape)

    def table(x: np.ndarray, **kw: Any) -> Any:
        eff = C.CausalEffects(ce=np.abs(x), domain=np.array(["d"] * 30, dtype=object), text_index=np.arange(30),
                              layers=[0, 1], exact=np.ones((2, 8), bool))
        return C.driver_experts(eff, n_boot=100, **kw).df

    a, b = table(ce), table(jitter)
    for col in ("p_value", "q_value", "ce_mean", "ce_lo", "ce_hi", "is_driver"):
        assert a[col].tolist() == b[col].tolist(), col
    assert a["is_driver"].sum() >= 1
    raw_a, raw_b = table(ce, ce_decimals=None), table(jitter, ce_decimals=None)
    assert not np.array_equal(raw_a["p_value"].to_numpy(), raw_b["p_value"].to_numpy())
    with pytest.raises(ConfigError, match="ce_decimals"):
        DriverConfig(ce_decimals=20)
