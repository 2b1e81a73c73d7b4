"""Figures, the self-contained report (also rendered in headless Chromium) and the expert map (Fig. 5)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _browser import Browser, require_chromium
from expertscope.errors import OutputError
from expertscope.io import make_manifest, write_json, write_table
from expertscope.report import figure_style as S
from expertscope.report import figures as F
from expertscope.report.html import build_html, load_tables, report
from expertscope.stats.expert_types import expert_types

DOMAINS = ("emotion", "knowledge", "math")

def synthetic_tables(L: int = 4, E: int = 8, seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows, drows, crows, prows = [], [], [], []
    for di, d in enumerate(DOMAINS):
        for layer in range(L):
            A = rng.dirichlet(np.ones(E)) * 2
            ce = rng.gamma(1.0, 0.01, E)
            ce[(layer + di) % E] += 0.08
            mu, sd = ce.mean(), ce.std()
            for e in range(E):
                rows.append({"domain": d, "layer": layer, "expert": e, "activation_rate": A[e],
                             "entropy": rng.uniform(0.2, 0.8), "cwas": A[e] * rng.uniform(0.3, 0.8),
                             "specificity": rng.normal(0, 0.05) + (0.3 if e == (2 * di + layer) % E else 0),
                             "uniform_rate": 2 / E, "is_domain_expert": e == (2 * di + layer) % E and A[e] > 2 / E,
                             "is_driver": False, "is_general": False})
                drows.append({"domain": d, "layer": layer, "expert": e, "ce_mean": ce[e], "layer_mean": mu,
                              "layer_sd": sd, "threshold": mu + 2 * sd, "is_driver": bool(ce[e] >= mu + 2 * sd)})
            crows.append({"domain": d, "layer": layer, "causal_rate": rng.uniform(0.05, 0.5)})
        tot = 400
        base = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
        trig = rng.dirichlet(np.ones(5) * 3)
        labels = ("[0.0, 0.2)", "[0.2, 0.4)", "[0.4, 0.6)", "[0.6, 0.8)", "[0.8, 1.0]")
        for layer in [*map(str, range(L)), "all"]:
            for b in range(5):
                prows.append({"domain": d, "layer": layer, "bin": labels[b], "bin_index": b,
                              "n_trigger": int(trig[b] * 100), "trigger_share": trig[b], "n_tokens": int(base[b] * tot),
                              "token_share": base[b], "ratio": trig[b] / base[b], "n_trigger_total": 100,
                              "n_tokens_total": tot})
    dom = pd.DataFrame(rows)
    act = dom.groupby(["layer", "expert"])["activation_rate"].transform("max") > 2 / E
    flagged = dom.groupby(["layer", "expert"])["is_domain_expert"].transform("any")
    dom["is_general"] = act & ~flagged
    drivers = pd.DataFrame(drows)
    assoc = pd.DataFrame([{"domain": d, "kind": k, "layer": 1, "expert": 3, "rank": r + 1, "token": t,
                           "token_ids": "5", "count": 10 - r, "n_selected": 8 - r,
                           "p_expert_given_token": 0.8, "p_expert": 0.25, "lift": 3.2 - r * 0.4}
                          for d in DOMAINS for k in ("domain", "driver") for r, t in enumerate(["sum", "what", "<b>"])])
    emap = pd.DataFrame({"layer": np.repeat(range(L), E), "expert": np.tile(range(E), L),
                         "x": rng.normal(size=L * E), "y": rng.normal(size=L * E),
                         "cluster": rng.integers(0, 5, L * E), "representation": "router"})
    drv_keys = set(zip(drivers[drivers.is_driver].layer, drivers[drivers.is_driver].expert, strict=True))
    emap["is_driver"] = [(a, b) in drv_keys for a, b in zip(emap.layer, emap.expert, strict=True)]
    conds = ("original", "domain_up", "domain_down", "driver_up", "driver_down")
    steering = pd.DataFrame([{"domain": d, "task": "classification", "condition": c, "mode": "scale",
                              "scale": 1.0, "n_targets": 3, "n": 50, "accuracy": a, "ci_low": a - 0.1,
                              "ci_high": min(1, a + 0.1), "weighted_f1": a - 0.05, "delta": a - 0.6,
                              "delta_lo": a - 0.7, "delta_hi": a - 0.5}
                             for d in DOMAINS for c, a in zip(conds, rng.uniform(0.4, 0.8, 5), strict=True)])
    sweep = pd.DataFrame([{"domain": d, "targets": t, "sweep": "scale", "scale": s, "n_targets": 3,
                           "accuracy": 0.6 + 0.1 * np.sin(s + i), "ci_low": 0.5, "ci_high": 0.75}
                          for d in DOMAINS for i, t in enumerate(("domain", "driver"))
                          for s in (0.6, 0.8, 1.0, 1.2, 1.4)])
    return {"domain_experts": dom, "drivers": drivers, "causal_rate": pd.DataFrame(crows),
            "positions": pd.DataFrame(prows), "associations": assoc, "expert_map": emap,
            "steering": steering, "steering_sweep": sweep}


FILES = {"domain_experts": "domain_experts.parquet", "drivers": "driver_experts.parquet",
         "causal_rate": "causal_rate.parquet", "positions": "token_positions.parquet",
         "associations": "token_associations.parquet", "expert_map": "expert_map.parquet",
         "steering": "steering.parquet", "steering_sweep": "steering_sweep.parquet"}
ALL_FIGURES = {"fig1_cwas", "fig2_expert_types", "fig3_causal_rate", "fig4_positions", "fig5_expert_map",
               "fig6_causal_layers", "fig7_causal_heatmap", "fig_steering", "fig_steering_sweep"}
PAGE_FIGURES = ALL_FIGURES - {"fig7_causal_heatmap"}  # the page shows that one as an explorable heatmap


def write_run(run_dir: Path, tables: dict[str, pd.DataFrame], keys: tuple[str, ...] | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for key in keys or tuple(FILES):
        write_table(run_dir / FILES[key], tables[key])
    write_json(run_dir / "manifest.json", make_manifest("study", {"model": "demo", "seed": 0}, seed=0,
                                                        status="complete",
                                                        model={"source": "demo", "moe_layers": [0, 1, 2, 3]}))
    return run_dir


@pytest.fixture(scope="module")
def built_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return report(write_run(tmp_path_factory.mktemp("run"), synthetic_tables()))


# ----- figures -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_figures_written_png_and_svg(built_report: Path, no_figures: list[str]):
    fig_dir = built_report.parent / "figures"  # drawn by the report
    # the tables the report read: every figure kept, none drawn twice
    out = F.write_figures(load_tables(built_report.parent), fig_dir)
    assert no_figures == [] and set(out) == ALL_FIGURES
    for paths in out.values():
        assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.parent == fig_dir for p in paths)
        png, svg = paths
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        text = svg.read_text()
        assert "<svg" in text and not re.search(r"""(?:href|src)\s*=\s*["']https?:""", text)
    assert not list(fig_dir.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_figures_are_drawn_only_when_their_tables_or_files_changed(tmp_path: Path, drawn_figures: list[str]):
    t = {k: v for k, v in synthetic_tables().items() if k in ("causal_rate", "steering")}
    t["steering"] = t["steering"].copy()
    t["steering"].attrs = {"seed": 0, "seconds": 1.0, "stats": {"total_s": 2.0, "computed": 3}}  # as read back
    drawn = drawn_figures
    first = F.write_figures(t, tmp_path / "a")
    assert sorted(drawn) == sorted(first) == ["fig3_causal_rate", "fig_steering"]
    digest = {p: p.read_bytes() for ps in first.values() for p in ps}
    drawn.clear()
    assert F.write_figures(t, tmp_path / "a") == first and drawn == []  # nothing changed: nothing drawn
    assert {p: p.read_bytes() for ps in first.values() for p in ps} == digest
    # a stage rerun to the same values (only the wall times in its metadata differ) keeps them; its settings
    # are part of what a figure is drawn from
    steering = t["steering"].copy()
    steering.attrs = {"seed": 0, "seconds": 7.5, "stats": {"total_s": 9.0, "computed": 3}}
    assert F.write_figures({**t, "steering": steering}, tmp_path / "a") == first and drawn == []
    steering.attrs = {"seed": 1, "seconds": 1.0, "stats": {"total_s": 2.0, "computed": 3}}
    F.write_figures({**t, "steering": steering}, tmp_path / "a")
    assert drawn == ["fig_steering"]
    drawn.clear()
    # one table changed: only the figure drawn from it; a file changed by hand: drawn again
    changed = {**t, "steering": t["steering"].assign(accuracy=t["steering"]["accuracy"] * 0.9)}
    first["fig3_causal_rate"][0].write_bytes(b"not the figure")
    assert set(F.write_figures(changed, tmp_path / "a")) == set(first)
    assert sorted(drawn) == ["fig3_causal_rate", "fig_steering"]
    # another directory takes the intact, matching files of reuse_from, byte for byte, and draws the rest
    drawn.clear()
    other = F.write_figures(t, tmp_path / "b", reuse_from=tmp_path / "a")
    assert drawn == ["fig_steering"]  # "a" holds the changed steering's figure now
    assert all(p.read_bytes() == digest[q] for n in other for p, q in zip(other[n], first[n], strict=True))
    # and what is kept equals a fresh drawing
    fresh = F.write_figures(t, tmp_path / "c")
    assert all(p.read_bytes() == q.read_bytes() for n in fresh for p, q in zip(fresh[n], other[n], strict=True))


def test_saved_figures_hold_legends_wider_than_the_panels(tmp_path: Path):
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(3.0, 2.0), layout="constrained")
    fig.subplots().plot([0, 1], [0, 1])
    handles = [Line2D([], [], marker="o", ls="", label=f"cluster {c}") for c in range(5)]
    handles.append(Line2D([], [], marker="*", ls="", label="driver expert"))
    legend = fig.legend(handles=handles, loc="outside lower center", ncols=6, frameon=False)
    fig.canvas.draw()
    legend_in = legend.get_window_extent().width / fig.dpi
    assert legend_in > 3.0  # the case that was clipped ("driver ex")
    png, svg = S.save_figure(fig, tmp_path, "wide_legend")
    width_in = mpimg.imread(png).shape[1] / 150
    assert width_in >= legend_in, (width_in, legend_in)
    assert "driver expert" in svg.read_text()


