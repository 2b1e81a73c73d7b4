"""Steering (scale / bias) on every router family, and router-only LoRA."""

from __future__ import annotations

import json
import tempfile
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from scipy.stats import t as student_t

import expertscope as es
from expertscope.data.types import Example
from expertscope.interventions import SteeringSpec, finetune_router, load_router_adapter, steer
from expertscope.models.model import MoEModel
from expertscope.testing import TINY_BUILDERS, tiny_model, tiny_tokenizer
from oracles.stats import bh_reference

FAMILIES = sorted(TINY_BUILDERS)


def _ids(seed: int = 4) -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def _rate(moe: MoEModel, layer: int, expert: int, ids: torch.Tensor, tokens: torch.Tensor | None = None) -> float:
    with es.RouterHooks(moe, record=[layer]) as h, torch.no_grad():
        moe.model(input_ids=ids)
    hit = (h.calls[layer][0].indices == expert).any(-1).float()
    return float(hit[tokens].mean() if tokens is not None else hit.mean())


@pytest.mark.parametrize("mode", ["scale", "bias"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unit_scale_is_bit_identical(family: str, mode: str, make_tiny) -> None:
    model = make_tiny(family)
    moe = MoEModel.from_model(model)
    ids = _ids()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    targets = [(layer, e) for layer in moe.layers for e in range(moe.site(layer).num_experts)]
    with steer(moe, targets, scale=1.0, mode=mode) as s, torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, clean)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0), gen)
    assert s.total_changed == 0


@pytest.mark.parametrize("mode", ["scale", "bias"])
@pytest.mark.parametrize("family", FAMILIES)
def test_up_raises_and_down_lowers_activation(family: str, mode: str, make_tiny) -> None:
    moe = MoEModel.from_model(make_tiny(family, initializer_range=0.3))
    ids = _ids()
    layer = moe.layers[-1]
    # The expert whose logit is largest on average but not always selected: scaling moves it both ways.
    with es.RouterHooks(moe, record=[layer]) as h, torch.no_grad():
        moe.model(input_ids=ids)
    call = h.calls[layer][0]
    E = call.logits.shape[1]
    chosen = torch.stack([(call.indices == e).any(-1).float().mean() for e in range(E)])
    positive = call.logits.mean(0) > 0
    candidates = [e for e in range(E) if 0 < chosen[e] < 1 and (positive[e] or mode == "bias")]
    expert = candidates[0] if candidates else int(call.logits.mean(0).argmax())
    # Scaling moves a negative logit the other way (docs/methods.md §5), so in scale mode compare on the tokens
    # where the expert's logit is positive; a bias moves every token the same way.
    tokens = call.logits[:, expert] > 0 if mode == "scale" else None
    base = _rate(moe, layer, expert, ids, tokens)
    up_s, down_s = (3.0, 0.3) if mode == "scale" else (20.0, 0.05)
    with steer(moe, [(layer, expert)], scale=up_s, mode=mode) as s:
        up = _rate(moe, layer, expert, ids, tokens)
    changed_up = s.total_changed
    with steer(moe, [(layer, expert)], scale=down_s, mode=mode) as s:
        down = _rate(moe, layer, expert, ids, tokens)
    changed_down = s.total_changed
    assert up >= base >= down
    assert up > down
    # The reported count of changed selections agrees with what was measured.
    assert changed_up > 0 or up == base
    assert changed_down > 0 or down == base


