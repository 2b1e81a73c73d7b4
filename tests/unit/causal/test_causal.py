"""Causal effects, driver experts and the causal rate against independent naive references.

Tolerance: exact CE values (KL divergences, here up to ~2 nats) must equal the naive loop to an absolute
1e-5 in fp32 (docs/methods.md §3).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import expertscope.causal as C
from expertscope.causal import _engine
from expertscope.errors import ConfigError, DataError
from expertscope.models.model import MoEModel
from expertscope.testing import TINY_BUILDERS, tiny_model, tiny_tokenizer

TEXTS = {
    "alpha": ["the cat sat on the mat", "hello", "a dog ran far away", "x"],
    "beta": ["1 + 2 = 3", "x = 42 * 7 and more", "99 bottles"],
}
SHORT = {"alpha": ["the cat sat", "hello", "x"], "beta": ["1 + 2 = 3", "x = 42 * 7"]}  # for naive loops
ATOL = 1e-5


def _moe(make_tiny: Any, family: str, **cfg: Any) -> MoEModel:
    return MoEModel.from_model(make_tiny(family, initializer_range=0.3, **cfg), tokenizer=tiny_tokenizer())


class _AddToColumn(TorchFunctionMode):
    """The naive perturbation, written independently of the engine: adds ``m`` to column ``e`` of the output
    of ``F.linear`` calls whose weight is the router's own weight, on ``rows`` (None: every token)."""

    def __init__(self, weight: torch.Tensor, e: int, m: float, rows: list[int] | None) -> None:
        super().__init__()
        self.weight, self.e, self.m, self.rows = weight, e, m, rows

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            out = out.clone()
            flat = out.view(-1, out.shape[-1])
            if self.rows is None:
                flat[:, self.e] += self.m
            else:
                flat[self.rows, self.e] += self.m
        return out


def naive_ce(moe: MoEModel, texts: list[str], m: float = 1.0, positions: str = "all",
             label_ids: list[int] | None = None) -> np.ndarray:
    """``(N, L, E)``: one full forward pass per (input, layer, expert), each input alone (no padding)."""
    out = np.zeros((len(texts), len(moe.sites), moe.num_experts))
    with torch.no_grad():
        for n, t in enumerate(texts):
            ids = moe.tokenizer(t, return_tensors="pt")["input_ids"]
            rows = None if positions == "all" else [ids.shape[1] - 1]

            def logp(logits: torch.Tensor) -> torch.Tensor:
                x = logits[0, -1].double()
                return (x if label_ids is None else x[label_ids]).log_softmax(-1)

            p = logp(moe.model(input_ids=ids).logits)
            for li, s in enumerate(moe.sites):
                for e in range(s.num_experts):
                    with _AddToColumn(s.module.weight, e, m, rows):
                        q = logp(moe.model(input_ids=ids).logits)
                    out[n, li, e] = float((p.exp() * (p - q)).sum())
    return out


def _flat(texts: dict[str, list[str]]) -> list[str]:
    return [t for ts in texts.values() for t in ts]


# ----- exact equals the definition -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_exact_matches_naive_loop(make_tiny: Any, family: str, positions: str) -> None:
    moe = _moe(make_tiny, family)
    res = C.causal_effects(moe, SHORT, positions=positions, batch_size=3)
    ref = naive_ce(moe, _flat(SHORT), positions=positions)
    assert res.ce.shape == ref.shape
    assert res.settings["exact_stats"]["engine"] == "restart"
    assert res.settings["exact_stats"]["last_layer_block"] == "decisions"  # the shortcut ran, and changed nothing
    assert ref.max() > 1e-2  # the effects are measurable
    np.testing.assert_allclose(res.ce, ref, rtol=0, atol=ATOL)
    if family != "mixtral":  # never skip for non-renormalising or sigmoid/grouped routers
        assert res.settings["skipped"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(TINY_BUILDERS) - {"mixtral", "qwen2_moe", "deepseek_v3"}))
