"""The table views (what the command line prints): every display string is read back and checked against
the number it shows, missing values show a dash, and rows are chosen and ordered as the views say."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from expertscope.report import views as V

NAN = float("nan")
_CI = re.compile(r"^\[([-+]?\d+\.\d+), ([-+]?\d+\.\d+)\]$")
_EFFECT = re.compile(r"^([-+]\d+\.\d{3}) \[([-+]\d+\.\d{3}), ([-+]\d+\.\d{3})\]( specific)?$")


def _close(text: str, value: float, decimals: int) -> None:
    assert float(text) == pytest.approx(value, abs=0.5 * 10 ** -decimals + 1e-12), (text, value)


def test_number_interval_and_effect_helpers() -> None:
    assert V.num(0.12345) == "0.123" and V.num(NAN) == "—" and V.num(None, missing="-") == "-"
    assert V.num(np.float32(2.5), ".2f") == "2.50"
    assert V.interval(0.1, 0.25) == "[0.100, 0.250]" and V.interval(0.1, NAN, missing="–") == "–"
    assert V.effect(0.0166, -0.0004, 0.05) == "+0.017 [-0.000, +0.050]"
    assert V.effect(0.1, NAN, NAN) == "+0.100" and V.effect(NAN, 0, 1) == "—"


def test_domain_expert_views_show_the_tables_numbers() -> None:
    from expertscope.stats.domain_experts import DomainExpertTable

    rng = np.random.default_rng(3)
    rows = []
    for d in ("emo", "math"):
        for layer in range(2):
            for e in range(4):
                rows.append({"domain": d, "layer": layer, "expert": e, "activation_rate": rng.uniform(),
                             "entropy": rng.uniform(), "cwas": rng.uniform(), "specificity": rng.normal(0, 0.2),
                             "lift": rng.uniform(0.5, 3), "A_lo": rng.uniform(0, 0.4), "A_hi": rng.uniform(0.5, 1),
                             "q_value": rng.uniform(0, 0.1), "is_domain_expert": e < 3 if d == "emo" else e == 0})
    df = pd.DataFrame(rows)
    df.loc[(df.domain == "math") & (df.layer == 1), ["A_lo", "q_value", "entropy", "cwas"]] = NAN  # a dash
    table = DomainExpertTable(df, {"domains": ["emo", "math"]})
    emo, math = V.domain_expert_views(table, top=4)
    assert emo.title == "domain experts of 'emo' (6 found)" and len(emo.rows) == 4  # top 4 of 6
    assert math.title == "domain experts of 'math' (2 found)" and len(math.rows) == 2
    assert list(emo.rows.columns) == ["layer", "expert", "A", "H", "CWAS", "specificity", "lift", "A 95% CI", "q"]
    for view in (emo, math):
        want = table.experts(view.title.split("'")[1]).head(4)
        assert list(want["specificity"]) == sorted(want["specificity"], reverse=True)
        for (_, shown), (_, r) in zip(view.rows.iterrows(), want.iterrows(), strict=True):
            assert (int(shown["layer"]), int(shown["expert"])) == (r.layer, r.expert)
            assert shown["specificity"][0] in "+-"
            _close(shown["specificity"], r["specificity"], 3)
            _close(shown["A"], r["activation_rate"], 3)
            _close(shown["lift"], r["lift"], 2)
            if np.isnan(r["A_lo"]):  # not measured: a dash, never "nan"
                assert [shown[c] for c in ("H", "CWAS", "A 95% CI", "q")] == ["–"] * 4
                continue
            _close(shown["H"], r["entropy"], 3)
            _close(shown["CWAS"], r["cwas"], 3)
            lo, hi = map(float, _CI.match(shown["A 95% CI"]).groups())  # type: ignore[union-attr]
            assert lo == pytest.approx(r["A_lo"], abs=5e-4) and hi == pytest.approx(r["A_hi"], abs=5e-4)
            assert float(shown["q"]) == pytest.approx(r["q_value"], rel=5e-3)
    assert (math.rows["layer"] == "1").any()  # the row without measurements is among those shown


def test_driver_view_ranks_experts_and_names_drivers() -> None:
    from expertscope.causal.drivers import DriverTable

    rng = np.random.default_rng(5)
    rows = [{"domain": d, "layer": layer, "expert": e, "ce_mean": float(rng.gamma(1, 0.01)),
             "threshold": 0.02 + layer, "is_driver": (layer, e) in {(0, 2), (0, 5)}}
            for d in ("a", "b") for layer in range(2) for e in range(6)]
    df = pd.DataFrame(rows)
    rate = pd.DataFrame({"domain": ["a", "a", "b"], "layer": [0, 1, 0], "causal_rate": [0.25, 0.0, 0.5]})
    view = V.driver_view(DriverTable(df, {"rule_text": "CE >= 2 x median"}), rate, top=2)
    assert view.title == "Driver experts (CE >= 2 x median)" and len(view.rows) == 4
    assert set(view.left) == {"domain", "top experts (CE)", "drivers"}
    for shown in view.rows.to_dict("records"):
        g = df[(df.domain == shown["domain"]) & (df.layer == int(shown["layer"]))]
        best = g.sort_values("ce_mean", ascending=False).head(2)
        assert shown["top experts (CE)"] == ", ".join(f"{e} ({ce:.3g})" for e, ce in zip(best.expert, best.ce_mean,
                                                                                          strict=True))
        drivers = sorted(int(x) for x in shown["drivers"].split(",")) if shown["drivers"] != "-" else []
        assert drivers == sorted(g[g.is_driver].expert)
        _close(shown["threshold"], g.threshold.iloc[0], 2)
        r = rate[(rate.domain == shown["domain"]) & (rate.layer == int(shown["layer"]))]
        assert shown["causal rate"] == (f"{r.causal_rate.iloc[0]:.3f}" if len(r) else "-")
    assert view.rows.iloc[-1]["causal rate"] == "-"  # (b, 1) has no causal rate


def _steering() -> pd.DataFrame:
    base = {"domain": "emo", "task": "classification", "n": 20, "weighted_f1": 0.61, "saturated": False}
    return pd.DataFrame([
        {**base, "condition": "original", "applicable": True, "reason": "", "n_targets": 0, "accuracy": 0.6,
         "delta": 0.0, "delta_lo": 0.0, "delta_hi": 0.0, "changed_selections": 0},
        {**base, "condition": "domain_up", "applicable": True, "reason": "", "n_targets": 3, "accuracy": 0.45,
         "delta": -0.15, "delta_lo": -0.25, "delta_hi": -0.05, "changed_selections": 40, "diff": -0.1234,
         "diff_lo": -0.2, "diff_hi": -0.0412, "specific": True},
        {**base, "condition": "domain_down", "applicable": True, "reason": "", "n_targets": 3, "accuracy": 0.65,
         "delta": 0.05, "delta_lo": -0.05, "delta_hi": 0.1, "changed_selections": 12, "diff": 0.02,
         "diff_lo": -0.03, "diff_hi": 0.07, "specific": False},
        {**base, "condition": "driver_up", "applicable": False, "reason": "no driver experts", "n_targets": 0,
         "n": NAN, "accuracy": NAN, "delta": NAN, "delta_lo": NAN, "delta_hi": NAN, "changed_selections": NAN},
        {**base, "condition": "driver_mask", "applicable": False, "reason": "no driver experts", "n_targets": 0,
         "n": NAN, "accuracy": NAN, "delta": NAN, "delta_lo": NAN, "delta_hi": NAN, "changed_selections": NAN},
        {**base, "condition": "finetune_router", "applicable": True, "reason": "", "n_targets": NAN,
         "n_parameters": 3264, "accuracy": 0.6, "delta": 0.0, "delta_lo": 0.0, "delta_hi": 0.0,
         "weighted_f1": NAN, "changed_selections": -1},
    ])


def test_steering_views_show_changes_with_their_intervals() -> None:
    table = _steering()
    (view,) = V.steering_views(table)
    assert view.title == "emo (classification, n=20)"
    assert view.caption == "driver_up, driver_mask: not applicable: no driver experts"
    rows = view.rows.set_index("condition")
    for r in table.itertuples():
        shown = rows.loc[r.condition]
        if not r.applicable:
            assert list(shown) == ["0", "n/a", "—", "—", "—", "—"]
            continue
        _close(shown["accuracy"], r.accuracy, 3)
        if r.condition == "original":
            assert shown["Δ acc [95% CI]"] == "—" and shown["Δ − controls [95% CI]"] == "—"
        else:
            m = _EFFECT.match(shown["Δ acc [95% CI]"])
            assert m is not None and [float(x) for x in m.groups()[:3]] == pytest.approx(
                [r.delta, r.delta_lo, r.delta_hi], abs=5e-4)
        if r.condition.startswith("domain"):
            m = _EFFECT.match(shown["Δ − controls [95% CI]"])
            assert m is not None and [float(x) for x in m.groups()[:3]] == pytest.approx(
                [r.diff, r.diff_lo, r.diff_hi], abs=5e-4)
            assert bool(m.group(4)) is (r.specific is True)
            assert shown["targets"] == str(int(r.n_targets)) and shown["changed selections"] == str(
                int(r.changed_selections))
    assert rows.loc["finetune_router", "targets"] == "LoRA, 3,264 params"
    lora = rows.loc["finetune_router"]
    assert lora["weighted F1"] == "—" and lora["changed selections"] == "—"
    assert rows.loc["original", "weighted F1"] == "0.610"
    assert "nan" not in " ".join(view.rows.to_numpy().ravel()).lower()


def test_steering_rows_mark_saturation_and_what_was_not_applicable() -> None:
    old = _steering().drop(columns=["saturated"])  # a table saved before the flag: derived from accuracy
    st = V.steering_rows(old)
    assert list(st["status"]) == ["", "", "", "not applicable: no driver experts",
                                  "not applicable: no driver experts", ""]
    assert not st["saturated"].any()
    old.loc[old.condition == "original", "accuracy"] = 0.96  # ≥ SATURATED: the whole domain is saturated
    assert V.steering_rows(old)["saturated"].all()
    (view,) = V.steering_views(old)
    assert view.title.endswith("— saturated: the original accuracy leaves little room to improve")


def test_eval_view_shows_the_wilson_interval() -> None:
    from expertscope.evaluation.metrics import wilson_interval

    results = {}
    for name, (k, n, f1) in {"emotion": (17, 23, 0.7), "math": (4, 30, None)}.items():
        lo, hi = wilson_interval(k, n)
        results[name] = {"task": "math" if f1 is None else "classification", "n": n, "accuracy": k / n,
                         "ci_low": lo, "ci_high": hi, "weighted_f1": f1, "n_truncated": 2 if f1 else 0}
    view = V.eval_view(results)
    assert view.title == "Evaluation (accuracy with Wilson 95% CI)"
    for shown, (name, r) in zip(view.rows.to_dict("records"), results.items(), strict=True):
        assert (shown["domain"], shown["task"], shown["n"]) == (name, r["task"], str(r["n"]))
        _close(shown["accuracy"], r["accuracy"], 3)
        lo, hi = map(float, _CI.match(shown["95% CI"]).groups())  # type: ignore[union-attr]
        assert lo == pytest.approx(r["ci_low"], abs=5e-4) and hi == pytest.approx(r["ci_high"], abs=5e-4)
        assert lo < float(shown["accuracy"]) < hi
        assert shown["weighted F1"] == ("-" if r["weighted_f1"] is None else f"{r['weighted_f1']:.3f}")
        assert shown["truncated"] == str(r["n_truncated"])


def test_lm_eval_view_leaves_out_sample_sizes() -> None:
    view = V.lm_eval_view({"t": {"acc": 0.51234, "acc_stderr": 0.0123, "sample_len": 100}})
    assert view.rows.values.tolist() == [["t", "acc", "0.5123"], ["t", "acc_stderr", "0.0123"]]


def test_shared_experts_line_counts_per_layer() -> None:
    assert V.shared_experts_line({}) is None
    assert V.shared_experts_line({"num_shared_experts": {"0": 0, "1": 0}}) is None
    line = V.shared_experts_line({"num_shared_experts": {"3": 1, "1": 2, "0": 0}})
    assert line is not None and line.endswith(": layer 1: 2, layer 3: 1")
