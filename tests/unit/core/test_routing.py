"""The one routing pass (expertscope.routing) and the generic executors (expertscope.execution).

References: each text run alone through the model (no padding at all), the caller's tokenizer as it was
before the call, and the in-process default path of each job.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import expertscope as es
from expertscope.causal.sweep import causal_sweep
from expertscope.data.types import Domain, Example
from expertscope.execution import LocalExecutor, make_executor
from expertscope.models.hooks import RouterHooks
from expertscope.models.model import MoEModel
from expertscope.routing import (
    as_domain_list,
    domain_texts,
    effective_max_length,
    ensure_pad,
    flatten_texts,
    plan_batches,
    routing_pass,
)
from expertscope.stats.expert_map import router_inputs
from expertscope.testing import tiny_tokenizer

TEXTS = {
    "a": ["hello there, friend", "hi", "a somewhat longer sentence of text", "x y"],
    "b": ["1 + 2 = 3", "forty-two is the answer", "ok"],
}


@pytest.fixture
def moe(make_tiny, one_torch_thread) -> MoEModel:
    return MoEModel.from_model(make_tiny("qwen2_moe"), tokenizer=tiny_tokenizer())


def _alone(moe: MoEModel, text: str, max_length: int | None) -> tuple[list[int], dict[int, torch.Tensor]]:
    """Token ids and each layer's router logits ``(T, E)`` of ``text`` run by itself (no padding)."""
    ids = moe.tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
    with RouterHooks(moe, record=True) as hooks, torch.no_grad():
        moe.model(input_ids=torch.tensor([ids]), use_cache=False)
    return ids, {layer: hooks.calls[layer][0].logits for layer in moe.layers}


def test_routing_pass_equals_each_text_run_alone(moe) -> None:
    max_length = 12  # cuts the longer texts
    seen = []
    for routed in routing_pass(moe, TEXTS, batch_size=3, max_length=max_length):
        B, T = routed.mask.shape
        assert len(routed.ids) == B
        for row, i in enumerate(routed.ids):
            text = TEXTS[routed.domain][i]
            ids, logits = _alone(moe, text, max_length)
            n = len(ids)
            assert routed.mask[row].tolist() == [True] * n + [False] * (T - n)  # right padding
            assert routed.input_ids[row, :n].tolist() == ids
            full = len(moe.tokenizer(text, add_special_tokens=True)["input_ids"])
            assert bool(routed.truncated[row]) == (full > max_length)
            for layer, call in routed.calls.items():
                got = call.logits.reshape(B, T, -1)[row, :n]
                torch.testing.assert_close(got, logits[layer], rtol=1e-5, atol=1e-5)
            seen.append((routed.domain, i))
    # every text exactly once, in domain order, batches of at most 3 of one domain
    assert seen == [(d, i) for d, ts in TEXTS.items() for i in range(len(ts))]


def test_routing_pass_stops_early_without_leaving_hooks(moe) -> None:
    passes = routing_pass(moe, TEXTS, batch_size=1)
    next(passes)
    passes.close()
    for site in moe.sites:
        assert not site.module._forward_pre_hooks and not site.module._forward_hooks


def test_callers_tokenizer_is_untouched(make_tiny, one_torch_thread) -> None:
    """No pad token and left padding on the caller's tokenizer: every analysis pads with eos on the right
    internally, leaves the tokenizer as it was, and matches the run with a pad token."""
    plain = MoEModel.from_model(make_tiny("qwen2_moe"), tokenizer=tiny_tokenizer())
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "left"
    bare = MoEModel.from_model(make_tiny("qwen2_moe"), tokenizer=tok)
    assert tok.pad_token_id is None and ensure_pad(tok) == tok.eos_token_id

    p_ref, p = es.profile(plain, TEXTS, batch_size=3), es.profile(bare, TEXTS, batch_size=3)
    for name in ("sel", "h_bern", "gate"):
        np.testing.assert_allclose(p.seq_stats(name), p_ref.seq_stats(name), rtol=1e-6, atol=1e-9)
    r_ref, r = es.record_tokens(plain, TEXTS, batch_size=3), es.record_tokens(bare, TEXTS, batch_size=3)
    np.testing.assert_array_equal(r.selected, r_ref.selected)
    drivers = {"domain": ["a", "b"], "layer": [plain.layers[0]] * 2, "expert": [0, 1], "is_driver": [True, True],
               "ce_mean": [1.0, 1.0]}
    c_ref = es.causal_rate(plain, TEXTS, pd.DataFrame(drivers), batch_size=3)
    c = es.causal_rate(bare, TEXTS, pd.DataFrame(drivers), batch_size=3)
    pd.testing.assert_frame_equal(c, c_ref)
    x_ref, x = router_inputs(plain, TEXTS, n_tokens=40, batch_size=3), router_inputs(bare, TEXTS, n_tokens=40,
                                                                                      batch_size=3)
    for layer in x_ref:
        torch.testing.assert_close(x[layer], x_ref[layer])
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok.padding_side == "left"


