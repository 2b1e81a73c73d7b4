"""Issue 38, item 3: the CE that rounding alone gives in the model's dtype is measured in every causal run, stated
in the findings, and raises the driver floor where it is higher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import expertscope as es
from expertscope.causal import driver_experts
from expertscope.models.model import MoEModel
from expertscope.report.record import findings
from expertscope.report.sentences import sentences
from expertscope.testing import tiny_model, tiny_tokenizer

TEXTS = {"a": ["the cat sat on the mat and then it went away to sleep for a long time " * 3,
               "one two three four five", "hello world again and again", "x y z"],
         "b": ["a b c d e f g", "the dog ran after the ball in the park " * 2, "red green blue", "up down"]}


def _moe(dtype: torch.dtype) -> MoEModel:
    return MoEModel.from_model(tiny_model("mixtral", seed=0, dtype=dtype), tokenizer=tiny_tokenizer())


def test_bf16_rounding_floor_is_measured_stated_and_raises_the_driver_floor() -> None:
    bf = es.causal_effects(_moe(torch.bfloat16), TEXTS, batch_size=8)
    f32 = es.causal_effects(_moe(torch.float32), TEXTS, batch_size=8)
    nb, nf = bf.settings["numerical_floor"], f32.settings["numerical_floor"]
    assert nb["dtype"] == "bfloat16" and nf["dtype"] == "float32" and nb["inputs"] == 8
    # bf16 keeps 8 mantissa bits, float32 24: its rounding CE is orders of magnitude larger
    assert nb["max"] > 1e-9 and nf["max"] < 1e-12 and nb["max"] > 1e3 * max(nf["max"], 1e-18)
    assert set(nb["per_layer"]) == set(bf.layers)
    assert all(v == max(nb["restart"][la], nb["batch"]) for la, v in nb["per_layer"].items())
    # a floor below the rounding is raised to it, layer by layer, and the table's bar says so
    table = driver_experts(bf, ce_floor=1e-12, stability_pairs=0, n_boot=0)
    raised = [la for la, v in nb["per_layer"].items() if v > 1e-12]
    assert raised and "raised to the rounding level" in table.settings["numerical_floor"]["note"]
    for la in raised:
        thr = table.df[table.df.layer == la].threshold.to_numpy()
        assert (thr >= nb["per_layer"][la] - 1e-18).all()
    # an expert whose CE is below its layer's rounding never passes the floor
    low = table.df[table.df.ce_mean < table.df.layer.map(nb["per_layer"])]
    assert not low.pass_floor.any()
    # with the default floor (1e-3 nats) nothing is raised on this model, and the findings say both numbers
    default = driver_experts(bf, stability_pairs=0, n_boot=0)
    assert "above the rounding everywhere" in default.settings["numerical_floor"]["note"]
    df = default.df.copy()
    df.attrs["meta"] = default.settings  # as the saved table carries its settings
    f = next(x for x in findings({"drivers": df}) if x.domain == "a")
    assert f.ce_noise == pytest.approx(nb["max"]) and f.ce_noise_dtype == "bfloat16"
    assert "in bfloat16" in f.numerical_floor and any("Rounding alone gives CE up to" in s for s in sentences(f))
    # the report says it once, in the driver section
    from expertscope.report.html import _driver_section

    assert _driver_section({"drivers": df}, {}).count("Rounding alone gives CE up to") == 1


def test_the_floor_can_be_turned_off_and_survives_a_save(tmp_path) -> None:
    ce = es.causal_effects(_moe(torch.float32), TEXTS, batch_size=8, noise_inputs=0)
    assert ce.settings["numerical_floor"] == {}
    assert driver_experts(ce, stability_pairs=0, n_boot=0).settings["numerical_floor"] is None
    ce = es.causal_effects(_moe(torch.bfloat16), TEXTS, batch_size=8, noise_inputs=2)
    ce.save(tmp_path)
    back = es.CausalEffects.load(tmp_path)
    a = driver_experts(ce, ce_floor=1e-12, stability_pairs=0, n_boot=0).df.threshold.to_numpy()
    b = driver_experts(back, ce_floor=1e-12, stability_pairs=0, n_boot=0).df.threshold.to_numpy()
    np.testing.assert_array_equal(a, b)  # per-layer keys read back from JSON as text
    with pytest.raises(es.ConfigError, match="noise_inputs"):
        es.causal_effects(_moe(torch.float32), TEXTS, noise_inputs=-1)
