"""The control findings say what the dose and selectivity tables hold (sizes, intervals, verdicts)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from expertscope.report.findings import control_sentences, findings


def _dose() -> pd.DataFrame:
    rows = []
    for kind, diff in (("domain", (-0.15, -0.23, -0.08)), ("driver", (-0.02, -0.09, 0.05))):
        for strength, mode, scale, neg in (("mask", "mask", np.nan, 0.3), ("×1.2", "scale", 1.2, 0.71),
                                           ("×0.8", "scale", 0.8, 0.71)):
            d, lo, hi = diff if strength == "mask" else (0.01, -0.04, 0.06)
            rows.append({"domain": "math", "kind": kind, "strength": strength, "mode": mode, "scale": scale,
                         "applicable": True, "reason": "", "n": 100, "n_targets": 4 if kind == "domain" else 3,
                         "delta": d - 0.02, "delta_lo": d - 0.1, "delta_hi": d + 0.05, "p_exact": 0.004,
                         "control_draws": 5, "control_delta": -0.02, "control_delta_min": -0.05,
                         "control_delta_max": 0.01, "busiest_delta": -0.03, "diff": d, "diff_lo": lo, "diff_hi": hi,
                         "p_vs_control": 0.002, "q_vs_control": 0.01, "specific": bool(lo > 0 or hi < 0),
                         "control_reason": "", "negative_share": neg})
    rows.append({"domain": "emotion", "kind": "domain", "strength": "mask", "mode": "mask", "applicable": False,
                 "reason": "no domain experts", "n": np.nan, "n_targets": np.nan, "specific": np.nan})
    return pd.DataFrame(rows)


def _selectivity() -> pd.DataFrame:
    cells = [("math", "math", -0.17, np.nan, np.nan), ("math", "emotion", -0.01, 0.05, 0.27),
             ("emotion", "emotion", -0.20, np.nan, np.nan), ("emotion", "math", 0.0, 0.08, 0.3)]
    return pd.DataFrame([{"kind": "domain", "ablated": a, "evaluated": e, "delta": d, "delta_lo": d - 0.05,
                          "delta_hi": d + 0.05, "gap": (d + 0.17 if a == "math" else d + 0.2) if e != a else np.nan,
                          "gap_lo": glo, "gap_hi": ghi} for a, e, d, glo, ghi in cells])


def test_control_findings_match_the_tables() -> None:
    dose, sel = _dose(), _selectivity()
    fs = {f.domain: f for f in findings({"steering_dose": dose, "steering_selectivity": sel})}
    math_f = fs["math"]
    by_kind = {c["kind"]: c for c in math_f.controls}
    d = by_kind["domain"]
    row = dose[(dose.domain == "math") & (dose.kind == "domain") & (dose.strength == "mask")].iloc[0]
    assert d["strength"] == "mask" and d["diff"] == row["diff"] and d["diff_lo"] == row["diff_lo"]
    assert d["specific"] is True and by_kind["driver"]["specific"] is False
    assert [x["strength"] for x in d["specific_at"]] == ["mask"]
    text = " ".join(control_sentences(math_f))
    assert "Ablating (mask) its 4 domain experts changes accuracy by -0.170 [-0.250, -0.100]" in text
    assert "Beyond the random controls: -0.150 [-0.230, -0.080]" in text and "specific: the interval excludes 0" in text
    assert "5 matched random controls: mean -0.020 (range -0.050 to +0.010)" in text
    assert "not specific: the interval includes 0" in text  # the drivers
    # "up" with 71% negative logits is said, for both kinds; "down" is not
    assert len(math_f.up_lowers) == 2 and all(u["strength"] == "×1.2" for u in math_f.up_lowers)
    assert '"Up" (×1.2) lowered most of the domain experts\' logits: 71%' in text
    # selectivity: both gaps above 0 both ways → selective and doubly dissociated from emotion
    sv = math_f.selectivity[0]
    assert sv["selective"] and sv["double_dissociation"] == ["emotion"]
    assert "double dissociation with emotion" in text
    # a domain with nothing to steer says so
    emo = fs["emotion"]
    assert emo.controls[0]["applicable"] is False and "not applicable (no domain experts)" in " ".join(
        control_sentences(emo))
    assert not math.isnan(d["p_vs_control"])


def test_not_selective_when_a_gap_interval_includes_zero() -> None:
    sel = _selectivity()
    sel.loc[(sel.ablated == "math") & (sel.evaluated == "emotion"), "gap_lo"] = -0.02
    f = {f.domain: f for f in findings({"steering_dose": _dose(), "steering_selectivity": sel})}["math"]
    assert not f.selectivity[0]["selective"] and f.selectivity[0]["double_dissociation"] == []
    assert "not selective" in " ".join(control_sentences(f))
