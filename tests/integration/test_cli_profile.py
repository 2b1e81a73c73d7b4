"""`expertscope profile` / `expertscope domains` end to end on a tiny model saved to disk, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import expertscope as es
from expertscope.cli.main import app
from expertscope.testing import save_tiny_model, tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-qwen")
    save_tiny_model(d, "qwen2_moe")
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    a = d / "a.jsonl"
    a.write_text("\n".join(json.dumps({"utterance": f"hello there number {i}", "y": "joy"}) for i in range(6)))
    b = d / "b.csv"
    b.write_text("utterance\n" + "\n".join(f"{i} + {i} = {2 * i}" for i in range(5)))
    empty = d / "empty.jsonl"
    empty.write_text("")
    return {"a": a, "b": b, "empty": empty}


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_profile_then_domains(model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run("profile", "--model", model_dir, "--domain", f"chat={data['a']}", "--domain", f"sums={data['b']}",
             "--text-field", "utterance", "--out", out, "--batch-size", "4", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["schema_version"] == 1
    assert manifest["config"]["seed"] == 0 and manifest["model"]["moe_layers"] == [0, 1, 2]
    prof = es.RoutingProfile.load(out)
    # The CLI's profile equals the library's on the same data: each file's discovery part (its confirmation
    # and training parts are kept for the steering study).
    moe = es.load_model(str(model_dir), dtype="float32")
    doms = es.data.sources.load_domains([f"chat={data['a']}?text=utterance", f"sums={data['b']}?text=utterance"],
                                        part="discovery")
    ref = es.profile(moe, doms, batch_size=4)
    whole = es.data.sources.load_domain(f"chat={data['a']}?text=utterance")
    assert manifest["stages"]["profile"]["items"]["discovery"]["chat"]["n"] == len(doms[0]) < len(whole)
    assert np.array_equal(prof.totals()[1]["sel"], ref.totals()[1]["sel"])
    # The routing mutual information is part of the profile's outputs, equal to the library's.
    from expertscope.io import read_table
    from expertscope.stats.routing_mi import routing_mutual_information

    mi, _ = read_table(out / "routing_mi.parquet")
    np.testing.assert_allclose(mi["mi_bits"], routing_mutual_information(ref)["mi_bits"], atol=1e-12)
    assert "I(domain; selected expert)" in r.output
    r = _run("domains", out, "--n-boot", "50", "--n-perm", "600")
    assert r.exit_code == 0, r.output
    assert "domain experts of 'chat'" in r.output
    # qwen2_moe has one shared expert per MoE layer: the output names them
    assert "shared experts (always on, not candidates" in r.output and "layer 2: 1" in r.output
    table = es.DomainExpertTable.load(out / "domain_experts.parquet")
    assert len(table.df) == 2 * 3 * 4 and table.settings["config"]["n_perm"] == 600
    assert (out / "domain_experts.csv").exists()
    # A second run into the same directory is refused; --resume continues (nothing left to do).
    r = _run("profile", "--model", model_dir, "--domain", f"chat={data['a']}?text=utterance", "--out", out)
    assert r.exit_code == 2 and "--resume" in r.output
    r = _run("profile", "--model", model_dir, "--domain", f"chat={data['a']}?text=utterance",
             "--domain", f"sums={data['b']}?text=utterance", "--out", out, "--resume", "--batch-size", "4",
             "--dtype", "float32")
    assert r.exit_code == 0, r.output  # the same data spelled as ?text= resumes; other settings are refused


@pytest.mark.parametrize(
    ("domain_args", "model", "message"),
    [
        (["x=/no/such/file.jsonl"], None, "not found"),
        (["x={a}"], None, "no field 'text'"),
        (["x={empty}"], None, "has no rows"),
        (["x={a}?text=utterance"], "/no/such/model", "does not exist"),
        (["x={a}?text=utterance"], "org/some-moe", "cannot fetch"),
        (["nonsense"], None, "is not NAME=SOURCE"),
        (["x={a}?text=utterance&task=classification&labels=joy"], None, "two or more distinct labels"),
    ],
)
def test_bad_input_is_one_line_exit_2(domain_args, model, message, model_dir, data, tmp_path) -> None:
    args = ["profile", "--model", model or model_dir, "--out", tmp_path / "o"]
    for spec in domain_args:
        args += ["--domain", spec.format(**data)]
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o" / "profile.safetensors").exists()


def test_model_without_moe_layers_is_refused(tmp_path: Path, data) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    r = _run("profile", "--model", d, "--domain", f"x={data['a']}?text=utterance", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no MoE layers" in r.output


def test_pickled_checkpoint_refused(tmp_path: Path, data) -> None:
    import torch

    d = tmp_path / "pickled"
    model = tiny_model("mixtral")
    model.save_pretrained(d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(d)
    r = _run("profile", "--model", d, "--domain", f"x={data['a']}?text=utterance", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--allow-pickle" in r.output


def test_output_dir_of_another_kind_refused(tmp_path: Path, model_dir, data) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"kind": "drivers"}))
    r = _run("profile", "--model", model_dir, "--domain", f"x={data['a']}?text=utterance", "--out", out)
    assert r.exit_code == 2 and "another run" in r.output
