"""Route files as real servers and users produce them (issue 35, item 1): every malformed file is one line
naming the file (and the record) and the fix, exit 2, nothing written; ids are whole numbers in [0, E); -1
means missing only for a whole position; k <= E; no expert twice in a token; layer numbers kept as given."""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import expertscope as es
from expertscope.cli.main import app

runner = CliRunner()


def _routes(T: int = 4, L: int = 2, k: int = 2, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.stack([np.stack([g.choice(8, size=k, replace=False) for _ in range(L)]) for _ in range(T)])


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _megatron_line(layer: object = 0, top: object = None, **extra: object) -> dict:
    top = [[0, 1], [2, 3]] if top is None else top
    return {"block": "decoder", "layer": layer, "step": 0, "rank": 0, "num_tokens": 2, "topk": 2,
            "top_indices": top, **extra}


def _truncated_npy(d: Path) -> Path:
    np.save(d / "t.npy", _routes())
    raw = (d / "t.npy").read_bytes()
    (d / "t.npy").write_bytes(raw[: len(raw) // 2])
    return d / "t.npy"


def _object_npy(d: Path) -> Path:
    np.save(d / "o.npy", np.array([_routes(), None], dtype=object), allow_pickle=True)
    return d / "o.npy"


def _pickle_npy(d: Path) -> Path:
    (d / "p.npy").write_bytes(pickle.dumps({"routes": [1, 2]}))
    return d / "p.npy"


def _dump(d: Path, obj: object, name: str = "dump.pt") -> Path:
    torch.save(obj, d / name)
    return d / name


CASES: list[tuple[str, Callable[[Path], Path], list[str], str]] = [
    ("truncated-npy", _truncated_npy, [], "cannot be read as vllm routes"),
    ("object-npy", _object_npy, [], "cannot be read as vllm routes"),
    ("pickle-as-npy", _pickle_npy, [], "cannot be read as vllm routes"),
    ("ragged-json", lambda d: _jsonl(d / "r.jsonl", [{"prompt_routed_experts": [[[0, 1]], [[0]]]}]), [],
     "r.jsonl record 1"),
    ("string-ids", lambda d: _jsonl(d / "s.jsonl", [{"prompt_routed_experts": [[["a", "b"]]]}]), [],
     "not whole numbers"),
    ("choices-int", lambda d: _jsonl(d / "c.jsonl", [{"prompt_routed_experts": _routes().tolist(), "choices": 5}]),
     [], "'choices' is a int"),
    ("choice-layers", lambda d: _jsonl(d / "cl.jsonl", [{"prompt_routed_experts": _routes().tolist(),
                                                         "choices": [{"routed_experts": _routes(L=3).tolist()}]}]),
     [], "one model per response"),
    ("binary-jsonl", lambda d: (d / "b.jsonl").write_bytes(bytes(range(256)) * 4) and d / "b.jsonl", [],
     "not UTF-8 text"),
    ("latin1-jsonl", lambda d: (d / "l.jsonl").write_bytes('{"x": "café"}'.encode("latin-1")) and d / "l.jsonl", [],
     "not UTF-8 text"),
    ("pt-read-as-vllm", lambda d: _dump(d, {"records": []}, "x.pt"), ["--routes-format", "vllm"], "not UTF-8"),
    ("sglang-bad-base64", lambda d: _jsonl(d / "sg.jsonl", [{"meta_info": {"routed_experts": "AAA"}}]),
     ["--moe-layers", "2", "--top-k", "2"], "not valid base64"),
    ("dump-no-topk", lambda d: _dump(d, {"records": [{"input_ids": [1, 2]}]}), [], "has no topk_ids_of_layer"),
    ("dump-2d", lambda d: _dump(d, {"records": [{"topk_ids_of_layer": torch.zeros(2, 8, dtype=torch.int32)}]}), [],
     "expected [layers, tokens, 8]"),
    ("dump-string-records", lambda d: _dump(d, {"records": ["x", "y"]}), [], "has no topk_ids_of_layer"),
    ("dump-0d", lambda d: _dump(d, {"records": [{"topk_ids_of_layer": torch.tensor(3)}]}), [],
     "expected [layers, tokens, 8]"),
    ("dump-bad-map", lambda d: _dump(d, {"records": [{"topk_ids_of_layer": torch.zeros(2, 3, 8, dtype=torch.int32)}],
                                         "last_physical_to_logical_map": torch.zeros(5, dtype=torch.int64)}), [],
     "last_physical_to_logical_map has shape"),
    ("megatron-no-top", lambda d: _jsonl(d / "m.jsonl", [{k: v for k, v in _megatron_line().items()
                                                         if k != "top_indices"}]), ["--routes-format", "megatron"],
     "line 1 has no 'top_indices'"),
    ("megatron-size", lambda d: _jsonl(d / "m.jsonl", [_megatron_line(top=[0, 1, 2])]), ["--routes-format", "megatron"],
     "do not reshape"),
    ("megatron-list-line", lambda d: _jsonl(d / "m.jsonl", [[1, 2, 3], [4]]), ["--routes-format", "megatron"],
     "line 1 is a JSON list"),
    ("megatron-string-layer", lambda d: _jsonl(d / "m.jsonl", [_megatron_line(layer="x")]),
     ["--routes-format", "megatron"], "must be whole numbers"),
    # ----- what was accepted silently
    ("float-ids", lambda d: _jsonl(d / "f.jsonl", [{"prompt_routed_experts": [[[3.7, 1.0]]]}]), [], "3.7"),
    ("id-minus-5", lambda d: _jsonl(d / "n.jsonl", [{"prompt_routed_experts": [[[-5, 1], [2, 3]]]}]), [],
     "expert id -5"),
    ("lone-minus-1", lambda d: _jsonl(d / "n1.jsonl", [{"prompt_routed_experts": [[[-1, 1], [2, 3]]]}]), [],
     "beside expert ids"),
    ("k-above-E", lambda d: _jsonl(d / "k.jsonl", [{"prompt_routed_experts": [[list(range(16))]]}]), [],
     "k=16 experts per token but the model has 8"),
    ("duplicate-in-token", lambda d: _jsonl(d / "dup.jsonl", [{"prompt_routed_experts": [[[2, 2], [0, 1]]]}]), [],
     "expert 2 twice in the top-k"),
]


@pytest.mark.parametrize(("make", "extra", "needle"), [(m, e, n) for _, m, e, n in CASES], ids=[c[0] for c in CASES])
def test_a_malformed_routes_file_is_one_line_exit_2(tmp_path: Path, make, extra: list[str], needle: str) -> None:
    path = make(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["profile", "--routes", f"a={path}", "--num-experts", "8", *extra, "-o", str(out)])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
    assert "Traceback" not in r.output and not out.exists()


def test_megatron_layers_keep_their_numbers_and_a_directory_works_on_the_cli(tmp_path: Path) -> None:
    d = tmp_path / "trace"
    d.mkdir()
    g = np.random.default_rng(0)
    lines = [_megatron_line(layer=la, top=[g.choice(8, 2, replace=False).tolist() for _ in range(2)])
             for la in (0, 5, 9, 30)]
    _jsonl(d / "router_trace_rank0.jsonl", lines)
    rr = es.load_routes(d)
    assert rr.layers == [0, 5, 9, 30] and any("not consecutive" in n for n in rr.notes)
    prof = es.profile_routes({"a": rr}, num_experts=8)
    assert list(prof.layers) == [0, 5, 9, 30]  # never relabelled 0-3
    out = tmp_path / "out"
    r = runner.invoke(app, ["profile", "--routes", f"a={d}", "--num-experts", "8", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert list(es.RoutingProfile.load(out).layers) == [0, 5, 9, 30]


def test_a_whole_position_of_minus_one_is_missing_and_named_by_format(tmp_path: Path) -> None:
    routes = _routes(T=5)
    routes[1] = -1
    rr = es.load_routes(_jsonl(tmp_path / "v.jsonl", [{"prompt_routed_experts": routes.tolist()}]))
    assert rr.prefix_cached == 1 and rr.n_tokens == 4 and "prefix-cache" in rr.notes[0]
    flat = base64.b64encode(routes.astype(np.int32).tobytes()).decode()
    rs = es.load_routes(_jsonl(tmp_path / "s.jsonl", [{"meta_info": {"routed_experts": flat}}]), num_layers=2,
                        top_k=2)
    assert rs.prefix_cached == 1 and "unrecorded by SGLang" in rs.notes[0]


def test_routes_names_follow_the_domain_rule_and_are_not_mixed_with_domains(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "v.jsonl", [{"prompt_routed_experts": _routes().tolist()}])
    g = _jsonl(tmp_path / "w.jsonl", [{"prompt_routed_experts": _routes(seed=1).tolist()}])
    cases = [(["--routes", f"a={f}", "--routes", f"a={g}"], "is used twice"),
             (["--routes", f"a={f}", "--routes", f"A={g}"], "differ only in case"),
             (["--routes", f"a={f}", "-d", "b=synthetic:math"], "give one or the other")]
    for args, needle in cases:
        r = runner.invoke(app, ["profile", *args, "--num-experts", "8", "-o", str(tmp_path / "out")])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["profile", "--routes", f"a={f},{g}", "--num-experts", "8", "-o", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output  # several files of one domain: NAME=A,B
    assert es.RoutingProfile.load(tmp_path / "ok").totals()[0].tolist() == [8]


@pytest.mark.slow  # draws the report's figures
def test_the_routes_report_shows_only_what_routes_give(tmp_path: Path) -> None:
    """No CWAS panel of empty axes, no "driver experts 0 %": what needs logits or the model is said once."""
    files = []
    for name, seed in (("a", 0), ("b", 1)):
        g = np.random.default_rng(seed)
        seqs = [np.stack([np.stack([g.choice(8, 2, replace=False, p=np.r_[[0.3], np.full(7, 0.1)] if name == "a"
                                              else None) for _ in range(3)]) for _ in range(20)]) for _ in range(6)]
        files.append(_jsonl(tmp_path / f"{name}.jsonl", [{"prompt_routed_experts": s.tolist()} for s in seqs]))
    out = tmp_path / "run"
    assert runner.invoke(app, ["profile", "--routes", f"a={files[0]}", "--routes", f"b={files[1]}", "--num-experts",
                               "8", "-o", str(out)]).exit_code == 0
    r = runner.invoke(app, ["domains", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    assert not (out / "figures" / "fig1_cwas.png").exists() and "CWAS = (1 − H)·A" not in page
    assert page.count("Not measurable from routes") == 1
    assert "driver experts 0" not in page and "drivers were not measured (no causal effects)" in page


def test_engine_quirks_are_detected_handled_and_counted(tmp_path: Path) -> None:
    """A layer with the same ids at every token (a dense layer of a hybrid model, or all zeros from a fused
    kernel) is left out with the others' numbers kept; generated tokens replayed three or more times in a row
    keep one; each is counted in the profile's record and said in the notes."""
    from expertscope.integrations.engine_routes import QUIRKS

    seqs = []
    for seed in range(3):
        s = _routes(T=10, L=3, seed=seed)
        s[:, 1] = 0  # layer 1: all zeros at every token
        seqs.append(s)
    seqs[0][4:7] = seqs[0][3]  # rows 3-6 equal: a run of four, in the generated part
    recs = [{"prompt_routed_experts": s[:2].tolist(), "choices": [{"routed_experts": s[2:].tolist()}]} for s in seqs]
    rr = es.load_routes(_jsonl(tmp_path / "q.jsonl", recs))
    assert rr.layers == [0, 2] and rr.shape == (2, 2)
    assert rr.quirks == {"constant_layer": 1, "repeated_decode": 3}  # rows 4-6 repeat row 3
    assert rr.n_tokens == 30 - 3
    assert any(n.startswith("constant_layer (1): ") for n in rr.notes) and set(rr.quirks) <= set(QUIRKS)
    prof = es.profile_routes({"a": rr}, num_experts=8)
    assert list(prof.layers) == [0, 2]
    assert prof.config["recorded"]["a"]["quirks"] == {"constant_layer": 1, "repeated_decode": 3}
    # prompt tokens are never replayed: the same run in a prompt is kept
    prompt_only = es.load_routes(_jsonl(tmp_path / "pr.jsonl", [{"prompt_routed_experts": s.tolist()} for s in seqs]))
    assert prompt_only.n_tokens == 30 and "repeated_decode" not in prompt_only.quirks
    # two equal neighbours happen by chance: kept
    s = _routes(T=6, L=2, seed=9)
    s[3] = s[2]
    assert es.load_routes(_jsonl(tmp_path / "p.jsonl", [{"prompt_routed_experts": s.tolist()}])).n_tokens == 6
