"""The shipped demo MoE: files and architecture, accuracy above chance, batch-size invariance, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from expertscope.cli.main import app
from expertscope.data import prompts, synthetic
from expertscope.demo import demo_model_path
from expertscope.evaluation import evaluate

MODEL_DIR = demo_model_path()
DEMOS = ("demo", "demo-deepseek")
# The accuracy band every domain of every shipped demo must meet on the test split: above chance, unsaturated.
BAND = (0.50, 0.80)
BAND_SAMPLE = 60  # test items per domain in the fresh check (a Wilson interval of about +-0.12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shipped(name: str) -> bool:
    return (demo_model_path(name) / "model.safetensors").exists()


needs_demo = pytest.mark.skipif(not _shipped("demo"), reason="the demo model has not been trained")


@pytest.fixture(scope="module")
def demos() -> dict:
    from expertscope.models.loading import load_model

    return {name: load_model(name, dtype="float32") for name in DEMOS if _shipped(name)}


@pytest.fixture(scope="module")
def demo(demos: dict):
    return demos["demo"]


@pytest.mark.parametrize("name", DEMOS)
def test_shipped_files_and_architecture(name: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = demo_model_path(name)
    if not _shipped(name):
        pytest.skip(f"{name} has not been trained")
    assert (path / "model.safetensors").stat().st_size <= 30 * 1024 * 1024
    cfg = AutoConfig.from_pretrained(path)
    if name == "demo":
        assert cfg.model_type == "mixtral"
        assert cfg.num_local_experts >= 8 and cfg.num_experts_per_tok == 2 and cfg.num_hidden_layers >= 4
    else:  # DeepSeek-MoE-like: fine-grained routed experts, top-4, a shared expert
        assert cfg.model_type == "qwen2_moe"
        assert 16 <= cfg.num_experts <= 32 and cfg.num_experts_per_tok == 4
        assert cfg.shared_expert_intermediate_size > 0
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert [tok.decode([i]) for i in tok("2026", add_special_tokens=False)["input_ids"]] == list("2026")
    manifest = json.loads((path / "training_manifest.json").read_text())
    assert manifest["config"]["seed"] == 0 and manifest["phase3"]["steps"] > 0
    assert manifest["architecture"] == ("mixtral" if name == "demo" else "deepseek")


@pytest.mark.parametrize("name", DEMOS)
@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_fresh_test_accuracy_is_compatible_with_the_band(demos: dict, name: str, domain: str) -> None:
    """A fresh evaluation (not the manifest) of 60 test items: the Wilson 95 % interval must overlap the
    band [0.50, 0.80], i.e. the sample does not show the model below it (chance) or above it (saturated)."""
    if name not in demos:
        pytest.skip(f"{name} has not been trained")
    dom = synthetic.generate(domain, BAND_SAMPLE, seed=0, split="test")
    res = evaluate(demos[name], dom.task, dom, batch_size=30)
    assert res.n == BAND_SAMPLE
    assert res.ci_high >= BAND[0] and res.ci_low <= BAND[1], (name, domain, res.accuracy, res.ci_low, res.ci_high)


@needs_demo
@pytest.mark.parametrize("name", ["emotion", "knowledge", "math"])
def test_demo_is_clearly_above_chance(demo, name: str) -> None:
    """On 60 test examples the lower 95 % bound beats chance (the majority-class rate for emotion)."""
    dom = synthetic.generate(name, 60, seed=0, split="test")
    res = evaluate(demo, dom.task, dom, batch_size=16)
    if name == "emotion":
        labels = [e.label for e in synthetic.generate(name, 2000, seed=0, split="train")]
        chance = max(labels.count(x) for x in set(labels)) / len(labels)
    else:
        chance = 0.25 if name == "knowledge" else 0.02
    assert res.n == 60
    assert res.ci_low > chance, (res.accuracy, res.ci_low, chance)


@needs_demo
@pytest.mark.slow
def test_cli_eval_demo_same_scores_at_batch_1_and_8(tmp_path: Path) -> None:
    outs = {}
    for bs in (1, 8):
        out = tmp_path / f"b{bs}"
        args = ["eval", "--model", "demo", "--limit", "8", "--batch-size", str(bs), "--dtype", "float32"]
        result = CliRunner().invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "knowledge" in result.output and "95% CI" in result.output
        outs[bs] = out
    assert json.loads((outs[1] / "results.json").read_text()) == json.loads((outs[8] / "results.json").read_text())
    for name in synthetic.DOMAINS:
        rows = {
            bs: [json.loads(x) for x in (outs[bs] / f"predictions.{name}.jsonl").read_text().splitlines()]
            for bs in outs
        }
        for a, b in zip(rows[1], rows[8], strict=True):
            assert a["prediction"] == b["prediction"]
            if "scores" in a:
                assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
            else:
                assert a["generation"] == b["generation"]


@pytest.mark.slow
def test_training_pipeline_smoke(tmp_path: Path) -> None:
    """A minute-scale run of the shipped training script writes a loadable Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertscope.demo.train import TrainConfig, train

    cfg = TrainConfig(hidden_size=32, intermediate_size=32, vocab_size=400, batch_size=16, threads=1).scaled(0.0005)
    manifest = train(tmp_path / "m", cfg, evaluate_after=False)
    assert manifest["steps"] > 0 and manifest["parameters"] > 0
    assert manifest["phase2"]["steps"] == cfg.phase2_steps > 0
    assert manifest["phase2"]["validation_knowledge"][-1][0] == cfg.phase2_steps
    assert manifest["phase3"]["steps"] == cfg.phase3_steps > 0
    step, report = manifest["phase3"]["validation"][-1]
    assert step == cfg.phase3_steps and set(report["accuracy"]) == set(synthetic.DOMAINS)
    assert len(report["mi_bits"]) == cfg.num_layers
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.num_local_experts == 8 and tok.pad_token == "<pad>"
    res = evaluate(model, "multiple_choice", synthetic.generate("knowledge", 4, split="test"), tokenizer=tok)
    assert res.n == 4

    # Phase 2 alone from the saved phase-1 directory (`demo train --from-phase1`) keeps the phase-1 record.
    from safetensors.torch import load_file

    from expertscope.demo.train import run_phase2

    again = run_phase2(tmp_path / "m", tmp_path / "p2", cfg, evaluate_after=False)
    assert again["steps"] == manifest["steps"] and again["phase2"]["steps"] == cfg.phase2_steps
    before, after = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "p2" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # Phase 3 alone as the DeepSeek-like demo: upcycled to fine-grained experts plus a shared expert.
    from expertscope.demo.train import run_phase3
    from expertscope.models.loading import load_model

    ds_cfg = TrainConfig(**{**cfg.__dict__, "architecture": "deepseek"})
    ds = run_phase3(tmp_path / "p2", tmp_path / "ds", ds_cfg, evaluate_after=True)
    assert ds["architecture"] == "deepseek" and ds["phase3"]["steps"] == cfg.phase3_steps
    assert set(ds["test_accuracy"]) == set(synthetic.DOMAINS) and "emotion" in ds["test_label_margins"]
    assert cfg.eval_n == 8 and all(r["n"] == 8 for r in ds["test_results"].values())  # scaled like the data
    moe = load_model(str(tmp_path / "ds"), dtype="float32")
    assert moe.num_experts == 2 * cfg.num_experts and moe.top_k == 2 * cfg.top_k
    assert set(moe.describe()["num_shared_experts"].values()) == {1}


