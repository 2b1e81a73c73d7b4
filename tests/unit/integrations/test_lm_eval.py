"""lm-evaluation-harness on local synthetic tasks, steered and unsteered."""

from __future__ import annotations

import pytest

import expertscope as es
from expertscope.integrations.lm_eval import lm_eval_steered, write_synthetic_tasks

pytest.importorskip("lm_eval", reason="lm_eval is part of the dev install; see pyproject [dev]")


def _loglik(out: dict, task: str) -> list[float]:
    return [float(r[0][0]) for s in out["samples"][task] for r in s["resps"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    moe = es.load_model("demo", dtype="float32")  # the bundled demo: a trained MoE, offline
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    names = write_synthetic_tasks(d, domains=("emotion", "knowledge"), n=12)
    return moe, d, names


@pytest.mark.slow
def test_unit_scale_identical_and_steering_changes_scores(setup, monkeypatch) -> None:
    import torch.utils.collect_env as collect_env

    from expertscope.integrations import lm_eval as integration

    moe, d, names = setup
    tasks = list(names.values())
    monkeypatch.setattr(integration, "_ENV_INFO", {})
    collected: list[str] = []
    real = collect_env.get_pretty_env_info
    monkeypatch.setattr(collect_env, "get_pretty_env_info", lambda: collected.append("env") or real())
    clean = lm_eval_steered(moe, tasks, include_path=d, log_samples=True, batch_size=4)
    unit = lm_eval_steered(moe, tasks, include_path=d, log_samples=True, batch_size=4,
                           steering=es.SteeringSpec(targets=((1, 0), (2, 1)), scale=1.0))
    steered = lm_eval_steered(moe, tasks, include_path=d, log_samples=True, batch_size=4,
                              steering=es.SteeringSpec(targets=((1, 0), (2, 1)), scale=3.0))
    for task in tasks:
        assert clean["results"][task]["sample_len"] == 12
        assert _loglik(clean, task) == _loglik(unit, task)  # bit-identical at scale 1.0
        assert _loglik(clean, task) != _loglik(steered, task)  # routing changed, so scores changed
    # The steering was removed after the run.
    again = lm_eval_steered(moe, tasks, include_path=d, log_samples=True, batch_size=4)
    assert all(_loglik(again, t) == _loglik(clean, t) for t in tasks)
    # Every result records the environment; it was collected (pip list and more) for the first one only.
    assert collected == ["env"]
    assert "PyTorch version" in clean["pretty_env_info"]
    assert all(r["pretty_env_info"] == clean["pretty_env_info"] for r in (unit, steered, again))
    assert all(r["lm_eval_version"] == clean["lm_eval_version"] for r in (unit, steered, again))


def test_task_files_are_local_json(setup) -> None:
    _, d, names = setup
    text = (d / f"{names['emotion']}.yaml").read_text()
    assert "dataset_path: json" in text and str(d) in text
    with pytest.raises(es.ConfigError, match="unknown synthetic domain"):
        write_synthetic_tasks(d, domains=("poetry",))
