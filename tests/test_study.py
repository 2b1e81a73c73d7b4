"""`expertscope run` as a resumable pipeline, on a tiny model and the synthetic domains."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from expertscope import study
from expertscope.cli.main import app
from expertscope.models.tiny import tiny_model, tiny_tokenizer

runner = CliRunner()
DOMAINS = ["emotion=synthetic:emotion@validation", "math=synthetic:math@validation"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_model("mixtral", num_local_experts=8).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    args = ["run", "--model", str(model_dir), "--out", str(out), "--limit", "12", "--batch-size", "4"]
    for d in DOMAINS:
        args += ["--domain", d]
    return args + list(extra)


def test_run_then_interrupted_run_resumes_to_same_tables(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    full = tmp_path / "full"
    r = runner.invoke(app, _args(model_dir, full))
    assert r.exit_code == 0, r.output
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 0
    assert all(manifest["stages"][n]["status"] == "complete" for n, _ in study.STAGES)

    # Interrupt the second stage once, then resume.
    part = tmp_path / "part"
    original = dict(study.STAGES)

    def boom(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "STAGES", [("profile", original["profile"]), ("domain_experts", boom)])
    r = runner.invoke(app, _args(model_dir, part))
    assert r.exit_code == 130 and "--resume" in r.output
    assert json.loads((part / "manifest.json").read_text())["status"] == "running"
    monkeypatch.setattr(study, "STAGES", list(original.items()))
    r = runner.invoke(app, _args(model_dir, part))
    assert r.exit_code == 2 and "--resume" in r.output  # refuses to mix runs without --resume
    r = runner.invoke(app, _args(model_dir, part, "--resume"))
    assert r.exit_code == 0, r.output
    assert "profile: already complete" in r.output
    a = pd.read_parquet(full / "domain_experts.parquet")
    b = pd.read_parquet(part / "domain_experts.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_resume_with_other_settings_is_refused(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert runner.invoke(app, _args(model_dir, out)).exit_code == 0
    r = runner.invoke(app, _args(model_dir, out, "--resume", "--seed", "3"))
    assert r.exit_code == 2 and "other settings" in r.output
