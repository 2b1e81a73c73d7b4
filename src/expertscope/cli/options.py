"""Command-line options generated from the config fields, so every setting has one spelling everywhere, its
help is the field's docstring, its default is the config's, and a new config field is an option by itself.

Naming: a field is ``--field-name``. A name several configs share with the same type is one option that sets
all of them (``--seed``, ``--batch-size``, ``--n-boot``: one concept); a name shared with different types is
prefixed by its section (``--domain-rule``, ``--driver-rule``). :data:`RENAMES` gives a few fields a clearer
name; :data:`ALIASES` keeps old spellings working, hidden, for one release.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..config import StudyConfig, type_hints
from ..errors import ConfigError
from .fields import field_docs, field_metavar, parse_field_value

#: Clearer names for fields whose own name says too little on a command line.
RENAMES: dict[tuple[str | None, str], str] = {
    (None, "domains"): "domain",
    ("causal", "limit"): "causal-limit",
    ("causal", "method"): "causal-method",
    ("intervention", "mode"): "steer-mode",
    ("intervention", "limit"): "eval-limit",
    ("domain_experts", "test"): "domain-test",
}
#: Section prefix of a field whose name other sections use with another type.
PREFIXES = {"domain_experts": "domain", "drivers": "driver", "intervention": "steer"}
SHORT = {"model": "-m", "domain": "-d", "batch-size": "-b"}
#: Options given once per value (``-d a=X -d b=Y``).
REPEATED = ("domain", "confirm")
#: The help panel of an option: by the config section it sets (run-level fields by name).
SECTION_PANELS = {"profile": "Profiling", "domain_experts": "Domain experts", "causal": "Causal effects",
                  "drivers": "Driver experts", "intervention": "Steering and confirmation",
                  "evaluation": "Evaluation", "lm_eval": "lm-evaluation-harness"}
RUN_PANELS = {"model": "Model", "dtype": "Model", "device": "Model", "trust_remote_code": "Model",
              "allow_pickle": "Model", "domains": "Data", "limit": "Data", "train_limit": "Data", "parts": "Data",
              "allow_overlap": "Data", "confirm": "Data", "seed": "Shared settings", "executor": "Execution",
              "workers": "Execution", "gpus_per_worker": "Execution", "threads": "Execution"}
OUTPUT_PANEL = "Output"


def panel_of(s: Setting) -> str:
    """The help panel an option is listed in."""
    if len({sec for sec, _ in s.targets}) > 1:
        return "Shared settings"  # one concept set in several analyses (--batch-size, --n-boot)
    sec, name = s.targets[0]
    return RUN_PANELS.get(name, "Run") if sec is None else SECTION_PANELS.get(sec, sec)
#: Fields no command offers as an option (``confirm``'s positional argument sets ``hypotheses``).
NOT_OPTIONS = ("hypotheses",)
#: Old spellings → the options they mean (the first one the command has), hidden, for one release.
ALIASES: dict[str, tuple[str, ...]] = {
    "method": ("causal-method",), "mode": ("steer-mode",), "test": ("domain-test",),
    "rule": ("driver-rule", "domain-rule"), "label": ("label-tokens",), "layers": ("only-layers",),
    "experts": ("only-experts",),
}


@dataclass(frozen=True)
class Setting:
    """One option: its flag name and the (section, field) pairs it sets (section None: run-level)."""

    name: str
    targets: tuple[tuple[str | None, str], ...]
    type: Any
    help: str


def _fields(cls: type) -> list[tuple[str, Any]]:
    hints = type_hints(cls)
    return [(f.name, hints[f.name]) for f in fields(cls)]


@cache
def all_settings() -> dict[str, Setting]:
    """Every option of every command, by flag name (without ``--``), from StudyConfig and its sections."""
    sections = StudyConfig.sections()
    entries: list[tuple[str | None, str, Any, str]] = []
    for name, tp in _fields(StudyConfig):
        if name in sections:
            for sub, sub_tp in _fields(sections[name]):
                entries.append((name, sub, sub_tp, field_docs(sections[name]).get(sub, "")))
        else:
            entries.append((None, name, tp, field_docs(StudyConfig).get(name, "")))
    by_field: dict[str, list[tuple[str | None, str, Any, str]]] = {}
    for e in entries:
        if (e[0], e[1]) not in RENAMES:
            by_field.setdefault(e[1], []).append(e)
    out: dict[str, Setting] = {}
    for (sec, name), flag in RENAMES.items():
        e = next(x for x in entries if (x[0], x[1]) == (sec, name))
        out[flag] = Setting(flag, ((sec, name),), e[2], e[3])
    for name, group in by_field.items():
        if len({repr(e[2]) for e in group}) == 1:  # one concept: one option sets it everywhere
            flag = name.replace("_", "-")
            out[flag] = Setting(flag, tuple((e[0], e[1]) for e in group), group[0][2], group[0][3])
        else:
            for sec, fname, tp, doc in group:
                flag = f"{PREFIXES.get(sec or '', sec or 'run')}-{fname}".replace("_", "-")
                out[flag] = Setting(flag, ((sec, fname),), tp, doc)
    return out


def settings_for(sections: Sequence[str], run_fields: Sequence[str]) -> list[Setting]:
    """The options of a command reading ``sections`` and the run-level ``run_fields``."""
    keep = []
    for s in all_settings().values():
        if s.name in NOT_OPTIONS:
            continue
        targets = [t for t in s.targets if (t[0] is None and t[1] in run_fields) or t[0] in sections]
        if targets:
            keep.append(Setting(s.name, tuple(targets), s.type, s.help))
    return keep


# ----- commands -------------------------------------------------------------------------------------------
def option_params(settings: Sequence[Setting], base: StudyConfig) -> list[inspect.Parameter]:
    """typer parameters for ``settings`` (all strings or flags, default None = "not given"), plus hidden
    old spellings."""
    params = []
    names = {s.name for s in settings}
    for s in settings:
        default = current(base, s)
        # Escaped: the CLI renders help as rich markup, where "[...]" would be read as a tag.
        help_text = escape(f"{s.help} [default: {_show(default)}]".strip())
        flags = [f"--{s.name}"] + ([SHORT[s.name]] if s.name in SHORT else [])
        panel = panel_of(s)
        if s.type is bool:
            flags = [f"--{s.name}/--no-{s.name}"]
            ann: Any = Annotated[bool | None, typer.Option(*flags, help=help_text, show_default=False,
                                                           rich_help_panel=panel)]
        elif s.name in REPEATED:
            ann = Annotated[list[str] | None, typer.Option(*flags, help=help_text, show_default=False,
                                                           metavar="<name=source>", rich_help_panel=panel)]
        else:
            ann = Annotated[str | None, typer.Option(*flags, help=help_text, metavar=field_metavar(s.type),
                                                     show_default=False, rich_help_panel=panel)]
        params.append(inspect.Parameter(_pname(s.name), inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann))
    for alias, wanted in ALIASES.items():
        target = next((w for w in wanted if w in names), None)
        if target is not None and alias not in names:
            ann = Annotated[str | None, typer.Option(f"--{alias}", hidden=True)]
            params.append(inspect.Parameter(f"alias__{_pname(alias)}__{_pname(target)}",
                                            inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann))
    return params


def _pname(flag: str) -> str:
    return flag.replace("-", "_")


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    return "none" if v is None else str(v)


def current(config: StudyConfig, s: Setting) -> Any:
    sec, name = s.targets[0]
    return getattr(config if sec is None else getattr(config, sec), name)


def build_config(base: StudyConfig, settings: Sequence[Setting], given: dict[str, Any]) -> StudyConfig:
    """``base`` with every option the user gave (``given``: typer's keyword values) applied to its targets."""
    by_param = {_pname(s.name): s for s in settings}
    values: dict[str, Any] = {}
    spelled: dict[str, tuple[str, Any]] = {}  # key -> (flag as the user spelled it, raw value)
    for key, raw in given.items():
        if raw is None or raw == []:
            continue
        flag = by_param[key].name if key in by_param else ""
        if key.startswith("alias__"):
            flag, key = key.split("__")[1].replace("_", "-"), key.split("__")[2]
            if given.get(key) is not None:
                continue  # the new spelling wins
        s = by_param.get(key)
        if s is None:
            continue
        spelled[key] = (flag, raw)
        if s.name in REPEATED:
            values[key] = tuple(raw)
        else:
            values[key] = raw if isinstance(raw, bool) else parse_field_value(raw, s.type, f"--{flag}")
    for key, value in values.items():  # each option alone first, so an error names the option
        try:
            with_options(base, {by_param[key].name: value})
        except ConfigError as e:
            raise ConfigError(_option_error(*spelled[key], value, str(e))) from None
    return with_options(base, {by_param[k].name: v for k, v in values.items()})


def _option_error(flag: str, raw: Any, value: Any, message: str) -> str:
    shown = " ".join(raw) if isinstance(raw, list) else raw
    if "not positive" in message:
        return f"--{flag} {value} is not positive: pass a number > 0 ({message})"
    if "(0, 1)" in message:
        return f"--{flag} {shown} is not in (0, 1): pass e.g. 0.05 ({message})"
    return f"--{flag} {shown} is out of range ({message})"


def with_options(base: StudyConfig, values: dict[str, Any]) -> StudyConfig:
    """``base`` with ``{flag name: value}`` set in every field the option names."""
    d = base.to_dict()
    for flag, value in values.items():
        for sec, name in all_settings()[flag].targets:
            (d if sec is None else d[sec])[name] = value
    return StudyConfig.from_dict(d)


# Options every writing command has besides its settings.
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (one run per directory).",
                                             show_default=False, metavar="<path>", rich_help_panel=OUTPUT_PANEL)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.",
                                         rich_help_panel=OUTPUT_PANEL)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the run in --out (its files are moved aside "
                                                         "until the new run finishes).", rich_help_panel=OUTPUT_PANEL)]
ShowOpt = Annotated[int, typer.Option("--show", help="Rows to print per domain or layer.", metavar="<int>",
                                      rich_help_panel=OUTPUT_PANEL)]

__all__ = ["ALIASES", "RENAMES", "Setting", "all_settings", "build_config", "field_docs",
           "option_params", "settings_for"]