def test_exact_matches_naive_loop_on_every_other_family(make_tiny: Any, family: str) -> None:
    """Every router family: the restart (with its last-layer shortcut, which runs each family's own MoE block
    on a gathered sequence) gives the definition."""
    moe = _moe(make_tiny, family)
    res = C.causal_effects(moe, SHORT, batch_size=3)
    assert res.settings["exact_stats"]["engine"] == "restart"
    assert res.settings["exact_stats"]["last_layer_block"] == "decisions"
    np.testing.assert_allclose(res.ce, naive_ce(moe, _flat(SHORT)), rtol=0, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("magnitude", [1.0, -1.0])
def test_skipped_perturbations_are_zero_in_the_naive_loop(make_tiny: Any, magnitude: float) -> None:
    moe = _moe(make_tiny, "mixtral", num_local_experts=8)
    res = C.causal_effects(moe, SHORT, positions="last", magnitude=magnitude, batch_size=4)
    ref = naive_ce(moe, _flat(SHORT), m=magnitude, positions="last")
    skipped = res.ce == 0.0
    assert res.settings["skipped"] > 0
    assert int(skipped.sum()) == res.settings["skipped"]
    assert ref[skipped].max() < 1e-12
    np.testing.assert_allclose(res.ce, ref, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_results_do_not_depend_on_batch_size_or_engine(make_tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    moe = _moe(make_tiny, "qwen2_moe")
    a = C.causal_effects(moe, TEXTS, batch_size=1)
    b = C.causal_effects(moe, TEXTS, batch_size=7)
    # Relative: CE is a float64 KL of fp32 logits, and fp32 sums round differently in another batch shape
    # (padding, matmul blocking), in proportion to the values: fresh machines measured 1.3e-6 relative at
    # CE 0.83, so an absolute 1e-6 failed there. rtol 1e-5 is ~100 fp32 ulps; atol 1e-7 covers KLs near 0,
    # whose rounding (~1e-8 here) does not shrink with them. A wrong batch mapping differs by far more.
    np.testing.assert_allclose(a.ce, b.ce, rtol=1e-5, atol=1e-7)
    # The generic full-forward fallback gives the same values.
    monkeypatch.setattr("expertscope.causal.effects.find_stack", lambda m: None)
    c = C.causal_effects(moe, TEXTS, batch_size=3)
    assert c.settings["exact_stats"]["engine"] == "full-forward"
    np.testing.assert_allclose(a.ce, c.ce, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_restart_check_passes_and_labels_target(make_tiny: Any) -> None:
    moe = _moe(make_tiny, "mixtral")
    labels = ["a", "b", "c", "d"]
    ids = [moe.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in labels]
    res = C.causal_effects(moe, SHORT, target="labels", labels=labels, batch_size=4)
    np.testing.assert_allclose(res.ce, naive_ce(moe, _flat(SHORT), label_ids=ids), rtol=0, atol=ATOL)
    assert res.settings["label_ids"] == ids


# ----- the engine: key/value store keyword, verification once per model -----------------------------
def test_cache_keyword_is_read_from_the_layer_signature() -> None:
    from torch import nn

    class New(nn.Module):
        def forward(self, h: Any, attention_mask: Any = None, cache: Any = None, **kw: Any) -> Any:
            return h

    class Old(nn.Module):
        def forward(self, h: Any, attention_mask: Any = None, past_key_values: Any = None, **kw: Any) -> Any:
            return h

    class Opaque(nn.Module):
        def forward(self, h: Any, **kw: Any) -> Any:
            return h

    assert _engine.cache_keyword(New()) == "cache"
    assert _engine.cache_keyword(Old()) == "past_key_values"
    assert _engine.cache_keyword(Opaque()) is None
    assert _engine.cache_keyword(Opaque(), {"cache": None, "attention_mask": None}) == "cache"
    assert _engine.cache_keyword(Opaque(), {"past_key_values": None}) == "past_key_values"
    # A store never goes in under two names (transformers >= 5.24 would ignore one of them, with a warning).
    kw = _engine._with_store({"cache": None, "past_key_values": None, "x": 1}, "cache", "S")
    assert kw == {"x": 1, "cache": "S"}


def _fresh(family: str = "mixtral", **cfg: Any) -> MoEModel:
    """A model no other test has verified (the verification is cached per model)."""
    return MoEModel.from_model(tiny_model(family, seed=0, initializer_range=0.3, **cfg), tokenizer=tiny_tokenizer())


def test_prefix_reuse_on_the_installed_transformers_without_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """On whatever transformers is installed (CI also runs this on the newest in range), the layers get the
    store under the name they take: prefix reuse verified, no warning of any kind, no engine note; the
    verification runs once per model, on two short rows, not on the caller's batch."""
    import warnings

    from expertscope.causal import exact

    seen: list[tuple[int, int]] = []
    real = exact.check_restart

    def counting(moe: Any, stack: Any, batch: Any, layers: Any) -> str:
        seen.append(tuple(batch.input_ids.shape))
        return real(moe, stack, batch, layers)

    monkeypatch.setattr(exact, "check_restart", counting)
    moe = _fresh()
    assert _engine.find_stack(moe).cache_kw in _engine.CACHE_KEYWORDS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = C.causal_effects(moe, TEXTS, positions="last", batch_size=7)
        b = C.causal_effects(moe, TEXTS, positions="last", batch_size=3)
    assert [str(w.message) for w in caught] == []
    assert seen == [(2, 12)]  # once per model, on the two probe rows
    for r in (a, b):
        assert r.settings["exact_stats"]["engine"] == "restart"
        assert r.settings["exact_stats"]["prefix_reuse"] is True
        assert r.settings["engine_notes"] == []
    np.testing.assert_allclose(a.ce, b.ce, rtol=1e-5, atol=1e-9)


def test_without_a_key_value_store_the_engine_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "cache_keyword", lambda layer, passed=None: None)
    moe = _fresh()
    with pytest.warns(UserWarning, match="no prefix reuse") as caught:
        a = C.causal_effects(moe, SHORT, positions="last", batch_size=5)
        b = C.causal_effects(moe, SHORT, positions="last", batch_size=2)
    assert len(caught) == 1  # once per model, not per call or batch
    for r in (a, b):
        assert r.settings["exact_stats"]["prefix_reuse"] is False
        assert r.settings["exact_stats"]["engine"] == "restart"
        notes = r.settings["engine_notes"]
        assert len(notes) == 1 and "without prefix reuse" in notes[0] and "key/value store" in notes[0]
    np.testing.assert_allclose(a.ce, naive_ce(moe, _flat(SHORT), positions="last"), rtol=0, atol=ATOL)


@pytest.mark.slow
def test_a_model_whose_restart_does_not_reproduce_it_falls_back() -> None:
    """A layer that behaves differently when called outside its model's forward (state set by the parent):
    restarting there does not reproduce the model, the check sees it, and full forward passes give the
    definition (compared with an identical model that restarts)."""
    plain, odd = _fresh(), _fresh()
    stack = _engine.find_stack(odd)
    state = {"inside": False}
    stack.base.register_forward_pre_hook(lambda m, a: state.update(inside=True))
    stack.base.register_forward_hook(lambda m, a, o: state.update(inside=False))
    stack.layers[1].register_forward_hook(
        lambda m, a, o: o if state["inside"] else ((o[0] + 0.5, *o[1:]) if isinstance(o, tuple) else o + 0.5))
    with pytest.warns(UserWarning, match="fall back to full forward passes"):
        got = C.causal_effects(odd, SHORT, batch_size=3)
    assert got.settings["exact_stats"]["engine"] == "full-forward"
    assert "restarting at decoder layer" in got.settings["engine_notes"][0]
    ref = C.causal_effects(plain, SHORT, batch_size=3)
    assert ref.settings["exact_stats"]["engine"] == "restart"
    np.testing.assert_allclose(got.ce, ref.ce, rtol=1e-4, atol=ATOL)
    again = C.causal_effects(odd, SHORT, batch_size=5)  # the cached verdict: still the fallback
    assert again.settings["exact_stats"]["engine"] == "full-forward"


def test_the_last_block_runs_at_the_given_positions_only() -> None:
    """``tail_only_at``: the block sees the picked tokens only (its router too), their outputs are the block's
    own at those tokens, and every other position is zero."""
    from expertscope.models.hooks import RouterHooks

    moe = _fresh("qwen2_moe")
    stack = _engine.find_stack(moe)
    last = len(stack.layers) - 1
    assert stack.tail is moe.site(last).block
    torch.manual_seed(1)
    x = torch.randn(3, 6, moe.model.config.hidden_size)
    row, pos = torch.tensor([0, 0, 2]), torch.tensor([1, 5, 3])
    with torch.no_grad():
        full = stack.tail(x)
        with _engine.tail_only_at(stack.tail, row, pos), RouterHooks(moe, record=[last]) as hooks:
            got = stack.tail(x)
    assert got.shape == x.shape
    assert hooks.calls[last][0].logits.shape[0] == 3  # the router saw 3 tokens, not 18
    torch.testing.assert_close(got[row, pos], full[row, pos], rtol=1e-5, atol=1e-6)
    keep = torch.zeros(3, 6, dtype=torch.bool)
    keep[row, pos] = True
    assert got[~keep].abs().max() == 0
    assert not stack.tail._forward_hooks and not stack.tail._forward_pre_hooks  # removed on exit


@pytest.mark.slow
def test_a_dense_last_layer_runs_whole() -> None:
    """No router in the last decoder layer: no shortcut (said in the stats), the definition all the same."""
    moe = _fresh("qwen2_moe", mlp_only_layers=[2])
    assert moe.layers == [0, 1] and _engine.find_stack(moe).tail is None
    res = C.causal_effects(moe, SHORT, batch_size=3)
    assert res.settings["exact_stats"]["last_layer_block"] == "absent" and res.settings["engine_notes"] == []
    np.testing.assert_allclose(res.ce, naive_ce(moe, _flat(SHORT)), rtol=0, atol=ATOL)


@pytest.mark.slow
def test_a_last_block_shortcut_that_does_not_reproduce_the_model_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """If running the last layer's block at the decision positions only does not reproduce the model (here:
    a broken gather), the once-per-model check sees it; restarts run that block at every position, say so,
    and still give the definition."""
    real = _engine.tail_only_at
    monkeypatch.setattr(_engine, "tail_only_at", lambda block, row, pos: real(block, row, pos.flip(0)))
    moe = _fresh()
    res = C.causal_effects(moe, SHORT, batch_size=3)
    st = res.settings["exact_stats"]
    assert st["engine"] == "restart" and st["last_layer_block"] == "failed"
    assert "restarting at decoder layer" in st["last_layer_note"]
    assert any("last layer's MoE block at every position" in n for n in res.settings["engine_notes"])
    np.testing.assert_allclose(res.ce, naive_ce(moe, _flat(SHORT)), rtol=0, atol=ATOL)


# ----- fisher and hybrid ---------------------------------------------------------------------------
@pytest.mark.slow
def test_fisher_is_the_second_order_term(make_tiny: Any) -> None:
    moe = _moe(make_tiny, "qwen2_moe")
    m = 1e-2
    ex = C.causal_effects(moe, SHORT, magnitude=m, batch_size=4)
    fi = C.causal_effects(moe, SHORT, method="fisher", magnitude=m, batch_size=4)
    ratio = fi.ce[ex.ce > 1e-9] / ex.ce[ex.ce > 1e-9]
    assert np.median(np.abs(ratio - 1)) < 0.02  # KL ≈ ½ m² F for small m
    # The hidden route (full vocabulary) equals the token route over the whole vocabulary.
    tok = C.causal_effects(moe, SHORT, method="fisher", magnitude=m, batch_size=4, fisher_route="tokens",
                           fisher_mass=1.0, fisher_max_outputs=10_000)
    assert set(fi.settings["fisher_stats"]["routes"]) == {"hidden"}  # hidden 32 < the 99% token set
    np.testing.assert_allclose(tok.ce, fi.ce, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
def test_hybrid_recomputes_top_candidates_exactly(make_tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    moe = _moe(make_tiny, "mixtral")
    ex = C.causal_effects(moe, SHORT, batch_size=4)
    hy = C.causal_effects(moe, SHORT, method="hybrid", hybrid_top=2, batch_size=4)
    fa = C.causal_effects(moe, SHORT, method="fast", batch_size=4)
    assert hy.exact.shape == hy.ce.shape  # per input: a cell is verified for the domains it matters to
    assert hy.exact[:, -1].all() and (hy.exact.sum(axis=2) >= 2).all()  # the calibration layer, the top 2 a layer
    np.testing.assert_allclose(hy.ce[hy.exact], ex.ce[hy.exact], rtol=0, atol=1e-6)  # other row packing
    # a cell computed on some of a domain's inputs holds fast x its own ratio (summed exact over summed fast there)
    # on the others; a cell never computed for a domain, fast x exp(a_l + (beta - 1) c): c its log fast domain mean
    # less its layer's median, beta - 1 the within-(domain, layer) least-squares slope of log ratio on c, a_l the
    # median over the layer's cells with a ratio of log ratio - (beta - 1) c. Recomputed here by loops.
    own, cen = {}, {}
    for d in hy.domains:
        rows = hy.domain == d
        for li in range(len(moe.layers)):
            done = hy.exact[rows][:, li]
            f = np.where(done, fa.ce[rows][:, li], 0).sum(0)
            e = np.where(done, hy.ce[rows][:, li], 0).sum(0)
            ok = done.any(0) & (f > 0)
            own[d, li] = np.where(ok, e / np.where(ok, f, 1), np.nan)
            mean = fa.ce[rows][:, li].mean(0)
            logf = np.log(np.where(mean > 0, mean, np.nan), where=mean > 0, out=np.full_like(mean, np.nan))
            cen[d, li] = np.nan_to_num(logf - np.nanmedian(logf))  # no fast CE: the layer's median ratio
    sxy = sxx = 0.0
    for key, r in own.items():
        m = np.isfinite(r)
        if m.sum() >= 2:
            x, y = cen[key][m] - cen[key][m].mean(), np.log(r[m]) - np.log(r[m]).mean()
            sxy, sxx = sxy + x @ y, sxx + x @ x
    beta = min(1.0, max(0.5, 1 + sxy / sxx))
    assert hy.settings["hybrid"]["beta"] == pytest.approx(beta, abs=1e-4)
    beta = hy.settings["hybrid"]["beta"]
    for li in range(len(moe.layers)):
        a = np.median([v for d in hy.domains for v in
                       (np.log(own[d, li]) - (beta - 1) * cen[d, li])[np.isfinite(own[d, li])]])
        for d in hy.domains:
            scale = np.where(np.isfinite(own[d, li]), own[d, li], np.exp(a + (beta - 1) * cen[d, li]))
            for i in np.flatnonzero(hy.domain == d):
                rest = ~hy.exact[i, li]
                np.testing.assert_allclose(hy.ce[i, li, rest], fa.ce[i, li, rest] * scale[rest], rtol=1e-3)
    assert hy.settings["hybrid"]["exact_cells"] == sum(int(hy.exact[hy.domain == d].all(axis=0).sum())
                                                       for d in hy.domains)
    # every input is run clean once: later rounds take its batch's kept clean run
    assert hy.settings["exact_stats"]["clean_rows"] == len(hy.domain)
    # 12 inputs a domain and a planted driver: a probe is 4 of a domain's inputs, and the first round after the
    # calibration probes, asking only those of the domains it flags a cell in (their batches of 8 hold other inputs
    # too); the half is 6 of them
    from expertscope.config import DriverConfig

    model = tiny_model("mixtral", seed=0, initializer_range=0.3, num_local_experts=8)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[5] *= 8.0
    planted = MoEModel.from_model(model, tokenizer=tiny_tokenizer())
    many = {d: [f"{t} {i}" for i in range(12) for t in texts][:12] for d, texts in SHORT.items()}
    hy = C.causal_effects(planted, many, method="hybrid", batch_size=8, drivers=DriverConfig(ce_floor=1e-9))
    rounds = hy.settings["hybrid"]["rounds"]
    assert hy.settings["hybrid"]["probe_inputs"] == 2 * 4 and len(rounds) >= 3
    assert rounds[1]["inputs"] in (4, 8) and hy.settings["hybrid"]["half_inputs"] == 2 * 6  # one domain's or both
    assert hy.settings["exact_stats"]["clean_rows"] == 24  # each input run clean once over >= 3 rounds
    # the rounds' batches: larger than the call's 8 (a tiny model's clean runs are small), each input in one
    sizes = hy.settings["hybrid"]["round_batch_sizes"]
    assert sum(sizes) == 24 and max(sizes) > 8
    # with no clean run kept, each round runs every batch it asks a cell of clean again: the same batches, so the
    # same values, bit for bit
    import expertscope.causal.exact as E

    monkeypatch.setattr(E.CleanCache, "keep", lambda self, key, run: None)
    again = C.causal_effects(planted, many, method="hybrid", batch_size=8, drivers=DriverConfig(ce_floor=1e-9))
    assert again.settings["exact_stats"]["clean_rows"] > 24
    assert np.array_equal(again.ce, hy.ce) and np.array_equal(again.exact, hy.exact)
    # the per-input mask survives a save and a load
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        back = C.CausalEffects.load(hy.save(tmp))
    assert np.array_equal(back.exact_per_input(), hy.exact)
    assert hy.settings["hybrid"]["rounds"][0]["round"].startswith("calibrate")
    agree = C.spearman_by_layer(hy, ex)
    assert set(agree.columns) >= {"domain", "layer", "spearman"}


def test_the_clean_cache_counts_shared_storage_once_and_keeps_within_its_budget() -> None:
    from expertscope.causal._engine import CleanRun
    from expertscope.causal.exact import CleanCache

    x = torch.zeros(10, 8)  # 320 bytes
    run = CleanRun(logits=torch.zeros(2, 5), inputs={0: ((x,), {"pos": (x[:2], x)}), 1: ((x,), {})})
    cache = CleanCache([0, 1], budget=400)
    cache.keep("a", run)  # 40 + 320: x's storage once, whatever the views of it
    assert cache.used == 360 and "a" in cache.runs
    cache.keep("b", run)  # 360 more would pass 400: not kept
    assert cache.used == 360 and "b" not in cache.runs


def _driver_tables(exact: np.ndarray, h: Any, dom: np.ndarray, rule: Any) -> tuple[Any, Any]:
    """The driver tables (``driver_experts(...).df``) under ``rule`` of ``exact`` ``(N, L, E)`` (every cell
    computed) and of the :class:`~expertscope.causal.hybrid.Hybrid` ``h``'s table (exact where it computed), the
    inputs' domains ``dom``."""
    from expertscope.causal import driver_experts
    from expertscope.causal.effects import CausalEffects

    N, L, E = exact.shape

    def as_effects(ce: np.ndarray, ex: np.ndarray) -> CausalEffects:
        return CausalEffects(ce=ce, domain=dom, text_index=np.arange(N), layers=list(range(L)), exact=ex)

    return (driver_experts(as_effects(exact, np.ones((L, E), bool)), rule).df,
            driver_experts(as_effects(h.ce, h.exact_per_input()), rule).df)


def test_hybrid_screen_and_verify_on_a_table() -> None:
    """The rounds on given arrays (no model): the last layer and, in layers of 16+ experts, the 2 experts nearest
    the layer's median fast CE (on the probe inputs) first; then every cell the relaxed rule could flag; a planted
    driver whose fast estimate stands out ends exact on every input and flagged, cells far below the floor never
    computed."""
    from expertscope.causal.hybrid import Hybrid

    g = np.random.default_rng(0)
    N, L, E = 24, 4, 16
    exact = g.gamma(4.0, 1e-4, size=(N, L, E))
    exact[:, 1, 5] *= 40  # a driver: 40x its layer
    fast = exact * 0.2 * g.uniform(0.8, 1.25, size=exact.shape)  # fast: a fifth of the scale, some noise
    dom = np.array(["a"] * N, dtype=object)
    h = Hybrid(fast, dom, [0, 1, 2, 3], {la: list(range(E)) for la in range(4)}, E)
    rounds = []
    for ask in h.rounds():
        rounds.append(ask)
        h.verified(exact, ask)
    assert rounds[0].shape == (N, L, E) and rounds[0][:, 3].all()  # the calibration layer in full
    med = np.median(fast.mean(0), axis=1)
    for la in range(3):
        nearest = np.argsort(np.abs(fast.mean(0)[la] - med[la]), kind="stable")[:2]
        assert rounds[0][h.probe][:, la, nearest].all() and not rounds[0][~h.probe][:, la, nearest].any()
    assert h.exact[0, 1, 5] and np.array_equal(h.ce[:, 1, 5], exact[:, 1, 5])
    # never computed: fast x one ratio per cell, exp(a + (beta - 1) c) with c its centred log fast mean; here fast is
    # exact x 0.2 x noise, so the ratio is about 5 and beta within its bounds
    none = ~h.done[:, 0].any(axis=0)
    assert none.sum() >= 10
    r = h.ce[:, 0, none] / fast[:, 0, none]
    assert np.allclose(r, r[:1]) and (r > 4).all() and (r < 6.5).all()
    c = np.log(fast.mean(0)[0]) - np.median(np.log(fast.mean(0)[0]))
    assert 0.5 <= h.beta <= 1.0
    np.testing.assert_allclose(np.log(r[0]) - np.log(r[0, 0]), (h.beta - 1) * (c[none] - c[none][0]), atol=1e-9)
    assert h.summary()["exact_cells"] == int(h.exact.sum()) < L * E
    # under the other rules too, what the rule picks on the final table was computed exactly
    from expertscope.config import DriverConfig

    for rule in (DriverConfig(rule="top", top=2), DriverConfig(rule="z", z=2.0)):
        h = Hybrid(fast, dom, [0, 1, 2, 3], {la: list(range(E)) for la in range(4)}, E, rule=rule)
        for ask in h.rounds():
            h.verified(exact, ask)
        mean = h.ce.mean(0)
        if rule.rule == "top":
            picked = mean >= -np.sort(-mean, axis=1)[:, 1:2]
        else:
            picked = mean >= mean.mean(1, keepdims=True) + 2.0 * mean.std(1, keepdims=True)
        assert picked.any() and h.exact[0][picked].all(), rule.rule


def test_hybrid_probes_a_candidate_before_computing_it_everywhere() -> None:
    """A cell that fast overstates 6x is flagged on the layer-ratio table, computed on its domain's probe inputs
    (a quarter) only, and, rescaled by its own ratio there, drops out; the planted driver is computed on every
    input. Cells the probe did not reach hold fast x the cell's own probe ratio."""
    from expertscope.causal.hybrid import PROBE_SHARE, Hybrid

    g = np.random.default_rng(5)
    N, L, E = 40, 4, 16
    exact = g.gamma(4.0, 1e-4, size=(N, L, E))
    exact[:, 1, 5] *= 40  # a driver
    fast = exact * 0.2 * g.uniform(0.8, 1.25, size=exact.shape)
    fast[:, 2, 7] *= 6  # fast overstates this one: a false candidate
    dom = np.array(["a"] * N, dtype=object)
    h = Hybrid(fast, dom, [0, 1, 2, 3], {la: list(range(E)) for la in range(4)}, E)
    assert h.probe.sum() == int(np.ceil(PROBE_SHARE * N)) == 10
    for ask in h.rounds():
        assert (ask & h.done).sum() == 0  # nothing computed twice
        h.verified(np.where(ask, exact, np.nan), ask)
    assert h.exact[0, 1, 5] and h.done[:, 1, 5].all()
    assert h.probed[0, 2, 7] and not h.exact[0, 2, 7]
    assert np.array_equal(h.done[:, 2, 7], h.probe)  # its probe inputs only
    own = exact[h.probe, 2, 7].sum() / fast[h.probe, 2, 7].sum()
    np.testing.assert_allclose(h.ce[~h.probe, 2, 7], fast[~h.probe, 2, 7] * own, rtol=1e-12)
    assert h.summary()["probed_only_cells"] >= 1
    assert h.summary()["exact_share"] == pytest.approx(h.done.sum() / (N * L * E), abs=1e-4)


def test_hybrid_takes_a_probed_cell_to_half_its_inputs_before_all() -> None:
    """A cell high on its probe inputs (2.5x its layer) and low elsewhere: still flagged after its probe, it is
    computed on its domain's half (the probe inputs among them); there its estimate falls below the rule's bar, so
    the other half is never computed. The planted driver goes on to every input."""
    from expertscope.causal.hybrid import HALF_SHARE, Hybrid
    from expertscope.config import DriverConfig

    g = np.random.default_rng(7)
    N, L, E = 40, 4, 16
    exact = g.gamma(4.0, 1e-4, size=(N, L, E))
    exact[:, 1, 5] *= 40  # a driver
    fast = exact * 0.2 * g.uniform(0.8, 1.25, size=exact.shape)
    fast[:, 2, 7] *= 6  # fast overstates this one everywhere
    dom = np.array(["a"] * N, dtype=object)
    rule = DriverConfig(ce_floor=1e-6)
    h = Hybrid(fast, dom, [0, 1, 2, 3], {la: list(range(E)) for la in range(4)}, E, rule=rule)
    assert h.half.sum() == int(np.ceil(HALF_SHARE * N)) and not (h.probe & ~h.half).any()  # nested draws
    exact[h.probe, 2, 7] *= 2.5  # high where it is probed ...
    exact[h.half & ~h.probe, 2, 7] *= 0.2  # ... low on the rest of the half
    for ask in h.rounds():
        assert (ask & h.done).sum() == 0
        h.verified(np.where(ask, exact, np.nan), ask)
    assert np.array_equal(h.done[:, 2, 7], h.half), h.done[:, 2, 7].astype(int)
    assert h.halved[0, 2, 7] and not h.exact[0, 2, 7]
    assert h.done[:, 1, 5].all()


def test_hybrid_goes_on_with_a_driver_its_probe_understates() -> None:
    """A driver at 2.34x its layer whose probe inputs are its weakest (0.6x of the rest): rescaled by its own probe
    ratio, it looks 1.56x, which the rule relaxed by 1.25 (bar 1.6x) would drop; relaxed by ``PROBED_MARGIN`` (1.4:
    bar 1.43x) it is computed on every input and found, as exact finds it."""
    from expertscope.causal.hybrid import PROBED_MARGIN, Hybrid
    from expertscope.config import DriverConfig

    assert PROBED_MARGIN > 2 / 1.6
    g = np.random.default_rng(4)
    N, L, E = 40, 4, 16
    exact = g.gamma(50.0, 2e-5, size=(N, L, E)) * 1e2
    exact[:, 2, 9] *= 2.6
    fast = exact * 0.2 * g.uniform(0.95, 1.05, size=exact.shape)
    dom = np.array(["a"] * N, dtype=object)
    rule = DriverConfig(stability_pairs=0)
    h = Hybrid(fast, dom, list(range(L)), {la: list(range(E)) for la in range(L)}, E, rule=rule)
    exact[h.probe, 2, 9] *= 0.6  # its probe inputs are its weakest
    for ask in h.rounds():
        h.verified(np.where(ask, exact, np.nan), ask)
    assert h.exact[0, 2, 9]

    a, b = _driver_tables(exact, h, dom, rule)
    assert a[a.is_driver][["layer", "expert"]].values.tolist() == [[2, 9]]
    assert (a.is_driver.to_numpy() == b.is_driver.to_numpy()).all()


def test_hybrid_slope_is_the_within_layer_slope_of_exact_on_fast() -> None:
    """``Hybrid.slope``: exact = k_l * fast**0.7 per cell (a per-layer k, noise per cell) gives 0.7 back; outside
    [SLOPE_MIN, 1] it is bounded; with fewer than two cells a layer it is 1. On a table whose fast spreads cells
    wider than exact (exact's cell means times noise), the rescaled cells never computed are nearer exact's than
    with one ratio a layer."""
    from expertscope.causal.hybrid import SLOPE_MIN, Hybrid

    g = np.random.default_rng(2)
    D, L, E = 2, 3, 16
    c = g.normal(0, 0.6, size=(D, L, E))
    c -= np.median(c, axis=2, keepdims=True)
    k = g.normal(0, 1, size=(1, L, 1))
    for beta in (0.7, 0.2, 1.4):
        log_ratio = k + (beta - 1) * c + g.normal(0, 0.01, size=c.shape)
        assert Hybrid.slope(log_ratio, c) == pytest.approx(min(1.0, max(SLOPE_MIN, beta)), abs=0.02)
    one = np.full(c.shape, np.nan)
    one[:, :, 0] = 0.0
    assert Hybrid.slope(one, c) == 1.0
    # errors in variables: fast's cell means are exact's times noise, so the cells fast puts high are overstated
    N = 48
    cell = g.gamma(2.0, 5e-4, size=(1, 4, E))
    exact = cell * g.uniform(0.7, 1.4, size=(N, 4, E))
    fast = 0.2 * exact * np.exp(g.normal(0, 0.4, size=(1, 4, E)))
    dom = np.array(["a"] * N, dtype=object)
    h = Hybrid(fast, dom, [0, 1, 2, 3], {la: list(range(E)) for la in range(4)}, E)
    full = np.ones(exact.shape, bool)
    full[:, :3, 8:] = False  # half of each layer but the last computed: the slope's data
    h.verified(exact, full)
    assert h.beta < 0.95
    est = h.ce[:, :3, 8:].mean(0)
    one_ratio = fast[:, :3, 8:].mean(0) * (exact[:, :3, :8].sum(0) / fast[:, :3, :8].sum(0)).mean(1, keepdims=True)
    truth = exact[:, :3, 8:].mean(0)
    assert np.median(np.abs(np.log(est / truth))) < np.median(np.abs(np.log(one_ratio / truth)))


def test_hybrid_verifies_a_cell_on_the_domains_it_could_drive() -> None:
    """Two domains, a driver planted in domain b only: it is computed exactly on b's inputs, never on a's (their
    cell holds the scaled fast CE); each round asks, per cell, for inputs of one domain: its probe inputs, or
    the rest of them."""
    from expertscope.causal.hybrid import Hybrid

    g = np.random.default_rng(1)
    N, L, E = 40, 4, 16
    exact = g.gamma(4.0, 1e-4, size=(N, L, E))
    dom = np.array(["a"] * 20 + ["b"] * 20, dtype=object)
    exact[20:, 1, 5] *= 40  # b's driver
    fast = exact * 0.2 * g.uniform(0.8, 1.25, size=exact.shape)
    h = Hybrid(fast, dom, [0, 1, 2, 3], {la: list(range(E)) for la in range(4)}, E)
    asked_total = np.zeros(exact.shape, bool)
    for r, ask in enumerate(h.rounds()):
        assert ask.shape == exact.shape
        which = h.which(ask)
        assert set(which) == {h.lays[li] for li in np.flatnonzero(ask.any(axis=(0, 2)))}
        for rows in h.rows:
            part = ask[rows]
            probe = h.probe[rows]
            # a cell's rows: none, or (after the calibration round) its probe rows, the rest of its domain's half,
            # or the rest of its domain's
            half = h.half[rows]
            for li, e in zip(*np.nonzero(part.any(axis=0)), strict=True):
                need, before = part[:, li, e], h.done[rows][:, li, e]
                assert r == 0 or any(np.array_equal(need, s & ~before) for s in (probe, half, np.ones_like(half))), \
                    (r, li, e)
        asked_total |= ask
        h.verified(np.where(ask, exact, np.nan), ask)  # what the engine returns: NaN outside the ask
    assert h.exact[1, 1, 5] and not h.exact[0, 1, 5]
    assert np.array_equal(h.ce[20:, 1, 5], exact[20:, 1, 5]) and not asked_total[:20, 1, 5].any()
    assert np.isfinite(h.ce).all()  # every cell filled: exact or scaled fast
    assert (h.exact_per_input() == asked_total).all()
    assert h.summary()["cells"] == 2 * L * E


def test_hybrid_makes_the_median_of_a_borderline_layer_exact() -> None:
    """Eight experts a layer: where a decision about an exact cell of a layer is within ``FULL_BAND_MARGIN`` of
    the rule's bars (a driver at 2.15x the median against a bar of 2x), the experts around that layer's median (the
    middle two, one more on each side) are computed on every input, so the test and ratio compare against exact's
    own median; a driver far above every bar (20x) leaves its layer's median estimated (only the driver is
    computed there). The drivers found on hybrid's table equal those on exact's."""
    from expertscope.causal.hybrid import Hybrid
    from expertscope.config import DriverConfig

    g = np.random.default_rng(3)
    N, L, E = 40, 4, 8
    exact = g.gamma(16.0, 2.5e-4, size=(N, L, E))
    exact[:, 2, 6] *= 20  # a clear driver of every domain at layer 2
    exact[:, 1, 3] *= 2.15  # a borderline one at layer 1
    # fast: a fifth of the scale, and a ranking that is off by expert (as fast is at depth)
    fast = exact * 0.2 * g.uniform(0.5, 2.0, size=(1, L, E)) * g.uniform(0.9, 1.1, size=exact.shape)
    dom = np.array(["a"] * 20 + ["b"] * 20, dtype=object)
    rule = DriverConfig(stability_pairs=0)
    h = Hybrid(fast, dom, list(range(L)), {la: list(range(E)) for la in range(L)}, E, rule=rule)
    for ask in h.rounds():
        h.verified(np.where(ask, exact, np.nan), ask)
    for di, rows in enumerate(h.rows):
        assert h.exact[di, 2, 6] and h.exact[di, 1, 3]
        middle = np.argsort(h.ce[rows].mean(0)[1], kind="stable")[2:6]
        assert h.exact[di, 1, middle].all(), (di, middle, h.exact[di, 1])  # borderline: all inputs
        assert np.array_equal(np.flatnonzero(h.probed[di, 2]), [6])  # clear: the driver alone

    a, b = _driver_tables(exact, h, dom, rule)
    assert a.is_driver.sum() >= 4 and (a.is_driver.to_numpy() == b.is_driver.to_numpy()).all()


def test_hybrid_computes_a_median_expert_that_fast_puts_low_in_a_small_layer() -> None:
    """Eight experts a layer; expert 3 sits at 1.99x its layer's median, just under the rule's ratio of 2 (a near
    decision), and fast puts expert 1, one of the two the median is taken from, at 0.7x instead of 1.07x: out of
    the middle four. Its estimate is within ``BAND_MARGIN`` of the median, so it is computed with the band; left
    estimated, it drags the median down and expert 3 passes as a driver at 2.26x (measured on this table). The
    drivers found on hybrid's table equal exact's: none."""
    from expertscope.causal.hybrid import Hybrid
    from expertscope.config import DriverConfig

    g = np.random.default_rng(11)
    N, L, E = 40, 4, 8
    means = np.ones((L, E)) * np.array([0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3])[None] * 2.5e-3
    means[1] = np.array([0.72, 1.07, 0.73, 1.89, 0.93, 0.79, 1.14, 1.29]) * 2.5e-3
    exact = means[None] * g.gamma(50.0, 1 / 50.0, size=(N, L, E))
    fast = exact * 0.2 * g.uniform(0.95, 1.05, size=exact.shape)
    fast[:, 1, 1] *= 0.66  # a median expert put low
    dom = np.array(["a"] * N, dtype=object)
    rule = DriverConfig(stability_pairs=0)
    h = Hybrid(fast, dom, list(range(L)), {la: list(range(E)) for la in range(L)}, E, rule=rule)
    for ask in h.rounds():
        h.verified(np.where(ask, exact, np.nan), ask)
    assert h.exact[0, 1, 3] and h.exact[0, 1, 1]

    a, b = _driver_tables(exact, h, dom, rule)
    row = a[(a.layer == 1) & (a.expert == 3)].iloc[0]
    assert 1.9 < row.ratio < 2.0 and row.pass_test  # near the ratio's bar, and only the ratio holds it back
    assert not a.is_driver.any() and not b.is_driver.any()


# ----- drivers, causal rate ------------------------------------------------------------------------
def test_planted_driver_is_found() -> None:
    model = tiny_model("mixtral", seed=0, initializer_range=0.3, num_local_experts=8)
    layer, expert = 1, 5
    with torch.no_grad():
        model.model.layers[layer].mlp.experts.down_proj[expert] *= 8.0  # its output dominates the layer's
        model.model.layers[layer].mlp.gate.weight *= 0.1  # near-tied routing: every expert is in contention
    moe = MoEModel.from_model(model, tokenizer=tiny_tokenizer())
    res = C.causal_effects(moe, TEXTS, batch_size=4)
    table = C.driver_experts(res, rule="z", z=2.0)
    for d in TEXTS:
        assert (layer, expert) in table.targets(d)
    row = table.df[(table.df.domain == "alpha") & (table.df.layer == layer) & (table.df.expert == expert)].iloc[0]
    assert row.ce_mean >= row.threshold == pytest.approx(row.layer_mean + 2.0 * row.layer_sd)
    assert table.settings["rule"] == "z" and table.settings["causal_effects"]["method"] == "exact"
    rate = C.causal_rate(moe, TEXTS, table)
    r = rate[(rate.domain == "alpha") & (rate.layer == layer)].iloc[0]
    assert 0 < r.causal_rate <= 1 and r.n_drivers >= 1
    assert rate[rate.n_drivers == 0].causal_rate.eq(0).all()


def test_causal_rate_from_selections_by_hand() -> None:
    sel = {0: np.array([[0, 1], [2, 3], [1, 3], [2, 0]]), 1: np.array([[1, 2], [3, 0]])}
    got = C.causal_rate_from_selections(sel, {0: {1}, 1: set()})
    assert got == {0: (2, 4), 1: (0, 2)}  # tokens 0 and 2 hold expert 1 at layer 0
    got = C.causal_rate_from_selections(sel, {0: {0, 3}, 1: [0]})
    assert got == {0: (4, 4), 1: (1, 2)}


# ----- checkpoints, persistence --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "hybrid"])
def test_interrupted_run_resumes_bit_identically(make_tiny: Any, tmp_path: Any, method: str) -> None:
    moe = _moe(make_tiny, "mixtral")
    full = C.causal_effects(moe, SHORT, method=method, batch_size=2, hybrid_top=2)
    ck = tmp_path / "ck.npz"

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.causal_effects(moe, SHORT, method=method, batch_size=2, hybrid_top=2, checkpoint=ck, on_batch=stop)
    resumed = C.causal_effects(moe, SHORT, method=method, batch_size=2, hybrid_top=2, checkpoint=ck, resume=True)
    assert resumed.settings["resumed_rows"] > 0
    assert resumed.ce.tobytes() == full.ce.tobytes()
    assert resumed.settings["skipped"] == full.settings["skipped"]
    # Every row is done now: a resume runs no batch, and the engine's record comes from the checkpoint.
    again = C.causal_effects(moe, SHORT, method=method, batch_size=2, hybrid_top=2, checkpoint=ck, resume=True)
    assert again.ce.tobytes() == full.ce.tobytes()
    for key in ("engine", "prefix_reuse", "last_layer_block", "last_layer_note"):
        assert again.settings["exact_stats"][key] == full.settings["exact_stats"][key], key
    with pytest.raises(ConfigError, match="other inputs or settings"):
        C.causal_effects(moe, SHORT, method=method, batch_size=2, magnitude=2.0, checkpoint=ck, resume=True)


def test_save_load_round_trip(make_tiny: Any, tmp_path: Any) -> None:
    moe = _moe(make_tiny, "deepseek_v3")
    res = C.causal_effects(moe, TEXTS, experts=[0, 3], batch_size=4)
    assert np.isnan(res.ce[:, :, 1]).all() and not np.isnan(res.ce[:, :, 3]).any()
    res.save(tmp_path)
    back = C.CausalEffects.load(tmp_path)
    assert back.ce.tobytes() == res.ce.tobytes()
    assert back.layers == res.layers == moe.layers
    assert back.settings["magnitude"] == 1.0 and back.domains == ["alpha", "beta"]
    means = back.mean_by_domain()
    assert len(means) == 2 * len(moe.layers) * 8
    table = C.driver_experts(back, rule="z")
    table.save(tmp_path / "drivers.parquet")
    assert C.DriverTable.load(tmp_path / "drivers.parquet").settings["rule"] == "z"


# ----- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "bogus"}, ConfigError, "method"),
        ({"positions": "first"}, ConfigError, "positions"),
        ({"target": "tokens"}, ConfigError, "target"),
        ({"layers": [7]}, ConfigError, "no MoE layer 7"),
        ({"experts": [4]}, ConfigError, "expert 4"),
        ({"magnitude": 0.0}, ConfigError, "magnitude"),
        ({"target": "labels"}, ConfigError, "labels"),
    ],
)
def test_bad_input_one_line_errors(make_tiny: Any, kwargs: dict, error: type, match: str) -> None:
    moe = _moe(make_tiny, "mixtral")
    with pytest.raises(error, match=match) as info:
        C.causal_effects(moe, TEXTS, **kwargs)
    assert "\n" not in str(info.value) and ": " in str(info.value)


def test_empty_domain_is_a_data_error(make_tiny: Any) -> None:
    moe = _moe(make_tiny, "mixtral")
    with pytest.raises(DataError, match="no texts"):
        C.causal_effects(moe, {"a": ["x"], "empty": []})


def test_skip_rule_is_only_used_where_safe(make_tiny: Any) -> None:
    assert _engine.can_skip(_moe(make_tiny, "mixtral").sites[0])
    assert not _engine.can_skip(_moe(make_tiny, "qwen2_moe").sites[0])  # norm_topk_prob=False
    assert _engine.can_skip(_moe(make_tiny, "qwen2_moe", norm_topk_prob=True).sites[0])
    assert not _engine.can_skip(_moe(make_tiny, "deepseek_v3").sites[0])


# ----- CLI -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_drivers_writes_tables_and_fails_in_one_line(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from expertscope.cli.main import app

    model_dir = tmp_path / "m"
    tiny_model("mixtral", seed=0, initializer_range=0.3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    for name, texts in SHORT.items():  # each file's discovery part is what the drivers command reads
        (tmp_path / f"{name}.jsonl").write_text("".join(f'{{"text": "{t} {i}"}}\n' for i in range(4) for t in texts))
    args = ["drivers", "--model", str(model_dir), "--domain", f"alpha={tmp_path / 'alpha.jsonl'}",
            "--domain", f"beta={tmp_path / 'beta.jsonl'}", "-b", "2"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    for f in ("ce.parquet", "drivers.parquet", "causal_rate.parquet", "manifest.json"):
        assert (tmp_path / "run" / f).exists()
    assert not (tmp_path / "run" / "checkpoint.npz").exists()
    back = C.CausalEffects.load(tmp_path / "run")
    from expertscope.data.sources import load_domain

    n = sum(len(load_domain(f"{d}={tmp_path / f'{d}.jsonl'}", part="discovery")) for d in SHORT)
    assert back.ce.shape == (n, 3, 4) and 0 < n < 20
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--positions", "first"])
    assert bad.exit_code == 2 and "positions" in bad.output


# ----- decision positions --------------------------------------------------------------------------
def _task_domains() -> list[Any]:
    from expertscope.data.types import Domain, Example

    emo = Domain("emo", [Example(text="Ann: we won", label="joy"), Example(text="Ben: go away", label="anger"),
                         Example(text="Cy: boo", label="fear")], task="classification")
    mc = Domain("mc", [Example(text="Capital?", choices=("Ka", "Lo", "Mi", "Zu"), label="C"),
                       Example(text="Sum?", choices=("1", "2", "3", "4"), label="A")], task="multiple_choice")
    math = Domain("math", [Example(text="2+3?", answer="5", solution="2+3=5. #### 5"),
                           Example(text="4-1?", answer="3")], task="math")
    plain = Domain("plain", [Example(text="the cat sat"), Example(text="x = 1")])
    return [emo, mc, math, plain]


def _by_hand(tok: Any, domains: list[Any]) -> list[tuple[list[int], list[int]]]:
    """Token ids and decision positions written out for the character-level tiny tokenizer: every label and
    letter verbalisation starts with the same space character, so the decision is the position after it."""
    from expertscope.data import prompts

    out = []
    for d in domains:
        for ex in d.examples:
            if d.task is None:
                ids = tok(ex.text)["input_ids"]
                out.append((ids, [len(ids) - 1]))
                continue
            p = tok(prompts.prompt(d.task, ex))["input_ids"]
            space = tok(" ", add_special_tokens=False)["input_ids"]
            if d.task in ("classification", "multiple_choice"):
                ids = p + space  # teacher-forced through the shared " "; the next token is the label's first letter
                out.append((ids, [len(ids) - 1]))
            else:
                gold = " " + ex.solution if ex.solution else f" #### {ex.answer}"
                g = tok(gold, add_special_tokens=False)["input_ids"]
                ids = p + g[:-1]
                out.append((ids, list(range(len(p) - 1, len(ids)))))
    return out


def naive_decision_ce(moe: MoEModel, items: list[tuple[list[int], list[int]]], positions: str = "all",
                      label_ids: list[int] | None = None, m: float = 1.0) -> np.ndarray:
    """``(N, L, E)``: one full forward per (input, layer, expert); KL at each decision position, averaged."""
    out = np.zeros((len(items), len(moe.sites), moe.num_experts))
    with torch.no_grad():
        for n, (ids_l, dec) in enumerate(items):
            ids = torch.tensor([ids_l])
            rows = None if positions == "all" else list(range(dec[0], len(ids_l)))

            def logp(logits: torch.Tensor, dec: list[int] = dec) -> torch.Tensor:
                x = logits[0, dec].double()
                return (x if label_ids is None else x[:, label_ids]).log_softmax(-1)

            p = logp(moe.model(input_ids=ids).logits)
            for li, s in enumerate(moe.sites):
                for e in range(s.num_experts):
                    with _AddToColumn(s.module.weight, e, m, rows):
                        q = logp(moe.model(input_ids=ids).logits)
                    out[n, li, e] = float((p.exp() * (p - q)).sum(-1).clamp_min(0).mean())
    return out


def test_decision_positions_by_hand() -> None:
    from expertscope.causal.decision import decision_index, prepare_inputs

    tok = tiny_tokenizer()
    doms = _task_domains()
    prep, dom_of, tix = prepare_inputs(tok, doms, None, "task", None)
    hand = _by_hand(tok, doms)
    assert prep.token_ids == [h[0] for h in hand]
    assert prep.decisions == [h[1] for h in hand]
    assert prep.kinds == ["label"] * 3 + ["letter"] * 2 + ["answer"] * 2 + ["last"] * 2
    assert dom_of[3:5] == ["mc", "mc"] and tix[3:5] == [0, 1]
    # The emotion decision position predicts the gold label's first letter (" joy" -> "j").
    ids, dec = prep.token_ids[0], prep.decisions[0]
    assert tok.decode([ids[dec[0]]]) == " " and dec == [len(ids) - 1]
    # math: one position per gold token; the first predicts the leading space after "Answer:".
    assert len(prep.decisions[5]) == len(" 2+3=5. #### 5")
    # decision_index: after a shared prefix; 0 for single-token labels; the last gold token if it is a prefix.
    assert decision_index([[5, 1], [5, 2]], [5, 2]) == 1
    assert decision_index([[7], [8], [9]], [8]) == 0
    assert decision_index([[5], [5, 6]], [5]) == 0
    # decision="last": the prompt's last token, as in the first version.
    old, _, _ = prepare_inputs(tok, doms, None, "last", None)
    assert old.token_ids[0] == tok(doms[0].texts[0])["input_ids"] and old.decisions[0] == [len(old.token_ids[0]) - 1]
    # Truncation keeps the decision positions that fit and says when none did.
    cut, _, _ = prepare_inputs(tok, doms[2:3], None, "task", 12)
    assert cut.truncated == 2 and cut.lost == 2 and cut.decisions[0] == [11]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_exact_at_decision_positions_matches_naive_loop(make_tiny: Any, family: str, positions: str) -> None:
    moe = _moe(make_tiny, family)
    doms = _task_domains()
    res = C.causal_effects(moe, doms, positions=positions, batch_size=3)
    ref = naive_decision_ce(moe, _by_hand(moe.tokenizer, doms), positions=positions)
    assert res.settings["decision"] == "task" and res.settings["decision_kinds"]["answer"] == 2
    assert ref.max() > 1e-2
    np.testing.assert_allclose(res.ce, ref, rtol=0, atol=ATOL)
    assert (res.ce >= 0).all()


@pytest.mark.slow
def test_decision_last_keeps_the_old_rule_and_labels_target(make_tiny: Any) -> None:
    moe = _moe(make_tiny, "mixtral")
    doms = _task_domains()
    tok = moe.tokenizer
    old = C.causal_effects(moe, doms, decision="last", batch_size=4)
    texts = [t for d in doms for t in d.texts]
    np.testing.assert_allclose(old.ce, naive_ce(moe, texts), rtol=0, atol=ATOL)
    # target="labels" on the emotion domain: KL over the labels' decision tokens (first letters here).
    emo = doms[0]
    res = C.causal_effects(moe, emo, target="labels", batch_size=2)
    ids = [tok(x, add_special_tokens=False)["input_ids"][0] for x in ("a", "f", "j")]  # anger, fear, joy
    assert res.settings["label_ids"] == ids
    ref = naive_decision_ce(moe, _by_hand(tok, [emo]), label_ids=ids)
    np.testing.assert_allclose(res.ce, ref, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_fisher_at_decision_positions_is_the_second_order_term(make_tiny: Any) -> None:
    moe = _moe(make_tiny, "qwen2_moe")
    doms = _task_domains()[1:3]
    m = 1e-2
    ex = C.causal_effects(moe, doms, magnitude=m, batch_size=4)
    fi = C.causal_effects(moe, doms, method="fisher", magnitude=m, batch_size=4)
    big = ex.ce > 1e-9
    assert np.median(np.abs(fi.ce[big] / ex.ce[big] - 1)) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_prefix_reuse_changes_no_value_and_recomputes_less(make_tiny: Any, family: str) -> None:
    moe = _moe(make_tiny, family)
    doms = _task_domains()
    for positions in ("all", "last"):
        on = C.causal_effects(moe, doms, positions=positions, batch_size=4)
        off = C.causal_effects(moe, doms, positions=positions, batch_size=4, prefix_reuse=False)
        assert on.settings["exact_stats"]["prefix_reuse"] is True
        assert off.settings["exact_stats"]["prefix_reuse"] is False
        np.testing.assert_allclose(on.ce, off.ce, rtol=1e-3, atol=1e-5)
        done_on = on.settings["exact_stats"]["recomputed_token_layers"]
        done_off = off.settings["exact_stats"]["recomputed_token_layers"]
        if positions == "last":  # only the answer spans onward are recomputed
            assert done_on < 0.8 * done_off
        else:
            assert done_on <= done_off
    # A small memory budget (one row per run) gives the same values.
    tiny = C.causal_effects(moe, doms, positions="last", batch_size=4, chunk_tokens=1)
    np.testing.assert_allclose(tiny.ce, on.ce, rtol=1e-3, atol=1e-5)
    assert tiny.settings["exact_stats"]["perturbed_runs"] == tiny.settings["exact_stats"]["computed"]


@pytest.mark.slow
def test_renormalising_router_restarts_where_the_expert_can_enter(make_tiny: Any) -> None:
    moe = _moe(make_tiny, "mixtral", num_local_experts=8)
    on = C.causal_effects(moe, SHORT, batch_size=4)
    off = C.causal_effects(moe, SHORT, batch_size=4, prefix_reuse=False)
    np.testing.assert_allclose(on.ce, naive_ce(moe, _flat(SHORT)), rtol=0, atol=ATOL)
    np.testing.assert_allclose(on.ce, off.ce, rtol=1e-3, atol=1e-5)
    # Rows whose expert cannot enter the top-k before position t restart at t.
    n_on, n_off = (r.settings["exact_stats"]["recomputed_token_layers"] for r in (on, off))
    assert n_on < n_off


@pytest.mark.slow
def test_sweep_items_use_the_decision_positions(make_tiny: Any) -> None:
    from expertscope.causal.sweep import causal_sweep

    moe = _moe(make_tiny, "qwen2_moe")
    doms = _task_domains()
    swept = causal_sweep(moe, doms)
    batched = C.causal_effects(moe, doms, batch_size=3)
    np.testing.assert_allclose(swept.ce, batched.ce, rtol=1e-3, atol=1e-5)
    old = causal_sweep(moe, doms, decision="last")
    np.testing.assert_allclose(old.ce, C.causal_effects(moe, doms, decision="last").ce, rtol=1e-3, atol=1e-5)


# ----- fast --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_fast_local_part_is_exact(make_tiny: Any, family: str) -> None:
    """For a small perturbation (no top-k change) with every output token, fast is the Fisher quadratic form
    of the exact local change: it equals exact KL to second order."""
    moe = _moe(make_tiny, family)
    doms = _task_domains()[1:3]
    m = 1e-2
    ex = C.causal_effects(moe, doms, magnitude=m, batch_size=4)
    fa = C.causal_effects(moe, doms, method="fast", magnitude=m, batch_size=4, fast_outputs=1000, fast_probes=0)
    big = ex.ce > 1e-9
    assert fa.settings["fast_stats"]["min_covered_mass"] == pytest.approx(1.0)
    assert np.median(np.abs(fa.ce[big] / ex.ce[big] - 1)) < 0.01
    # The memory budget (tokens per MoE call) changes no value (on 16 outputs: the chunking is the same code
    # whatever the outputs, and each output costs a backward product).
    kw = dict(method="fast", magnitude=m, batch_size=4, fast_outputs=16, fast_probes=0)
    whole = C.causal_effects(moe, doms, **kw)
    small = C.causal_effects(moe, doms, **kw, chunk_tokens=7)
    assert small.settings["fast_stats"]["min_covered_mass"] < 1.0  # not the all-outputs run again
    np.testing.assert_allclose(small.ce, whole.ce, rtol=2e-3, atol=1e-4 * whole.ce.max())  # fp32 rounding


@pytest.mark.parametrize("family", sorted(TINY_BUILDERS))
def test_fast_decomposed_local_change_equals_the_block_rerun(make_tiny: Any, monkeypatch: pytest.MonkeyPatch,
                                                              family: str) -> None:
    """The local change from the routing weights and every expert's output (``Σ_j Δw_j f_j``) is the block's own:
    on every tiny family fast's CE with it equals fast's CE with the block rerun per (expert, token) (the model's
    own code; fp32 rounding apart), and it was used on every layer."""
    import expertscope.causal.fast as F

    moe = _moe(make_tiny, family)
    doms = _task_domains()[1:3]
    kw = dict(method="fast", batch_size=4, fast_probes=0, fast_outputs=16)
    monkeypatch.setattr(F, "LOCAL", "rerun")
    ref = C.causal_effects(moe, doms, **kw)
    monkeypatch.setattr(F, "LOCAL", "auto")
    got = C.causal_effects(moe, doms, **kw)
    st, st_ref = got.settings["fast_stats"], ref.settings["fast_stats"]
    assert st["local_rerun"] == 0 and st["local_decomposed"] == st_ref["local_rerun"] > 0
    assert np.nanmax(ref.ce) > 0
    np.testing.assert_allclose(got.ce, ref.ce, rtol=1e-4, atol=1e-6 * np.nanmax(ref.ce))


def test_fast_reruns_the_block_where_the_decomposition_disagrees(make_tiny: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter whose routing weights are not the block's (here: doubled) fails the per-layer check against the
    block: those layers are rerun, and fast's CE is the rerun's (the decomposition's own values are wrong there).
    """
    import expertscope.causal.fast as F

    moe = _moe(make_tiny, "mixtral")
    doms = _task_domains()[1:3]
    kw = dict(method="fast", batch_size=4, fast_probes=0, fast_outputs=16)
    monkeypatch.setattr(F, "LOCAL", "rerun")
    ref = C.causal_effects(moe, doms, **kw)
    monkeypatch.setattr(F, "LOCAL", "auto")
    site = moe.sites[0]
    route = type(site.adapter).site_route

    def doubled(self: Any, s: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, w = route(self, s, logits)
        return idx, 2 * w if s is site else w

    g = torch.Generator().manual_seed(0)
    h, z = torch.randn(6, site.adapter.hidden_size(site), generator=g), torch.randn(6, site.num_experts, generator=g)
    right = F.decomposed_delta(site, h, z, torch.ones(6), [0, 1], 1.0, 8192)
    monkeypatch.setattr(type(site.adapter), "site_route", doubled)
    wrong = F.decomposed_delta(site, h, z, torch.ones(6), [0, 1], 1.0, 8192)
    assert wrong.shape == (2, 6, h.shape[1]) and not torch.allclose(wrong, right, rtol=0.1)
    got = C.causal_effects(moe, doms, **kw)
    st = got.settings["fast_stats"]
    batches = st["local_rerun"] + st["local_decomposed"]
    assert st["local_rerun"] == batches // len(moe.sites) >= 1  # the first MoE layer, every batch
    np.testing.assert_allclose(got.ce, ref.ce, rtol=1e-4, atol=1e-6 * np.nanmax(ref.ce))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "cfg"), [("mixtral", {"num_local_experts": 8}), ("qwen2_moe", {}),
                                             ("deepseek_v3", {})])
def test_fast_ranks_like_exact(make_tiny: Any, family: str, cfg: dict) -> None:
    """At magnitude 1 (top-k changes included) fast's per-layer ranking agrees with exact. Measured median
    per-(domain, layer) Spearman with the defaults (64 outputs, 8 probes): 0.82 / 0.90 / 0.96 (fisher: 0.65 /
    0.50 / -0.11)."""
    moe = _moe(make_tiny, family, **cfg)
    doms = _task_domains()
    ex = C.causal_effects(moe, doms, batch_size=4)
    fa = C.causal_effects(moe, doms, method="fast", batch_size=4)
    assert C.spearman_by_layer(fa, ex).spearman.median() >= 0.75
    assert fa.settings["exact_stats"] is None and fa.settings["fast_stats"]["backward_products"] > 0


def test_sweep_takes_the_causal_config(make_tiny: Any) -> None:
    """One settings object for both entry points: the sweep's defaults are CausalConfig's (chunk_tokens was
    4096 in the sweep, 8192 in the config), and what the sweep cannot do is one line."""
    from expertscope.causal.sweep import causal_sweep
    from expertscope.config import CausalConfig

    moe = _moe(make_tiny, "mixtral")
    with pytest.raises(ConfigError, match="method='exact'"):
        causal_sweep(moe, ["x"], method="fast")
    with pytest.raises(ConfigError):
        causal_sweep(moe, ["x"], CausalConfig(magnitude=2.0), magnitude=3.0)  # a keyword contradicting config
    res = causal_sweep(moe, ["x"], limit=1)
    assert res.settings["chunk_tokens"] == CausalConfig().chunk_tokens and res.settings["method"] == "exact"


def test_config_restrictions_are_read_from_the_config() -> None:
    """``CausalConfig(only_layers=..., only_experts=...)`` restricts the pairs computed exactly as the keyword
    arguments do (it was ignored outside the study's stage); the restricted values equal the full run's."""
    from expertscope.config import CausalConfig

    moe = MoEModel.from_model(tiny_model("mixtral", seed=0, initializer_range=0.3), tokenizer=tiny_tokenizer())
    full = C.causal_effects(moe, SHORT, method="exact").to_frame()
    cfg = C.causal_effects(moe, SHORT, config=CausalConfig(method="exact", only_layers=(1,), only_experts=(0, 2)))
    kw = C.causal_effects(moe, SHORT, method="exact", layers=[1], experts=[0, 2])
    a, b = cfg.to_frame(), kw.to_frame()
    assert a.equals(b)
    done = a.dropna(subset=["ce"])
    assert set(zip(done.layer, done.expert, strict=True)) == {(1, 0), (1, 2)}
    ref = full.set_index(["domain", "input", "layer", "expert"])["ce"]
    got = done.set_index(["domain", "input", "layer", "expert"])["ce"]
    np.testing.assert_allclose(got.to_numpy(), ref.loc[got.index].to_numpy(), atol=ATOL)
