"""Typed, validated, serialisable settings. Each config checks its ``Literal`` options and ranges on
creation and round-trips through plain dicts (what manifests store)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError

C = TypeVar("C", bound="BaseConfig")


@dataclass(frozen=True)
class BaseConfig:
    """Validates ``Literal`` fields against their options on creation; ``to_dict``/``from_dict``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            options = _literal_options(hints.get(f.name))
            value = getattr(self, f.name)
            if options and value not in options:
                raise ConfigError(
                    f"{f.name}={value!r} is not a valid option: use one of {', '.join(map(repr, options))}"
                )
        self.validate()

    def validate(self) -> None:
        """Range checks beyond the Literal options (subclasses)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field {unknown[0]!r}: use one of {sorted(names)}")
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def resolve_config(cls: type[C], config: C | None, overrides: dict[str, Any]) -> C:
    """The one rule every analysis follows for its settings.

    ``config`` (or ``cls()`` when None) with keyword ``overrides`` applied. An override that names no field of
    ``cls`` raises, and so does one that contradicts an explicitly passed ``config`` (the same value is fine):
    a config and a keyword never silently disagree.
    """
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__name__}, got {type(config).__name__}: pass {cls.__name__}(...)")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} setting {unknown[0]!r}: use one of {sorted(names)}")
    if config is None:
        return cls(**overrides)
    clash = [k for k, v in overrides.items() if getattr(config, k) != v]
    if clash:
        k = clash[0]
        raise ConfigError(
            f"{k}={overrides[k]!r} contradicts config.{k}={getattr(config, k)!r}: pass the setting in one place"
        )
    return config


def _literal_options(tp: Any) -> tuple[Any, ...]:
    if tp is None:
        return ()
    if get_origin(tp) is Literal:
        return get_args(tp)
    # Optional[Literal[...]]
    opts: list[Any] = []
    for arg in get_args(tp):
        if get_origin(arg) is Literal:
            opts.extend(get_args(arg))
        elif arg is type(None):
            opts.append(None)
    return tuple(opts) if any(get_origin(a) is Literal for a in get_args(tp)) else ()


def _positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}: pass a value > 0")


@dataclass(frozen=True)
class ProfileConfig(BaseConfig):
    """Settings of :func:`expertscope.profile`."""

    batch_size: int = 8
    max_length: int | None = 512
    keep_sequences: bool = True
    sort_by_length: bool = True
    limit: int | None = None

    def validate(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("max_length", self.max_length, allow_none=True)
        _positive("limit", self.limit, allow_none=True)


@dataclass(frozen=True)
class DomainExpertConfig(BaseConfig):
    """Settings of :func:`expertscope.domain_experts` (SPEC §2)."""

    rule: Literal["z", "fdr"] = "z"
    z: float = 2.0
    entropy: Literal["bernoulli", "eq1"] = "bernoulli"
    conditional: bool = False
    n_boot: int = 1000
    n_perm: int = 1000
    alpha: float = 0.05
    ci: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        if self.n_boot < 0 or self.n_perm < 0:
            raise ConfigError("n_boot and n_perm must be >= 0: pass 0 to skip bootstraps or permutations")
        if not 0 < self.alpha < 1 or not 0 < self.ci < 1:
            raise ConfigError("alpha and ci must lie in (0, 1): e.g. --alpha 0.05 --ci 0.95")
        if self.rule == "fdr" and self.n_perm == 0:
            raise ConfigError("rule='fdr' needs permutation p-values: set n_perm > 0 or use rule='z'")


@dataclass(frozen=True)
class CausalConfig(BaseConfig):
    """Settings of :func:`expertscope.causal_effects` (definitions in docs/methods.md).

    ``chunk_tokens`` bounds the tokens of one perturbed run (rows × recomputed positions): the memory budget
    of the exact engine; ``prefix_reuse`` recomputes each perturbed row only from the first position whose
    layer output can change, reusing the clean run's keys and values before it; ``skip`` drops
    perturbations that provably cannot change the output (renormalising top-k routers only);
    ``fisher_mass``/``fisher_max_outputs`` set the output tokens the Fisher expectation covers;
    ``fisher_route`` forces how the Fisher expectation is taken (``auto``: the cheaper exact route);
    ``hybrid_top`` is how many experts per layer ``method="hybrid"`` recomputes exactly (chosen by
    ``fast``); ``fast_outputs`` is how many of the most probable output tokens ``method="fast"`` takes
    gradients for, and ``fast_probes`` how many random-sign backward probes estimate its Fisher form (0,
    or at least positions × outputs: one product per (position, token), exact).
    ``decision``: where CE is measured. ``"task"`` (default): where each input's task is decided (the label
    or answer-letter position, every gold-answer position of math, teacher-forced; the last real token of
    plain text); ``"last"``: the last token of the prompt (the first version's rule).
    """

    method: Literal["exact", "fast", "fisher", "hybrid"] = "exact"
    magnitude: float = 1.0
    positions: Literal["all", "last"] = "all"
    decision: Literal["task", "last"] = "task"
    target: Literal["vocab", "labels"] = "vocab"
    batch_size: int = 8
    max_length: int | None = 512
    limit: int | None = None
    chunk_tokens: int = 8192
    skip: bool = True
    prefix_reuse: bool = True
    fisher_mass: float = 0.99
    fisher_max_outputs: int = 512
    fisher_route: Literal["auto", "tokens", "hidden"] = "auto"
    hybrid_top: int = 4
    fast_outputs: int = 64
    fast_probes: int = 8

    def validate(self) -> None:
        if self.magnitude == 0 or self.magnitude != self.magnitude:
            raise ConfigError(f"magnitude={self.magnitude!r} perturbs nothing: pass a non-zero value, e.g. 1.0")
        _positive("batch_size", self.batch_size)
        _positive("max_length", self.max_length, allow_none=True)
        _positive("limit", self.limit, allow_none=True)
        _positive("chunk_tokens", self.chunk_tokens)
        _positive("fisher_max_outputs", self.fisher_max_outputs)
        _positive("hybrid_top", self.hybrid_top)
        _positive("fast_outputs", self.fast_outputs)
        if self.fast_probes < 0:
            raise ConfigError(f"fast_probes={self.fast_probes!r} is negative: pass 0 (exact, one pass per "
                              "position and token) or more, e.g. 8")
        if not 0 < self.fisher_mass <= 1:
            raise ConfigError(f"fisher_mass={self.fisher_mass!r} is not in (0, 1]: e.g. 0.99")