def test_steering_removes_itself_after_exception_and_replays_from_json(make_tiny, tmp_path) -> None:
    moe = MoEModel.from_model(make_tiny("mixtral", initializer_range=0.3))
    ids = _ids()
    with torch.no_grad():
        clean = moe.model(input_ids=ids).logits
    with pytest.raises(RuntimeError), steer(moe, [(0, 1)], scale=5.0):
        raise RuntimeError("user code failed")
    with torch.no_grad():
        assert torch.equal(moe.model(input_ids=ids).logits, clean)
    spec = SteeringSpec(targets=((0, 1), (2, 3)), scale=1.5, mode="bias")
    spec.save(tmp_path / "s.json")
    back = SteeringSpec.load(tmp_path / "s.json")
    assert back == spec and json.loads((tmp_path / "s.json").read_text())["mode"] == "bias"
    s1 = steer(moe, spec=spec).attach()
    with torch.no_grad():
        a = moe.model(input_ids=ids).logits
    s1.detach()
    with steer(moe, spec=back), torch.no_grad():
        b = moe.model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, clean)


def test_steering_composes_with_recording(make_tiny) -> None:
    moe = MoEModel.from_model(make_tiny("qwen2_moe", initializer_range=0.3))
    ids = _ids()
    with steer(moe, [(1, 0)], scale=50.0, mode="bias"), es.RouterHooks(moe, record=True) as h, torch.no_grad():
        moe.model(input_ids=ids)
    assert bool((h.calls[1][0].indices == 0).any(-1).all())
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()


@pytest.mark.parametrize(
    ("targets", "scale", "message"),
    [([(9, 0)], 1.2, "not an MoE layer"), ([(0, 99)], 1.2, "does not exist"), ([(0, 0)], 0.0, "positive"),
     ([(0, 0)], -1.0, "positive")],
)
def test_bad_targets_and_scales(targets, scale, message, make_tiny) -> None:
    moe = MoEModel.from_model(make_tiny("mixtral"))
    with pytest.raises(es.ConfigError, match=message):
        steer(moe, targets, scale=scale)


@pytest.mark.slow
def test_router_lora_trains_only_router_adapters_and_reloads(tmp_path) -> None:
    model = tiny_model("mixtral", num_hidden_layers=4, initializer_range=0.3)
    moe = MoEModel.from_model(model, tokenizer=tiny_tokenizer())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = [Example(text=f"item {i % 5}", label="joy" if i % 2 else "anger") for i in range(32)]
    ft = finetune_router(moe, train, task="classification", layers="last3", rank=4, lr=5e-2, epochs=6,
                         batch_size=8, seed=0)
    assert ft.adapted == [f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)]
    assert ft.trainable_parameters == 3 * (4 * 32 + 4 * 4)
    assert ft.losses[-1] < ft.losses[0]
    # Only the targeted routers' adapter weights changed; every original parameter is untouched.
    for name, p in ft.peft_model.named_parameters():
        base = name.replace("base_model.model.", "")
        if "lora_" in name:
            assert any(f"layers.{i}.mlp.gate" in name for i in (1, 2, 3))
            if "lora_B" in name:
                assert p.abs().sum() > 0, name  # B starts at zero; training moved it
        else:
            assert not p.requires_grad
            key = base.replace(".base_layer", "")
            if key in before:
                assert torch.equal(p, before[key]), name
    ids = _ids()
    with torch.no_grad():
        tuned = ft.peft_model(input_ids=ids).logits
    ft.save(tmp_path / "adapter")
    ft.unload()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, _fresh_logits(ids))
    reloaded = load_router_adapter(moe, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, tuned, atol=1e-6)


def _fresh_logits(ids: torch.Tensor) -> torch.Tensor:
    model = tiny_model("mixtral", num_hidden_layers=4, initializer_range=0.3)
    return model(input_ids=ids).logits


def test_router_lora_bad_input(make_tiny) -> None:
    moe = MoEModel.from_model(make_tiny("mixtral"), tokenizer=tiny_tokenizer())
    with pytest.raises(es.DataError, match="training set is empty"):
        finetune_router(moe, [], task="classification")
    with pytest.raises(es.ConfigError, match="not an MoE layer"):
        finetune_router(moe, [Example("a", label="joy")], task="classification", layers=[7])


