"""The control findings say what the dose and selectivity tables hold: sizes, intervals, the calibrated
verdict with the control it names and the run's number of tests, the domain's fragility, selectivity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from expertscope.report.record import findings
from expertscope.report.sentences import control_sentences


def _dose() -> pd.DataFrame:
    rows = []
    for kind, diff, spec in (("domain", (-0.15, -0.23, -0.08), True), ("driver", (-0.02, -0.09, 0.05), False)):
        for strength, mode, scale, neg in (("mask", "mask", np.nan, 0.3), ("×1.2", "scale", 1.2, 0.71),
                                           ("×0.8", "scale", 0.8, 0.71)):
            d, lo, hi = diff if strength == "mask" else (0.01, -0.04, 0.06)
            rows.append({"domain": "math", "kind": kind, "strength": strength, "mode": mode, "scale": scale,
                         "applicable": True, "reason": "", "n": 100, "n_targets": 4 if kind == "domain" else 3,
                         "delta": d - 0.02, "delta_lo": d - 0.1, "delta_hi": d + 0.05, "p_exact": 0.004,
                         "control": "matched", "control_draws": 8, "control_delta": -0.02,
                         "control_delta_min": -0.05, "control_delta_max": 0.01, "control_sd": 0.02,
                         "control_rank": 0.0 if spec and strength == "mask" else 0.5, "target_activation": 0.41,
                         "control_activation": 0.38, "reference": "random", "reference_draws": 2,
                         "reference_delta": -0.03, "busiest_delta": -0.03, "diff": d, "diff_lo": lo,
                         "diff_hi": hi, "p_set": 0.001, "p_item": 0.002, "p_vs_control": 0.002,
                         "q_vs_control": 0.01 if spec and strength == "mask" else 0.6, "n_tests": 6,
                         "specific": spec and strength == "mask", "control_reason": "", "negative_share": neg})
    rows.append({"domain": "emotion", "kind": "domain", "strength": "mask", "mode": "mask", "applicable": False,
                 "reason": "no domain experts", "n": np.nan, "n_targets": np.nan, "specific": np.nan})
    return pd.DataFrame(rows)


def _selectivity(math_selective: bool = True) -> pd.DataFrame:
    cells = [("math", "math", -0.17, -0.15), ("math", "emotion", -0.01, -0.01),
             ("emotion", "emotion", -0.20, -0.18), ("emotion", "math", 0.0, 0.01)]
    verdicts = {"math": (math_selective, "every other domain loses at most 0.33 × its own 0.150 beyond controls"
                         if math_selective else "emotion loses 0.060 beyond controls, more than 0.33 × its own"),
                "emotion": (True, "every other domain loses at most 0.33 × its own 0.180 beyond controls")}
    return pd.DataFrame([{"kind": "domain", "ablated": a, "evaluated": e, "delta": d, "delta_lo": d - 0.05,
                          "delta_hi": d + 0.05, "norm_delta": nd, "norm_lo": nd - 0.05, "norm_hi": nd + 0.05,
                          "gap": np.nan, "gap_lo": np.nan, "gap_hi": np.nan, "selective": verdicts[a][0],
                          "selective_reason": verdicts[a][1]} for a, e, d, nd in cells])


def test_control_findings_match_the_tables() -> None:
    dose, sel = _dose(), _selectivity()
    fs = {f.domain: f for f in findings({"steering_dose": dose, "steering_selectivity": sel})}
    math_f = fs["math"]
    by_kind = {c["kind"]: c for c in math_f.controls}
    d = by_kind["domain"]
    row = dose[(dose.domain == "math") & (dose.kind == "domain") & (dose.strength == "mask")].iloc[0]
    assert d["strength"] == "mask" and d["diff"] == row["diff"] and d["diff_lo"] == row["diff_lo"]
    assert d["specific"] is True and by_kind["driver"]["specific"] is False and d["n_tests"] == 6
    assert [x["strength"] for x in d["specific_at"]] == ["mask"]
    text = " ".join(control_sentences(math_f))
    assert "Ablating (mask) its 4 domain experts changes accuracy by -0.170 [-0.250, -0.100]" in text
    # the verdict names its control, where the target lies among the draws, both tests and the correction
    assert ("beyond equally busy experts (mean activation 0.38 against the targets' 0.41): -0.150 [-0.230, -0.080], "
            "below all 8 control sets (set test p = 0.001, item sign test p = 0.002; BH q = 0.01 over the run's 6 "
            "tests): specific beyond equally busy experts.") in text
    assert "q = 0.6 over the run's 6 tests): not specific beyond equally busy experts after the run's correction" \
        in text  # the drivers
    # the domain's fragility, in words
    assert ("Fragility: masking 4 other experts of the layers of its domain experts changes math's accuracy by "
            "-0.020 on average over 8 sets of equally busy experts (from -0.050 to +0.010), and by -0.030 over 2 "
            "sets of random experts of the layer.") in text
    # "up" with 71% negative logits is said, for both kinds; "down" is not
    assert len(math_f.up_lowers) == 2 and all(u["strength"] == "×1.2" for u in math_f.up_lowers)
    assert '"Up" (×1.2) lowered most of the domain experts\' logits: 71%' in text
    # selectivity: the table's verdict and reason; both sets selective → a double dissociation
    sv = math_f.selectivity[0]
    assert sv["selective"] is True and sv["double_dissociation"] == ["emotion"]
    assert "selective (every other domain loses at most 0.33 × its own 0.150 beyond controls)" in text
    assert "double dissociation with emotion" in text
    # a domain with nothing to steer says so
    emo = fs["emotion"]
    assert emo.controls[0]["applicable"] is False and "not applicable (no domain experts)" in " ".join(
        control_sentences(emo))
    assert not math.isnan(d["p_vs_control"])


def test_not_selective_and_no_dissociation_when_the_table_says_so() -> None:
    f = {f.domain: f for f in findings({"steering_dose": _dose(),
                                        "steering_selectivity": _selectivity(math_selective=False)})}["math"]
    assert f.selectivity[0]["selective"] is False and f.selectivity[0]["double_dissociation"] == []
    assert "not selective (emotion loses 0.060 beyond controls" in " ".join(control_sentences(f))


def test_no_verdict_is_said_as_such() -> None:
    dose = _dose()
    dose.loc[dose.kind == "domain", ["specific", "q_vs_control", "p_vs_control"]] = np.nan
    dose.loc[dose.kind == "domain", "control_reason"] = "2 distinct control sets: fewer than 3, no verdict"
    f = {f.domain: f for f in findings({"steering_dose": dose})}["math"]
    assert "No calibrated verdict (2 distinct control sets: fewer than 3, no verdict)." in " ".join(
        control_sentences(f))


def test_every_verdict_of_a_domain_with_overlapping_items_says_so() -> None:
    """A run with --allow-overlap records, per domain, how many confirmation or training items were discovery
    items (in the dose table's settings); every verdict sentence of that domain, and no other, says so."""
    dose, sel = _dose(), _selectivity()
    dose.attrs["meta"] = {"overlap": {"math": 3}}
    fs = {f.domain: f for f in findings({"steering_dose": dose, "steering_selectivity": sel})}
    assert fs["math"].overlap == 3 and fs["emotion"].overlap == 0
    lines = control_sentences(fs["math"])
    verdicts = [x for x in lines if ("specific" in x or "selective" in x) and not x.startswith("Fragility")]
    assert verdicts and all("Not an independent test: 3 of math's" in x and "--allow-overlap" in x for x in verdicts)
    assert not any("Not an independent test" in x for x in lines if x.startswith("Fragility"))
    assert not any("Not an independent test" in x for x in control_sentences(fs["emotion"]))
    dose.attrs["meta"] = {}
    assert not any("independent" in x for x in control_sentences(findings({"steering_dose": dose})[0]))
