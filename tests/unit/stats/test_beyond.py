"""Co-activation, paths, output-aware importance and recorded routes against independent references:
naive counts from the routers' own calls (one text at a time, no padding) and norms computed by hand from
the experts' weights."""

from __future__ import annotations

import base64
import io
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import expertscope as es
from expertscope.errors import ConfigError, DataError
from expertscope.models.hooks import RouterHooks
from expertscope.models.model import MoEModel
from expertscope.testing import tiny_tokenizer

TEXTS = {
    "alpha": ["the cat sat", "a dog ran far away", "hello", "abc abc abc abc", "moe routing is fun"],
    "beta": ["1 + 2 = 3", "x = 42 * 7", "99 bottles", "0.5 - 0.25 = 0.25"],
}


def _moe(make_tiny, family: str = "mixtral", **cfg) -> MoEModel:
    return MoEModel.from_model(make_tiny(family, **cfg), tokenizer=tiny_tokenizer())


def _router_calls(moe: MoEModel, text: str) -> tuple[torch.Tensor, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """One text, no padding: input ids and, per layer, the router's own (indices, weights) as numpy."""
    ids = moe.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), RouterHooks(moe, record=True) as hooks:
        moe.model(input_ids=ids)
    return ids, {la: (hooks.calls[la][0].indices.numpy(), hooks.calls[la][0].weights.numpy()) for la in moe.layers}


def _routes_of(moe: MoEModel, text: str) -> np.ndarray:
    """``(T, L, k)`` selections of one text, ordered by gate weight (largest first) as engines list them."""
    _, calls = _router_calls(moe, text)
    cols = []
    for la in moe.layers:
        idx, w = calls[la]
        order = np.argsort(-w, axis=1, kind="stable")
        cols.append(np.take_along_axis(idx, order, 1))
    return np.stack(cols, axis=1).astype(np.int64)


# ----- co-activation ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_coactivation_equals_naive_counts_from_router_calls(make_tiny, one_torch_thread) -> None:
    moe = _moe(make_tiny)
    prof = es.profile(moe, TEXTS, batch_size=3, importance=False)
    co = es.coactivation(prof)
    table, trans, paths = co.to_frame(), co.transitions_frame(), co.paths_frame(top=1000)
    L, E = len(moe.layers), moe.num_experts
    for dom, texts in TEXTS.items():
        pair = np.zeros((L, E, E))
        tr = np.zeros((max(L - 1, 0), E, E))
        pc: Counter = Counter()
        n = 0
        for text in texts:
            r = _routes_of(moe, text)
            for tok in r:
                n += 1
                for li in range(L):
                    for a in tok[li]:
                        for b in tok[li]:
                            pair[li, a, b] += 1
                        if li + 1 < L:
                            for b in tok[li + 1]:
                                tr[li, a, b] += 1
                for s in range(L - co.window + 1):
                    pc[(s, tuple(int(x) for x in tok[s:s + co.window, 0]))] += 1
        sub = table[table.domain == dom]
        for row in sub.itertuples():
            li = moe.layers.index(row.layer)
            assert row.count == pair[li, row.expert_a, row.expert_b]
            if pair[li, row.expert_a, row.expert_a]:
                p = pair[li, row.expert_a, row.expert_b] / pair[li, row.expert_a, row.expert_a]
                assert row.p_b_given_a == pytest.approx(p, abs=1e-12)
                pb = pair[li, row.expert_b, row.expert_b] / n
                if pb:
                    assert row.lift == pytest.approx(p / pb, rel=1e-12)
        for row in trans[trans.domain == dom].itertuples():
            li = moe.layers.index(row.layer)
            assert row.count == tr[li, row.expert_a, row.expert_b]
        got = {(moe.layers.index(r.start_layer), tuple(int(x) for x in r.path.split(">"))): r.count
               for r in paths[paths.domain == dom].itertuples()}
        assert got == dict(pc)
        # I(S_l; S_l+1) from the naive transition counts, by hand
        cons = co.consistency_frame()
        for row in cons[cons.domain == dom].itertuples():
            li = moe.layers.index(row.layer)
            p = tr[li] / tr[li].sum()
            pa, pb = p.sum(1), p.sum(0)
            mi = sum(p[a, b] * math.log2(p[a, b] / (pa[a] * pb[b])) for a in range(E) for b in range(E) if p[a, b])
            assert row.mi_bits == pytest.approx(mi, abs=1e-10)


