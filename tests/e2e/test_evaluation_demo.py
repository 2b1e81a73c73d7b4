"""The fast evaluation path against the reference on both shipped demos (trained models, whose math
generations reach ``####`` and stop early): identical predictions and accuracy, plain and steered."""

from __future__ import annotations

import pytest

from expertscope.data import synthetic
from expertscope.demo import demo_model_path
from expertscope.evaluation import evaluate
from oracles.evaluation import evaluate_reference

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]
DEMOS = [n for n in ("demo", "demo-deepseek") if (demo_model_path(n) / "model.safetensors").exists()]


@pytest.mark.skipif(not DEMOS, reason="no demo model has been trained")
@pytest.mark.parametrize("name", DEMOS)
@pytest.mark.parametrize("steered", [False, True])
def test_fast_path_equals_reference_on_demo(name: str, steered: bool) -> None:
    from expertscope.interventions.steering import SteeringSpec, steer
    from expertscope.models.loading import load_model

    model = load_model(name, dtype="float32")
    spec = SteeringSpec(targets=tuple((layer, e) for layer in model.layers for e in range(3)), scale=0.6)
    for domain in synthetic.DOMAINS:
        dom = synthetic.generate(domain, 12, seed=3, split="test")
        if steered:
            with steer(model, spec=spec):
                fast, ref = evaluate(model, dom.task, dom, batch_size=8), evaluate_reference(
                    model, dom.task, dom, batch_size=8)
        else:
            fast, ref = evaluate(model, dom.task, dom, batch_size=8), evaluate_reference(
                model, dom.task, dom, batch_size=8)
        assert [r["prediction"] for r in fast.predictions] == [r["prediction"] for r in ref.predictions]
        assert [r["correct"] for r in fast.predictions] == [r["correct"] for r in ref.predictions]
        assert (fast.accuracy, fast.weighted_f1, fast.ci_low, fast.ci_high) == (
            ref.accuracy, ref.weighted_f1, ref.ci_low, ref.ci_high)
        for a, b in zip(fast.predictions, ref.predictions, strict=True):
            for key in b.get("scores", {}):
                assert a["scores"][key] == pytest.approx(b["scores"][key], abs=2e-5)
            if "generation" in b:
                assert b["generation"].startswith(a["generation"])
    assert fast.n_truncated == 0
