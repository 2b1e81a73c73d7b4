"""`expertscope run` as a resumable pipeline, on a tiny model and the synthetic domains."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import expertscope as es
from expertscope.cli.main import app
from expertscope.pipeline import PIPELINE, stages
from expertscope.testing import tiny_model, tiny_tokenizer

runner = CliRunner()
# No math domain here: greedy generation is the slow part and the steering tests cover it.
DOMAINS = ["emotion=synthetic:emotion@validation", "knowledge=synthetic:knowledge@validation"]
SENTIMENT = ["positive", "negative", "neutral"]
TABLES = ["domain_experts.parquet", "drivers.parquet", "causal_rate.parquet", "token_positions.parquet",
          "token_associations.parquet", "steering.parquet", "steering_dose.parquet",
          "steering_arms.parquet", "steering_selectivity.parquet", "coactivation.parquet",
          "paths.parquet", "routing_consistency.parquet", "importance.parquet", "routing_overlap.parquet"]


@contextlib.contextmanager
def counting_loads() -> Iterator[Counter[str]]:
    """Count how often the run context reads each shared table from disk."""
    from expertscope.pipeline import context

    counts: Counter[str] = Counter()
    with pytest.MonkeyPatch.context() as mp:
        for name, (file, load) in list(context._LOADERS.items()):
            def counted(path: Path, _load=load, _name=name):
                counts[_name] += 1
                return _load(path)

            mp.setitem(context._LOADERS, name, (file, counted))
        yield counts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_model("mixtral", num_local_experts=8, initializer_range=0.2).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _sentiment_file(path: Path, n: int = 40) -> Path:
    words = {"positive": "great lovely", "negative": "awful bad", "neutral": "plain usual"}
    rows = [{"text": f"Ann: the day was {words[SENTIMENT[i % 3]]} {i}", "label": SENTIMENT[i % 3]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> list[str]:
    """The study's domains: a user's sentiment file with its own three labels, and synthetic knowledge."""
    data = _sentiment_file(tmp_path_factory.mktemp("data") / "sentiment.jsonl")
    return [f"sa={data}?task=classification", DOMAINS[1]]


def _args(model_dir: Path, domains: list[str], out: Path, *extra: str) -> list[str]:
    args = ["run", "--model", str(model_dir), "--out", str(out), "--limit", "10", "--batch-size", "4",
            "--causal-limit", "3", "--eval-limit", "5", "--train-limit", "8", "--n-boot", "50", "--n-perm", "auto",
            # a small dose-response (mask, ×0.8, ×1.2, ×2, +ln 2) with one control draw: every part runs, quickly
            "--n-controls", "1", "--dose-scales", "2", "--dose-biases", "2"]
    for d in domains:
        args += ["--domain", d]
    return args + list(extra)


FULL_RUN_LOADS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def full_run(model_dir, domains, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    with counting_loads() as loads:
        r = runner.invoke(app, _args(model_dir, domains, out))
    assert r.exit_code == 0, r.output
    FULL_RUN_LOADS.update(loads)
    return out


@pytest.mark.slow
def test_full_run_writes_manifest_tables_and_report(full_run: Path) -> None:
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 0 and manifest["schema_version"] == 1
    assert PIPELINE.study() == [k for k in manifest["stages"] if not k.startswith("_")]
    assert all(manifest["stages"][n]["status"] == "complete" for n in PIPELINE.study())
    # every shared table is handed from the stage that wrote it to the later ones: none is read back from disk
    assert not FULL_RUN_LOADS, FULL_RUN_LOADS
    # each stage records the settings of the config sections it read
    assert manifest["stages"]["steering"]["settings"]["intervention"]["n_controls"] == 1  # as --n-controls said
    for name in TABLES:
        assert (full_run / name).exists(), name
    html = (full_run / "report.html").read_text()
    assert "<img" in html and "http://" not in html.replace("http://www.w3.org", "")
    steering = pd.read_parquet(full_run / "steering.parquet")
    assert set(steering["domain"]) == {"sa", "knowledge"}
    assert "finetune_router" in set(steering["condition"])


def test_interrupt_exits_130_and_leaves_a_resumable_run(model_dir: Path, domains: list[str], tmp_path: Path,
                                                        monkeypatch) -> None:
    part = tmp_path / "part"

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(PIPELINE, "stages", (PIPELINE.get("profile"), PIPELINE.get("domain_experts")))
    monkeypatch.setattr(stages, "domain_experts_stage", interrupted)
    r = runner.invoke(app, _args(model_dir, domains, part))
    assert r.exit_code == 130 and "--resume" in r.output
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["stages"]["profile"]["status"] == "complete"
    assert "domain_experts" not in manifest["stages"]
    r = runner.invoke(app, _args(model_dir, domains, part))
    assert r.exit_code == 2 and "--resume" in r.output  # refuses to mix runs without --resume


@pytest.mark.slow
def test_resume_recomputes_only_unfinished_stages_to_the_same_tables(full_run: Path, model_dir: Path,
                                                                      domains: list[str], tmp_path: Path,
                                                                      no_figures: list[str]) -> None:
    # A run stopped after the causal rate: later stages' outputs gone and unrecorded.
    part = tmp_path / "part"
    shutil.copytree(full_run, part)
    manifest = json.loads((part / "manifest.json").read_text())
    later = ["tokens", "expert_map", "steering", "report"]
    for name in later:
        manifest["stages"].pop(name)
    manifest["status"] = "running"
    (part / "manifest.json").write_text(json.dumps(manifest))
    for f in ["token_positions.parquet", "token_associations.parquet", "steering.parquet",
              "steering_dose.parquet", "report.html"]:
        (part / f).unlink()
    with counting_loads() as loads:
        r = runner.invoke(app, _args(model_dir, domains, part, "--resume"))
    assert r.exit_code == 0, r.output
    # tokens, expert_map, steering, routing_overlap read the earlier tables: each from disk once, not per stage
    assert loads == Counter({"drivers": 1, "domain_experts": 1, "profile": 1}), loads
    assert "profile: already complete" in r.output and "causal_rate: already complete" in r.output
    assert "tokens: already complete" not in r.output
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(full_run / name), pd.read_parquet(part / name), obj=name)
    assert (part / "report.html").exists()
    assert no_figures == []  # the same tables: the report keeps every figure (their wall times do not count)


def test_resume_with_other_settings_is_refused(model_dir: Path, domains: list[str], tmp_path: Path,
                                               monkeypatch) -> None:
    monkeypatch.setattr(PIPELINE, "stages", (PIPELINE.get("profile"),))
    out = tmp_path / "o"
    assert runner.invoke(app, _args(model_dir, domains, out)).exit_code == 0
    r = runner.invoke(app, _args(model_dir, domains, out, "--resume", "--seed", "3"))
    assert r.exit_code == 2 and "other settings" in r.output


def test_report_of_a_directory_without_tables_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "Traceback" not in r.output


# ----- every row and setting checked before the first stage ---------------------------------------------------
def _no_model_load(monkeypatch) -> None:
    import expertscope.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.slow
def test_a_sentiment_file_with_its_own_labels_runs_the_whole_study(full_run: Path, model_dir: Path,
                                                                   domains: list[str], tmp_path: Path) -> None:
    manifest = json.loads((full_run / "manifest.json").read_text())  # the full run's first domain is the file
    assert manifest["status"] == "complete"
    # the label set is the data's own, in the manifest and in the fingerprint (so --resume sees a change)
    assert manifest["labels"] == {"sa": sorted(SENTIMENT)}
    assert manifest["fingerprint"]["data"]["sa"]["labels"] == sorted(SENTIMENT)
    steering = pd.read_parquet(full_run / "steering.parquet")
    orig = steering[(steering.domain == "sa") & (steering.condition == "original")].iloc[0]
    assert orig.n == 5 and 0 <= orig.accuracy <= 1  # --eval-limit 5
    # The file's items: the manifest records what each stage read; the steering stage evaluated only items of
    # the confirmation part, none of which the profile (discovery) read.
    from expertscope.data.parts import digest, item_hash
    from expertscope.data.sources import load_domain

    data = domains[0].split("=", 1)[1].split("?")[0]
    parts = {p: load_domain(f"sa={data}", part=p).examples for p in ("discovery", "train", "confirm")}
    items = {n: manifest["stages"][n]["items"] for n in ("profile", "steering")}
    assert items["profile"]["discovery"]["sa"] == digest(parts["discovery"][:10])  # --limit 10
    assert items["steering"]["confirm"]["sa"] == digest(parts["confirm"][:5])  # --eval-limit 5
    assert items["steering"]["train"]["sa"] == digest(parts["train"][:8])  # --train-limit 8
    assert not {item_hash(e) for e in parts["discovery"]} & {item_hash(e) for e in parts["confirm"]}
    # `expertscope run` prints the three parts and their sizes, in its summary table
    from rich.console import Console

    from expertscope.cli.tables import run_summary

    sizes = (min(10, len(parts["discovery"])), min(8, len(parts["train"])), min(5, len(parts["confirm"])))
    rec = Console(record=True, width=120)
    rec.print(run_summary(full_run, manifest))
    row = next(line for line in rec.export_text().splitlines() if line.startswith("│ sa "))
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    dom = pd.read_parquet(full_run / "domain_experts.parquet")
    drv = pd.read_parquet(full_run / "drivers.parquet")
    assert cells[:4] == ["sa", "{}/{}/{}".format(*sizes), str(int(dom[dom.domain == "sa"].is_domain_expert.sum())),
                         str(int(drv[drv.domain == "sa"].is_driver.sum()))]
    # the evaluation scores exactly the domain's own labels
    r = runner.invoke(app, ["eval", "--model", str(model_dir), "--data", data, "--limit", "6",
                            "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.sentiment.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(set(p["scores"]) == set(SENTIMENT) for p in preds)
    assert all(p["prediction"] == max(p["scores"], key=p["scores"].get) for p in preds)


def test_a_label_outside_the_given_label_set_is_refused_before_the_model_loads(model_dir: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    _no_model_load(monkeypatch)
    data = _sentiment_file(tmp_path / "s.jsonl")
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", "--model", str(model_dir), "--out", str(out), "--domain",
                            f"sa={data}?task=classification&labels=positive,negative", "--domain", DOMAINS[1]])
    assert r.exit_code == 2 and "'neutral' outside the task's label set" in r.output and "domain 'sa'" in r.output
    assert not out.exists()


def test_math_without_answers_is_refused_before_the_model_loads(model_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    _no_model_load(monkeypatch)
    data = tmp_path / "m.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"What is {i} + {i}?"}) for i in range(30)))
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", "--model", str(model_dir), "--out", str(out), "--domain",
                            f"m={data}?task=math", "--domain", DOMAINS[0]])
    assert r.exit_code == 2 and "no 'answer'" in r.output and "Traceback" not in r.output
    assert not out.exists()  # nothing written


def test_too_few_permutations_are_refused_before_the_model_loads(model_dir: Path, domains: list[str],
                                                                  tmp_path: Path, monkeypatch) -> None:
    _no_model_load(monkeypatch)
    out = tmp_path / "o"
    r = runner.invoke(app, _args(model_dir, domains, out, "--n-perm", "20"))
    # 2 domains × 3 MoE layers × 8 experts (the tiny Mixtral's config) = 48 tests: 1/(20+1) can never pass BH
    assert r.exit_code == 2 and "n_perm=20 is too few for 48 tests" in r.output
    assert not out.exists()


def test_the_n_perm_check_counts_the_tests_the_profile_has(model_dir: Path) -> None:
    from expertscope.models.loading import ModelSource, load_model

    shape = ModelSource.resolve(str(model_dir)).moe_shape()
    moe = load_model(str(model_dir))  # independent reference: the loaded model's own routers
    assert shape == (len(moe.layers), moe.num_experts)


# ----- no command replaces another's table --------------------------------------------------------------------
@pytest.mark.slow
def test_domains_in_a_study_directory_refuses_and_writes_elsewhere(full_run: Path, tmp_path: Path) -> None:
    import hashlib

    study_dir = tmp_path / "study"
    shutil.copytree(full_run, study_dir)
    digest = hashlib.sha256((study_dir / "domain_experts.parquet").read_bytes()).hexdigest()
    r = runner.invoke(app, ["domains", str(study_dir), "--domain-rule", "z", "--n-boot", "20"])
    assert r.exit_code == 2 and "-o NEW_DIR" in r.output and "--force" in r.output
    assert hashlib.sha256((study_dir / "domain_experts.parquet").read_bytes()).hexdigest() == digest
    other = tmp_path / "z"
    r = runner.invoke(app, ["domains", str(study_dir), "--rule", "z", "--n-boot", "20", "-o", str(other)])
    assert r.exit_code == 0, r.output
    assert hashlib.sha256((study_dir / "domain_experts.parquet").read_bytes()).hexdigest() == digest
    table = pd.read_parquet(other / "domain_experts.parquet")
    assert len(table) and json.loads((other / "manifest.json").read_text())["kind"] == "domains"
    # --force replaces the study's table, keeping the old one aside
    r = runner.invoke(app, ["domains", str(study_dir), "--rule", "z", "--n-boot", "20", "--force"])
    assert r.exit_code == 0, r.output
    kept = list((study_dir / ".replaced-tables").glob("*/domain_experts.parquet"))
    assert len(kept) == 1 and hashlib.sha256(kept[0].read_bytes()).hexdigest() == digest


@pytest.mark.slow
def test_report_to_a_file_writes_only_that_file_and_its_own_assets(full_run: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in full_run.rglob("*")}
    where = tmp_path / "mine"
    where.mkdir()
    (where / "findings.json").write_text("the user's own file")
    r = runner.invoke(app, ["report", str(full_run), "-o", str(where / "r.html")])
    assert r.exit_code == 0, r.output
    assert (where / "findings.json").read_text() == "the user's own file"
    assert {p.name for p in where.iterdir()} == {"findings.json", "r.html", "r.findings.json", "r_figures"}
    assert {p: p.stat().st_mtime_ns for p in full_run.rglob("*")} == before  # the run is untouched


def test_a_dead_eval_run_is_replaced_on_rerun(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    out.mkdir()
    # what a SIGKILLed `eval --out` leaves: a running manifest and a lock file nobody holds
    (out / "manifest.json").write_text(json.dumps({"kind": "eval", "status": "running", "fingerprint": {}}))
    (out / ".expertscope.lock").write_text("999999\n")
    (out / "predictions.old.jsonl").write_text("{}\n")
    r = runner.invoke(app, ["eval", "--model", str(model_dir), "--limit", "3", "--task", "multiple_choice",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not (out / "predictions.old.jsonl").exists() and (out / "predictions.knowledge.jsonl").exists()
    # a finished run is still refused without --force
    r = runner.invoke(app, ["eval", "--model", str(model_dir), "--limit", "3", "--task", "multiple_choice",
                            "--out", str(out)])
    assert r.exit_code == 2 and "--force" in r.output


def test_drivers_rule_top_flags_top_per_layer(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    r = runner.invoke(app, ["drivers", "--model", str(model_dir), "--out", str(out), "--domain", DOMAINS[0],
                            "--limit", "4", "--batch-size", "4", "--n-boot", "20", "--rule", "top", "--top", "2"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "drivers.parquet")
    per_layer = df.groupby(["domain", "layer"])["is_driver"].sum()
    assert (per_layer == 2).all() and len(per_layer) == 3  # the tiny Mixtral's 3 MoE layers
    # independent reference: the two flagged experts of each layer are its two largest mean CEs
    for (_, _), g in df.groupby(["domain", "layer"]):
        assert set(g[g.is_driver].expert) == set(g.nlargest(2, "ce_mean").expert)


@pytest.mark.slow
def test_readme_results_table_is_read_from_the_run(full_run: Path, capsys) -> None:
    """scripts/demo_results.py (which writes the README's results table) reads its cells from the run's
    findings and manifest: the counts it prints are the run's own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_results", Path(__file__).parents[2] / "scripts" /
                                                  "demo_results.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(full_run)]) == 0
    out = capsys.readouterr().out
    f = json.loads((full_run / "findings.json").read_text())
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].strip(" |") for line in out.splitlines()[2:]}
    assert rows["domain experts"] == " / ".join(str(d["n_domain_experts"]) for d in f["domains"])
    assert rows["driver experts"] == " / ".join(str(d["n_drivers"]) for d in f["domains"])
    assert rows["domains"] == " / ".join(d["domain"] for d in f["domains"])
    conf = pd.read_parquet(full_run / "confirmation.parquet")
    tested = conf[conf.outcome != "not measured"]
    assert rows["pre-registered predictions confirmed (confirmation part; second corpus)"] == \
        f"{int((tested.outcome == 'confirmed').sum())} of {len(tested)}"
    assert mod.main([str(full_run.parent / "nothing")]) == 2


