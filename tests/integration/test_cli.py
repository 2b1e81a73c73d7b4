"""CLI plumbing: the entry point's warning filter."""

from __future__ import annotations

import warnings

import pytest

import expertscope.cli.main as cli_main


def _warn_from(module: str, category: type[Warning]) -> None:
    warnings.warn_explicit(f"from {module}", category, filename=f"{module}.py", lineno=1, module=module)


def test_entry_point_hides_third_party_deprecations_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_app() -> None:  # what a command does while the CLI runs
        _warn_from("transformers.modeling_utils", FutureWarning)
        _warn_from("torch.nn.modules", DeprecationWarning)
        _warn_from("transformers.modeling_utils", UserWarning)  # not a deprecation: kept
        _warn_from("expertscope.stats.profile", FutureWarning)  # our own: kept

    monkeypatch.setattr(cli_main, "app", fake_app)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() installs its own: undo it
    monkeypatch.setattr(cli_main.sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli_main.main()
    assert sorted(str(w.message) for w in seen) == ["from expertscope.stats.profile",
                                                   "from transformers.modeling_utils"]
    assert {w.category for w in seen} == {FutureWarning, UserWarning}
    # With -W / PYTHONWARNINGS the user's choice stands: nothing is hidden.
    monkeypatch.setattr(cli_main.sys, "warnoptions", ["default"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli_main.main()
    assert len(seen) == 4


class _Captured(Exception):
    """Raised by the stand-in run_study: carries what the command would have run."""

    def __init__(self, config: object, kwargs: dict[str, object]) -> None:
        super().__init__("captured")
        self.config, self.kwargs = config, kwargs


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch):
    import expertscope.pipeline as pipeline_mod

    def fake(config, out=None, **kwargs):
        raise _Captured(config, {"out": out, **kwargs})

    monkeypatch.setattr(pipeline_mod, "run_study", fake)

    def invoke(*args: str) -> _Captured:
        from typer.testing import CliRunner

        r = CliRunner().invoke(cli_main.app, list(args))
        assert isinstance(r.exception, _Captured), r.output
        return r.exception

    return invoke


def _other_value(value: object, tp: object) -> tuple[str, object]:
    """A command-line spelling of a valid value different from ``value``, and that value."""
    import types
    import typing

    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    lits = [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    if isinstance(value, bool):
        raise AssertionError("flags are tested separately")
    others = [v for v in lits if v != value]
    if others:
        return str(others[0]), others[0]
    if int in args and not isinstance(value, float):
        new = 7 if value in (None, "auto") else int(value) + 3  # type: ignore[arg-type]
        return str(new), new
    if value == 0.6 and float in args:  # a share that must stay above one half (min_frequency)
        return "0.8", 0.8
    if float in args:
        new = 0.5 if value is None else (float(value) / 2 if 0 < float(value) < 1 else float(value) + 0.25)  # type: ignore[arg-type]
        return repr(new), new
    if value == (0.6, 0.2, 0.2):  # shares that must sum to 1
        return "0.5,0.25,0.25", (0.5, 0.25, 0.25)
    if any(typing.get_origin(a) is tuple for a in args):
        return "2,3", (2, 3) if typing.get_args(next(a for a in args if typing.get_origin(a) is tuple))[0] is int \
            else ("2", "3") if typing.get_args(next(a for a in args if typing.get_origin(a) is tuple))[0] is str \
            else (2.0, 3.0)
    return "float32", "float32"  # the remaining free-text settings: a value every one of them accepts


COMMAND_NAMES = ["run", "profile", "domains", "drivers", "steer-study", "eval", "lm-eval", "confirm"]


def _hypotheses_file(path) -> str:  # type: ignore[no-untyped-def]
    """A valid hypotheses file (nothing in it is run: the stand-in run_study captures the config)."""
    import pandas as pd

    from expertscope.config import InterventionConfig
    from expertscope.data.types import Domain, Example
    from expertscope.interventions.hypotheses import pre_register

    dom = pd.DataFrame([{"domain": "math", "layer": 0, "expert": 1, "activation_rate": 0.2, "is_domain_expert": True,
                         "specificity": 1.0}])
    hyp = pre_register(dom, None, InterventionConfig(), model_source="demo", layers=[0], num_experts=8,
                       discovery=[Domain("math", [Example(text="x", answer="1")], "math")])
    return str(hyp.save(path / "hypotheses.json"))


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if c in ("run", "steer-study", "drivers")
                                     else c for c in COMMAND_NAMES])
def test_every_option_reaches_its_config_field(command: str, captured, tmp_path) -> None:
    """Each generated option, given alone with a non-default value, sets exactly the config fields it names
    (and the flag spells the field's name), for every writing command."""
    from expertscope.cli import commands
    from expertscope.cli.options import RENAMES, current, settings_for
    from expertscope.pipeline import PIPELINE

    cmd = next(c for c in commands.COMMANDS if c.name == command)
    stages = list(cmd.stages) if cmd.stages is not None else PIPELINE.study()
    settings = settings_for(PIPELINE.sections(stages), PIPELINE.run_fields(stages))
    assert settings, command
    (tmp_path / "manifest.json").write_text('{"kind": "profile", "config": {}}')
    prefix = [command, str(tmp_path)] if command == "domains" else [command]
    if command == "confirm":
        prefix = [command, _hypotheses_file(tmp_path)]
    base = cmd.base()
    checked = 0
    for s in settings:
        if s.name in ("domain", "confirm"):  # repeated options: one value each
            got = captured(*prefix, f"--{s.name}", "a=synthetic:math", f"--{s.name}", "b=synthetic:emotion").config
            # confirm's -d names its corpora: the second corpora
            field = "confirm" if s.name == "confirm" or command == "confirm" else "domains"
            assert getattr(got, field)[-2:] == ("a=synthetic:math", "b=synthetic:emotion") or command == "eval"
            continue
        default = current(base, s)
        if s.type is bool:
            args, want = [f"--no-{s.name}" if default else f"--{s.name}"], not default
        else:
            text, want = _other_value(default, s.type)
            args = [f"--{s.name}", text]
        got = captured(*prefix, *args).config
        for sec, name in s.targets:
            spelled = RENAMES.get((sec, name), name.replace("_", "-"))
            assert s.name == spelled or s.name.endswith(spelled), (s.name, name)
            value = getattr(got if sec is None else getattr(got, sec), name)
            assert value == want, (command, s.name, sec, name, value, want)
        checked += 1
    assert checked >= 3


def test_run_with_no_options_is_run_study_of_the_default_config(captured) -> None:
    from expertscope.config import StudyConfig

    got = captured("run")
    assert got.config == StudyConfig()
    assert got.kwargs["stages"] is None and str(got.kwargs["out"]) == "runs/study"


def test_one_spelling_per_concept_and_old_spellings_hidden(captured) -> None:
    from expertscope.cli.options import all_settings

    names = set(all_settings())
    # shared concepts: one option sets every analysis holding the field
    assert {("domain_experts", "n_boot"), ("drivers", "n_boot"), ("intervention", "n_boot")} <= set(
        all_settings()["n-boot"].targets)
    assert {"causal-method", "steer-mode", "domain-rule", "driver-rule", "top", "z"} <= names
    assert not {"method", "mode", "rule"} & names
    # old spellings still work where they were, and mean what they meant
    assert captured("drivers", "--method", "fast").config.causal.method == "fast"
    assert captured("steer-study", "--mode", "bias").config.intervention.mode == "bias"
    assert captured("drivers", "--rule", "top").config.drivers.rule == "top"
    # `run --z` reaches both z rules (it used to reach only the domain experts)
    cfg = captured("run", "--z", "3").config
    assert (cfg.domain_experts.z, cfg.drivers.z) == (3.0, 3.0)


def test_bad_option_value_is_one_line_exit_2() -> None:
    from typer.testing import CliRunner

    r = CliRunner().invoke(cli_main.app, ["drivers", "--top", "two"])
    assert r.exit_code == 2 and "--top 'two' is not valid" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli_main.app, ["run", "--alpha", "1.5"])
    assert r.exit_code == 2 and "alpha" in r.output