def test_paired_bootstrap_against_hand_computation() -> None:
    from expertscope.interventions.steering_study import paired_bootstrap

    a = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    b = np.array([1, 1, 1, 0, 1, 0, 1, 1])
    d, lo, hi = paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert d == pytest.approx(0.25)
    assert lo < d < hi and lo >= -1 and hi <= 1
    d0, lo0, hi0 = paired_bootstrap(a, a, n_boot=100)
    assert (d0, lo0, hi0) == (0.0, 0.0, 0.0)


@pytest.mark.slow
def test_intervention_study_rows_and_deltas_are_consistent(make_tiny) -> None:
    import pandas as pd

    from expertscope.data.sources import load_domain
    from expertscope.evaluation import evaluate
    from expertscope.interventions.steering_study import CONDITIONS, intervention_study

    moe = MoEModel.from_model(make_tiny("mixtral", initializer_range=0.3, num_local_experts=8),
                              tokenizer=tiny_tokenizer())
    dom = load_domain("emo=synthetic:emotion@test", limit=12)
    table = pd.DataFrame({"domain": ["emo"] * 2, "layer": [0, 2], "expert": [1, 3],
                          "is_domain_expert": [True, True], "specificity": [0.2, 0.5]})
    drivers = pd.DataFrame({"domain": ["emo"], "layer": [1], "expert": [0], "is_driver": [True], "ce_mean": [0.1]})
    train = {"emo": load_domain("emo=synthetic:emotion@train", limit=8)}
    res = intervention_study(moe, [dom], table, drivers, train=train, scale_up=3.0, scale_down=0.3, n_boot=200,
                             n_controls=4, n_reference=1, dose_scales=(), dose_biases=(), finetune_max_steps=2,
                             finetune_batch_size=4, batch_size=4, selectivity=False)
    t = res.table.set_index("condition")
    assert list(t.index) == list(CONDITIONS) and t["applicable"].all() and (t["reason"] == "").all()
    base = evaluate(moe, "classification", dom, batch_size=4)
    assert t.loc["original", "accuracy"] == base.accuracy
    assert t.loc["domain_up", "n_targets"] == 2 and t.loc["driver_up", "n_targets"] == 1
    for cond in CONDITIONS:
        assert t.loc[cond, "delta"] == pytest.approx(t.loc[cond, "accuracy"] - base.accuracy)
        assert t.loc[cond, "delta_lo"] <= t.loc[cond, "delta"] + 1e-12 <= t.loc[cond, "delta_hi"] + 2e-12
    # steering with these scales changes routing; the router LoRA was removed afterwards
    assert t.loc["domain_up", "changed_selections"] > 0
    assert t.loc["domain_mask", "mode"] == "mask"
    assert evaluate(moe, "classification", dom, batch_size=4).accuracy == base.accuracy
    # The router-LoRA row has its own mode and a parameter count (not a number of targets).
    lora = t.loc["finetune_router"]
    assert lora["mode"] == "lora" and np.isnan(lora["n_targets"]) and lora["n_parameters"] == 3 * (8 * 32 + 8 * 8)
    # Each steered row's control numbers come from the arms table: the mean over draws and Δ(target) − it. The
    # table has no activation rates, so the verdict falls back to random controls of the layer, and says so.
    arms = res.arms
    assert (res.dose["control"] == "random").all() and res.dose["control_reason"].str.contains("random").all()
    assert (res.dose["n_tests"] == len(res.dose)).all() and res.settings["n_tests"] == len(res.dose)
    p_all = []
    for cond in ("domain_up", "driver_mask"):
        kind, strength = t.loc[cond, "kind"], t.loc[cond, "strength"]
        a = arms[(arms.kind == kind) & (arms.strength == strength)]
        rand = a[a.role == "verdict"]
        assert len(rand) == 4 and t.loc[cond, "control_draws"] == 4 and (rand.arm == "random").all()
        assert rand["changed_selections"].isna().all()  # verdict draws do not record routing changes
        assert t.loc[cond, "control_delta"] == pytest.approx(rand["delta"].mean())
        assert t.loc[cond, "control_delta_min"] == pytest.approx(rand["delta"].min())
        tgt = a[a.arm == "target"].iloc[0]
        assert t.loc[cond, "diff"] == pytest.approx(tgt["delta"] - rand["delta"].mean())
        assert t.loc[cond, "diff_lo"] <= t.loc[cond, "diff"] + 1e-12 <= t.loc[cond, "diff_hi"] + 1e-12
        # The verdict's p-value by hand: a t prediction test over the draws' Δ (floored at 1/n) and a sign test.
        n, deltas = len(tgt["correct"]), rand["delta"].to_numpy(float)
        sd = max(float(np.std(deltas, ddof=1)), 1 / n) * np.sqrt(1 + 1 / 4)
        p_set = 2 * student_t.sf(abs(tgt["delta"] - deltas.mean()) / sd, 3)
        per_item = (np.array([int(c) for c in tgt["correct"]])
                    - np.mean([[int(c) for c in r] for r in rand["correct"]], axis=0))
        nz = per_item[per_item != 0]
        p_item = binomtest(int((nz > 0).sum()), len(nz)).pvalue if len(nz) else 1.0
        assert t.loc[cond, "p_vs_control"] == pytest.approx(max(p_set, p_item))
        p_all.append(t.loc[cond, "p_vs_control"])
        # per-item correctness in the arms table gives the same accuracy
        assert np.mean([int(c) for c in tgt["correct"]]) == pytest.approx(tgt["accuracy"])
    # BH over the run's tested conditions (here 6: 2 kinds × 3 strengths), then the interval clear of 0.
    q = bh_reference(res.dose["p_vs_control"].to_numpy(float))
    for r, qq in zip(res.dose.itertuples(), q, strict=True):
        assert r.q_vs_control == pytest.approx(qq)
        tol = 0.5 / (r.n * r.control_draws)
        assert r.specific == (qq <= 0.05 and (r.diff_lo > tol or r.diff_hi < -tol))


