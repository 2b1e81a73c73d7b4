"""Issue 38, item 2: ``expertscope plan`` says what a study costs before any weight is loaded, from the model's
config and the data; its counts follow the stages' own work."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import expertscope as es
from expertscope.cli.main import app
from expertscope.models.loading import ModelSource
from expertscope.pipeline.plan import _arms, _causal_fe, model_shape
from expertscope.testing import save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), "qwen2_moe", num_experts=8)


def test_the_shape_from_the_config_is_the_loaded_models(model_dir: Path, monkeypatch) -> None:
    import transformers

    loaded = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(a) or real(*a, **k))
    shape = model_shape(ModelSource.resolve(str(model_dir)))
    assert not loaded  # no weight read
    moe = es.load_model(str(model_dir))
    assert shape.params == sum(p.numel() for p in moe.model.parameters())
    assert shape.moe == {s.layer: (s.num_experts, s.top_k) for s in moe.sites}
    assert shape.n_layers == len(moe.model.model.layers) and shape.bytes_per_param == 4
    # active parameters: the routed experts count k / E of theirs (by hand from the model's experts modules)
    experts = sum(p.numel() for layer in moe.model.model.layers for p in layer.mlp.experts.parameters())
    k, E = moe.top_k, moe.num_experts
    assert shape.active_params == pytest.approx(shape.params - experts + experts * k / E, rel=1e-9)
    # exact's forward-equivalents: one clean pass and a restart of layers l.. per layer and expert
    n = shape.n_layers
    assert _causal_fe(shape, "exact", 8, 1.0) == pytest.approx(1 + sum(E * (n - la) / n for la in moe.layers))


def test_plan_command_prints_every_stage_and_a_total(model_dir: Path) -> None:
    r = runner.invoke(app, ["plan", "-m", str(model_dir), "--limit", "12", "--causal-limit", "4", "--eval-limit", "6"])
    assert r.exit_code == 0, r.output
    for stage in ("profile", "drivers", "steering", "confirmation"):
        assert stage in r.output
    assert "total:" in r.output and "not calibrated" in " ".join(r.output.split())
    r = runner.invoke(app, ["plan", "-m", str(model_dir), "--limit", "12", "--causal-limit", "4", "--eval-limit", "6",
                            "--calibrate", "--tokens", "32", "--executor", "process", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "calibrated:" in r.output and "ms per token" in r.output
    words = " ".join(r.output.split())
    assert "per scored token (a batch of each domain's test items, evaluated)" in words
    # the workers' start, timed (a fresh interpreter's imports and the model's load): a few seconds here
    import re

    start = re.search(r"over 2 process workers \(their start: (\d+) s\)", words)
    assert start is not None and 0 < int(start.group(1)) < 120, words
    r = runner.invoke(app, ["plan", "-m", str(model_dir), "--tflops", "-1"])
    assert r.exit_code == 2 and "tflops" in r.output


def test_plan_counts_follow_the_inputs_and_the_settings(model_dir: Path) -> None:
    base = es.StudyConfig(model=str(model_dir), limit=12, causal=es.CausalConfig(limit=4))
    p = es.plan(base)
    prof, drv = p.stage("profile"), p.stage("drivers")
    assert prof is not None and drv is not None
    assert prof.inputs == 12 * 3 and drv.inputs == 4 * 3  # the demo's three synthetic domains
    assert drv.fe == pytest.approx(drv.inputs * _causal_fe(p.model, "exact", 8, 1.0))
    fast = es.plan(base.replace(causal=es.CausalConfig(limit=4, method="fast")))
    assert fast.stage("drivers").fe == drv.inputs * (2 + 2 * 8)  # type: ignore[union-attr]  # 8 probes
    double = es.plan(base, tflops=0.06)
    assert double.total_seconds == pytest.approx(p.total_seconds / 2, rel=1e-9)
    # the steering stage's arms: strengths x (target, controls, references, busiest) and the selectivity matrix
    c = base.intervention
    n_strengths = int(c.dose_mask) + len(set(c.dose_scales) | {c.scale_up, c.scale_down}) + len(set(c.dose_biases))
    per = n_strengths * (1 + c.n_controls + c.n_reference + int(c.busiest))
    assert _arms(base, 3) == 2 * (per + (1 + c.selectivity_controls) * 3) + 1


def test_plan_scores_the_steering_items_as_evaluation_does(model_dir: Path) -> None:
    """The steering stage's work is its arms x what evaluation runs on the test items (every label of the task,
    padded rows), counted by ``scoring_cost`` on the same items; its memory follows the largest forward."""
    from transformers import AutoTokenizer

    from expertscope.evaluation import scoring_cost
    from expertscope.pipeline.prepare import prepare

    cfg = es.StudyConfig(model=str(model_dir), limit=12, causal=es.CausalConfig(limit=4),
                         intervention=es.InterventionConfig(limit=5, batch_size=4))
    p = es.plan(cfg)
    st = p.stage("steering")
    assert st is not None
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    test = prepare(cfg).test or []
    costs = [scoring_cost(d.task, d, tok, batch_size=4, max_new_tokens=cfg.intervention.max_new_tokens)
             for d in test]
    per_item = sum(c.token_forwards for c in costs) / sum(c.items for c in costs)
    n = sum(c.items for c in costs)
    arms = _arms(cfg, len(test))
    lora = 3 * sum(len(d.examples) for d in prepare(cfg).train or []) * cfg.intervention.finetune_epochs
    assert st.inputs == n
    assert st.fe == pytest.approx(arms * n * per_item / st.tokens + lora, rel=1e-9)
    # twice the batch: rows per forward double, so the largest forward (and the stage's memory) grows
    big = es.plan(cfg.replace(intervention=es.InterventionConfig(limit=5, batch_size=8))).stage("steering")
    assert big is not None and big.memory_gb > st.memory_gb


def test_plan_spreads_the_executor_stages_over_its_workers(model_dir: Path) -> None:
    """With ``executor="process"`` the stages it runs (profiling, steering, confirmation) take their local time over
    the workers, and the first of them pays the workers' start once; the other stages are unchanged."""
    from expertscope.pipeline.plan import LOAD_GB_PER_S, WORKER_START_S

    local = es.StudyConfig(model=str(model_dir), limit=12, causal=es.CausalConfig(limit=4))
    one = es.plan(local)
    for workers in (2, 3):
        p = es.plan(local.replace(executor="process", workers=workers))
        start = WORKER_START_S + p.model.weights_gb / LOAD_GB_PER_S
        for s in one.stages:
            got = p.stage(s.stage)
            assert got is not None and got.fe == s.fe
            if s.stage == "profile":
                assert got.seconds == pytest.approx(s.seconds / workers + start, rel=1e-9)
            elif s.stage in ("steering", "confirmation"):
                assert got.seconds == pytest.approx(s.seconds / workers, rel=1e-9)
                assert f"over {workers} process workers" in got.note
            else:
                assert got.seconds == pytest.approx(s.seconds, rel=1e-9)