def test_coactivation_is_mergeable_and_model_path_agrees(make_tiny, one_torch_thread) -> None:
    moe = _moe(make_tiny)
    a = es.profile(moe, {"alpha": TEXTS["alpha"]}, batch_size=2, importance=False).coactivation
    b = es.profile(moe, {"beta": TEXTS["beta"]}, batch_size=4, importance=False).coactivation
    whole = es.coactivation(moe, TEXTS, batch_size=5)
    merged = a.merge(b)
    pd_eq = merged.to_frame().equals(whole.to_frame())
    assert pd_eq
    assert merged.paths_frame().equals(whole.paths_frame())


def test_coactivation_save_load_round_trip(make_tiny, tmp_path, one_torch_thread) -> None:
    moe = _moe(make_tiny)
    prof = es.profile(moe, TEXTS, batch_size=3, importance=False)
    prof.save(tmp_path)
    back = es.RoutingProfile.load(tmp_path)
    assert back.coactivation is not None and back.routes is not None
    assert back.coactivation.to_frame().equals(prof.coactivation.to_frame())
    assert back.coactivation.paths_frame().equals(prof.coactivation.paths_frame())
    for key, (r, h) in prof.routes.data.items():
        np.testing.assert_array_equal(back.routes.data[key][0], r)
        assert back.routes.data[key][1] == h
    assert back.routes.data[("alpha", 0)][0].dtype == np.uint8  # E <= 256: one byte per selection


# ----- output-aware importance -----------------------------------------------------------------------------
def _hand_expert(family: str, experts: torch.nn.Module, e: int, x: torch.Tensor, act) -> torch.Tensor:
    """f_e(x) computed by hand from the expert's weight tensors (one token)."""
    if isinstance(experts, torch.nn.ModuleList):
        m = experts[e]
        return m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    if family == "gpt_oss":  # (E, H, 2I) interleaved gate/up with biases, clamped GLU
        gu = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = gu[..., ::2].clamp(max=experts.limit), gu[..., 1::2].clamp(-experts.limit, experts.limit)
        glu = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return glu @ experts.down_proj[e] + experts.down_proj_bias[e]
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)  # (E, 2I, H): gate rows first
    return (act(gate) * up) @ experts.down_proj[e].T


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3", "linear_gate_4x"])
def test_importance_equals_hand_computed_norms(make_tiny, family, one_torch_thread) -> None:
    moe = _moe(make_tiny, family)
    texts = {"alpha": TEXTS["alpha"][:3], "beta": TEXTS["beta"][:2]}
    frame = es.profile(moe, texts, batch_size=2).to_frame()
    from transformers.activations import ACT2FN

    act = ACT2FN[getattr(moe.model.config, "hidden_act", "silu")]
    for dom, items in texts.items():
        sums: dict[tuple[int, int], list[float]] = {}
        for text in items:
            ids = moe.tokenizer(text, return_tensors="pt")["input_ids"]
            inputs: dict[int, torch.Tensor] = {}
            handles = [s.module.register_forward_pre_hook(
                lambda m, a, layer=s.layer, keep=inputs: keep.__setitem__(layer, a[0].reshape(-1, a[0].shape[-1])))
                for s in moe.sites]
            try:
                with torch.no_grad(), RouterHooks(moe, record=True) as hooks:
                    moe.model(input_ids=ids)
            finally:
                for h in handles:
                    h.remove()
            for site in moe.sites:
                call = hooks.calls[site.layer][0]
                for t in range(ids.shape[1]):
                    for j in range(moe.top_k):
                        e = int(call.indices[t, j])
                        with torch.no_grad():
                            f = _hand_expert(family, site.block.experts, e, inputs[site.layer][t], act)
                        sums.setdefault((site.layer, e), []).append(float(call.weights[t, j]) * float(f.norm()))
        sub = frame[(frame.domain == dom) & ~frame.shared]
        for row in sub.itertuples():
            vals = sums.get((row.layer, row.expert))
            if not vals:
                assert math.isnan(row.importance)
            else:
                assert row.importance == pytest.approx(np.mean(vals), rel=1e-4, abs=1e-9)