@pytest.mark.slow
def test_intervention_conditions_without_targets_are_not_applicable(make_tiny) -> None:
    import pandas as pd

    from expertscope.config import InterventionConfig
    from expertscope.data.sources import load_domain
    from expertscope.evaluation import evaluate
    from expertscope.interventions.steering_study import CONDITIONS, intervention_study

    moe = MoEModel.from_model(make_tiny("mixtral", initializer_range=0.3), tokenizer=tiny_tokenizer())
    dom = load_domain("emo=synthetic:emotion@test", limit=10)
    table = pd.DataFrame({"domain": ["emo"], "layer": [0], "expert": [1], "is_domain_expert": [True],
                          "specificity": [0.2]})
    # Drivers were scored but none passed: the reason carries the largest mean CE.
    drivers = pd.DataFrame({"domain": ["emo"] * 2, "layer": [0, 1], "expert": [0, 0], "is_driver": [False] * 2,
                            "ce_mean": [2e-4, 7e-4]})
    seen: list[str] = []
    res = intervention_study(moe, [dom], table, drivers, config=InterventionConfig(
        dose_scales=(2.0,), dose_biases=(), n_controls=1, n_boot=50, batch_size=5), on_eval=seen.append)
    t = res.table.set_index("condition")
    assert list(t.index) == list(CONDITIONS)
    na = t[~t["applicable"]]
    assert list(na.index) == ["driver_up", "driver_down", "driver_mask", "finetune_router"]
    assert na.loc["driver_up", "reason"] == "no driver experts (largest mean CE 0.0007 nats)"
    assert na.loc["finetune_router", "reason"] == "no training split given"
    measured = ["n", "accuracy", "ci_low", "ci_high", "delta", "delta_lo", "delta_hi", "changed_selections"]
    assert na[measured].isna().all().all()  # no numbers at all, never 0.000 [0, 0]
    assert (na.drop(index="finetune_router")["n_targets"] == 0).all()
    assert np.isnan(na.loc["finetune_router", "n_targets"]) and na.loc["finetune_router", "mode"] == "lora"
    assert not any("driver" in label for label in seen)  # nothing evaluated for a condition with no targets
    base = evaluate(moe, "classification", dom, batch_size=5)
    assert t.loc["domain_up", "n"] == base.n and t.loc["original", "accuracy"] == base.accuracy
    assert set(res.dose[res.dose["applicable"]]["kind"]) == {"domain"}
    # The table has no activation rates: the busiest control says so, the random ones are there.
    assert "no activation rates" in t.loc["domain_up", "control_reason"]
    # No tables at all: every steered condition says which table is missing.
    bare = intervention_study(moe, [dom], n_boot=20, batch_size=5, finetune=False)
    bt = bare.table.set_index("condition")
    assert bt.loc["domain_down", "reason"] == "no domain-expert table given"
    assert bt.loc["finetune_router", "reason"] == "router LoRA switched off (finetune=False)"
    assert bt["applicable"].sum() == 1 and not bare.arms.shape[0]


