"""The findings record and the report's opening section, from hand-built tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expertscope.report.html import build_html
from expertscope.report.record import findings
from expertscope.report.sentences import sentences


def _tables() -> dict[str, pd.DataFrame]:
    rows = []
    for d in ("a", "b"):
        for layer in (0, 1):
            for e in range(4):
                flagged = d == "a" and layer == 1 and e in (2, 3)
                rows.append({"domain": d, "layer": layer, "expert": e, "n_sequences": 40, "n_tokens": 400,
                             "activation_rate": 0.9 if flagged else 0.4, "A_lo": 0.35, "A_hi": 0.45,
                             "lift": 3.0 if e == 3 and flagged else (2.0 if flagged else 1.0),
                             "lift_lo": 1.5, "lift_hi": 4.0, "q_value": 0.01 if flagged else 0.8,
                             "specificity": 0.1, "cwas": 0.2, "is_domain_expert": flagged})
    dom = pd.DataFrame(rows)
    dom.attrs["meta"] = {"rule_text": "BH q <= 0.05, A > k/E, lift >= 1.5"}
    drows = []
    for d in ("a", "b"):
        for layer in (0, 1):
            for e in range(4):
                ce = 0.05 if (d == "a" and layer == 0 and e == 1) else (1e-4 if d == "b" else 0.004)
                drows.append({"domain": d, "layer": layer, "expert": e, "ce_mean": ce, "ce_lo": ce / 2,
                              "ce_hi": ce * 2, "n_inputs": 30, "is_driver": ce == 0.05})
    drv = pd.DataFrame(drows)
    drv.attrs["meta"] = {"rule_text": "paired test, 2x median, floor", "config": {"ce_floor": 1e-3, "min_ratio": 2.0}}
    nan = float("nan")
    st = pd.DataFrame([
        {"domain": "a", "condition": "original", "accuracy": 0.6, "ci_low": 0.5, "ci_high": 0.7, "n": 100},
        {"domain": "a", "condition": "driver_down", "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 100,
         "delta": -0.1, "delta_lo": -0.15, "delta_hi": -0.05, "applicable": True},
        {"domain": "a", "condition": "domain_up", "accuracy": 0.61, "ci_low": 0.5, "ci_high": 0.7, "n": 100,
         "delta": 0.01, "delta_lo": -0.02, "delta_hi": 0.04, "applicable": True},
        {"domain": "b", "condition": "original", "accuracy": 0.97, "ci_low": 0.93, "ci_high": 0.99, "n": 100},
        {"domain": "b", "condition": "driver_down", "accuracy": nan, "ci_low": nan, "ci_high": nan, "n": 100,
         "delta": nan, "delta_lo": nan, "delta_hi": nan, "applicable": False, "note": "no driver experts"},
    ])
    return {"domain_experts": dom, "drivers": drv, "steering": st}


def test_findings_counts_strongest_and_nulls() -> None:
    fa, fb = findings(_tables())
    assert (fa.domain, fb.domain) == ("a", "b")
    assert fa.n_domain_experts == 2 and fb.n_domain_experts == 0
    assert [(e["layer"], e["expert"]) for e in fa.domain_experts] == [(1, 3), (1, 2)]  # largest lift first
    assert fa.n_drivers == 1 and fa.drivers[0]["expert"] == 1
    assert fa.drivers[0]["ratio_to_median"] == np.float64(0.05 / 0.004)
    assert fb.n_drivers == 0 and fb.largest_ce == 1e-4
    # the smallest flaggable CE: max(floor, 2 x smallest layer median)
    assert fb.detectable_ce == 1e-3
    assert fa.detectable_ce == max(1e-3, 2 * 0.004)
    assert [c["condition"] for c in fa.steering_changes] == ["driver_down"]
    assert fa.steering_null == ["domain_up"]
    assert fb.saturated and not fa.saturated
    assert fb.not_applicable == [{"condition": "driver_down", "reason": "no driver experts"}]


def test_sentences_say_nulls_in_words() -> None:
    _, fb = findings(_tables())
    text = " ".join(sentences(fb))
    assert "No domain experts" in text
    assert "No driver experts (largest mean CE 0.0001 nats" in text
    assert "saturated" in text
    assert "driver down: not applicable (no driver experts)" in text
    assert "+0.000" not in text and "[0.000, 0.000]" not in text  # a null is never a zero change


def test_report_opens_with_findings_and_ends_with_settings() -> None:
    page = build_html({"model": {"source": "tiny"}, "config": {"seed": 3}}, _tables(), {})
    assert page.index("id='findings'") < page.index("id='domain'") < page.index("id='settings'")
    assert "not applicable: no driver experts" in page
    assert "Saturated:" in page


def _fake_run(tmp_path: Path, name: str, n_experts: int) -> Path:
    import json

    from expertscope.io import write_table

    run = tmp_path / name
    run.mkdir()
    t = _tables()
    (run / "manifest.json").write_text(json.dumps({"model": {
        "source": name, "architecture": "X", "moe_layers": [0, 1], "num_experts": {"0": n_experts},
        "top_k": {"0": 2}, "num_shared_experts": {"0": 0}}}))
    write_table(run / "domain_experts.parquet", t["domain_experts"], meta=t["domain_experts"].attrs["meta"])
    write_table(run / "drivers.parquet", t["drivers"], meta=t["drivers"].attrs["meta"])
    write_table(run / "steering.parquet", t["steering"], meta={})
    write_table(run / "routing_mi.parquet", pd.DataFrame({"layer": [0, 1], "mi_bits": [0.1, 0.3]}), meta={})
    return run


@pytest.mark.slow  # renders a whole report (matplotlib figures)
def test_compare_two_runs(tmp_path: Path, drawn_figures: list[str]) -> None:
    import pytest

    from expertscope.errors import OutputError
    from expertscope.report.compare import compare

    a, b = _fake_run(tmp_path, "m-one", 8), _fake_run(tmp_path, "m-two", 32)
    drawn = drawn_figures
    page = compare([a, b], tmp_path / "cmp.html").read_text()
    assert "m-one" in page and "m-two" in page and "Tables 1–2" in page
    # the two runs' tables are the same: the second run's figures are copies of the first's
    assert sorted(drawn) == ["fig1_cwas", "fig2_expert_types", "fig_routing_mi"]
    assert [p.read_bytes() for p in sorted((tmp_path / "cmp_figures" / "run1").glob("*.png"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "cmp_figures" / "run0").glob("*.png"))]
    # a run whose own report drew them: copied from there too
    (tmp_path / "cmp_figures").rename(tmp_path / "old")
    (tmp_path / "old" / "run0").rename(a / "figures")
    drawn.clear()
    assert compare([a, b], tmp_path / "cmp.html").read_text().count("<img") == page.count("<img")
    assert drawn == ["fig_routing_mi"]
    import json

    rec = json.loads((tmp_path / "cmp.json").read_text())
    rows = {(r["model"], r["domain"]): r for r in rec["summary"]}
    assert rows[("m-two", "a")]["experts_per_layer"] == 32
    assert rows[("m-one", "a")]["domain_experts"] == 2 and rows[("m-one", "b")]["drivers"] == 0
    with pytest.raises(OutputError, match="at least two"):
        compare([a], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_findings_use_the_tables_own_medians_ratios_and_saturation() -> None:
    """Where the driver and steering tables carry what their rules used (layer median, ratio, the study's
    saturation label), the findings report those, not a recomputation."""
    t = _tables()
    drv = t["drivers"].copy()
    drv["layer_median"] = 0.02  # as if the rule's median differed from the rows shown
    drv["ratio"] = drv["ce_mean"] / 0.02
    drv.attrs["meta"] = t["drivers"].attrs["meta"]
    st = t["steering"].copy()
    st["saturated"] = st["domain"] == "a"  # the study's own threshold labelled a, not b
    fa, fb = findings({**t, "drivers": drv, "steering": st})
    assert fa.drivers[0]["ratio_to_median"] == 0.05 / 0.02
    assert fa.detectable_ce == max(1e-3, 2 * 0.02)
    assert fa.saturated and not fb.saturated


@pytest.mark.slow  # renders a whole report (matplotlib figures)
def test_compare_command_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, no_figures: list[str]) -> None:
    from typer.testing import CliRunner

    from expertscope.cli.main import app

    a, b = _fake_run(tmp_path, "m-one", 8), _fake_run(tmp_path, "m-two", 8)
    runner = CliRunner()
    for args in (["compare", str(a), "-o", str(tmp_path / "one.html")],      # one run only
                 ["compare", str(a), str(tmp_path / "nope"), "-o", str(tmp_path / "two.html")],  # missing run
                 ["compare", str(a), str(b), "-o", str(tmp_path)]):           # -o is a directory
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not list(tmp_path.glob("*.html")) and not list(tmp_path.glob("*_figures"))
    r = runner.invoke(app, ["compare", str(a), str(b), "-o", str(tmp_path / "ok.html")])
    assert r.exit_code == 0 and (tmp_path / "ok.html").exists(), r.output
    assert "fig1_cwas" in no_figures  # only the good command got as far as the figures


# ----- the section readings come from the tables' own columns -------------------------------------------
def test_read_drivers_names_the_strongest_driver_not_the_largest_ce() -> None:
    """The expert with the largest mean CE fails the rule (its test is not significant): the reading names the
    flagged driver with the largest CE, with the table's own interval, ratio and q, and the layer medians
    from ``layer_median``."""
    from expertscope.report.sentences import read_drivers

    drv = pd.DataFrame({
        "domain": "m", "layer": [0, 0, 0, 1, 1, 1], "expert": [0, 1, 2, 0, 1, 2],
        "ce_mean": [0.50, 0.20, 0.01, 0.30, 0.02, 0.01], "ce_lo": [0.0, 0.15, 0, 0.25, 0, 0],
        "ce_hi": [1.0, 0.25, 0.02, 0.35, 0.03, 0.02], "layer_median": [0.04] * 3 + [0.015] * 3,
        "ratio": [12.5, 5.0, 0.25, 20.0, 1.33, 0.67], "q_value": [0.2, 0.01, 0.9, 0.02, 0.8, 0.9],
        "is_driver": [False, True, False, True, False, False]})
    (text,) = read_drivers(drv)
    assert text.domain == "m"
    assert "2 of 6 experts pass the driver rule, at layer(s) 0 (1), 1 (1)" in text
    assert "The strongest driver is expert 0 at layer 1: CE 0.3 [0.25, 0.35] nats, 20× its layer's median, " \
           "q = 0.02." in text
    assert "highest at layer 0 (0.04 nats) and lowest at layer 1 (0.015 nats)" in text
    assert "expert 0 at layer 0" not in text  # the larger CE that is not a driver
    (none,) = read_drivers(drv.assign(is_driver=False))
    assert "no expert passes the driver rule. The largest mean CE, 0.5 nats (expert 0 at layer 0, 12.5× its " \
           "layer's median), is not a driver." in none


def test_every_sentence_lives_in_sentences() -> None:
    """html.py lays out: no reading generator is defined there (they live in sentences.py)."""
    import inspect

    from expertscope.report import html as html_mod
    from expertscope.report import sentences as fnd

    own = [n for n, f in inspect.getmembers(html_mod, inspect.isfunction) if f.__module__ == html_mod.__name__]
    assert not [n for n in own if n.startswith("read_")]
    assert {"read_domain_experts", "read_drivers", "read_steering", "read_routing_mi"} <= set(dir(fnd))


def test_no_reference_to_a_spec_file_the_repository_lacks() -> None:
    """docs/methods.md is the reference: no file cites sections of a specification the repository lacks."""
    root = Path(__file__).resolve().parents[3]
    needle = "SPEC" + " §"
    hits = [f"{p.relative_to(root)}:{i}" for base in ("src", "tests", "docs", "benchmarks", "scripts")
            for p in sorted((root / base).rglob("*")) if p.is_file() and p.suffix in (".py", ".md", ".sh", ".toml")
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if needle in line]
    hits += [f"README.md:{i}" for i, line in enumerate((root / "README.md").read_text().splitlines(), 1)
             if needle in line]
    assert hits == []


# ----- incomplete runs ---------------------------------------------------------------------------------
def test_study_stages_match_the_pipeline() -> None:
    from expertscope.pipeline import PIPELINE
    from expertscope.report.status import STUDY_STAGES

    assert list(STUDY_STAGES) == PIPELINE.study()


def test_status_sentence_names_the_missing_stages() -> None:
    from expertscope.report.status import run_status, status_sentence

    done = {"status": "complete", "seconds": 1.0}
    running = {"kind": "study", "status": "running",
               "stages": {"profile": done, "domain_experts": done, "_total_seconds": {"status": "info"}}}
    st = run_status(running)
    assert not st.complete and st.finished == ["profile", "domain_experts"]
    assert st.missing == ["coactivation", "drivers", "replication", "causal_rate", "tokens", "expert_map",
                          "hypotheses", "steering", "routing_overlap", "confirmation"]  # not "report"
    text = status_sentence(running)
    assert text is not None and "status “running”" in text
    assert ("stages coactivation, drivers, replication, causal_rate, tokens, expert_map, hypotheses, steering, "
            "routing_overlap, confirmation did not finish") in text
    # The stages the run planned, where its manifest lists them.
    planned = {**running, "planned_stages": ["profile", "domain_experts", "drivers", "report"]}
    assert "stage drivers did not finish, so its section is missing" in (status_sentence(planned) or "")
    assert status_sentence({**running, "status": "complete"}) is None
    assert "no stage is recorded as finished" in (status_sentence({"kind": "eval", "status": "running"}) or "")


def test_report_puts_a_banner_on_an_incomplete_run() -> None:
    done = {"status": "complete", "seconds": 1.0}
    manifest = {"kind": "study", "model": {"source": "tiny"},
                "stages": {s: done for s in ("profile", "coactivation", "domain_experts", "drivers")}}
    assert "Incomplete run" not in build_html({**manifest, "status": "complete"}, _tables(), {})
    page = build_html({**manifest, "status": "running"}, _tables(), {})
    banner = page.split("<div class='banner' role='alert'>")[1].split("</div>")[0]
    assert ("causal_rate, tokens, expert_map, hypotheses, steering, routing_overlap, confirmation did not "
            "finish") in banner
    assert "“running”" in banner
    assert page.index("class='banner'") < page.index("id='findings'")  # above everything else


@pytest.mark.slow
def test_compare_puts_a_banner_on_each_incomplete_run(tmp_path: Path, no_figures: list[str]) -> None:
    import json

    from expertscope.report.compare import compare

    a, b = _fake_run(tmp_path, "m-one", 8), _fake_run(tmp_path, "m-two", 8)
    for run, status in ((a, "complete"), (b, "running")):
        m = json.loads((run / "manifest.json").read_text())
        m.update(kind="study", status=status, stages={"profile": {"status": "complete"}})
        (run / "manifest.json").write_text(json.dumps(m))
    out = compare([a, b], tmp_path / "cmp.html")
    page = out.read_text()
    assert page.count("<div class='banner'") == 1 and "Run m-two is not complete" in page
    assert ("stages coactivation, drivers, domain_experts, replication, causal_rate, tokens, expert_map, hypotheses, "
            "steering, routing_overlap, confirmation did not finish") in page

    # The same explorable page as the report: sort the summary, read the MI heatmap's hover value.
    from _browser import Browser, require_chromium

    with Browser(require_chromium(), tmp_path / "profile") as br:
        br.open(out.as_uri())
        br.click("#summary th[data-col='domain_experts']")
        assert br.eval("Array.from(document.querySelectorAll('#summary tbody tr')).map(r => r.cells[0].textContent + "
                       "'/' + r.cells[6].textContent)") == ["m-one/a", "m-two/a", "m-one/b", "m-two/b"]
        br.hover("#mi svg.hm rect[data-v][y='0'][x]:not([x='0'])")  # model m-one, layer 1
        tip = br.eval("document.getElementById('tip').textContent")
        assert tip == "model m-one · layer 1: I(domain; expert) 0.3 bits"  # _fake_run's mi_bits of layer 1


def test_steering_and_sweep_readings_say_whether_an_interval_excludes_zero() -> None:
    from expertscope.report.sentences import read_steering, read_sweep

    st = _tables()["steering"]
    a, b = read_steering(st)
    assert "driver down -0.100 [-0.150, -0.050]; domain up +0.010 [-0.020, +0.040]" in a
    assert a.endswith("The interval excludes 0 for driver down only.")
    assert "driver down not applicable (no driver experts)" in b
    sweep = pd.DataFrame({"domain": "a", "targets": "driver", "sweep": "scale", "scale": [0.8, 1.0, 1.2],
                          "accuracy": [0.40, 0.60, 0.66], "ci_low": [0.3, 0.5, 0.55], "ci_high": [0.5, 0.7, 0.76]})
    (text,) = read_sweep(sweep)
    assert "best accuracy at s = 1.2: 0.66 against 0.6 unsteered (95% CI [0.5, 0.7]); outside it: s = 0.8 " \
           "(0.4, below)." in text
    (flat,) = read_sweep(sweep.assign(accuracy=[0.55, 0.6, 0.58]))
    assert "no scale of the driver experts beats the unsteered accuracy of 0.6" in flat
    assert "all 3 scales lie inside it, so the sweep shows no effect" in flat