# ----- recorded routes -------------------------------------------------------------------------------------
def _npy_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def _write_formats(tmp, routes: dict[str, list[np.ndarray]], ids: dict[str, list[list[int]]], k: int) -> dict:
    """Files of every documented format holding the same routes; returns {format: {domain: path}}."""
    out: dict[str, dict[str, object]] = {f: {} for f in ("vllm-npz", "vllm-json", "sglang", "sglang-dump",
                                                          "megatron")}
    for dom, seqs in routes.items():
        p = tmp / f"{dom}.npz"
        np.savez(p, *[s.astype(np.int16) for s in seqs])
        out["vllm-npz"][dom] = p
        # HTTP responses: prompt routes as base64 .npy or nested lists, plus a prefix-cached (-1) record part
        recs = []
        for i, s in enumerate(seqs):
            prompt = s[:2].astype(np.int16)
            cached = np.full((3, *s.shape[1:]), -1, np.int16)
            rec = {"prompt_routed_experts": _npy_b64(np.concatenate([cached, prompt])) if i % 2 else
                   np.concatenate([cached, prompt]).tolist(),
                   "choices": [{"index": 0, "routed_experts": s[2:].tolist()}]}
            recs.append(rec)
        p = tmp / f"{dom}.vllm.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in recs))
        out["vllm-json"][dom] = p
        p = tmp / f"{dom}.sglang.json"
        p.write_text(json.dumps([{"text": "", "meta_info": {
            "routed_experts": base64.b64encode(s.astype(np.int32).tobytes()).decode()}} for s in seqs]))
        out["sglang"][dom] = p
        # SGLang per-token dump: one extend forward holding every sequence, k padded to 8 with -1
        allr = np.concatenate(seqs)
        topk = np.full((allr.shape[1], len(allr), 8), -1, np.int32)
        topk[:, :, :k] = allr.transpose(1, 0, 2)
        rec = {"input_ids": [t for x in ids[dom] for t in x], "positions": [p for s in seqs for p in range(len(s))],
               "extend_seq_lens": [len(s) for s in seqs], "forward_mode": 1,
               "topk_ids_of_layer": torch.from_numpy(topk)}
        p = tmp / f"{dom}.pt"
        torch.save({"records": [rec]}, p)
        out["sglang-dump"][dom] = p
        lines = []
        for step, s in enumerate(seqs):
            for la in range(s.shape[1]):
                lines.append({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": la, "rank": 0,
                              "num_tokens": len(s), "topk": k, "top_indices": s[:, la].tolist()})
            lines.append({"step": step, "stage": "pre_dispatch", "block": "mtp", "mtp_idx": 0, "layer": 0, "rank": 0,
                          "num_tokens": len(s), "topk": k, "top_indices": s[:, 0].tolist()})
        d = tmp / f"{dom}_megatron"
        d.mkdir()
        (d / "router_trace_rank0.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
        out["megatron"][dom] = d
    return out


@pytest.mark.slow
def test_recorded_routes_profile_equals_hook_profile(make_tiny, tmp_path, one_torch_thread) -> None:
    moe = _moe(make_tiny, "qwen2_moe")
    hook = es.profile(moe, TEXTS, batch_size=3, importance=False)
    routes = {d: [_routes_of(moe, t) for t in ts] for d, ts in TEXTS.items()}
    ids = {d: [moe.tokenizer(t)["input_ids"] for t in ts] for d, ts in TEXTS.items()}
    files = _write_formats(tmp_path, routes, ids, moe.top_k)
    ref = hook.to_frame()
    ref = ref[~ref.shared].reset_index(drop=True)  # recorded routes hold routed experts only
    ref_de = es.domain_experts(hook, n_boot=0, seed=0).df
    for fmt, by_domain in files.items():
        prof = es.profile_routes(by_domain, num_experts=moe.num_experts, layers=moe.layers,
                                 num_layers=len(moe.layers), top_k=moe.top_k)
        got = prof.to_frame()
        for col in ("n_tokens", "activation_rate", "lift"):
            np.testing.assert_array_equal(got[col].to_numpy(), ref[col].to_numpy(), err_msg=f"{fmt} {col}")
        assert got["entropy"].isna().all() and got["cwas"].isna().all() and got["importance"].isna().all()
        assert prof.coactivation.to_frame().equals(hook.coactivation.to_frame()), fmt
        assert prof.coactivation.transitions_frame().equals(hook.coactivation.transitions_frame()), fmt
        assert prof.coactivation.paths_frame().equals(hook.coactivation.paths_frame()), fmt
        assert prof.coactivation.consistency_frame().equals(hook.coactivation.consistency_frame()), fmt
        from expertscope.stats.routing_mi import routing_mutual_information

        assert routing_mutual_information(prof).equals(routing_mutual_information(hook)), fmt
        de = es.domain_experts(prof, n_boot=0, seed=0).df
        for col in ("activation_rate", "activation_lift", "activation_q"):
            if col in ref_de.columns:
                np.testing.assert_array_equal(de[col].to_numpy(), ref_de[col].to_numpy(), err_msg=f"{fmt} {col}")
        if fmt == "vllm-json":
            rec = prof.config["recorded"]["alpha"]
            assert rec["prefix_cached"] == 3 * len(TEXTS["alpha"])
            assert any("prefix-cache" in n for n in rec["notes"])
        if fmt == "megatron":
            assert any("MTP" in n for n in prof.config["recorded"]["alpha"]["notes"])


def _distinct(T: int, L: int, k: int, seed: int = 0, E: int = 8) -> np.ndarray:
    """Random routes ``(T, L, k)``: k distinct experts of E per token and layer."""
    g = np.random.default_rng(seed)
    return np.stack([np.stack([g.choice(E, size=k, replace=False) for _ in range(L)]) for _ in range(T)])


def test_recorded_routes_bad_input_is_one_line(tmp_path) -> None:
    a = _distinct(4, 3, 2, seed=1).astype(np.int16)  # distinct experts per token
    b = _distinct(4, 3, 3, seed=2).astype(np.int16)
    with pytest.raises(DataError, match="k=3") as exc:
        es.profile_routes({"x": a, "y": b}, num_experts=8)
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="--num-experts 4"):
        es.profile_routes({"x": _distinct(3, 3, 2, seed=4) + 2}, num_experts=4)  # ids up to 9
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"meta_info": {"routed_experts": base64.b64encode(np.zeros(12, np.int32).tobytes())
                                           .decode()}}))
    with pytest.raises(ConfigError, match="--moe-layers"):
        es.load_routes(p)
    with pytest.raises(DataError, match="do not split"):
        es.load_routes(p, num_layers=5, top_k=2)
    # a per-token dump of a k=2 model read as k=8 is refused with the fix
    topk = torch.full((3, 4, 8), -1, dtype=torch.int32)
    topk[:, :, :2] = torch.from_numpy(_distinct(4, 3, 2, seed=5).transpose(1, 0, 2).astype(np.int32))
    torch.save({"records": [{"input_ids": [1, 2, 3, 4], "positions": [0, 1, 2, 3], "topk_ids_of_layer": topk}]},
               tmp_path / "d.pt")
    with pytest.raises(ConfigError, match="assumes k = 8"):
        es.load_routes(tmp_path / "d.pt")
    assert es.load_routes(tmp_path / "d.pt", top_k=2).shape == (3, 2)