def test_a_figure_is_laid_out_once_and_drawn_once_per_file(tmp_path: Path, monkeypatch):
    """Layout once, then one draw per format: savefig must not redo the (already fixed) layout per file."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0, 2.0), layout="constrained")
    fig.subplots().plot([0, 1], [0, 1])
    draws: list[str] = []
    draw = Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda self, renderer: draws.append(type(renderer).__name__)
                        or draw(self, renderer))
    S.save_figure(fig, tmp_path, "once")
    assert len(draws) == 3, draws  # draw_without_rendering, then the PNG (Agg) and the SVG renderer
    assert fig.get_layout_engine() is None


def test_steering_figure_marks_not_applicable_conditions(tmp_path: Path):
    nan = float("nan")
    st = pd.DataFrame({"domain": ["a"] * 3, "condition": ["original", "domain_up", "driver_up"],
                       "accuracy": [0.6, 0.7, nan], "ci_low": [0.5, 0.6, nan], "ci_high": [0.7, 0.8, nan]})
    (png, svg) = F.fig_steering(st, tmp_path)
    assert png.suffix == ".png" and png.exists()
    assert svg.read_text().count("n/a") == 1
    (_, svg) = F.fig_steering(st.iloc[:2], tmp_path, name="all_applicable")
    assert "n/a" not in svg.read_text()


def test_figures_skip_empty_inputs(tmp_path: Path):
    empty = pd.DataFrame()
    for fn in (F.fig_cwas, F.fig_expert_types, F.fig_causal_rate, F.fig_positions, F.fig_expert_map,
               F.fig_causal_layers, F.fig_causal_heatmap, F.fig_steering, F.fig_steering_sweep):
        assert fn(None, tmp_path) == []
        assert fn(empty, tmp_path) == []
    assert F.write_figures({}, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []


def test_expert_types_classification():
    t = synthetic_tables()
    typed = expert_types(t["domain_experts"], t["drivers"])
    assert set(typed["type"]) <= {"general", "domain", "driver", "both", "other", "below uniform"}
    flagged = typed[typed["is_domain_expert"]]
    assert flagged["type"].isin(["domain", "both"]).all()
    below = typed["activation_rate"] <= typed["uniform_rate"]
    assert (typed.loc[below & ~typed["is_domain_expert"], "type"].isin(["below uniform", "driver"])).all()


# ----- report ------------------------------------------------------------------------------------------
@pytest.mark.slow  # renders a whole report (matplotlib figures)
def test_report_is_self_contained(built_report: Path):
    page = built_report.read_text()
    assert built_report.name == "report.html"
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(?:https?:)?//|<link\b|<script\s[^>]*src", page, re.I)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) == len(PAGE_FIGURES)
    assert all("src='data:image/png;base64," in i for i in imgs)
    # The causal heatmap is inline SVG (one per domain) with hover values; its PNG and SVG are still written.
    assert page.count("<svg class='hm'") == 2 * len(DOMAINS)  # activation rate and CE, per domain
    assert (built_report.parent / "figures" / "fig7_causal_heatmap.png").exists()
    assert "Incomplete run" not in page
    # Plain-language readings come from the numbers; table cells are escaped.
    assert "domain experts; layer" in page and "specificity +" in page
    assert "driver-triggering tokens sit in the first fifth" in page
    assert "<td>&lt;b&gt;</td>" in page and "<td><b></td>" not in page
    assert (built_report.parent / "figures" / "fig1_cwas.svg").exists()


def test_report_partial_and_missing_tables(tmp_path: Path):
    t = synthetic_tables()
    only = report(write_run(tmp_path / "only", t, keys=("domain_experts",)))
    page = only.read_text()
    assert page.count("<img") == 2 and "Driver experts" not in page.split("<nav>")[1].split("</nav>")[0]
    nothing = tmp_path / "empty"
    nothing.mkdir()
    with pytest.raises(OutputError, match=r"no manifest\.json"):
        report(nothing)
    write_json(nothing / "manifest.json", {"kind": "study"})
    with pytest.raises(OutputError, match=r"no domain_experts\.parquet"):
        report(nothing)


@pytest.mark.slow  # renders a whole report (matplotlib figures)
def test_report_cli_exit_codes(tmp_path: Path):
    import typer
    from typer.testing import CliRunner

    from expertscope.cli import report_cmds

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    report_cmds.register(app)
    runner = CliRunner()
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2
    assert "no manifest.json" in bad.output and len(bad.output.strip().splitlines()) <= 2
    # the one table a report needs (what is drawn from each table is tested above)
    run = write_run(tmp_path / "run", synthetic_tables(), keys=("domain_experts",))
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0 and (run / "report.html").exists()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    # Rewriting the run's own report takes its writer lock: a run another process is writing is refused.
    from expertscope.rundir import lock_dir

    with lock_dir(run):
        busy = runner.invoke(app, ["report", str(run)])
        assert busy.exit_code == 2 and "another expertscope process" in busy.output
        assert report(run, out=tmp_path / "r2.html", lock=True).exists()  # -o writes nothing into the run
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    ok = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "r.html")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "r.html").exists() and {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_load_tables_derives_ce_means_without_driver_table(tmp_path: Path):
    t = synthetic_tables()
    run = write_run(tmp_path, t, keys=("domain_experts",))
    ce = pd.DataFrame({"input": [0, 0, 1, 1], "domain": ["math"] * 4, "layer": [0, 0, 0, 0], "expert": [0, 1, 0, 1],
                       "ce": [0.1, 0.3, 0.3, 0.5]})
    (run / "causal").mkdir()
    write_table(run / "causal" / "ce.parquet", ce, csv=False)
    tables = load_tables(run)
    np.testing.assert_allclose(tables["drivers"].sort_values("expert")["ce_mean"], [0.2, 0.4])
    page = build_html({"kind": "study"}, tables, {})
    assert "no driver rule was applied (no driver table); the largest mean CE is expert 1 at layer 0" in page


# ----- headless Chromium -------------------------------------------------------------------------------
# A fresh machine has no browser: the tests skip there with their reason. CI (`.ci/run`) installs Chromium and
# sets EXPERTSCOPE_REQUIRE_BROWSER=1, which turns the skip into a failure so the report is always rendered.
_require_chromium = require_chromium


def _chromium(args: list[str], profile: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    cmd = [_require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--disable-default-apps", f"--user-data-dir={profile}",
           "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _page_requests(net_log: Path) -> list[str]:
    """URLs of requests the page made (Chromium's own update/sign-in/time requests carry no initiator
    origin: ``"not an origin"``; a file:// page's requests have initiator ``"null"``)."""
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"]
            if e["type"] == start and "url" in e.get("params", {})
            and e["params"].get("initiator") != "not an origin"]


