"""Ray executor: sharded profiling on a local Ray cluster equals the in-process profile exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import expertscope as es
from expertscope.execution import ModelSpec, RayExecutor, make_executor
from expertscope.testing import save_tiny_model

# One test process runs this module (make test: --dist loadgroup): one local Ray cluster, not one per worker.
pytestmark = pytest.mark.xdist_group("ray")

TEXTS = {
    "emotion": [f"I feel number {i} " * (i % 4 + 1) for i in range(14)],
    "math": [f"{i} + {2 * i} = {3 * i}" for i in range(11)],
    "knowledge": ["the capital of Zorbia is Quell"] * 5 + [f"fact {i}" for i in range(4)],
}


@pytest.fixture(scope="module")
def cluster():
    # imported here, not at collection: only the test process that runs this module pays for it
    ray = pytest.importorskip("ray", reason="ray is part of the dev install; see pyproject [dev]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-model")
    save_tiny_model(d, "qwen2_moe")
    return d


@pytest.fixture(scope="module")
def executor(cluster, model_dir):
    """Two actors, kept across this module's jobs (as a study keeps them across its stages)."""
    with RayExecutor(ModelSpec(str(model_dir), dtype="float32", threads=1), workers=2, cpus_per_worker=0.5) as ex:
        yield ex
    assert ex.pids() == []  # closed


@pytest.mark.slow
def test_two_actor_profile_equals_in_process_exactly(executor, model_dir) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors are pinned to one thread too: same kernels, same bits
    try:
        model = es.load_model(str(model_dir), dtype="float32")
        local = es.profile(model, TEXTS, batch_size=4)
        sharded = es.profile(model, TEXTS, batch_size=4, executor=executor)
        pids = executor.pids()
        assert len(set(pids)) == 2
        again = es.profile(model, TEXTS, batch_size=4, executor=executor)  # the same actors serve the next job
        assert executor.pids() == pids
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(sharded.seq_stats("h_bern"), again.seq_stats("h_bern"))
    assert sorted(local.domains) == sorted(sharded.domains)
    order = [sharded.domains.index(d) for d in local.domains]
    n_l, t_l = local.totals()
    n_s, t_s = sharded.totals()
    assert np.array_equal(n_l, n_s[order])
    for k in t_l:
        assert np.array_equal(t_l[k], t_s[k][order]), k
    assert np.array_equal(local.seq_stats("h_bern"), sharded.seq_stats("h_bern"))


@pytest.mark.slow
def test_gpu_request_without_gpus_is_refused(cluster, model_dir) -> None:
    with pytest.raises(es.ConfigError, match="needs 2 GPUs but the Ray cluster has 0"):
        RayExecutor(ModelSpec(str(model_dir)), workers=2, gpus_per_worker=1)


def test_unknown_executor(tmp_path) -> None:
    with pytest.raises(es.ConfigError, match="unknown executor"):
        make_executor("dask", ModelSpec(str(tmp_path)))  # type: ignore[arg-type]


def test_die_on_item_refuses_to_kill_the_calling_process(tmp_path) -> None:
    from expertscope.execution import LocalExecutor
    from expertscope.testing import DieOnItem

    with pytest.raises(RuntimeError, match="would kill the calling process"):
        list(DieOnItem(LocalExecutor(), 0).run_items(None, [1, 2], lambda model: str))


def test_ray_missing_is_a_clear_error(monkeypatch, tmp_path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(es.ConfigError, match=r"Ray is not installed: pip install 'expertscope\[ray\]'"):
        RayExecutor(ModelSpec(str(tmp_path)))


@pytest.mark.slow
def test_causal_sweep_on_ray_equals_local_and_resumes_after_a_dead_actor(executor, model_dir, tmp_path) -> None:
    """A sweep on the two actors equals the in-process one. An actor that dies mid-job (SIGKILL, as the
    out-of-memory killer sends) fails the job with the results finished so far kept; the next job replaces the
    dead actor alone (the survivor and its model kept) and resumes to the same values."""
    from expertscope.causal.sweep import causal_sweep
    from expertscope.testing import DieOnItem

    texts = {"a": ["hello there", "a longer sentence here"], "b": ["1 + 2 = 3", "x"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = es.load_model(str(model_dir), dtype="float32")
        local = causal_sweep(model, texts)
        on_ray = causal_sweep(model, texts, executor=executor)
        before = executor.pids()
        ck = tmp_path / "sweep.jsonl"
        total = 4 * len(model.layers)
        with pytest.raises(es.ExpertscopeError, match="rerun with --resume"):
            causal_sweep(model, texts, executor=DieOnItem(executor, total - 1), checkpoint=ck)
        # Every item before the last (the dead one) is kept, but the one the other actor may still be running
        # when the death is seen: a lower index could be outrun by the other actor, leaving nothing to keep.
        kept = len(ck.read_text().splitlines()) - 1
        resumed = causal_sweep(model, texts, executor=executor, checkpoint=ck, resume=True)
        after = executor.pids()
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(local.ce, on_ray.ce)  # bit-identical to the single-process sweep
    assert total - 2 <= kept <= total - 1
    assert len(before) == len(after) == 2 and len(set(before) & set(after)) == 1  # one replaced, one kept
    assert resumed.settings["resumed_items"] == kept and resumed.settings["computed_items"] == total - kept
    assert np.array_equal(local.ce, resumed.ce)
    # and the sweep agrees with the batched engine
    batched = es.causal_effects(model, texts, method="exact", batch_size=1)
    np.testing.assert_allclose(local.ce, batched.ce, atol=1e-6)
