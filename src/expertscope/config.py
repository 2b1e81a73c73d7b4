"""Typed, validated, serialisable settings. Each config checks its ``Literal`` options and ranges on
creation and round-trips through plain dicts (what manifests store)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError, InputTypeError

C = TypeVar("C", bound="BaseConfig")


@dataclass(frozen=True)
class BaseConfig:
    """Validates ``Literal`` fields against their options on creation; ``to_dict``/``from_dict``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_field_type(f.name, getattr(self, f.name), hints.get(f.name))
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
    # Optional[Literal[...]]; a union that also admits other types (``int | Literal["auto"]``) is checked
    # by the config's own ``validate``.
    if any(get_origin(a) is not Literal and a is not type(None) for a in get_args(tp)):
        return ()
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
    if value is None or not value > 0 or not math.isfinite(value):  # NaN and inf are not sizes or rates
        raise ConfigError(f"{name} must be positive, got {value!r}: pass a value > 0")


# Router logits are at most float32 (bf16 shares its range); validation.FLOAT32_MAX is the same number (config
# is a leaf module and imports nothing of the package but errors).
_FLOAT32_MAX = 3.4028234663852886e38


def _finite_factor(name: str, value: float, example: str = "1.2", signed: bool = False) -> None:
    """A finite number within float32 (> 0 unless ``signed``): steering scales and logit perturbations."""
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not finite: pass a finite number, e.g. {example}")
    if not signed and value <= 0:
        raise ConfigError(f"{name}={value!r} is not positive: pass a finite number > 0, e.g. {example}")
    if abs(value) > _FLOAT32_MAX:
        raise ConfigError(f"{name}={value!r} overflows float32, the router logits' precision (largest 3.4e+38): "
                          f"pass e.g. {example}")


# bool fields are left to each config's validate, which names what the flag does.
_SCALAR_TYPES: dict[Any, tuple[type, ...]] = {int: (numbers.Integral,), float: (numbers.Real,), str: (str,)}