@pytest.mark.slow
def test_report_renders_offline_in_chromium(built_report: Path, tmp_path: Path):
    _require_chromium()  # skip (or fail under EXPERTSCOPE_REQUIRE_BROWSER=1) before building anything
    # Control: a page with remote resources must show up in the net-log check, or the check proves nothing.
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><html><body><img src='http://example.invalid/x.png'></body></html>")
    net = tmp_path / "control-net.json"
    _chromium([f"--log-net-log={net}", "--virtual-time-budget=3000", "--dump-dom", control.as_uri()],
              tmp_path / "p0")
    assert any(u.startswith("http://example.invalid") for u in _page_requests(net))

    net = tmp_path / "net.json"
    res = _chromium([f"--log-net-log={net}", "--run-all-compositor-stages-before-draw",
                     "--virtual-time-budget=5000", "--dump-dom", built_report.as_uri()], tmp_path / "p1")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    n = len(PAGE_FIGURES)
    assert f'data-images-ok="{n}/{n}"' in dom, dom[-500:]
    assert dom.count('data-loaded="1"') == n and 'data-loaded="0"' not in dom
    assert [u for u in _page_requests(net) if not u.startswith(("file:", "data:"))] == []

    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", "--virtual-time-budget=5000",
                     built_report.as_uri()], tmp_path / "p2")
    assert shot.exists() and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20000, res.stderr[-2000:]