@pytest.mark.slow
def test_intervention_study_labels_saturated_tasks(make_tiny) -> None:
    from expertscope.data.sources import load_domain
    from expertscope.interventions.steering_study import intervention_study

    moe = MoEModel.from_model(make_tiny("mixtral", initializer_range=0.3), tokenizer=tiny_tokenizer())
    dom = load_domain("emo=synthetic:emotion@test", limit=10)
    acc = intervention_study(moe, [dom], n_boot=20, batch_size=5, finetune=False).table["accuracy"].iloc[0]
    # The same run with the threshold at the measured accuracy (saturated) and just above it (not).
    for thr, want in ((acc, True), (acc + 0.01, False)):
        if not 0 < thr <= 1:
            continue
        t = intervention_study(moe, [dom], n_boot=20, batch_size=5, finetune=False, saturation=thr).table
        assert t["saturated"].tolist() == [want] * len(t), (thr, acc)


def test_intervention_config_rule_and_validation() -> None:
    from expertscope.config import InterventionConfig
    from expertscope.interventions.steering_study import intervention_study

    with pytest.raises(es.ConfigError, match=r"contradicts config\.scale_up"):
        intervention_study(None, [], config=InterventionConfig(scale_up=1.5), scale_up=2.0)  # type: ignore[arg-type]
    with pytest.raises(es.ConfigError, match="dose scales must be positive"):
        InterventionConfig(dose_scales=(1.0, 0.0))
    with pytest.raises(es.ConfigError, match="must be True or False"):
        InterventionConfig(finetune={"epochs": 1})  # type: ignore[arg-type]
    with pytest.raises(es.ConfigError, match="n_controls"):
        InterventionConfig(n_controls=-1)
    c = InterventionConfig.from_dict(InterventionConfig(dose_biases=(0.5, 3)).to_dict())
    assert c.dose_biases == (0.5, 3.0) and c.finetune_kwargs()["epochs"] == 1