# ----- routing overlap -------------------------------------------------------------------------------------
def test_routing_overlap_equals_naive_intersections_under_steering(make_tiny, tmp_path, one_torch_thread) -> None:
    moe = _moe(make_tiny)
    layer = moe.layers[-1]
    spec = es.SteeringSpec(targets=((layer, 0), (layer, 1)), scale=20.0, mode="bias")
    table = es.routing_overlap(moe, (moe, es.steer(moe, spec=spec)), TEXTS, batch_size=3, n_boot=200)
    k = moe.top_k
    for dom, texts in TEXTS.items():
        inter = {la: [] for la in moe.layers}
        for text in texts:
            _, base = _router_calls(moe, text)
            with es.steer(moe, spec=spec):
                _, steered = _router_calls(moe, text)
            for la in moe.layers:
                for s1, s2 in zip(base[la][0], steered[la][0], strict=True):
                    inter[la].append(len(set(s1.tolist()) & set(s2.tolist())) / k)
        for row in table[table.domain == dom].itertuples():
            assert row.overlap == pytest.approx(np.mean(inter[row.layer]), abs=1e-12)
            assert row.n_unmatched == 0
    last = table[(table.domain == "all") & (table.layer == layer)].iloc[0]
    assert last.overlap < 1.0 and last.ci_low <= last.overlap <= last.ci_high
    # saved runs of the same texts: identical routing is overlap 1; a text routed differently is unmatched
    es.profile(moe, TEXTS, batch_size=2, importance=False).save(tmp_path / "a")
    es.profile(moe, TEXTS, batch_size=5, importance=False).save(tmp_path / "b")
    same = es.routing_overlap(tmp_path / "a", tmp_path / "b")
    assert (same.overlap == 1.0).all() and (same.changed == 0.0).all()
    other = {"alpha": ["something else", *TEXTS["alpha"][1:]], "beta": TEXTS["beta"]}
    es.profile(moe, other, importance=False).save(tmp_path / "c")
    part = es.routing_overlap(tmp_path / "a", tmp_path / "c")
    assert part[part.domain == "alpha"].n_unmatched.iloc[0] == 1
    with pytest.raises(DataError, match="no common texts"):
        es.routing_overlap(tmp_path / "a", es.profile(moe, {"gamma": ["x"]}, importance=False))