def test_causal_sweep_with_the_local_executor_equals_the_default(moe) -> None:
    texts = {"a": ["hello there", "a longer sentence"], "b": ["1 + 2 = 3"]}
    default = causal_sweep(moe, texts)
    local = causal_sweep(moe, texts, executor=make_executor("local"))
    assert isinstance(make_executor("local"), LocalExecutor)
    assert np.array_equal(default.ce, local.ce) and np.isfinite(local.ce).all()
    assert local.settings["executor"] == "local" and local.settings["computed_items"] == 3 * len(moe.layers)
    batched = es.causal_effects(moe, texts, method="exact", batch_size=1)
    np.testing.assert_allclose(local.ce, batched.ce, atol=1e-6)


def test_local_executor_yields_in_item_order_from_one_worker() -> None:
    built = []

    def factory(model):
        built.append(model)
        return lambda item: item * 10

    assert list(LocalExecutor().run_items("m", [3, 1, 2], factory)) == [30, 10, 20]
    assert built == ["m"]  # one worker for all items


def test_process_executor_needs_the_model_source(tmp_path) -> None:
    """The process executor is made from --executor process with the model's source (its profile equals the
    in-process one exactly: tests/test_interventions.py, which runs it in real worker processes)."""
    from expertscope.execution import ModelSpec, ProcessExecutor

    ex = make_executor("process", ModelSpec(str(tmp_path), dtype="float32", threads=1), workers=2)
    assert isinstance(ex, ProcessExecutor) and ex.workers == 2 and ex._pool is None  # no process until a job
    with pytest.raises(es.ConfigError, match="needs the model's source"):
        make_executor("process")


def test_worker_processes_fork_from_a_preloaded_server_or_else_spawn(tmp_path, monkeypatch) -> None:
    """Workers are forked from a server that imported the libraries and the model's family module; where that
    server cannot start (its socket path too long for AF_UNIX under a long TMPDIR) they are spawned."""
    import multiprocessing
    from multiprocessing import forkserver

    from expertscope.execution import ModelSpec, _worker_context

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no forkserver on this platform: workers are always spawned")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_moe"}')
    started: list[list[str]] = []  # the modules the server would import
    server = forkserver._forkserver  # type: ignore[attr-defined]
    monkeypatch.setattr(forkserver, "ensure_running", lambda: started.append(list(server._preload_modules)))
    assert _worker_context(ModelSpec(str(tmp_path))).get_start_method() == "forkserver"
    assert started == [["__main__", "expertscope", "transformers.modeling_utils",
                        "transformers.models.qwen2_moe.modeling_qwen2_moe"]]

    def fail() -> None:
        raise OSError("AF_UNIX path too long")

    monkeypatch.setattr(forkserver, "ensure_running", fail)
    assert _worker_context(ModelSpec(str(tmp_path))).get_start_method() == "spawn"


def test_plan_batches_longest_first_skipping_done() -> None:
    texts = {"a": ["xx", "xxxx", "x", "xxxx"], "b": ["y"]}
    plan = plan_batches(texts, 2, done=lambda d, i: (d, i) == ("a", 2))
    assert plan == [("a", [1, 3]), ("a", [0]), ("b", [0])]
    assert plan_batches(texts, 3, sort_by_length=False) == [("a", [0, 1, 2]), ("a", [3]), ("b", [0])]
    with pytest.raises(es.ConfigError, match="batch_size must be positive"):
        plan_batches(texts, 0)


def test_domain_inputs_and_their_errors(moe) -> None:
    assert [d.name for d in as_domain_list(["t1", "t2"])] == ["texts"]
    assert domain_texts({"a": ["1", "2", "3"]}, limit=2) == {"a": ["1", "2"]}
    assert flatten_texts({"a": ["1", "2"], "b": ["3"]}) == (["1", "2", "3"], ["a", "a", "b"], [0, 1, 0])
    with pytest.raises(es.InputTypeError, match="is one string"):
        as_domain_list("one text")
    with pytest.raises(es.DataError, match="no domain given"):
        as_domain_list([])
    with pytest.raises(es.DataError, match="repeat"):
        domain_texts([Domain("a", [Example("x")]), Domain("a", [Example("y")])])
    with pytest.raises(es.DataError, match="has no texts"):
        domain_texts({"a": []})
    ctx = moe.context_length
    assert effective_max_length(moe, None) == ctx
    assert effective_max_length(moe, 3) == 3
