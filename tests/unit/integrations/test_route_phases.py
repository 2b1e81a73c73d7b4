"""Issue 35, items 2-5: the engines' remaining quirks (255-filled slots, one short, stitched turns), phases
(prompt against generated, from the engines' fields and from ``profile --generate``), gate weights beside the
ids, and streamed files whose counts equal the in-memory read."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import expertscope as es
from expertscope.cli.main import app
from expertscope.errors import DataError
from expertscope.integrations import engine_routes as er
from expertscope.models.hooks import RouterHooks
from expertscope.models.model import MoEModel
from expertscope.stats.phases import phase_comparison
from expertscope.testing import tiny_tokenizer

runner = CliRunner()


def _routes(T: int, L: int = 3, k: int = 2, E: int = 8, seed: int = 0, p: np.ndarray | None = None) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.stack([np.stack([g.choice(E, size=k, replace=False, p=p) for _ in range(L)]) for _ in range(T)])


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _b64(a: np.ndarray, dtype: type = np.int32) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode()


# ----- quirks ----------------------------------------------------------------------------------------------
def test_255_filled_slots_of_a_uint8_buffer_are_unwritten(tmp_path: Path) -> None:
    """A uint8 buffer one slot wider than k (shared experts left out) whose fourth position was never written:
    the all-255 slot is left out, the all-255 position is missing, each counted."""
    r = _routes(6).astype(np.uint8)
    buf = np.full((6, 3, 3), 255, np.uint8)
    buf[:, :, :2] = r
    buf[3] = 255
    np.save(tmp_path / "u.npy", buf)
    rr = es.load_routes(tmp_path / "u.npy")
    assert rr.shape == (3, 2) and rr.n_tokens == 5 and rr.prefix_cached == 1
    assert rr.quirks == {"filled_255": 6 * 3 + 2 * 3, "unwritten_slot": 1}  # the slot column, then position 3
    np.testing.assert_array_equal(np.concatenate(rr.sequences), np.delete(r, 3, axis=0).astype(np.int64))
    # the same ids as JSON lose the dtype: 255 is read as unwritten when the model has at most 255 experts
    prof = es.profile_routes({"a": [{"prompt_routed_experts": buf.astype(int).tolist()}]}, num_experts=8)
    assert prof.totals()[0].tolist() == [5] and prof.config["recorded"]["a"]["quirks"]["unwritten_slot"] == 1
    # a 255 beside expert ids is neither: one line
    bad = r.astype(int)
    bad[0, 0, 1] = 255
    with pytest.raises(DataError, match=r"position 0 holds a -1 .*255.* beside expert ids"):
        es.profile_routes({"a": [{"prompt_routed_experts": bad.tolist()}]}, num_experts=8)
    # with 300 experts an id of 255 is an expert
    big = _routes(4, E=300, seed=3)
    big[0, 0, 0] = 255 if 255 not in big[0, 0] else big[0, 0, 0]
    assert es.profile_routes({"a": big}, num_experts=300).totals()[0].tolist() == [4]


def test_a_request_one_short_is_counted_and_other_counts_are_refused(tmp_path: Path) -> None:
    r = _routes(5)
    recs = [{"meta_info": {"routed_experts": _b64(r[:4]), "prompt_tokens": 5, "completion_tokens": 0}},  # one short
            {"meta_info": {"routed_experts": _b64(_routes(5, seed=9)), "prompt_tokens": 3,
                           "completion_tokens": 3}}]  # 3 + 3 - 1: the last token is never fed back
    rr = es.load_routes(_jsonl(tmp_path / "s.jsonl", recs), num_layers=3, top_k=2)
    assert rr.quirks == {"one_short": 1} and rr.n_tokens == 9
    assert [int((p == er.PROMPT).sum()) for p in rr.phases] == [4, 3]
    assert [int((p == er.GENERATED).sum()) for p in rr.phases] == [0, 2]
    bad = [{"meta_info": {"routed_experts": _b64(r[:3]), "prompt_tokens": 5, "completion_tokens": 0}}]
    with pytest.raises(DataError, match="3 routed positions for 5 prompt and 0 completion tokens"):
        es.load_routes(_jsonl(tmp_path / "b.jsonl", bad), num_layers=3, top_k=2)
    v = [{"prompt_routed_experts": r[:4].tolist(), "prompt_token_ids": [1, 2, 3, 4, 5]}]
    assert es.load_routes(_jsonl(tmp_path / "v.jsonl", v)).quirks == {"one_short": 1}
    v[0]["prompt_token_ids"] = [1, 2]
    with pytest.raises(DataError, match="4 routed positions for 2 prompt tokens"):
        es.load_routes(_jsonl(tmp_path / "v2.jsonl", v))


def test_stitched_turns_that_repeat_the_previous_request_are_left_out(tmp_path: Path) -> None:
    """A server that ignores routed_experts_start_len returns every earlier turn again: those positions once."""
    t1, t2, t3 = _routes(4, seed=1), _routes(3, seed=2), _routes(5, seed=3)
    recs = [{"meta_info": {"routed_experts": _b64(t1)}},
            {"meta_info": {"routed_experts": _b64(np.concatenate([t1, t2]))}},
            {"meta_info": {"routed_experts": _b64(np.concatenate([t1, t2, t3]))}}]
    rr = es.load_routes(_jsonl(tmp_path / "t.jsonl", recs), num_layers=3, top_k=2)
    assert rr.quirks == {"stitched_overlap": 4 + 7} and rr.n_tokens == 12
    np.testing.assert_array_equal(np.concatenate(rr.sequences), np.concatenate([t1, t2, t3]))
    # turns sent with start_len honoured share nothing: untouched
    ok = [{"meta_info": {"routed_experts": _b64(t)}} for t in (t1, t2, t3)]
    assert es.load_routes(_jsonl(tmp_path / "ok.jsonl", ok), num_layers=3, top_k=2).quirks == {}


# ----- phases and weights ---------------------------------------------------------------------------------
def test_vllm_phases_count_the_prompt_once_and_the_dump_reads_forward_mode(tmp_path: Path) -> None:
    prompt, c0, c1 = _routes(5, seed=1), _routes(3, seed=2), _routes(4, seed=3)
    rec = {"prompt_routed_experts": prompt.tolist(),
           "choices": [{"routed_experts": c0.tolist()}, {"routed_experts": c1.tolist()}]}
    prof = es.profile_routes({"a": [rec]}, num_experts=8)
    assert prof.totals()[0].tolist() == [12]  # 5 + 3 + 4: the prompt once
    assert prof.phase("prompt").totals()[0].tolist() == [5] and prof.phase("generated").totals()[0].tolist() == [7]
    sel = prof.phase("generated").totals()[1]["sel"][0]
    for la in range(3):
        np.testing.assert_array_equal(sel[la], np.bincount(np.concatenate([c0, c1])[:, la].ravel(), minlength=8))
    with pytest.raises(es.ConfigError, match="no 'decode' phase"):
        prof.phase("decode")
    # SGLang's per-token dump: an extend forward is the prompt, a decode forward generated
    topk = np.full((3, 4, 8), -1, np.int32)
    topk[:, :, :2] = _routes(4, seed=5).transpose(1, 0, 2)
    recs = [{"input_ids": [1, 2, 3, 4], "positions": [0, 1, 2, 3], "forward_mode": 1,
             "topk_ids_of_layer": torch.from_numpy(topk)},
            {"input_ids": [5, 6], "positions": [4, 2], "forward_mode": 2,
             "topk_ids_of_layer": torch.from_numpy(topk[:, :2].copy())}]
    torch.save({"records": recs}, tmp_path / "d.pt")
    rr = es.load_routes(tmp_path / "d.pt", top_k=2)
    assert [p.tolist() for p in rr.phases] == [[0, 0, 0, 0], [1, 1]]


def test_gate_weights_beside_the_ids_give_weight_statistics(tmp_path: Path) -> None:
    r = _routes(6)
    w = np.random.default_rng(0).random(r.shape)
    recs = [{"meta_info": {"routed_experts": _b64(r), "routed_experts_weights": _b64(w, np.float32)}}]
    prof = es.profile_routes({"a": _jsonl(tmp_path / "w.jsonl", recs)}, num_experts=8, num_layers=3, top_k=2)
    df = prof.to_frame()
    w32 = w.astype(np.float32).astype(np.float64)
    for row in df.itertuples():
        hit = r[:, row.layer] == row.expert
        want = w32[:, row.layer][hit].mean() if hit.any() else np.nan
        assert (np.isnan(want) and np.isnan(row.gate_mean)) or row.gate_mean == pytest.approx(want, rel=1e-12)
        assert row.weighted_activation == pytest.approx(w32[:, row.layer][hit].sum() / len(r), rel=1e-12, abs=0)
    assert "gate_mean" not in prof.model_info["not_applicable"]
    bad = [{"meta_info": {"routed_experts": _b64(r), "routed_experts_weights": _b64(w[:2], np.float32)}}]
    with pytest.raises(DataError, match="do not match the ids' shape"):
        es.load_routes(_jsonl(tmp_path / "b.jsonl", bad), num_layers=3, top_k=2)
    plain = es.profile_routes({"a": r}, num_experts=8)
    assert plain.to_frame().gate_mean.isna().all() and "gate_mean" in plain.model_info["not_applicable"]


def test_the_phase_verdict_is_calibrated_on_random_labels_and_finds_a_planted_shift() -> None:
    """Prompt and generated drawn alike: a domain is called different (any layer) in few of 40 draws; generated
    tokens that favour expert 0: called different in nearly all."""
    skew = np.r_[[0.45], np.full(7, 0.55 / 7)]
    false = power = 0
    for seed in range(40):
        recs = [{"prompt_routed_experts": _routes(20, seed=1000 * seed + i).tolist(),
                 "choices": [{"routed_experts": _routes(10, seed=1000 * seed + 500 + i).tolist()}]} for i in range(6)]
        t = phase_comparison(es.profile_routes({"a": recs}, num_experts=8), n_boot=0, seed=seed)
        false += bool(t.differs.any())
        for rec, i in zip(recs, range(6), strict=True):
            rec["choices"][0]["routed_experts"] = _routes(10, seed=1000 * seed + 500 + i, p=skew).tolist()
        t = phase_comparison(es.profile_routes({"a": recs}, num_experts=8), n_boot=0, seed=seed)
        power += bool(t.differs.any())
    assert false <= 6, false  # about 5% by construction (Bonferroni over layers): at most 15% in 40 draws
    assert power >= 36, power


def test_generated_routes_equal_the_routing_at_decode_time(make_tiny) -> None:
    """``generate=N`` routes the continuation in one teacher-forced pass; a generated token's selection equals
    the one the router made while decoding with the KV cache (the last token is never fed back while decoding)."""
    moe = MoEModel.from_model(make_tiny("qwen2_moe"), tokenizer=tiny_tokenizer())
    text = "the cat sat on the mat"
    prof = es.profile(moe, {"a": [text]}, generate=5, importance=False)
    ids = moe.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), RouterHooks(moe, record=True) as hooks:
        out = moe.model.generate(input_ids=ids, max_new_tokens=5, do_sample=False,
                                 pad_token_id=moe.tokenizer.pad_token_id or 0, eos_token_id=None)
    P, new = ids.shape[1], out.shape[1] - ids.shape[1]
    assert prof.phase("prompt").totals()[0].tolist() == [P]
    assert prof.phase("generated").totals()[0].tolist() == [new]
    routes = prof.routes.data[("a", 0)][0]  # (P + new, L, k)
    for li, la in enumerate(moe.layers):
        calls = hooks.calls[la]
        assert calls[0].indices.shape[0] == P and len(calls) == new  # the prompt, then one call per fed token
        for step, call in enumerate(calls[1:], 0):
            assert set(call.indices[0].tolist()) == set(routes[P + step, li].tolist()), (la, step)


# ----- streaming -------------------------------------------------------------------------------------------
def test_streamed_files_give_the_counts_of_the_in_memory_read(tmp_path: Path, monkeypatch) -> None:
    """Pieces of 7 rows, two passes over JSONL, .npy and a Megatron directory: the same selections, co-activation,
    transitions and paths as reading whole, and a domain of two files equals one file of both."""
    monkeypatch.setattr(er, "CHUNK_TOKENS", 7)
    a, b = _routes(40, seed=1), _routes(33, seed=2)
    np.save(tmp_path / "a.npy", a.astype(np.int16))
    _jsonl(tmp_path / "b.jsonl", [{"prompt_routed_experts": b[:20].tolist(),
                                   "choices": [{"routed_experts": b[20:].tolist()}]}])
    np.save(tmp_path / "ab.npy", np.concatenate([a, b]).astype(np.int16))
    held = es.profile_routes({"x": tmp_path / "a.npy", "y": tmp_path / "b.jsonl"}, num_experts=8)
    streamed = es.profile_routes({"x": tmp_path / "a.npy", "y": tmp_path / "b.jsonl"}, num_experts=8, stream=True)
    assert not streamed.keep_sequences and streamed.routes is None
    for name in ("sel",):
        np.testing.assert_array_equal(held.totals()[1][name], streamed.totals()[1][name])
    assert held.coactivation.to_frame().equals(streamed.coactivation.to_frame())
    assert held.coactivation.transitions_frame().equals(streamed.coactivation.transitions_frame())
    assert held.coactivation.paths_frame().equals(streamed.coactivation.paths_frame())
    assert streamed.phase("generated").totals()[0].tolist() == [13]
    two = es.profile_routes({"z": [tmp_path / "a.npy", tmp_path / "ab.npy"]}, num_experts=8, stream=True)
    one = es.profile_routes({"z": [tmp_path / "a.npy"]}, num_experts=8, stream=True).merge(
        es.profile_routes({"w": [tmp_path / "ab.npy"]}, num_experts=8, stream=True))
    np.testing.assert_array_equal(two.totals()[1]["sel"][0], one.totals()[1]["sel"].sum(0))
    # a truncated .npy is one line, streamed too
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) - 50])
    with pytest.raises(DataError, match="truncated"):
        es.profile_routes({"x": tmp_path / "t.npy"}, num_experts=8, stream=True)


def test_cli_stream_and_phases_write_the_phase_tables(tmp_path: Path) -> None:
    recs = [{"prompt_routed_experts": _routes(8, seed=i).tolist(),
             "choices": [{"routed_experts": _routes(4, seed=100 + i).tolist()}]} for i in range(5)]
    f = _jsonl(tmp_path / "a.jsonl", recs)
    g = _jsonl(tmp_path / "b.jsonl", [{"prompt_routed_experts": _routes(8, seed=50 + i).tolist(),
                                       "choices": [{"routed_experts": _routes(4, seed=150 + i).tolist()}]}
                                      for i in range(5)])
    out = tmp_path / "run"
    r = runner.invoke(app, ["profile", "--routes", f"a={f}", "--routes", f"b={g}", "--num-experts", "8", "--stream",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "prompt (40 tokens) and generated (20 tokens)" in r.output
    table = pd.read_parquet(out / "phase_comparison.parquet")
    assert set(table.domain) == {"a", "b"} and (table.n_generated == 20).all()
    back = es.RoutingProfile.load(out)
    assert back.phase("generated").totals()[0].tolist() == [20, 20]
    assert json.loads((out / "manifest.json").read_text())["recorded"]["a"]["streamed"] is True
    r = runner.invoke(app, ["profile", "--routes", f"a={f}", "--num-experts", "8", "-o", str(out / "x"),
                            "--stream", "-d", "b=synthetic:math"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["profile", "-d", "b=synthetic:math", "--stream", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "go with --routes" in " ".join(r.output.replace("│", " ").split())


@pytest.mark.slow  # draws the report's figures
def test_the_report_compares_the_phases_per_domain(tmp_path: Path) -> None:
    skew = np.r_[[0.45], np.full(7, 0.55 / 7)]
    files = []
    for name, p in (("a", skew), ("b", None)):
        recs = [{"prompt_routed_experts": _routes(12, seed=10 * i + len(name)).tolist(),
                 "choices": [{"routed_experts": _routes(8, seed=500 + 10 * i + len(name), p=p).tolist()}]}
                for i in range(6)]
        files.append(_jsonl(tmp_path / f"{name}.jsonl", recs))
    out = tmp_path / "run"
    assert runner.invoke(app, ["profile", "--routes", f"a={files[0]}", "--routes", f"b={files[1]}", "--num-experts",
                               "8", "-o", str(out)]).exit_code == 0
    assert runner.invoke(app, ["domains", str(out)]).exit_code == 0
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    assert "Prompt against generated tokens" in page and "layers differ beyond sampling noise" in page
    assert "a: prompt (72 tokens) and generated (48 tokens)" in page and "b: prompt (72 tokens)" in page
    # each phase's directory reads as a profile run of its own
    assert runner.invoke(app, ["domains", str(out / "phases" / "generated"), "-o", str(tmp_path / "g")]).exit_code == 0
