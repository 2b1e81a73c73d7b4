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


# Rule options (--rule, --z, --alpha, --n-perm) follow the domain/driver rule configs and are checked there.
RULE_OPTIONS = {"rule", "z", "alpha", "n_perm"}


def _command_defaults(name: str) -> dict[str, object]:
    import typer.main

    group = typer.main.get_command(cli_main.app)
    cmd = group.commands[name]  # type: ignore[attr-defined]
    return {p.name: p.default for p in cmd.params}


@pytest.mark.parametrize(("command", "configs"), [
    ("profile", ["ProfileConfig"]),
    ("drivers", ["CausalConfig"]),
    ("run", ["StudyConfig"]),
    ("steer-study", ["InterventionConfig", "StudyConfig"]),
])
def test_cli_defaults_are_the_configs_defaults(command: str, configs: list[str]) -> None:
    import dataclasses

    import expertscope.config as config_mod
    import expertscope.study as study_mod

    defaults = _command_defaults(command)
    checked = 0
    for cls_name in configs:
        cls = getattr(config_mod, cls_name, None) or getattr(study_mod, cls_name)
        cfg = cls()
        for f in dataclasses.fields(cls):
            name = "mode" if (cls_name, f.name) == ("InterventionConfig", "mode") else f.name
            if name in RULE_OPTIONS or name not in defaults or name in {"model", "domains"}:
                continue
            want = getattr(cfg, f.name)
            # max_length None (no limit) has no CLI spelling: the option keeps the model-context default.
            assert defaults[name] == want or (f.name == "max_length" and want is None), (command, name)
            checked += 1
    assert checked >= 4  # the command really shares settings with its config
    # And StudyConfig's steering settings are the intervention study's.
    assert (study_mod.StudyConfig().scale_up, study_mod.StudyConfig().steer_mode) == (
        config_mod.InterventionConfig().scale_up, config_mod.InterventionConfig().mode)


def test_steering_table_prints_not_applicable_and_saturated(capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    from expertscope.cli._common import out_console
    from expertscope.cli.steer_cmds import print_steering

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
        print_steering(table)
    finally:
        out_console.width = width
    out = capsys.readouterr().out
    assert "not applicable: no driver experts" in out and "saturated" in out
    assert "nan" not in out.lower().replace("not applicable", "")