def test_cli_profile_routes_writes_tables_and_refuses_mismatch(tmp_path) -> None:
    from typer.testing import CliRunner

    from expertscope.cli.main import app

    rng = np.random.default_rng(0)
    for name in ("a", "b"):  # ten sequences of eight tokens, 3 MoE layers, k = 2 of 8 experts
        seqs = [np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(8)])
                for _ in range(10)]
        np.savez(tmp_path / f"{name}.npz", *[x.astype(np.int16) for x in seqs])
    np.save(tmp_path / "bad.npy", _distinct(5, 3, 4, seed=3).astype(np.int16))  # k = 4
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["profile", "--routes", f"a={tmp_path / 'a.npz'}", "--routes", f"b={tmp_path / 'b.npz'}",
                              "--num-experts", "8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("profile.safetensors", "routes.safetensors", "coactivation.parquet", "paths.parquet",
              "routing_consistency.parquet", "routing_mi.parquet", "manifest.json"):
        assert (out / f).exists(), f
    assert "per layer [bits]: 0: " in res.output
    res = runner.invoke(app, ["domains", str(out)])
    assert res.exit_code == 0, res.output
    assert "nan" not in res.output.lower()  # entropy and CWAS were not measured: a dash, not "nan"
    import pandas as pd

    de = pd.read_parquet(out / "domain_experts.parquet")
    assert de["entropy"].isna().all() and de["cwas"].isna().all() and de["activation_rate"].notna().all()
    res = runner.invoke(app, ["profile", "--routes", f"a={tmp_path / 'a.npz'}", "--routes", f"b={tmp_path / 'bad.npy'}",
                              "--num-experts", "8", "-o", str(tmp_path / "run2")])
    assert res.exit_code == 2
    assert "k=4" in res.output and not (tmp_path / "run2" / "profile.safetensors").exists()
    res = runner.invoke(app, ["profile", "--routes", f"a={tmp_path / 'a.npz'}", "-o", str(tmp_path / "run3")])
    assert res.exit_code == 2 and "--num-experts" in res.output