# ----- expert map (Fig. 5) -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_moe_remote"])
def test_expert_forward_matches_the_experts_module(make_tiny, family: str):
    from expertscope.models.model import MoEModel
    from expertscope.stats.expert_map import expert_forward

    moe = MoEModel.from_model(make_tiny(family), verify=False)
    site = moe.sites[0]
    experts = site.block.experts
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    for i in range(site.num_experts):
        got = expert_forward(experts, i, x)
        if isinstance(experts, torch.nn.ModuleList):
            want = experts[i](x)
        else:  # the module's own forward with every token routed to expert i at weight 1
            want = experts(x, torch.full((6, 1), i), torch.ones(6, 1))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_expert_map_representations(make_tiny):
    from expertscope.models.model import MoEModel
    from expertscope.stats.expert_map import expert_map, valid_perplexity
    from expertscope.testing import tiny_tokenizer

    assert valid_perplexity(4) < 4 and valid_perplexity(4, 30.0) < 3 and valid_perplexity(1000) == 30.0
    moe = MoEModel.from_model(make_tiny("mixtral"), tiny_tokenizer(), verify=False)
    drivers = pd.DataFrame({"domain": ["a"], "layer": [1], "expert": [2], "is_driver": [True]})
    texts = {"a": ["hello world", "abc"], "b": ["1+2=3"]}
    for rep in ("router", "weights", "output"):
        df = expert_map(moe, representation=rep, k=3, drivers=drivers, domains=texts, n_tokens=20)
        assert list(df.columns[:5]) == ["layer", "expert", "x", "y", "cluster"]
        assert len(df) == len(moe.layers) * 4 and np.isfinite(df[["x", "y"]].to_numpy()).all()
        assert df["cluster"].nunique() <= 3 and df["is_driver"].sum() == 1
    again = expert_map(moe, representation="router", k=3)
    pd.testing.assert_frame_equal(again, expert_map(moe, representation="router", k=3))  # seeded
    per_layer = expert_map(moe, representation="router", scope="layer", perplexity=50)
    assert all(e["perplexity"] < 4 for e in per_layer.attrs["embeddings"])