def _check_field_type(name: str, value: Any, tp: Any) -> None:
    """A field annotated ``int``/``float``/``bool``/``str`` (or ``X | None``) holds that type: a string for a
    number is :class:`InputTypeError` naming the field, not a comparison error deep inside ``validate``."""
    import types

    args = get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if not args or any(a not in _SCALAR_TYPES and a is not type(None) for a in args):
        return  # Literal, tuple, dict, ...: checked elsewhere
    if value is None and type(None) in args:
        return
    ok = any(isinstance(value, _SCALAR_TYPES[a]) and (a is bool or not isinstance(value, bool))
             for a in args if a is not type(None))
    if not ok:
        want = " or ".join("None" if a is type(None) else a.__name__ for a in args)
        raise InputTypeError(f"{name}={value!r} is a {type(value).__name__}, not {want}: e.g. "
                             f"{name}={'8' if int in args else '1.0' if float in args else repr('text')}")


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
    """Settings of :func:`expertscope.domain_experts` (rules and defaults in ``docs/methods.md``).

    ``rule="fdr"`` (default): a domain expert passes all three of BH ``q <= alpha`` on the specificity test
    over all D·L·E cells, ``A > k/E`` and lift ``A(D) / mean A(other domains) >= min_lift``.
    ``test`` picks the specificity test: ``"permutation"`` (domain labels shuffled across sequences,
    sequential Monte Carlo), ``"normal"`` (a normal approximation of the same permutation null, fitted
    to ``n_perm`` permutations) or ``"auto"`` (permutation when its worst-case work, permutations ×
    domains × sequences × cells, is at most ``perm_budget`` multiply-adds, else normal; the table's
    settings say which ran). ``n_perm="auto"``: ``ceil(20·m/alpha)`` permutations for m = D·L·E tests
    (permutation, so the smallest p can pass BH at that many tests), 1000 for the normal approximation.
    ``perm_stop``: a (layer, expert) column stops permuting once each of its domain cells has seen that
    many permuted statistics at least as large as the observed one (its p-value is then settled and large).

    ``rule="z"`` (the first version): specificity >= mean + z·sd (ddof=0) of the layer's experts, and
    ``A > k/E``. Its cap: among E values the largest z is sqrt(E-1) and at most E/(1+z²) values can reach
    z, so with E = 8 and z = 2 at most one expert per (domain, layer) can pass, and none when two are
    equally specific.
    """

    rule: Literal["fdr", "z"] = "fdr"
    z: float = 2.0
    entropy: Literal["bernoulli", "eq1"] = "bernoulli"
    conditional: bool = False
    test: Literal["auto", "permutation", "normal"] = "auto"
    n_boot: int = 1000
    n_perm: int | Literal["auto"] = "auto"
    perm_stop: int = 50
    perm_budget: float = 5e10
    alpha: float = 0.05
    min_lift: float = 1.5
    ci: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        if self.n_perm != "auto" and (isinstance(self.n_perm, bool) or not isinstance(self.n_perm, int)):
            raise ConfigError(f"n_perm={self.n_perm!r} is not valid: pass 'auto' or a whole number >= 0")
        if self.n_boot < 0 or (self.n_perm != "auto" and int(self.n_perm) < 0):
            raise ConfigError("n_boot and n_perm must be >= 0: pass 0 to skip bootstraps or permutations")
        if not 0 < self.alpha < 1 or not 0 < self.ci < 1:
            raise ConfigError("alpha and ci must lie in (0, 1): e.g. alpha=0.05, ci=0.95")
        if self.rule == "fdr" and self.n_perm == 0:
            raise ConfigError("rule='fdr' needs permutation p-values: set n_perm > 0 (or 'auto') or use rule='z'")
        _positive("perm_stop", self.perm_stop)
        _positive("perm_budget", self.perm_budget)
        if not self.min_lift >= 1:
            raise ConfigError(f"min_lift={self.min_lift!r} is below 1: pass a lift >= 1, e.g. 1.5")


@dataclass(frozen=True)
class DriverConfig(BaseConfig):
    """Settings of :func:`expertscope.driver_experts` (rules and defaults in ``docs/methods.md``).

    ``rule="fdr"`` (default): a driver of D at layer l passes all three of (1) a one-sided Wilcoxon
    signed-rank test across D's inputs that ``CE_{l,i}(X)`` exceeds the median CE of layer l's experts on
    the same input, Benjamini–Hochberg over D's L·E cells, ``q <= alpha``; (2) ``CE_{l,i}(D) >= min_ratio``
    × the layer's median ``CE(D)``; (3) ``CE_{l,i}(D) >= ce_floor`` nats.
    ``rule="z"`` (the first version): ``CE(D) >= layer mean + z·sd`` (ddof=0) of the layer's experts. Its
    cap: among E values the largest z is sqrt(E-1) and at most E/(1+z²) values can reach z (E = 8, z = 2:
    at most one driver per layer, none when two are equally strong). ``rule="top"``: the ``top`` largest.
    ``n_boot`` bootstrap resamples of the inputs give the ``ci`` interval of each mean CE.
    """

    rule: Literal["fdr", "z", "top"] = "fdr"
    alpha: float = 0.05
    min_ratio: float = 2.0
    ce_floor: float = 1e-3
    z: float = 2.0
    top: int = 1
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.alpha < 1 or not 0 < self.ci < 1:
            raise ConfigError("alpha and ci must lie in (0, 1): e.g. alpha=0.05, ci=0.95")
        if self.n_boot < 0:
            raise ConfigError(f"n_boot={self.n_boot} is negative: pass 0 to skip bootstraps")
        if self.ce_floor < 0 or self.min_ratio < 0:
            raise ConfigError("ce_floor and min_ratio must be >= 0: e.g. ce_floor=1e-3, min_ratio=2")
        _positive("top", self.top)


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
        _finite_factor("magnitude", self.magnitude, "1.0", signed=True)  # inf or 1e308 on a logit: no perturbation
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


