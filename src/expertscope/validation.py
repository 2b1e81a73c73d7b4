"""Input checks run before any expensive stage: ranges, devices, domain specs, steering files, API types.

Each check raises a one-line :class:`~expertscope.errors.ExpertscopeError` naming the problem and the fix.
``name`` is how the value is spelled to the user: an option (``"--limit"``, shown as ``--limit 0``) or a
setting (``"limit"``, shown as ``limit=0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, InputTypeError


def _show(name: str, value: Any) -> str:
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(value: Any, name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    """An integer ≥ 1 (≥ 0 with ``allow_zero``); None passes only with ``allow_none`` (meaning "all")."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputTypeError(f"{_show(name, value)} is not an integer: pass a whole number")
    low = 0 if allow_zero else 1
    if value < low:
        hint = "" if not allow_none else " (leave it out for all)" if name.startswith("--") else " (None for all)"
        raise ConfigError(f"{_show(name, value)} is out of range: pass {low} or more{hint}")


def check_finite(value: Any, name: str, example: str = "2.0") -> None:
    """A finite real number (not NaN, not ±inf)."""
    if not _is_number(value):
        raise InputTypeError(f"{_show(name, value)} is not a number: pass a finite number, e.g. {example}")
    if not math.isfinite(value):
        raise ConfigError(f"{_show(name, value)} is not finite: pass a finite number, e.g. {example}")


def check_positive_finite(value: Any, name: str) -> None:
    """A finite number > 0 (steering scales, magnitudes)."""
    check_finite(value, name, "1.2")
    if value <= 0:
        raise ConfigError(f"{_show(name, value)} is not positive: pass a finite number > 0, e.g. 1.2")


def check_open_unit(value: Any, name: str) -> None:
    """A number strictly between 0 and 1 (significance levels)."""
    check_finite(value, name, "0.05")
    if not 0 < value < 1:
        raise ConfigError(f"{_show(name, value)} is not in (0, 1): pass e.g. 0.05")


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    """One of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{_show(name, value)} is not a valid choice: use one of {', '.join(choices)}")


def check_device(device: Any) -> None:
    """A device torch can parse and this machine has (``cuda:7`` on a 1-GPU machine is refused)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} is not available (no CUDA GPU found): use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {device!r} does not exist ({n} CUDA GPU(s): cuda:0..cuda:{n - 1}): "
                              "pick one of those")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {device!r} is not available (no Apple MPS): use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")


def check_domain_specs(specs: Any, option: str = "--domain") -> None:
    """Domain specs parse, name unique domains, and point at files that exist / known synthetic domains."""
    from .data.sources import PRESETS, parse_domain_spec

    if isinstance(specs, str):
        raise InputTypeError(f"domains must be a list of NAME=SOURCE specs, got one string {specs!r}: "
                             "wrap it in a list")
    names: list[str] = []
    for spec in specs:
        if not isinstance(spec, str):
            raise InputTypeError(f"domain spec {spec!r} is a {type(spec).__name__}, not a NAME=SOURCE string")
        name, source, fields = parse_domain_spec(spec)
        names.append(name)
        if "limit" in fields:
            parse_limit(fields["limit"], spec)
        if "task" in fields:
            from .data.types import TASKS

            if fields["task"] not in TASKS:
                raise DataError(f"unknown task {fields['task']!r} in {spec!r}: use one of {', '.join(TASKS)}")
        if source.startswith("synthetic:"):
            from .data.synthetic import DOMAINS, SPLITS

            kind, _, split = source.split(":", 1)[1].partition("@")
            if kind not in DOMAINS:
                raise DataError(f"unknown synthetic domain {kind!r} in {spec!r}: use one of {', '.join(DOMAINS)}")
            if split and split not in SPLITS:
                raise DataError(f"unknown split {split!r} in {spec!r}: use one of {', '.join(SPLITS)}")
        elif source.startswith("preset:"):
            if source.split(":", 1)[1] not in PRESETS:
                raise DataError(f"unknown preset {source.split(':', 1)[1]!r} in {spec!r}: use one of "
                                f"{', '.join(PRESETS)}")
        elif not source.startswith("hf:"):
            path = Path(source).expanduser()
            if not path.exists():
                raise DataError(f"data file {path} not found (in {option} {spec}): check the path")
            if path.is_dir():
                raise DataError(f"{path} is a directory (in {option} {spec}): pass a .jsonl, .csv or .parquet file")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise DataError(f"domain name {dup!r} is used twice: give each {option} its own name")


def spec_task(spec: str) -> str | None:
    """The evaluation task a domain spec implies: ``?task=``, else the preset's or synthetic domain's own."""
    from .data.sources import PRESETS, _synthetic_task, parse_domain_spec

    _, source, fields = parse_domain_spec(spec)
    if "task" in fields:
        return fields["task"]
    if source.startswith("preset:"):
        preset = PRESETS.get(source.split(":", 1)[1])
        return preset.task if preset else None
    if source.startswith("synthetic:"):
        return _synthetic_task(source.split(":", 1)[1].partition("@")[0])
    return None


def check_stage_inputs(specs: Sequence[str], stages: Sequence[str]) -> None:
    """What later stages need, checked before the first: two domains for domain experts, a task to steer."""
    if "domain_experts" in stages and len(specs) < 2:
        raise DataError(f"domain experts compare domains, but {len(specs)} --domain was given: pass at least two")
    if "steering" in stages and not any(spec_task(s) for s in specs):
        raise DataError("the steering stage evaluates a task, but no --domain has one: add ?task=classification|"
                        "multiple_choice|math to a spec (e.g. -d qa=qa.jsonl?task=multiple_choice), or use "
                        "preset: or synthetic: sources")


def parse_limit(value: str, where: str) -> int:
    """``?limit=N`` of a domain spec as an integer ≥ 1."""
    try:
        n = int(value)
    except ValueError:
        raise DataError(f"limit={value!r} in {where!r} is not a whole number: e.g. ?limit=100") from None
    if n < 1:
        raise DataError(f"limit={n} in {where!r} is out of range: pass 1 or more (leave it out for all)")
    return n


def check_text(value: Any, where: str, field: str = "text") -> str:
    """A text field's value as a string; anything else (a number, list, dict, None) is refused, not repr'd."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__} ({_preview(value)}), not text: "
                        "make it a string")
    return value


def _preview(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."




def check_type(value: Any, types: type | tuple[type, ...], name: str, expected: str) -> None:
    """``value`` is an instance of ``types``; else :class:`InputTypeError` naming what was expected."""
    if not isinstance(value, types):
        raise InputTypeError(f"{name} is a {type(value).__name__}, not {expected}")


__all__ = ["check_choice", "check_device", "check_domain_specs", "check_finite", "check_open_unit",
           "check_positive", "check_positive_finite", "check_stage_inputs", "check_text", "check_type",
           "parse_limit", "spec_task"]
