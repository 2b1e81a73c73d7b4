"""Pre-registered hypotheses: the sealed file, a hand edit refused, predicted against observed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expertscope.config import InterventionConfig
from expertscope.data.parts import item_hash
from expertscope.data.types import Domain, Example
from expertscope.errors import DataError
from expertscope.interventions.hypotheses import (
    Hypotheses,
    check_items,
    compare,
    pre_register,
    predictions,
)
from expertscope.interventions.steering_study import InterventionResult


def _tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    dom = pd.DataFrame([{"domain": d, "layer": layer, "expert": e, "activation_rate": 0.1 * (e + 1),
                         "is_domain_expert": (d, layer, e) in {("math", 1, 3), ("math", 0, 2), ("code", 0, 1)},
                         "specificity": float(e + layer)}
                        for d in ("math", "code") for layer in (0, 1) for e in range(4)])
    drv = pd.DataFrame([{"domain": "math", "layer": 1, "expert": 0, "is_driver": True, "ce_mean": 0.1},
                        {"domain": "code", "layer": 1, "expert": 2, "is_driver": False, "ce_mean": 0.0}])
    return dom, drv


def _domains() -> list[Domain]:
    return [Domain("math", [Example(text=f"m{i}", answer="1") for i in range(5)], "math"),
            Domain("code", [Example(text=f"c{i}", label="A", choices=("a", "b", "c", "d")) for i in range(4)],
                   "multiple_choice")]


def _hyp() -> Hypotheses:
    dom, drv = _tables()
    return pre_register(dom, drv, InterventionConfig(), model_source="tiny", layers=[0, 1], num_experts=4,
                        discovery=_domains(), rules={"domain": "rule d", "driver": "rule c"}, seed=3)


def test_pre_registration_holds_the_exact_sets_predictions_and_discovery_items(tmp_path: Path) -> None:
    hyp = _hyp()
    by = {(h.domain, h.kind): h for h in hyp.hypotheses}
    assert set(by) == {("math", "domain"), ("math", "driver"), ("code", "domain")}  # code has no driver
    assert by[("math", "domain")].experts == [(1, 3), (0, 2)]  # strongest (specificity) first
    assert by[("math", "driver")].experts == [(1, 0)]
    assert predictions(InterventionConfig()) == {"×1.2": "higher", "×0.8": "lower", "mask": "lower"}
    assert all(h.predictions == predictions(InterventionConfig()) and h.selective for h in hyp.hypotheses)
    assert hyp.discovery["math"]["n"] == 5
    assert set(hyp.discovery["math"]["items"]) == {item_hash(e)[:16] for e in _domains()[0].examples}
    assert [0, 1, 0.2] in hyp.activation["math"]  # layer 0, expert 1, its rate: for equally busy controls
    assert hyp.settings["seed"] == 3 and hyp.settings["rules"]["driver"] == "rule c"
    path = hyp.save(tmp_path / "hypotheses.json")
    back = Hypotheses.load(path)
    assert back.hash == hyp.hash == json.loads(path.read_text())["hash"]
    assert back.to_dict() == hyp.to_dict()
    cfg = back.config()  # confirmation: the registered strengths only, nothing trained
    assert cfg.dose_scales == () and cfg.dose_biases == () and not cfg.finetune and cfg.n_controls == 8


@pytest.mark.parametrize("edit", ["prediction", "expert", "extra key", "no hash", "hash edited to match nothing"])
def test_a_hypotheses_file_edited_by_hand_is_refused(tmp_path: Path, edit: str) -> None:
    path = _hyp().save(tmp_path / "hypotheses.json")
    d = json.loads(path.read_text())
    if edit == "prediction":
        d["hypotheses"][0]["predictions"]["mask"] = "higher"
    elif edit == "expert":
        d["hypotheses"][0]["experts"].append([0, 3])
    elif edit == "extra key":
        d["note"] = "added later"
    elif edit == "no hash":
        del d["hash"]
    else:
        d["hash"] = "0" * 64
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="changed after it was written"):
        Hypotheses.load(path)


def test_a_file_that_is_no_hypotheses_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(DataError, match="not a hypotheses file"):
        Hypotheses.load(tmp_path / "x.json")


def test_items_that_found_the_hypotheses_cannot_confirm_them() -> None:
    hyp = _hyp()
    new = Domain("math", [Example(text="fresh", answer="1"), Example(text="m2", answer="1")], "math")
    with pytest.raises(DataError, match="1 item"):
        check_items(hyp, [new])
    assert check_items(hyp, [new], allow_overlap=True) == {"math": 1}
    assert check_items(hyp, [Domain("math", [Example(text="fresh", answer="1")], "math")]) == {}


def _dose_row(domain: str, kind: str, strength: str, n_targets: int, diff: float, lo: float, hi: float,
              specific: bool | None, applicable: bool = True) -> dict:
    return {"domain": domain, "kind": kind, "strength": strength, "n_targets": n_targets, "applicable": applicable,
            "reason": "" if applicable else "no driver experts", "n": 40, "delta": diff - 0.01,
            "delta_lo": lo - 0.01, "delta_hi": hi - 0.01, "diff": diff, "diff_lo": lo, "diff_hi": hi,
            "q_vs_control": 0.01 if specific else 0.4, "specific": np.nan if specific is None else specific,
            "control": "matched", "control_reason": ""}


def test_predicted_against_observed_by_hand() -> None:
    hyp = _hyp()
    dose = pd.DataFrame([
        _dose_row("math", "domain", "mask", 2, -0.2, -0.3, -0.1, True),  # lower, specific: confirmed
        _dose_row("math", "domain", "×0.8", 2, 0.1, 0.05, 0.15, True),  # higher where lower predicted: opposite
        _dose_row("math", "domain", "×1.2", 2, 0.02, -0.05, 0.09, False),  # not specific: not confirmed
        _dose_row("math", "driver", "mask", 1, -0.1, -0.2, 0.0, None),  # no verdict: not measured
        _dose_row("code", "domain", "mask", 1, -0.2, -0.3, -0.1, True),
    ])
    sel = pd.DataFrame([{"kind": "domain", "ablated": "math", "evaluated": "math", "n": 40, "delta": -0.2,
                         "delta_lo": -0.3, "delta_hi": -0.1, "norm_delta": -0.2, "norm_lo": -0.3, "norm_hi": -0.1,
                         "selective": True, "selective_reason": "every other domain loses at most 0.1x"},
                        {"kind": "domain", "ablated": "code", "evaluated": "code", "n": 40, "delta": -0.1,
                         "delta_lo": -0.2, "delta_hi": 0.0, "norm_delta": -0.1, "norm_lo": -0.2, "norm_hi": 0.0,
                         "selective": False, "selective_reason": "math loses as much"}])
    table = compare(hyp, InterventionResult(pd.DataFrame(), dose, pd.DataFrame(), sel), "test",
                    {"math": "m.jsonl"}, overlap={"code": 2})
    got = {(r.domain, r.kind, r.strength): r for r in table.itertuples()}
    assert got[("math", "domain", "mask")].outcome == "confirmed"
    assert got[("math", "domain", "mask")].observed == "lower" and got[("math", "domain", "mask")].diff == -0.2
    down = got[("math", "domain", "×0.8")]
    assert down.outcome == "opposite" and down.observed == "higher"
    assert got[("math", "domain", "×1.2")].outcome == "not confirmed"
    assert got[("math", "driver", "mask")].outcome == "not measured"
    assert got[("math", "driver", "×1.2")].outcome == "not measured"  # not in the dose table at all
    assert "not evaluated" in got[("math", "driver", "×1.2")].note
    assert got[("math", "domain", "selectivity")].outcome == "confirmed"
    assert got[("code", "domain", "selectivity")].outcome == "not confirmed"
    assert got[("math", "domain", "mask")].source == "m.jsonl" and set(table["corpus"]) == {"test"}
    # the overlap is said on every row of the affected domain, and only there
    assert all("--allow-overlap" in r.note for r in table.itertuples() if r.domain == "code")
    assert not any("--allow-overlap" in r.note for r in table.itertuples() if r.domain == "math")
    # 3 hypotheses x (3 strengths + selectivity)
    assert len(table) == 12


def test_a_steering_table_of_other_sets_is_refused() -> None:
    dose = pd.DataFrame([_dose_row("math", "domain", "mask", 5, -0.2, -0.3, -0.1, True)])
    with pytest.raises(DataError, match="different runs"):
        compare(_hyp(), InterventionResult(pd.DataFrame(), dose), "test")


def test_confirmation_sentences_count_and_name_the_outcomes() -> None:
    from expertscope.report.sentences import confirmation_sentences

    table = pd.DataFrame([
        {"corpus": "the second corpus", "domain": "math", "kind": "domain", "strength": "mask", "n_targets": 2,
         "predicted": "lower", "observed": "lower", "outcome": "confirmed", "diff": -0.2, "diff_lo": -0.3,
         "diff_hi": -0.1, "q_vs_control": 0.01, "control": "equally busy experts"},
        {"corpus": "the second corpus", "domain": "math", "kind": "domain", "strength": "×1.2", "n_targets": 2,
         "predicted": "higher", "observed": "no change beyond controls", "outcome": "not confirmed", "diff": 0.0,
         "diff_lo": -0.1, "diff_hi": 0.1, "q_vs_control": 0.5, "control": "equally busy experts"},
        {"corpus": "the second corpus", "domain": "code", "kind": "driver", "strength": "mask", "n_targets": 1,
         "predicted": "lower", "observed": "", "outcome": "not measured", "diff": np.nan, "diff_lo": np.nan,
         "diff_hi": np.nan, "q_vs_control": np.nan, "control": ""},
    ])
    lines = confirmation_sentences(table)
    assert lines[0].startswith("On the second corpus: 1 of 2 pre-registered predictions confirmed (math 1/2, code 0/0)")
    assert "1 not confirmed" in lines[0] and "1 not measured" in lines[0]
    assert lines[1] == ("math domain experts (2) at mask: predicted lower, observed -0.200 [-0.300, -0.100] beyond "
                        "equally busy experts (q 0.01): confirmed.")


def test_a_prediction_the_data_cannot_show_is_not_measured_and_says_why() -> None:
    """At the floor a loss cannot show, at saturation a gain cannot: those rows are not measured (numbers kept)."""
    hyp = _hyp()
    dose = pd.DataFrame([_dose_row("math", "domain", "mask", 2, -0.01, -0.03, 0.01, False),
                         _dose_row("math", "domain", "×1.2", 2, 0.1, 0.05, 0.15, True),
                         _dose_row("code", "domain", "×1.2", 1, 0.0, -0.02, 0.02, False),
                         _dose_row("code", "domain", "mask", 1, -0.2, -0.3, -0.1, True)])
    table = pd.DataFrame([{"domain": "math", "condition": "original", "accuracy": 0.02},
                          {"domain": "code", "condition": "original", "accuracy": 0.97}])
    got = compare(hyp, InterventionResult(table, dose), "shifted").set_index(["domain", "kind", "strength"])
    floor = got.loc[("math", "domain", "mask")]
    assert floor.outcome == "not measured" and floor.note.startswith("floor: unsteered accuracy 0.020")
    assert floor["diff"] == -0.01  # the measurement is kept
    assert got.loc[("math", "domain", "selectivity")].outcome == "not measured"
    assert got.loc[("math", "domain", "×1.2")].outcome == "confirmed"  # a gain can show at the floor
    assert got.loc[("code", "domain", "×1.2")].note.startswith("saturated: unsteered accuracy 0.970")
    assert got.loc[("code", "domain", "mask")].outcome == "confirmed"  # a loss can show at saturation
