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
# The accuracy targets for the full test splits (checked against the training manifest).
TARGETS = {"emotion": 0.60, "knowledge": 0.50, "math": 0.30}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


needs_demo = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists(), reason="the demo model has not been trained"
)


@pytest.fixture(scope="module")
def demo():
    from expertscope.models.loading import load_model

    return load_model("demo", dtype="float32")


@needs_demo
def test_shipped_files_architecture_and_manifest() -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 30 * 1024 * 1024
    cfg = AutoConfig.from_pretrained(MODEL_DIR)
    assert cfg.model_type == "mixtral"
    assert cfg.num_local_experts >= 8 and cfg.num_experts_per_tok == 2 and cfg.num_hidden_layers >= 4
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert [tok.decode([i]) for i in tok("2026", add_special_tokens=False)["input_ids"]] == list("2026")
    manifest = json.loads((MODEL_DIR / "training_manifest.json").read_text())
    assert manifest["config"]["seed"] == 0 and manifest["steps"] > 0
    assert manifest["phase2"]["steps"] == manifest["config"]["phase2_steps"] > 0
    assert set(manifest["test_accuracy"]) == set(TARGETS)


@needs_demo
@pytest.mark.parametrize("name", ["emotion", "knowledge", "math"])
def test_manifest_meets_accuracy_targets(name: str) -> None:
    manifest = json.loads((MODEL_DIR / "training_manifest.json").read_text())
    assert manifest["test_accuracy"][name] >= TARGETS[name], manifest["test_accuracy"]


@needs_demo
@pytest.mark.parametrize("name", ["emotion", "knowledge", "math"])
def test_demo_is_clearly_above_chance(demo, name: str) -> None:
    """On 60 test examples the lower 95 % bound beats chance (the majority-class rate for emotion)."""
    dom = synthetic.generate(name, 60, seed=0, split="test")
    res = evaluate(demo, dom.task, dom, batch_size=16)
    if name == "emotion":
        labels = [e.label for e in dom]
        chance = max(labels.count(x) for x in set(labels)) / len(labels)
    else:
        chance = 0.25 if name == "knowledge" else 0.02
    assert res.n == 60
    assert res.ci_low > chance, (res.accuracy, res.ci_low, chance)


@needs_demo
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


def test_training_pipeline_smoke(tmp_path: Path) -> None:
    """A minute-scale run of the shipped training script writes a loadable Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertscope.demo.train import TrainConfig, train

    cfg = TrainConfig(hidden_size=32, intermediate_size=32, vocab_size=400, batch_size=16, threads=1).scaled(0.0015)
    manifest = train(tmp_path / "m", cfg, evaluate_after=False)
    assert manifest["steps"] > 0 and manifest["parameters"] > 0
    assert manifest["phase2"]["steps"] == cfg.phase2_steps > 0
    assert manifest["phase2"]["validation_knowledge"][-1][0] == cfg.phase2_steps
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