def test_help_comes_from_the_field_docstrings() -> None:
    from expertscope.cli.fields import field_docs
    from expertscope.cli.options import all_settings
    from expertscope.config import DriverConfig

    assert field_docs(DriverConfig)["top"] == "rule top: drivers flagged per layer."
    assert all_settings()["top"].help == "rule top: drivers flagged per layer."


def test_steering_table_prints_not_applicable_and_saturated(capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    from expertscope.cli._common import out_console
    from expertscope.cli.tables import print_views
    from expertscope.report.views import steering_views

    nan = float("nan")
    base = {"domain": "emo", "task": "classification", "n": 20, "weighted_f1": nan, "saturated": True}
    table = pd.DataFrame([
        {**base, "condition": "original", "applicable": True, "reason": "", "n_targets": 0, "accuracy": 0.97,
         "delta": 0.0, "delta_lo": 0.0, "delta_hi": 0.0, "changed_selections": 0},
        {**base, "condition": "driver_up", "applicable": False, "reason": "no driver experts", "n_targets": 0,
         "n": nan, "accuracy": nan, "delta": nan, "delta_lo": nan, "delta_hi": nan, "changed_selections": nan},
    ])
    width = out_console.width
    out_console.width = 200
    try:
        print_views(*steering_views(table))
    finally:
        out_console.width = width
    out = capsys.readouterr().out
    assert "not applicable: no driver experts" in out and "saturated" in out
    assert "nan" not in out.lower().replace("not applicable", "")


def test_confirm_takes_the_hypotheses_model_unless_told_and_the_demo_shifted_corpora_by_default(captured,
                                                                                               tmp_path) -> None:
    from expertscope.config import DEMO_CONFIRM

    path = _hypotheses_file(tmp_path)
    got = captured("confirm", path)
    assert got.config.hypotheses == path and got.config.model == "demo"
    assert got.config.confirm == () and got.config.confirm_specs == DEMO_CONFIRM
    assert got.kwargs["stages"] == ("confirmation", "report") and str(got.kwargs["out"]) == "runs/confirm"
    got = captured("confirm", path, "-m", "demo-deepseek", "-d", "math=synthetic:math@shifted")
    assert got.config.model == "demo-deepseek" and got.config.confirm_specs == ("math=synthetic:math@shifted",)
    with pytest.raises(AssertionError, match="not a hypotheses file"):
        (tmp_path / "other.json").write_text("{}")
        captured("confirm", str(tmp_path / "other.json"))


def test_help_imports_no_heavy_library() -> None:
    """`expertscope --help` and a command's --help load no torch, transformers, pandas, scipy or matplotlib
    (measured: 0.26 s against 3.3 s before), and list the options in panels by what they configure."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; import expertscope.cli.main as m; "
            "r1 = CliRunner().invoke(m.app, ['--help']); r2 = CliRunner().invoke(m.app, ['run', '--help']); "
            "assert r1.exit_code == 0 and r2.exit_code == 0, r2.output; "
            "print(sorted(k for k in ('torch', 'transformers', 'pandas', 'scipy', 'matplotlib') if k in sys.modules)); "
            "print(r2.output)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, "COLUMNS": "120"})
    assert r.returncode == 0, r.stderr
    first, _, helptext = r.stdout.partition("\n")
    assert first == "[]", first
    for panel in ("Output", "Data", "Model", "Causal effects", "Driver experts", "Steering and confirmation",
                  "Execution", "Shared settings"):
        assert f"─ {panel} ─" in helptext, panel
    assert "<int|none>" in helptext and "INT" not in helptext  # one notation