def test_upcycling_keeps_the_function_and_finds_shared_experts() -> None:
    """Cutting each Mixtral expert into fine-grained pieces (plus a silent shared expert) computes the same
    logits as the Mixtral model, for split 2 and 4."""
    from expertscope.demo.upcycle import upcycle_mixtral
    from expertscope.models.model import MoEModel
    from expertscope.testing import tiny_model

    mix = tiny_model("mixtral", seed=0)
    ids = torch.randint(0, mix.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = mix(input_ids=ids).logits
        for split in (2, 4):
            up = upcycle_mixtral(mix, split=split, shared_intermediate_size=16)
            assert up.config.num_experts == split * mix.config.num_local_experts
            assert up.config.num_experts_per_tok == split * mix.config.num_experts_per_tok
            torch.testing.assert_close(up(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert MoEModel.from_model(up, verify=True).num_experts == 4 * mix.config.num_local_experts


def test_phase3_pairs_follow_the_mix_and_avoid_test_items() -> None:
    from expertscope.demo.train import TrainConfig, phase3_pairs

    pairs = phase3_pairs(TrainConfig(), 1000)
    assert len(pairs) == 1000
    emotion = [p for p, _ in pairs if p.startswith("Dialogue:")]
    assert abs(len(emotion) - 450) <= 1
    test_prompts = {
        prompts.prompt(dom.task, ex)
        for name in synthetic.DOMAINS
        for dom in [synthetic.generate(name, 300, split="test")]
        for ex in dom.examples
    }
    assert not test_prompts & {p for p, _ in pairs}


def test_phase2_pairs_follow_the_mix_and_avoid_test_items() -> None:
    """Phase-2 data has the configured shares and never contains a test-split question."""
    from expertscope.demo.train import TrainConfig, phase2_pairs

    cfg = TrainConfig()
    pairs = phase2_pairs(cfg, 1000)
    assert len(pairs) == 1000
    matching = [p for p, _ in pairs if "Which option" in p or "Pick the option" in p]
    assert abs(len(matching) - 400) <= 2  # 15 % single-token + 25 % knowledge-value matching
    emotion = [p for p, _ in pairs if p.startswith("Dialogue:")]
    assert abs(len(emotion) - 50) <= 1
    test_prompts = {
        prompts.prompt("multiple_choice", ex) for ex in synthetic.generate("knowledge", 500, split="test").examples
    }
    assert not test_prompts & {p for p, _ in pairs}


def test_demo_train_from_phase1_rejects_a_non_model_directory(tmp_path: Path) -> None:
    """`demo train --from-phase1` on a directory without config.json: one-line error, exit 2, nothing written."""
    result = CliRunner().invoke(app, ["demo", "train", "--out", str(tmp_path / "out"), "--from-phase1", str(tmp_path)])
    assert result.exit_code == 2
    assert "no config.json" in result.output
    assert not (tmp_path / "out").exists()


def test_warmup_cosine_lr_against_hand_values() -> None:
    from expertscope.demo.train import warmup_cosine_lr

    assert warmup_cosine_lr(0, 1.0, 10, 110, floor=0.1) == pytest.approx(0.1)
    assert warmup_cosine_lr(10, 1.0, 10, 110, floor=0.1) == pytest.approx(1.0)
    assert warmup_cosine_lr(60, 1.0, 10, 110, floor=0.1) == pytest.approx(0.55)  # half-way: floor + (1-floor)/2
    assert warmup_cosine_lr(110, 1.0, 10, 110, floor=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("name", DEMOS)
def test_demo_train_defaults_are_the_shipped_recipe(name: str) -> None:
    """`expertscope demo train --demo <name>` runs the settings the shipped model was trained with."""
    from dataclasses import asdict

    from expertscope.demo.train import DEMO_ARCHITECTURES, TrainConfig

    if not _shipped(name):
        pytest.skip(f"{name} has not been trained")
    shipped = json.loads((demo_model_path(name) / "training_manifest.json").read_text())["config"]
    cfg = asdict(TrainConfig(architecture=DEMO_ARCHITECTURES[name]))
    for key, value in cfg.items():
        if key == "threads":  # a machine setting, not part of the recipe
            continue
        assert key in shipped, key
        assert (list(value) if isinstance(value, tuple) else value) == shipped[key], key
    assert TrainConfig(architecture="deepseek", phase3_aux_loss_coef=0.5).phase3_aux_loss_coef == 0.5


@pytest.mark.parametrize("name", DEMOS)
def test_tokenizer_round_trips_emotion_v2_words(name: str) -> None:
    """The demos' byte-level BPE tokenizer (trained before emotion v2 existed) spells its new words exactly."""
    from transformers import AutoTokenizer

    if not _shipped(name):
        pytest.skip(f"{name} has not been trained")
    tok = AutoTokenizer.from_pretrained(demo_model_path(name))
    dom = synthetic.generate("emotion", 200, seed=0, split="validation")
    for text in dom.texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_demo_train_rejects_unknown_demo_and_bad_phase2_dir(tmp_path: Path) -> None:
    """`demo train --demo <unknown>` and `--from-phase2 <not a model>`: one-line errors, exit 2, nothing written."""
    out = tmp_path / "out"
    bad = CliRunner().invoke(app, ["demo", "train", "--out", str(out), "--demo", "demo-nope"])
    assert bad.exit_code == 2 and "unknown demo" in bad.output
    missing = CliRunner().invoke(app, ["demo", "train", "--out", str(out), "--from-phase2", str(tmp_path)])
    assert missing.exit_code == 2 and "no config.json" in missing.output
    both = CliRunner().invoke(
        app, ["demo", "train", "--out", str(out), "--from-phase1", str(tmp_path), "--from-phase2", str(tmp_path)]
    )
    assert both.exit_code == 2 and "exclude each other" in both.output
    assert not out.exists()


def test_train_demo_checks_its_arguments_and_locks_out(tmp_path: Path) -> None:
    """The library entry refuses what the command refuses, before writing anything, and never trains into a
    directory another process is writing to."""
    from expertscope.demo.train import train_demo
    from expertscope.errors import ConfigError, OutputError
    from expertscope.rundir import lock_dir

    out = tmp_path / "out"
    for kwargs, message in (({"demo": "demo-nope"}, "unknown demo 'demo-nope'"), ({"scale": 0.0}, "--scale"),
                            ({"threads": 0}, "--threads"),
                            ({"from_phase1": tmp_path, "from_phase2": tmp_path}, "exclude each other")):
        with pytest.raises(ConfigError, match=message):
            train_demo(out, **kwargs)
        assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        train_demo(tmp_path / "file" / "out")
    with lock_dir(out, require_manifest=False, create=True), pytest.raises(OutputError, match="another expertscope"):
        train_demo(out, from_phase2=tmp_path)