# ----- the explorable page: tables, heatmaps, domain selector ------------------------------------------
def _cells(page: str, svg_domain: str, section: str = "drivers") -> dict[tuple[int, int], tuple[str, bool]]:
    """``{(layer, expert): (data-v, boxed)}`` of one domain's heatmap in ``section``, parsed from the page."""
    sec = page.split(f"<section id='{section}'>")[1].split("</section>")[0]
    fig = sec.split(f"<figure data-domain='{svg_domain}'>")[1].split("</figure>")[0]
    rows = re.search(r"data-rows='([^']*)'", fig).group(1).split("|")
    cols = re.search(r"data-cols='([^']*)'", fig).group(1).split("|")
    cw, ch = (float(re.search(rf"data-{k}='([^']*)'", fig).group(1)) for k in ("cw", "ch"))
    out = {}
    for x, y, v, f in re.findall(r"<rect x='([\d.]+)' y='([\d.]+)' [^>]*data-v='([^']*)'( data-f='1')?", fig):
        out[(int(rows[round(float(y) / ch)]), int(cols[round(float(x) / cw)]))] = (v, bool(f))
    return out


@pytest.mark.slow  # renders a whole report (matplotlib figures)
def test_heatmap_cells_hold_the_tables_values_and_flags(built_report: Path):
    """Every heatmap cell's hover value is the driver table's CE of that (layer, expert), printed as the
    tables print it; exactly the drivers are boxed."""
    from expertscope.report.sentences import format_number

    page = built_report.read_text()
    drv = synthetic_tables()["drivers"]
    for d in DOMAINS:
        cells = _cells(page, d)
        g = drv[drv["domain"] == d]
        assert len(cells) == len(g) == 4 * 8
        for r in g.itertuples():
            assert cells[(r.layer, r.expert)] == (format_number(r.ce_mean), bool(r.is_driver))


def test_table_rows_carry_full_precision_sort_keys_and_domains():
    from expertscope.report.blocks import MAX_ROWS, table_html

    df = pd.DataFrame({"domain": ["a", "b"], "x": [0.123456789, float("nan")], "flag": [True, False], "n": [3, 4]})
    html = table_html(df)
    assert "<tr data-domain='a'><td>a</td><td data-v='0.123456789'>0.123</td><td data-v='1'>yes</td>" in html
    assert "<td>–</td>" in html  # NaN: shown as a dash, no sort key (sorted last)
    assert "data-col='x' data-num='1'" in html and "data-col='domain' data-num='0'" in html
    big = pd.DataFrame({"domain": "a", "x": np.arange(MAX_ROWS + 5, dtype=float)})
    html = table_html(big, source="t.parquet")
    assert html.count("<tr data-domain") == MAX_ROWS and f"first {MAX_ROWS} of {MAX_ROWS + 5} rows" in html