@pytest.mark.slow
def test_steer_study_command_and_bad_scale(tmp_path) -> None:
    from typer.testing import CliRunner

    from expertscope.cli.main import app

    d = tmp_path / "m"
    tiny_model("mixtral", num_local_experts=8, initializer_range=0.2).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    runner = CliRunner()
    base = ["steer-study", "--model", str(d), "-d", "emotion=synthetic:emotion@validation",
            "-d", "knowledge=synthetic:knowledge@validation", "--limit", "8", "--causal-limit", "2",
            "--eval-limit", "5", "--train-limit", "4", "--n-boot", "20", "-b", "4",
            "--n-controls", "1", "--dose-scales", "0.5", "--dose-biases", "4"]  # controls: tested in their own file
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "o"), "--mode", "bias", "--scale-up", "2.0"])
    assert r.exit_code == 0, r.output
    import pandas as pd

    t = pd.read_parquet(tmp_path / "o" / "steering.parquet")
    updown = t[t.condition.isin(["domain_up", "domain_down"])]
    assert set(updown["mode"]) == {"bias"} and t[t.condition == "domain_up"]["scale"].iloc[0] == 2.0
    assert set(t[t.condition == "domain_mask"]["mode"]) == {"mask"}
    assert "finetune_router" in set(t["condition"]) and "steering study complete" in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "p"), "--scale-down", "0"])
    assert r.exit_code == 2 and "--scale-down 0.0 is not positive" in r.output


@pytest.mark.slow
def test_intervention_study_evaluates_each_distinct_condition_once(make_tiny) -> None:
    """An arm met twice (the ↑ row and the same dose point; a selectivity diagonal and the mask point) is
    evaluated once, and its numbers equal an independent steered evaluation."""
    import pandas as pd

    from expertscope.data.sources import load_domain
    from expertscope.evaluation import evaluate
    from expertscope.interventions.steering_study import intervention_study

    moe = MoEModel.from_model(make_tiny("mixtral", initializer_range=0.3), tokenizer=tiny_tokenizer())
    dom = load_domain("emo=synthetic:emotion@test", limit=10)
    table = pd.DataFrame({"domain": ["emo"] * 2, "layer": [0, 2], "expert": [1, 3],
                          "is_domain_expert": [True, True], "specificity": [0.2, 0.5]})
    labels: list[str] = []
    progress: list[tuple[str, int, int]] = []
    res = intervention_study(moe, [dom], table, None, scale_up=3.0, scale_down=0.3, dose_scales=(0.3, 3.0),
                             dose_biases=(), n_controls=1, n_boot=20, batch_size=5, finetune=False,
                             on_eval=labels.append, progress=lambda *a: progress.append(a))
    # original + 3 strengths (mask, ×0.3, ×3) × (target + 1 control); the ↑/↓ rows and the selectivity
    # diagonal repeat dose points
    assert len(labels) == 7, labels
    assert progress[0] == ("steering", 0, 7) and progress[-1] == ("steering", 7, 7)
    t = res.table.set_index("condition")
    d = res.dose.set_index("condition")
    assert d.loc["domain_x3", "accuracy"] == t.loc["domain_up", "accuracy"]
    assert res.selectivity.iloc[0]["delta"] == pytest.approx(t.loc["domain_mask", "delta"])
    with es.steer(moe, [(0, 1), (2, 3)], scale=3.0):
        assert evaluate(moe, "classification", dom, batch_size=5).accuracy == t.loc["domain_up", "accuracy"]