@pytest.mark.slow
def test_hypotheses_are_registered_and_confirmed_on_new_data(full_run: Path, domains: list[str],
                                                             tmp_path: Path) -> None:
    """The run pre-registers what discovery found (before steering), compares it with its confirmation part, and
    `expertscope confirm` tests the same file on a new corpus; discovery items and edited files are refused."""
    import math

    from expertscope.data.parts import digest
    from expertscope.data.sources import load_domain
    from expertscope.interventions.hypotheses import Hypotheses

    manifest = json.loads((full_run / "manifest.json").read_text())
    order = [k for k in manifest["stages"] if not k.startswith("_")]
    assert order.index("hypotheses") < order.index("steering") < order.index("confirmation")
    hyp = Hypotheses.load(full_run / "hypotheses.json")
    assert hyp.discovery["sa"]["digest"] == manifest["stages"]["profile"]["items"]["discovery"]["sa"]["digest"]
    dom = pd.read_parquet(full_run / "domain_experts.parquet")
    for h in hyp.hypotheses:
        if h.kind == "domain":
            flagged = dom[(dom.domain == h.domain) & dom.is_domain_expert.fillna(False).astype(bool)]
            assert set(h.experts) == {(int(r.layer), int(r.expert)) for r in flagged.itertuples()}
    # the study's own confirmation part: each outcome recomputed by hand from the steering dose table
    conf = pd.read_parquet(full_run / "confirmation.parquet")
    dose = pd.read_parquet(full_run / "steering_dose.parquet")
    assert set(conf["corpus"]) == {"the confirmation part"} and len(conf) == 4 * len(hyp.hypotheses)
    for r in conf[conf.strength != "selectivity"].itertuples():
        d = dose[(dose.domain == r.domain) & (dose.kind == r.kind) & (dose.strength == r.strength)].iloc[0]
        if d.specific is None or (isinstance(d.specific, float) and math.isnan(d.specific)):
            want = "not measured"
        elif not d.specific:
            want = "not confirmed"
        else:
            went = "lower" if d.diff_hi < 0 else "higher"
            want = "confirmed" if went == r.predicted else "opposite"
        assert r.outcome == want, (r.domain, r.kind, r.strength)
    # a new corpus for sa: other texts, the same labels
    new = tmp_path / "new.jsonl"
    words = {"positive": "wonderful", "negative": "dreadful", "neutral": "ordinary"}
    new.write_text("\n".join(json.dumps({"text": f"Bo: it felt {words[SENTIMENT[i % 3]]} #{i}",
                                         "label": SENTIMENT[i % 3]}) for i in range(30)))
    out = tmp_path / "confirm"
    r = runner.invoke(app, ["confirm", str(full_run / "hypotheses.json"), "-d", f"sa={new}?task=classification",
                            "--eval-limit", "5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    got = pd.read_parquet(out / "confirmation.parquet")
    assert set(got["domain"]) == {"sa"} and set(got["corpus"]) == {"the second corpus"}
    assert len(got) == 4 * sum(h.domain == "sa" for h in hyp.hypotheses)
    cm = json.loads((out / "manifest.json").read_text())
    assert cm["stages"]["confirmation"]["items"]["second"]["sa"] == digest(
        load_domain(f"sa={new}?task=classification").examples[:5])
    assert cm["stages"]["confirmation"]["hypotheses_hash"] == hyp.hash
    assert (out / "report.html").exists() and "pre-registered against observed" in (out / "report.html").read_text()
    # the discovery file itself: its items found the hypotheses, so they cannot confirm them
    data = domains[0].split("=", 1)[1].split("?")[0]
    r = runner.invoke(app, ["confirm", str(full_run / "hypotheses.json"), "-d", f"sa={data}?task=classification",
                            "--eval-limit", "40", "-o", str(tmp_path / "again")])
    assert r.exit_code == 2 and "found the hypotheses" in r.output and not (tmp_path / "again").exists()
    # an edited hypotheses file
    edited = tmp_path / "edited.json"
    edited.write_text((full_run / "hypotheses.json").read_text().replace('"lower"', '"higher"'))
    r = runner.invoke(app, ["confirm", str(edited), "-d", f"sa={new}?task=classification", "-o", str(tmp_path / "e")])
    assert r.exit_code == 2 and "changed after it was written" in r.output and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_docs_outputs_lists_every_column_of_every_table(full_run: Path) -> None:
    """docs/outputs.md names each table the study writes and every one of its columns (kept true by this test)."""
    import re

    import pyarrow.parquet as pq

    text = (Path(__file__).resolve().parents[2] / "docs" / "outputs.md").read_text()
    sections = dict(re.findall(r"### `(\w+)\.parquet`\n(.*?)(?=\n### |\Z)", text, flags=re.S))
    for path in sorted(full_run.glob("*.parquet")):
        assert path.stem in sections, f"docs/outputs.md lacks {path.name}"
        listed = set(re.findall(r"`(\w+)`", sections[path.stem].split("Columns:", 1)[-1]))
        missing = set(pq.read_schema(path).names) - listed
        assert not missing, f"{path.name}: columns not in docs/outputs.md: {sorted(missing)}"


@pytest.mark.slow
def test_the_plan_bounds_the_arms_the_run_steered(full_run: Path) -> None:
    """``expertscope plan`` counts the steering stage's arms from the settings alone: the run evaluated no more than
    planned, and most of them (kinds without targets are not applicable)."""
    from expertscope.interventions.steering_study import strengths
    from expertscope.pipeline.plan import _arms
    from expertscope.pipeline.runner import config_of_run

    cfg = config_of_run(full_run, es.StudyConfig())
    arms = pd.read_parquet(full_run / "steering_arms.parquet")
    domains = arms["domain"].nunique()
    assert len(arms) <= (_arms(cfg, domains) - 1) * domains
    c = cfg.intervention
    per_kind = len(strengths(c)) * (1 + c.n_controls + c.n_reference + int(c.busiest))
    own = arms[arms["ablated"] == arms["domain"]]
    counts = own.groupby(["domain", "kind"]).size()
    assert len(counts) and all(per_kind / 2 <= n <= per_kind + 2 * (1 + c.selectivity_controls) for n in counts), \
        (counts.to_dict(), per_kind)