@pytest.mark.slow  # renders a whole report (matplotlib figures)
def test_report_explores_in_chromium(built_report: Path, tmp_path: Path):
    """Click a sort in a real browser (the mouse, over the DevTools protocol), read the heatmap's hover value,
    filter by typing and pick a domain: each checked against the tables the run saved."""
    from expertscope.report.sentences import format_number

    exe = _require_chromium()
    drv = synthetic_tables()["drivers"]
    drivers = drv[drv["is_driver"]]
    with Browser(exe, tmp_path / "profile") as b:
        b.open(built_report.as_uri())
        assert b.eval("document.body.getAttribute('data-js')") == "ready"
        table = "#drivers div.xt"  # the driver table: flagged rows only
        visible = (f"Array.from(document.querySelector('{table}').querySelectorAll('tbody tr'))"
                   ".filter(r => !r.hidden)")
        col = "Array.from(document.querySelectorAll('{t} thead th')).findIndex(h => h.dataset.col === '{c}')"

        def column(name: str) -> list[str]:
            i = b.eval(col.format(t=table, c=name))
            return b.eval(f"{visible}.map(r => r.cells[{i}].getAttribute('data-v'))")

        # Sorting: the first click on a numeric header sorts largest first, the second smallest first.
        b.click(f"{table} th[data-col='ce_mean']")
        assert b.eval(f"document.querySelector(\"{table} th[data-col='ce_mean']\").getAttribute('aria-sort')") \
            == "descending"
        shown = [float(v) for v in column("ce_mean")]
        want = sorted(drivers["ce_mean"], reverse=True)
        assert shown == want[:len(shown)] and len(shown) == min(20, len(drivers))
        b.click(f"{table} th[data-col='ce_mean']")
        assert [float(v) for v in column("ce_mean")] == sorted(drivers["ce_mean"])[:len(shown)]

        # Hover: the tooltip of a boxed heatmap cell names its layer and expert and prints the table's CE.
        cell = "#drivers figure[data-domain='math'] svg.hm rect[data-f]"
        b.hover(cell)
        tip = b.eval("document.getElementById('tip').hidden ? null : document.getElementById('tip').textContent")
        m = re.fullmatch(r"layer (\d+) · expert (\d+): CE (\S+) nats \(driver\)", tip or "")
        assert m, tip
        layer, expert, value = int(m.group(1)), int(m.group(2)), m.group(3)
        row = drv[(drv["domain"] == "math") & (drv["layer"] == layer) & (drv["expert"] == expert)].iloc[0]
        assert row["is_driver"] and value == format_number(row["ce_mean"])
        shown_text = b.eval(f"{visible}.filter(r => r.cells[0].textContent === 'math' && r.cells[1].textContent === "
                            f"'{layer}' && r.cells[2].textContent === '{expert}').map(r => r.cells[3].textContent)")
        assert shown_text == [value]  # the same number in the table as under the mouse

        # Filtering by typing: column=value terms, with or without spaces around the operator.
        b.click(f"{table} input.xt-q")
        b.send("Input.insertText", {"text": "layer=1"})
        assert set(b.eval(f"{visible}.map(r => r.cells[1].textContent)")) == {"1"}
        assert len(column("ce_mean")) == int((drivers["layer"] == 1).sum())
        clear = (f"(function(){{var q=document.querySelector('{table} input.xt-q');q.value='';"
                 "q.dispatchEvent(new Event('input'));})()")
        note = f"document.querySelector('{table} .xt-n').textContent"
        b.eval(clear)
        readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
        example = re.search(r"e\.g\. `(math ce_mean > ([0-9.]+))` in the driver table", readme)
        assert example, "the README's filter example"
        b.send("Input.insertText", {"text": example.group(1)})  # the README's example, as written (spaced)
        want = drivers[(drivers["domain"] == "math") & (drivers["ce_mean"] > float(example.group(2)))]
        assert len(want) and sorted(float(v) for v in column("ce_mean")) == sorted(want["ce_mean"])[:20]
        assert b.eval(note).startswith("showing ")
        # A column the table does not have, or a comparison with no number, is said under the box.
        b.eval(clear)
        b.send("Input.insertText", {"text": "lift>2"})
        assert b.eval(note).startswith("filter: no column 'lift' in this table (columns: domain, layer, expert")
        b.eval(clear)
        b.send("Input.insertText", {"text": "ce_mean>abc"})
        assert b.eval(note).startswith("filter: 'ce_mean>abc': > needs a number")
        b.eval(clear)

        # The answer on the first screen (1280 × 900 here, 1400 × 900 in the issue): the whole summary table.
        assert b.eval("document.querySelector('#summary table.summary').getBoundingClientRect().bottom") <= 900
        assert b.eval("document.querySelectorAll('#summary tbody tr').length") == len(set(drv["domain"]))

        # The domain selector: one domain's rows, heatmaps and findings only.
        b.eval("(function(){var s=document.getElementById('domain-select');s.value='knowledge';"
               "s.dispatchEvent(new Event('change'));})()")
        assert set(b.eval(f"{visible}.map(r => r.cells[0].textContent)")) == {"knowledge"}
        assert b.eval("Array.from(document.querySelectorAll('[data-domain]')).filter(e => e.tagName !== 'TR' && "
                      "!e.hidden).every(e => e.dataset.domain === 'knowledge')")
        assert b.eval("document.querySelectorAll(\"figure[data-domain='knowledge']:not([hidden])\").length") == 2
        # ... and what is shown is on screen: the page itself, the table's rows and that domain's heatmaps.
        on_screen = "(function(q){{return Array.from(document.querySelectorAll(q)).filter(e => " \
                    "e.getClientRects().length > 0).length;}})({!r})"
        shown_rows = b.eval(f"{visible}.filter(r => r.getClientRects().length > 0).length")
        assert shown_rows == int((drivers["domain"] == "knowledge").sum())
        assert b.eval(on_screen.format("svg.hm")) == 2 and b.eval(on_screen.format("#findings h3")) == 1
        b.screenshot(tmp_path / "explored.png")
    assert (tmp_path / "explored.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_opens_with_the_answer_and_says_each_sentence_once(no_figures: list[str]) -> None:
    """The first section is the summary: a row per domain whose cells link to their sections and carry the
    run's numbers; the findings are a few sentences per domain; no sentence appears twice on the page, and every
    replication reading names its domain."""
    from expertscope.report.html import build_html
    from expertscope.report.record import findings

    tables = synthetic_tables()
    page = build_html({"kind": "study", "status": "complete", "model": {"source": "tiny"}}, tables, {})
    sections = re.findall(r"<section id='([a-z_]+)'>", page)
    assert sections[:2] == ["summary", "findings"]
    summary = page.split("<section id='summary'>")[1].split("</section>")[0]
    fs = findings(tables)
    for f in fs:
        row = re.search(rf"<tr data-domain='{f.domain}'>(.*?)</tr>", summary).group(1)
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert re.sub("<[^>]+>", "", cells[2]) == str(f.n_domain_experts)
        assert "href='#domain'" in cells[2] and "href='#drivers'" in cells[3]
        assert re.sub("<[^>]+>", "", cells[3]).startswith(str(f.n_drivers))
    items = [re.sub("<[^>]+>", "", x) for x in re.findall(r"<li[^>]*>(.*?)</li>", page)]
    repeated = {x for x in items if items.count(x) > 1}
    assert not repeated, sorted(repeated)[:3]
    findings_part = page.split("<section id='findings'>")[1].split("</section>")[0]
    assert all(len(re.findall(r"<li>", block)) <= 7 for block in findings_part.split("<h3>")[1:])
    rep = page.split("<section id='replication'>")[1].split("</section>")[0] if "id='replication'" in page else ""
    for line in re.findall(r"<li data-domain='([^']+)'>(.*?)</li>", rep):
        assert line[1].startswith(f"{line[0]}: ")


# ----- figures that read (issue 36) ------------------------------------------------------------------------
def _captured(monkeypatch) -> dict:
    """Build figures without saving them: each Figure by name."""
    from expertscope.report import figure_style

    built: dict = {}

    def keep(fig, out_dir, name):  # type: ignore[no-untyped-def]
        built[name] = fig
        return []

    monkeypatch.setattr(figure_style, "save_figure", keep)
    return built


def test_layer_axes_have_whole_number_ticks(monkeypatch, tmp_path: Path) -> None:
    """MI, paths and routing-overlap plots label layers 0, 1, 2, never 0.5 or 1.25 (matplotlib's default
    locator puts halves between 4 layers)."""
    from expertscope.report import beyond_figures as BF
    from expertscope.report import paper_figures as PF

    built = _captured(monkeypatch)
    layers = [0, 1, 2, 3]
    PF.fig_routing_mi(pd.DataFrame({"layer": layers, "mi_bits": [0.1, 0.05, 0.12, 0.15]}), tmp_path)
    BF.fig_routing_overlap(pd.DataFrame({"domain": "math", "condition": "mask", "layer": layers,
                                         "overlap": [0.9, 0.8, 0.85, 0.7]}), tmp_path)
    BF.fig_paths(pd.DataFrame({"domain": "math", "start_layer": 0, "layers": "0>1>2", "path": "3>5>1",
                               "share": [0.2]}), tmp_path)
    for name, fig in built.items():
        fig.canvas.draw()  # the tick locator runs at draw time
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
    assert len(built) == 3


def test_selectivity_cell_text_reads_on_its_colour(monkeypatch, tmp_path: Path) -> None:
    """White text on the dark cells, black on the light ones (black on dark red before)."""
    from matplotlib.colors import to_rgba

    from expertscope.report import beyond_figures as BF

    built = _captured(monkeypatch)
    sel = pd.DataFrame([{"kind": "domain", "ablated": a, "evaluated": e, "delta": d, "delta_lo": d - 0.05,
                         "delta_hi": d + 0.05} for a, e, d in (("math", "math", -0.5), ("math", "emotion", 0.0),
                                                               ("emotion", "emotion", -0.45),
                                                               ("emotion", "math", 0.01))])
    BF.fig_selectivity(sel, tmp_path)
    (fig,) = built.values()
    colours = {t.get_text().split("\n")[0]: to_rgba(t.get_color()) for t in fig.axes[0].texts}
    assert colours["-0.50"] == to_rgba("white") and colours["-0.45"] == to_rgba("white")
    assert colours["+0.00"] == to_rgba("black")


def test_dose_stars_sit_inside_the_axes_and_zero_bars_show(monkeypatch, tmp_path: Path) -> None:
    from expertscope.report import beyond_figures as BF
    from expertscope.report import paper_figures as PF

    built = _captured(monkeypatch)
    dose = pd.DataFrame([{"domain": "math", "kind": "domain", "strength": s, "applicable": True, "delta": d,
                          "delta_lo": d - 0.1, "delta_hi": d + 0.1, "n": 60, "specific": spec}
                         for s, d, spec in (("mask", -0.4, True), ("×0.8", 0.0, False), ("×1.2", 0.3, True))])
    BF.fig_dose(dose, tmp_path)
    (fig,) = [f for n, f in built.items() if n.startswith("fig_dose")]
    ax = fig.axes[0]
    stars = [t for t in ax.texts if t.get_text() == "*"]
    assert len(stars) == 2 and all(t.get_position()[1] < ax.get_ylim()[1] for t in stars)
    steering = pd.DataFrame([{"domain": "math", "condition": "original", "accuracy": 0.0, "ci_low": 0.0,
                              "ci_high": 0.06}, {"domain": "math", "condition": "domain_mask", "accuracy": 0.3,
                                                 "ci_low": 0.2, "ci_high": 0.4}])
    PF.fig_steering(steering, tmp_path)
    ax = built["fig_steering"].axes[0]
    assert any(list(line.get_ydata()) == [0, 0] and line.get_linewidth() >= 3 for line in ax.lines)
    assert any(t.get_text() == "0" for t in ax.texts)


def test_domain_heatmaps_share_one_colour_scale() -> None:
    from expertscope.report.blocks import heatmap

    df = pd.DataFrame([{"domain": d, "layer": layer, "expert": e, "A": scale * (e + 1)}
                       for d, scale in (("a", 1.0), ("b", 0.01)) for layer in range(2) for e in range(4)])
    svg = heatmap(df, "A", label="activation")
    legends = re.findall(r"<text x='\d+' y='[\d.]+'>([^<]+)</text><text x='\d+' y='[\d.]+' text-anchor='end'>"
                         r"([^<]+) </text>", svg)
    assert len(legends) == 2 and legends[0] == legends[1] == ("0.01", "4")
    own = re.findall(r"text-anchor='end'>([^<]+) </text>", heatmap(df, "A", label="activation", shared=False))
    assert own == ["4", "0.04"]


@pytest.mark.slow
def test_figures_are_numbered_in_page_order(built_report: Path) -> None:
    """Figure numbers run 1, 2, 3, … down the page; a figure of the paper names its own number in words."""
    page = built_report.read_text()
    numbers = [int(x) for x in re.findall(r"<figcaption>Figure (\d+)[ .]", page)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 5
    assert re.search(r"<figcaption>Figure \d+ \(the paper's Figure 1\)\. CWAS", page)
    alts = [int(x) for x in re.findall(r"<img alt='Figure (\d+)[ .]", page)]
    assert alts == numbers


@pytest.mark.slow
@pytest.mark.parametrize("width", [800, 1400])
def test_figures_keep_their_drawn_size_in_a_narrow_window(built_report: Path, tmp_path: Path, width: int) -> None:
    """At 800 and 1400 px every figure is shown at the size it was drawn for (its text 9-11 pt at 100 dpi), so
    tick labels never shrink to a few pixels; a figure wider than the window scrolls inside its box."""
    exe = _require_chromium()
    with Browser(exe, tmp_path / "profile", size=(width, 900)) as b:
        b.open(built_report.as_uri())
        assert b.eval("document.body.getAttribute('data-js')") == "ready"
        sizes = b.eval("Array.from(document.querySelectorAll('figure img')).map(i => "
                       "[i.getBoundingClientRect().width, parseFloat(i.style.width), i.naturalWidth])")
        assert len(sizes) >= 5
        for shown, designed, natural in sizes:
            # the rendered box holds the 1 px border on each side
            assert abs(shown - designed) <= 2 and abs(designed - natural * 2 / 3) <= 1, (shown, designed, natural)


@pytest.mark.slow
def test_saved_svg_figures_have_whole_layer_ticks_and_readable_cell_text(built_report: Path) -> None:
    """The SVG files of the figures (text kept as text): layer axes carry whole numbers; the selectivity
    matrix writes white on its dark cells."""
    fig_dir = built_report.parent / "figures"
    checked = 0
    for name in ("fig_routing_mi", "fig_routing_overlap", "fig_paths", "fig3_causal_rate", "fig6_causal_layers"):
        path = fig_dir / f"{name}.svg"
        if not path.exists():
            continue
        ticks = re.findall(r'<g id="xtick_\d+">.*?<text[^>]*>([^<]*)</text>', path.read_text(), re.S)
        assert ticks and all(re.fullmatch(r"−?\d+", t) for t in ticks), (name, ticks)
        checked += 1
    assert checked >= 2
    sel = fig_dir / "fig_selectivity.svg"
    if sel.exists():
        fills = re.findall(r'<text style="[^"]*fill: (#[0-9a-f]{6})', sel.read_text())
        assert set(fills) <= {"#ffffff", "#000000"}
