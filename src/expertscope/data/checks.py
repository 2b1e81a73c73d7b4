"""Checks of domain specs made before anything is loaded: they parse, name unique domains, point at files
that exist or known synthetic domains and presets, and give later stages what they need."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, InputTypeError
from ..validation import parse_limit
from .sources import PRESETS, _synthetic_task
from .synthetic import CORPORA, DOMAINS
from .types import TASKS, DomainSpec, check_unique_names


def parse_domain_specs(specs: Any) -> tuple[DomainSpec, ...]:
    """Parse NAME=SOURCE strings once into :class:`DomainSpec` values (a lone string is refused)."""
    if isinstance(specs, str):
        raise InputTypeError(f"domains must be a list of NAME=SOURCE specs, got one string {specs!r}: "
                             "wrap it in a list")
    return tuple(DomainSpec.parse(s) for s in specs)


def check_domain_specs(specs: Any, option: str = "--domain") -> tuple[DomainSpec, ...]:
    """Domain specs parse, name unique domains, and point at files that exist / known synthetic domains;
    returns them parsed."""
    parsed = parse_domain_specs(specs)
    names: list[str] = []
    for d in parsed:
        spec, name, source = str(d), d.name, d.source
        names.append(name)
        if d.limit is not None:
            parse_limit(d.limit, spec)
        if d.task is not None and d.task not in TASKS:
            raise DataError(f"unknown task {d.task!r} in {spec!r}: use one of {', '.join(TASKS)}")
        if d.labels is not None and d.task not in (None, "classification"):
            raise DataError(f"?labels= in {spec!r} is for classification domains: add ?task=classification or "
                            "drop labels")
        if source.startswith("synthetic:"):
            kind, _, split = source.split(":", 1)[1].partition("@")
            if kind not in DOMAINS:
                raise DataError(f"unknown synthetic domain {kind!r} in {spec!r}: use one of {', '.join(DOMAINS)}")
            if split and split not in CORPORA:
                raise DataError(f"unknown split {split!r} in {spec!r}: use one of {', '.join(CORPORA)}")
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
    check_unique_names(names, option)
    return parsed


def spec_task(spec: str | DomainSpec) -> str | None:
    """The evaluation task a domain spec implies: ``?task=``, else the preset's or synthetic domain's own."""
    d = DomainSpec.parse(spec)
    source = d.source
    if d.task is not None:
        return d.task
    if source.startswith("preset:"):
        preset = PRESETS.get(source.split(":", 1)[1])
        return preset.task if preset else None
    if source.startswith("synthetic:"):
        return _synthetic_task(source.split(":", 1)[1].partition("@")[0])
    return None


def check_stage_inputs(specs: Sequence[str | DomainSpec], stages: Sequence[str]) -> None:
    """What later stages need, checked before the first: two domains for domain experts, a task to steer."""
    if "domain_experts" in stages and len(specs) < 2:
        raise DataError(f"domain experts compare domains, but {len(specs)} --domain was given: pass at least two")
    if "steering" in stages and not any(spec_task(s) for s in specs):
        raise DataError("the steering stage evaluates a task, but no --domain has one: add ?task=classification|"
                        "multiple_choice|math to a spec (e.g. -d qa=qa.jsonl?task=multiple_choice), or use "
                        "preset: or synthetic: sources")


__all__ = ["check_domain_specs", "check_stage_inputs", "parse_domain_specs", "spec_task"]