def test_the_routing_stages_count_the_texts_their_passes_read(model_dir: Path) -> None:
    """``causal_rate`` reads every discovery text (not the causal stage's limit) and ``expert_map`` the texts that
    give its router inputs: counted by a hook on the model's forward while the library's own functions run."""
    import pandas as pd
    import torch

    from expertscope.causal import causal_rate
    from expertscope.pipeline.prepare import prepare
    from expertscope.stats.expert_map import router_inputs

    cfg = es.StudyConfig(model=str(model_dir), limit=12, causal=es.CausalConfig(limit=4))
    p = es.plan(cfg)
    rate, emap = p.stage("causal_rate"), p.stage("expert_map")
    assert rate is not None and emap is not None
    moe = es.load_model(str(model_dir))
    doms = prepare(cfg).domains
    rows: list[int] = []
    handle = moe.model.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(int((kwargs.get("input_ids") if "input_ids" in kwargs
                                                  else args[0]).shape[0])), with_kwargs=True)
    try:
        with torch.no_grad():
            causal_rate(moe, doms, pd.DataFrame(columns=["domain", "layer", "expert", "is_driver"]),
                        batch_size=cfg.causal.batch_size, max_length=cfg.causal.max_length)
            read_by_rate = sum(rows)
            rows.clear()
            router_inputs(moe, doms, batch_size=cfg.profile.batch_size, max_length=cfg.profile.max_length)
            read_by_map = sum(rows)
    finally:
        handle.remove()
    assert rate.inputs == rate.forward_passes == read_by_rate == 12 * 3
    # the plan reads whole batches until the mean text length gives 1024 inputs: within a batch of the count
    assert abs(emap.forward_passes - read_by_map) <= cfg.profile.batch_size
    assert emap.forward_passes < rate.forward_passes  # 16 of the 36 texts here: not every text, as before


