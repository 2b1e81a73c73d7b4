"""SIGKILL of `expertscope drivers` mid-run, then `--resume`: the lock dies with the process, the fingerprint
matches, and the tables equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from expertscope.cli.main import app
from expertscope.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_tables(tmp_path: Path) -> None:
    model = tmp_path / "model"
    tiny_model("mixtral", num_local_experts=4).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"text number {i} " * (1 + i % 3)}) for i in range(12)))
    args = ["drivers", "--model", str(model), "-d", f"a={data}", "--batch-size", "1", "--dtype", "float32"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "expertscope.cli.main", *args, "-o", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    ck = killed / "ce_checkpoint.jsonl"

    def rows_done() -> int:  # the checkpoint's header is written first: kill once a row is in it
        return max(0, len(ck.read_text().splitlines()) - 1) if ck.exists() else 0

    while rows_done() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "running" and not (killed / "drivers.parquet").exists()
    assert (killed / ".expertscope.lock").exists()  # left behind by the kill, but no longer locked

    runner = CliRunner()
    r = runner.invoke(app, [*args, "-o", str(killed)])
    assert r.exit_code == 2 and "--resume" in r.output  # a killed run is not silently restarted
    r = runner.invoke(app, [*args, "-o", str(killed), "--resume"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "-o", str(full)])
    assert r.exit_code == 0, r.output
    for name in ("drivers.parquet", "causal_rate.parquet", "ce.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(killed / name), pd.read_parquet(full / name), obj=name)
    done = json.loads((killed / "manifest.json").read_text())
    assert done["status"] == "complete" and done["stages"]["drivers"]["resumed_rows"] > 0  # it continued, not restarted