@pytest.mark.slow
def test_intervention_study_in_worker_processes_equals_in_process(tmp_path, capfd, monkeypatch) -> None:
    """Two worker processes (each loading the saved model itself, one thread) give the same profile and the
    same steering tables, bit for bit, as profiling, evaluating every arm and training the router LoRA here;
    the processes serve one job after another; a worker's error reaches the caller; a worker's death fails its
    job and the next job starts new processes."""
    import pandas as pd

    from expertscope.data.sources import load_domain
    from expertscope.execution import ModelSpec, ProcessExecutor, _worker_context
    from expertscope.interventions.steering_study import intervention_study
    from expertscope.testing import DieOnItem

    tiny_model("mixtral", initializer_range=0.3, num_local_experts=8).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moe = es.load_model(str(tmp_path / "m"), dtype="float32")
        doms = [load_domain("emo=synthetic:emotion@test", limit=8), load_domain("math=synthetic:math@test", limit=2)]
        table = pd.DataFrame({"domain": ["emo", "emo", "math"], "layer": [0, 2, 1], "expert": [1, 3, 2],
                              "is_domain_expert": [True] * 3, "specificity": [0.2, 0.5, 0.3]})
        # 16 new tokens: a tiny random model never settles an answer, so each math evaluation generates to the cap
        kw = dict(n_boot=50, n_controls=1, dose_scales=(), dose_biases=(), finetune_max_steps=2, finetune_batch_size=4,
                  batch_size=4, max_new_tokens=16, train={"emo": load_domain("emo=synthetic:emotion@train", limit=8)})
        local = intervention_study(moe, doms, table, None, **kw)
        jobs = tmp_path / "tmp"
        jobs.mkdir()
        spec = ModelSpec(str(tmp_path / "m"), dtype="float32", threads=1)
        _worker_context(spec)  # the process server starts here, its socket not among the job files below
        monkeypatch.setattr(tempfile, "tempdir", str(jobs))  # where the job files go
        ex = ProcessExecutor(spec, workers=2)
        # first a profiling job (as a study's profile stage), then the steering job on the same processes
        texts = {"a": ["hello there", "a longer sentence of text", "x"], "b": ["1 + 2 = 3", "four five six"]}
        local_prof, spread_prof = es.profile(moe, texts, batch_size=2), es.profile(moe, texts, batch_size=2,
                                                                                    executor=ex)
        pids = set(ex._pool._processes)
        seen: list[tuple[int, int]] = []
        capfd.readouterr()
        with warnings.catch_warnings():  # as the CLI does: third-party FutureWarnings hidden, in the workers too
            warnings.simplefilter("ignore", FutureWarning)
            spread = intervention_study(moe, doms, table, None, executor=ex,
                                        progress=lambda t, d, n: seen.append((d, n)), **kw)
        assert "FutureWarning" not in capfd.readouterr().err
    finally:
        torch.set_num_threads(threads)
    assert local.settings["evaluations"] == spread.settings["evaluations"] > 10
    for attr in ("table", "dose", "arms", "selectivity"):
        pd.testing.assert_frame_equal(getattr(local, attr), getattr(spread, attr))
    assert seen[-1][0] == seen[-1][1] == local.settings["evaluations"] + 1  # + the router LoRA
    assert local.table.set_index(["domain", "condition"]).loc[("emo", "finetune_router"), "n_parameters"] > 0
    assert local_prof.domains == spread_prof.domains
    (n_l, t_l), (n_s, t_s) = local_prof.totals(), spread_prof.totals()
    assert np.array_equal(n_l, n_s) and n_l.sum() > 0
    for k in t_l:
        assert np.array_equal(t_l[k], t_s[k], equal_nan=True), k
    assert np.array_equal(local_prof.seq_stats("h_bern"), spread_prof.seq_stats("h_bern"))
    # an arm that fails in a worker (a target beyond the router) fails the study with the library's own error;
    # the same two processes served the profile and both studies, and close() stops them
    bad = table.assign(expert=[1, 3, 99])
    with pytest.raises(es.ConfigError, match="expert 99 does not exist at layer 1"):
        intervention_study(moe, doms, bad, None, executor=ex, **{**kw, "n_controls": 0, "selectivity": False})
    assert set(ex._pool._processes) == pids and len(pids) == 2
    # a worker process that dies (SIGKILL) fails its job in one line; the next job starts new processes
    with pytest.raises(es.ExpertscopeError, match="a worker process died"):
        es.profile(moe, texts, batch_size=2, executor=DieOnItem(ex, 1))
    again = es.profile(moe, texts, batch_size=2, executor=ex)
    assert len(ex._pool._processes) == 2 and not set(ex._pool._processes) & pids
    assert np.array_equal(local_prof.seq_stats("h_bern"), again.seq_stats("h_bern"))
    procs = list(ex._pool._processes.values())
    ex.close()
    assert ex._pool is None and not any(p.is_alive() for p in procs)
    assert not list(jobs.iterdir())  # each job's factory file removed