def test_calibration_times_at_the_studys_thread_count(model_dir: Path, monkeypatch) -> None:
    """``--calibrate`` times forwards at the study's ``threads`` (the run's own count: two threads on busy cores
    made a tiny model's forward 2x slower than the run it planned) and restores the caller's afterwards."""
    import torch

    import expertscope.pipeline.plan as P

    seen = []
    monkeypatch.setattr(P, "_measure", lambda *a: seen.append(torch.get_num_threads())
                        or P.Calibration(1e-4, 1.0, 1.0, 1.0, 20.0, None, None))
    before = torch.get_num_threads()
    for threads in (1, 2):
        es.plan(es.StudyConfig(model=str(model_dir), limit=4, threads=threads), calibrate=True, stages=["profile"])
    assert seen == [1, 2] and torch.get_num_threads() == before


def test_timed_repeats_short_calls_and_takes_the_median(monkeypatch) -> None:
    import expertscope.pipeline.plan as P

    # start; a call of 0.1 s, check; 0.4 s, check; 0.1 s, check: 1.2 s passed, stop
    clock = iter([0.0, 0.0, 0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.6, 1.2])
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    calls = []
    assert P._timed(lambda: calls.append(1)) == pytest.approx(0.1)
    assert len(calls) == 3


@pytest.mark.parametrize("warm_s, items", [(0.01, 16), (2.0, 2)])
def test_evaluation_is_timed_at_its_batch_unless_one_item_takes_seconds(model_dir: Path, monkeypatch,
                                                                        warm_s: float, items: int) -> None:
    """A small model's evaluation rate is timed on its own batch (per-call costs depend on the shape); where the
    warm-up item takes over ``EVAL_SLOW_ITEM_S`` (compute-bound) two items are timed. The rate is the time over the
    tokens ``scoring_cost`` counts for exactly the items evaluated."""
    import expertscope.evaluation as ev
    import expertscope.pipeline.plan as P
    from expertscope.pipeline.prepare import prepare

    clock = [0.0]
    seen: list[int] = []

    def fake_evaluate(model, task, examples, batch_size=8, max_new_tokens=None, **kw):  # type: ignore[no-untyped-def]
        n = len(examples.examples)
        seen.append(n)
        clock[0] += warm_s if max_new_tokens == 1 else 0.001 * n
        return None

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock[0])
    cfg = es.StudyConfig(model=str(model_dir), limit=12, intervention=es.InterventionConfig(limit=20, batch_size=16))
    test = prepare(cfg).test or []
    moe = es.load_model(str(model_dir))
    rate = P._eval_rate(moe, cfg, test)
    assert seen == [1, items] * len(test)
    counted = sum(ev.scoring_cost(d.task, d.head(items), moe.tokenizer, 16, max_new_tokens=32).token_forwards
                  for d in test)
    assert rate == pytest.approx(0.001 * items * len(test) / counted)


def test_hybrid_memory_holds_the_clean_runs_its_rounds_keep(model_dir: Path, monkeypatch) -> None:
    """``hybrid`` keeps each batch's clean run between its rounds (up to the cache's budget): its planned memory
    grows with the batches, by exact's per-batch cache, until the budget caps it."""
    import expertscope.causal.exact as E
    from expertscope.pipeline.plan import _activations

    shape = model_shape(ModelSource.resolve(str(model_dir)))
    fast = _activations(shape, 4, 64.0, "fast")
    one = _activations(shape, 4, 64.0, "hybrid", inputs=4) - fast  # one batch's clean run
    assert one > 0
    assert _activations(shape, 4, 64.0, "hybrid", inputs=40) - fast == pytest.approx(10 * one)
    monkeypatch.setattr(E, "CLEAN_CACHE_BYTES", int(3.5 * one * 1e9))
    assert _activations(shape, 4, 64.0, "hybrid", inputs=40) - fast == pytest.approx(3.5 * one)