# ----- report: findings and figures ------------------------------------------------------------------------
@pytest.mark.slow
def test_beyond_findings_read_the_tables(make_tiny, tmp_path, one_torch_thread) -> None:
    import pandas as pd
    from scipy.stats import spearmanr

    from expertscope.report.figures import fig_coactivation, fig_paths, fig_routing_overlap, pooled_lift
    from expertscope.report.html import load_tables
    from expertscope.report.record import beyond_findings
    from expertscope.report.sentences import beyond_sentences
    from expertscope.stats.structure import save_coactivation_tables

    moe = _moe(make_tiny)
    texts = {d: ts * 6 for d, ts in TEXTS.items()}  # enough tokens for pairs to be read out
    prof = es.profile(moe, texts, batch_size=8)
    save_coactivation_tables(prof, tmp_path)
    tables = load_tables(tmp_path)
    imp = tables["importance"]
    ce = imp[["domain", "layer", "expert"]].assign(ce_mean=np.arange(len(imp), dtype=float) % 7)
    tables["drivers"] = ce
    ov = pd.DataFrame({"domain": ["alpha"] * 2 + ["beta"], "condition": ["domain_up"] * 2 + ["driver_up"],
                       "applicable": [True, True, False], "reason": ["", "", "no driver experts"],
                       "layer": [0, 1, -1], "n_tokens": [50, 50, 0], "overlap": [0.9, 0.6, np.nan],
                       "ci_low": [0.85, 0.5, np.nan], "ci_high": [0.95, 0.7, np.nan], "changed": [0.2, 0.7, np.nan]})
    tables["routing_overlap"] = ov
    rec = beyond_findings(tables)
    a = imp[imp.domain == "alpha"]
    ok = a.importance.notna()
    want = spearmanr(a.importance[ok], a.activation_rate[ok]).statistic
    assert rec["importance"]["alpha"]["vs_A"]["rho"] == pytest.approx(want)
    j = a.merge(ce[ce.domain == "alpha"], on=["domain", "layer", "expert"])
    okj = j.importance.notna()
    assert rec["importance"]["alpha"]["vs_CE"]["rho"] == pytest.approx(spearmanr(j.importance[okj],
                                                                                 j.ce_mean[okj]).statistic)
    assert rec["routing_overlap"]["alpha/domain_up"]["mean_overlap"] == pytest.approx(0.75)
    assert rec["routing_overlap"]["alpha/domain_up"]["lowest_layer"] == 1
    assert rec["routing_overlap"]["beta/driver_up"] == {"applicable": False, "reason": "no driver experts"}
    co = tables["coactivation"]
    strongest = co[co["count"] >= 20].sort_values("lift").iloc[-1]
    s = rec["coactivation"]["strongest"][str(strongest.domain)]
    assert s["lift"] == pytest.approx(strongest.lift)
    text = beyond_sentences(rec)
    assert any("not applicable (no driver experts)" in x for x in text["routing_overlap"])
    assert any("75.0%" in x for x in text["routing_overlap"])
    # the pooled lift drawn in the heatmap, by hand from the routes
    layer = moe.layers[0]
    r = np.concatenate([prof.routes.domain_routes(d) for d in prof.routes.domains])[:, 0]
    n = np.array([(r == e).any(1).sum() for e in range(moe.num_experts)], float)
    both = ((r == 0).any(1) & (r == 1).any(1)).sum()
    assert pooled_lift(co, layer, moe.num_experts)[0, 1] == pytest.approx((both / n[0]) / (n[1] / len(r)))
    for fn, t in ((fig_coactivation, co), (fig_paths, tables["paths"]), (fig_routing_overlap, ov)):
        assert [p.suffix for p in fn(t, tmp_path / "fig")] == [".png", ".svg"]


@pytest.mark.parametrize("n", [8, 40])
def test_spearman_interval_equals_one_resample_at_a_time(n: int) -> None:
    """The vectorised bootstrap of Spearman's rho (ranked all at once) against scipy on each resample in turn."""
    from scipy.stats import spearmanr

    from expertscope.stats.rules import spearman_ci as _spearman_ci

    r = np.random.default_rng(n)
    x = r.integers(0, 4, n).astype(float)  # ties on purpose
    y = x + r.normal(size=n)
    y[0] = np.nan
    rho, lo, hi, m = _spearman_ci(x, y, n_boot=300, seed=2)
    ok = np.isfinite(y)
    rng, boots = np.random.default_rng(2), []
    for _ in range(300):
        i = rng.integers(0, m, m)
        xs, ys = x[ok][i], y[ok][i]
        if np.ptp(xs) > 0 and np.ptp(ys) > 0:
            boots.append(spearmanr(xs, ys).statistic)
    assert m == n - 1 and rho == pytest.approx(spearmanr(x[ok], y[ok]).statistic)
    np.testing.assert_allclose([lo, hi], np.percentile(boots, [2.5, 97.5]), atol=1e-12)