@dataclass(frozen=True)
class InterventionConfig(BaseConfig):
    """Settings of :func:`expertscope.interventions.study.intervention_study` (the paper's Tables 1–2).

    ``scale_up``/``scale_down`` steer each domain's targets in the ↑/↓ rows (``mode="scale"``: logits × s;
    ``"bias"``: logits + ln s); ``sweep_scales``/``sweep_counts`` are the sweeps over the scale and the number
    of strongest targets. ``finetune`` trains the router LoRA row (for domains given a training split) with
    the ``finetune_*`` settings of :func:`expertscope.finetune_router`. Deltas against the original model
    come with ``ci`` paired-bootstrap intervals (``n_boot`` resamples). A domain whose original accuracy is at
    least ``saturation`` is labelled saturated: there is little room for steering to improve it.
    """

    scale_up: float = 1.2
    scale_down: float = 0.8
    mode: Literal["scale", "bias"] = "scale"
    sweep_scales: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2, 1.4, 1.6)
    sweep_counts: tuple[int, ...] = (1, 2, 4, 8)
    batch_size: int = 16
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    saturation: float = 0.95
    finetune: bool = True
    finetune_layers: str = "last3"
    finetune_rank: int = 8
    finetune_alpha: int = 16
    finetune_lr: float = 1e-3
    finetune_epochs: int = 1
    finetune_max_steps: int | None = None
    finetune_batch_size: int = 8

    def __post_init__(self) -> None:
        # Lists (from JSON manifests or callers) become tuples, so the frozen config stays hashable.
        object.__setattr__(self, "sweep_scales", tuple(float(s) for s in self.sweep_scales))
        object.__setattr__(self, "sweep_counts", tuple(int(c) for c in self.sweep_counts))
        super().__post_init__()

    def validate(self) -> None:
        if self.scale_up <= 0 or self.scale_down <= 0 or any(s <= 0 for s in self.sweep_scales):
            raise ConfigError("scales must be positive: e.g. --scale-up 1.2 --scale-down 0.8")
        for key in ("scale_up", "scale_down"):  # NaN, inf and beyond-float32 scales too
            _finite_factor(key, getattr(self, key))
        for s in self.sweep_scales:
            _finite_factor("sweep_scales", s)
        if any(c <= 0 for c in self.sweep_counts):
            raise ConfigError(f"sweep_counts={self.sweep_counts!r} must be positive counts: e.g. (1, 2, 4)")
        if not isinstance(self.finetune, bool):
            raise ConfigError(f"finetune={self.finetune!r} must be True or False: set the LoRA through "
                              "finetune_epochs, finetune_lr, finetune_max_steps, finetune_batch_size, ...")
        _positive("batch_size", self.batch_size)
        _positive("finetune_batch_size", self.finetune_batch_size)
        _positive("finetune_rank", self.finetune_rank)
        _positive("finetune_lr", self.finetune_lr)
        _positive("finetune_epochs", self.finetune_epochs)
        _positive("finetune_max_steps", self.finetune_max_steps, allow_none=True)
        if self.n_boot < 1:
            raise ConfigError(f"n_boot={self.n_boot} must be at least 1: e.g. 1000")
        if not 0 < self.ci < 1 or not 0 < self.saturation <= 1:
            raise ConfigError("ci must lie in (0, 1) and saturation in (0, 1]: e.g. ci=0.95 saturation=0.95")

    def finetune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`expertscope.finetune_router` for the router-LoRA row."""
        return {"layers": self.finetune_layers, "rank": self.finetune_rank, "alpha": self.finetune_alpha,
                "lr": self.finetune_lr, "epochs": self.finetune_epochs, "max_steps": self.finetune_max_steps,
                "batch_size": self.finetune_batch_size, "seed": self.seed}
