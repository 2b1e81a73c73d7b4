"""`expertscope run` as a resumable pipeline, on a tiny model and the synthetic domains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from expertscope import study
from expertscope.cli.main import app
from expertscope.testing import tiny_model, tiny_tokenizer

runner = CliRunner()
# No math domain here: greedy generation is the slow part and the steering tests cover it.
DOMAINS = ["emotion=synthetic:emotion@validation", "knowledge=synthetic:knowledge@validation"]
TABLES = ["domain_experts.parquet", "drivers.parquet", "causal_rate.parquet", "token_positions.parquet",
          "token_associations.parquet", "steering.parquet", "steering_sweep.parquet", "coactivation.parquet",
          "paths.parquet", "routing_consistency.parquet", "importance.parquet", "routing_overlap.parquet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_model("mixtral", num_local_experts=8, initializer_range=0.2).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    args = ["run", "--model", str(model_dir), "--out", str(out), "--limit", "10", "--batch-size", "4",
            "--causal-limit", "3", "--eval-limit", "5", "--train-limit", "8", "--n-boot", "50", "--n-perm", "auto"]
    for d in DOMAINS:
        args += ["--domain", d]
    return args + list(extra)


@pytest.fixture(scope="module")
def full_run(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    r = runner.invoke(app, _args(model_dir, out))
    assert r.exit_code == 0, r.output
    return out


def test_full_run_writes_manifest_tables_and_report(full_run: Path) -> None:
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 0 and manifest["schema_version"] == 1
    assert [n for n, _ in study.STAGES] == [k for k in manifest["stages"] if not k.startswith("_")]
    assert all(manifest["stages"][n]["status"] == "complete" for n, _ in study.STAGES)
    for name in TABLES:
        assert (full_run / name).exists(), name
    html = (full_run / "report.html").read_text()
    assert "<img" in html and "http://" not in html.replace("http://www.w3.org", "")
    steering = pd.read_parquet(full_run / "steering.parquet")
    assert set(steering["domain"]) == {"emotion", "knowledge"}
    assert "finetune_router" in set(steering["condition"])


def test_interrupt_exits_130_and_leaves_a_resumable_run(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    part = tmp_path / "part"

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "STAGES", [study.STAGES[0], ("domain_experts", interrupted)])
    r = runner.invoke(app, _args(model_dir, part))
    assert r.exit_code == 130 and "--resume" in r.output
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["stages"]["profile"]["status"] == "complete"
    assert "domain_experts" not in manifest["stages"]
    r = runner.invoke(app, _args(model_dir, part))
    assert r.exit_code == 2 and "--resume" in r.output  # refuses to mix runs without --resume


def test_resume_recomputes_only_unfinished_stages_to_the_same_tables(full_run: Path, model_dir: Path,
                                                                      tmp_path: Path) -> None:
    # A run stopped after the causal rate: later stages' outputs gone and unrecorded.
    part = tmp_path / "part"
    shutil.copytree(full_run, part)
    manifest = json.loads((part / "manifest.json").read_text())
    later = ["tokens", "expert_map", "steering", "report"]
    for name in later:
        manifest["stages"].pop(name)
    manifest["status"] = "running"
    (part / "manifest.json").write_text(json.dumps(manifest))
    for f in ["token_positions.parquet", "token_associations.parquet", "steering.parquet",
              "steering_sweep.parquet", "report.html"]:
        (part / f).unlink()
    r = runner.invoke(app, _args(model_dir, part, "--resume"))
    assert r.exit_code == 0, r.output
    assert "profile: already complete" in r.output and "causal_rate: already complete" in r.output
    assert "tokens: already complete" not in r.output
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(full_run / name), pd.read_parquet(part / name), obj=name)
    assert (part / "report.html").exists()


def test_resume_with_other_settings_is_refused(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(study, "STAGES", [study.STAGES[0]])
    out = tmp_path / "o"
    assert runner.invoke(app, _args(model_dir, out)).exit_code == 0
    r = runner.invoke(app, _args(model_dir, out, "--resume", "--seed", "3"))
    assert r.exit_code == 2 and "other settings" in r.output


def test_report_of_a_directory_without_tables_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "Traceback" not in r.output
