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
