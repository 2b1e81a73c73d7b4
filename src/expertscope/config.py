"""Typed, validated, serialisable settings. Each config checks its ``Literal`` options and ranges on
creation and round-trips through plain dicts (what manifests store)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError, InputTypeError

C = TypeVar("C", bound="BaseConfig")
#: The largest seed: torch seeds with at most 64 bits, numpy with any; 2**63 - 1 fits both everywhere.
MAX_SEED = 2**63 - 1


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, once per class: the annotations are strings (``from __future__ import
    annotations``) and evaluating them on every config made was most of a CLI command's set-up time."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


@dataclass(frozen=True)
class BaseConfig:
    """Validates ``Literal`` fields against their options on creation; ``to_dict``/``from_dict``."""

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in fields(self):
            _check_field_type(f.name, getattr(self, f.name), hints.get(f.name))
            options = _literal_options(hints.get(f.name))
            value = getattr(self, f.name)
            if options and value not in options:
                raise ConfigError(
                    f"{f.name}={value!r} is not a valid option: use one of {', '.join(map(repr, options))}"
                )
        self._check_seed()
        self.validate()

    def validate(self) -> None:
        """Range checks beyond the Literal options (subclasses)."""

    def _check_seed(self) -> None:
        """A ``seed`` field, where the config has one: a whole number torch and numpy can both seed with."""
        seed = getattr(self, "seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            from .errors import InputTypeError

            raise InputTypeError(f"seed={seed!r} is a {type(seed).__name__}, not an integer: pass e.g. seed=0")
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed={seed} is out of range: pass 0 to {MAX_SEED} (2**63 - 1)")

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


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not finite: pass a finite number, e.g. {name}=2.0")


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
    """Texts per forward pass (results do not depend on it)."""
    max_length: int | None = 512
    """Truncate longer texts to this many tokens (counted in the manifest); None: the model's context."""
    keep_sequences: bool = True
    """Keep per-sequence statistics (needed for CIs and p-values)."""
    sort_by_length: bool = True
    """Batch texts of similar length together (faster; results unchanged)."""
    limit: int | None = None
    """At most this many texts per domain (None: all)."""
    importance: bool = True
    """Compute the output-aware importance mean w·‖f_i(x)‖₂ in the routing pass (≈ the MoE layers' cost again)."""
    keep_routes: bool = True
    """Keep every real token's selected experts per sequence (routes.safetensors; overlap between runs)."""
    path_length: int | None = None
    """Consecutive MoE layers per expert path in the co-activation counts (None: 3, or all when fewer)."""
    generate: int = 0
    """Also route N greedily generated tokens per text, and split every table by phase (prompt / generated)."""

    def validate(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("max_length", self.max_length, allow_none=True)
        _positive("limit", self.limit, allow_none=True)
        _positive("path_length", self.path_length, allow_none=True)
        if isinstance(self.generate, bool) or not isinstance(self.generate, int) or self.generate < 0:
            raise ConfigError(f"generate={self.generate!r} must be a whole number >= 0: e.g. generate=32 (0: prompts "
                              "only)")


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
    """fdr (BH q <= alpha, A > k/E, lift >= min_lift) or z (specificity z-score; capped: at most E/(1+z^2) pass)."""
    z: float = 2.0
    """rule z: standard deviations above the layer mean."""
    entropy: Literal["bernoulli", "eq1"] = "bernoulli"
    """bernoulli (default) or eq1 (the paper's literal Eq. 1)."""
    conditional: bool = False
    """Average H over the tokens that select the expert."""
    test: Literal["auto", "permutation", "normal"] = "auto"
    """Specificity test: auto (permutation when affordable, else its normal approximation), permutation or normal."""
    n_boot: int = 1000
    """Bootstrap resamples for the CIs (0: none)."""
    n_perm: int | Literal["auto"] = "auto"
    """Permutations for domain-expert p-values: auto (20·tests/alpha) or a number (0: none)."""
    perm_stop: int = 50
    """A column stops permuting once each cell saw this many permuted statistics at least as large."""
    perm_budget: float = 5e10
    """test=auto: largest permutation work (multiply-adds) before the normal approximation is used."""
    alpha: float = 0.05
    """FDR level of the Benjamini-Hochberg rules."""
    min_lift: float = 1.5
    """rule fdr: least activation lift A(D) / mean A(other domains)."""
    ci: float = 0.95
    """Level of the bootstrap intervals."""
    seed: int = 0
    """Random seed (resamples, permutations, data sampling)."""

    def validate(self) -> None:
        _finite("z", self.z)
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
    ``ce_decimals``: every per-input CE is rounded to this many decimals (nats) before the rule, so that
    differences far below ``10**-ce_decimals`` (the torch thread count moves CE by < 1e-12 nats) cannot
    change a decision; ``None`` decides on the unrounded values.
    ``stability_pairs`` > 0 (rule fdr): the rule runs on that many complementary pairs of half-samples of
    the inputs and a driver is an expert flagged in at least ``min_frequency`` of them (stability
    selection, :mod:`expertscope.causal.stability`); 0 decides once on all inputs.
    """

    rule: Literal["fdr", "z", "top"] = "fdr"
    """fdr (paired test vs the layer median, BH q <= alpha, CE >= min_ratio x median, >= ce_floor), z or top."""
    alpha: float = 0.05
    """FDR level of the Benjamini-Hochberg rules."""
    min_ratio: float = 2.0
    """rule fdr: least CE as a multiple of the layer's median CE."""
    ce_floor: float = 1e-3
    """rule fdr: least CE in nats."""
    z: float = 2.0
    """rule z: standard deviations above the layer mean."""
    top: int = 1
    """rule top: drivers flagged per layer."""
    n_boot: int = 1000
    """Bootstrap resamples for the CIs (0: none)."""
    ci: float = 0.95
    """Level of the bootstrap intervals."""
    seed: int = 0
    """Random seed (resamples, permutations, data sampling)."""
    ce_decimals: int | None = 9
    """CE rounded to this many decimals before the rule (decisions independent of thread count); None: exact."""
    stability_pairs: int = 50
    """rule fdr: complementary pairs of half-samples the rule runs on (stability selection); 0: one pass."""
    min_frequency: float = 0.6
    """rule fdr with stability: least share of half-samples that must flag a driver (in (0.5, 1])."""

    def validate(self) -> None:
        _finite("z", self.z)
        if self.stability_pairs < 0:
            raise ConfigError(f"stability_pairs={self.stability_pairs} is negative: e.g. 50, or 0 for one pass")
        if not 0.5 < self.min_frequency <= 1:
            raise ConfigError(f"min_frequency={self.min_frequency!r} must lie in (0.5, 1]: e.g. 0.6")
        if not 0 < self.alpha < 1 or not 0 < self.ci < 1:
            raise ConfigError("alpha and ci must lie in (0, 1): e.g. alpha=0.05, ci=0.95")
        if self.ce_decimals is not None and not 0 <= self.ce_decimals <= 15:
            raise ConfigError(f"ce_decimals={self.ce_decimals!r} is outside 0..15: e.g. 9 (1e-9 nats), or None")
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
    ``hybrid_top``: ``method="hybrid"`` screens with ``fast`` and verifies exactly what could be a driver
    (:mod:`expertscope.causal.hybrid`); this many top experts per layer by fast CE are verified too;
    ``fast_outputs`` is how many of the most probable output tokens ``method="fast"`` takes gradients for,
    and ``fast_probes`` how many random-sign backward probes estimate its Fisher form (0,
    or at least positions × outputs: one product per (position, token), exact).
    ``decision``: where CE is measured. ``"task"`` (default): where each input's task is decided (the label
    or answer-letter position, every gold-answer position of math, teacher-forced; the last real token of
    plain text); ``"last"``: the last token of the prompt (the first version's rule).
    """

    method: Literal["exact", "fast", "fisher", "hybrid"] = "exact"
    """exact (the definition), fast (Fisher sketch), hybrid (fast screens, possible drivers exact) or fisher."""
    magnitude: float = 1.0
    """Added to the expert's router logit (non-zero)."""
    positions: Literal["all", "last"] = "all"
    """all (every token) or last (the prediction position)."""
    decision: Literal["task", "last"] = "task"
    """task (where each input's task is decided) or last (the prompt's last token)."""
    target: Literal["vocab", "labels"] = "vocab"
    """vocab (full-vocabulary KL) or labels (over the answer tokens)."""
    batch_size: int = 8
    """Texts per forward pass (results do not depend on it)."""
    max_length: int | None = 512
    """Truncate longer texts to this many tokens (counted in the manifest); None: the model's context."""
    limit: int | None = None
    """Texts per domain for causal effects (None: all)."""
    chunk_tokens: int = 8192
    """Memory budget: tokens recomputed in one perturbed run."""
    skip: bool = True
    """Skip perturbations that provably cannot change the output."""
    prefix_reuse: bool = True
    """Reuse the clean run's keys/values before the first changed position (values unchanged)."""
    fisher_mass: float = 0.99
    """Fisher: probability mass of the output tokens covered."""
    fisher_max_outputs: int = 512
    """Fisher: at most this many output tokens."""
    fisher_route: Literal["auto", "tokens", "hidden"] = "auto"
    """Fisher: auto (the cheaper exact route), tokens or hidden."""
    hybrid_top: int = 0
    """hybrid: the top experts of each layer by fast CE also computed exactly (beside the screened ones)."""
    noise_inputs: int = 8
    """Inputs on which the dtype's rounding floor of CE is measured (0: not measured)."""
    fast_outputs: int = 64
    """fast: most probable output tokens given gradients."""
    fast_probes: int = 8
    """fast: random-sign backward probes (0: exact)."""
    only_layers: tuple[int, ...] | None = None
    """MoE layers to perturb (comma-separated; None: all)."""
    only_experts: tuple[int, ...] | None = None
    """Experts to perturb in each layer (comma-separated; None: all)."""
    label_tokens: tuple[str, ...] | None = None
    """target=labels: the answer token texts (comma-separated)."""

    def __post_init__(self) -> None:
        # Lists (from JSON manifests or callers) become tuples, so the frozen config stays hashable.
        for name, kind in (("only_layers", int), ("only_experts", int), ("label_tokens", str)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(kind(v) for v in value))
        super().__post_init__()

    def validate(self) -> None:
        if self.magnitude == 0 or self.magnitude != self.magnitude:
            raise ConfigError(f"magnitude={self.magnitude!r} perturbs nothing: pass a non-zero value, e.g. 1.0")
        _finite_factor("magnitude", self.magnitude, "1.0", signed=True)  # inf or 1e308 on a logit: no perturbation
        _positive("batch_size", self.batch_size)
        _positive("max_length", self.max_length, allow_none=True)
        _positive("limit", self.limit, allow_none=True)
        _positive("chunk_tokens", self.chunk_tokens)
        _positive("fisher_max_outputs", self.fisher_max_outputs)
        if isinstance(self.hybrid_top, bool) or not isinstance(self.hybrid_top, int) or self.hybrid_top < 0:
            raise ConfigError(f"hybrid_top={self.hybrid_top!r} must be a whole number >= 0: e.g. 0")
        if isinstance(self.noise_inputs, bool) or not isinstance(self.noise_inputs, int) or self.noise_inputs < 0:
            raise ConfigError(f"noise_inputs={self.noise_inputs!r} must be a whole number >= 0: e.g. 8 (0: no "
                              "rounding floor measured)")
        _positive("fast_outputs", self.fast_outputs)
        if self.fast_probes < 0:
            raise ConfigError(f"fast_probes={self.fast_probes!r} is negative: pass 0 (exact, one pass per "
                              "position and token) or more, e.g. 8")
        if not 0 < self.fisher_mass <= 1:
            raise ConfigError(f"fisher_mass={self.fisher_mass!r} is not in (0, 1]: e.g. 0.99")


@dataclass(frozen=True)
class InterventionConfig(BaseConfig):
    """Settings of :func:`expertscope.interventions.steering_study.intervention_study` (the paper's Tables 1–2 with
    controls, a dose–response and a selectivity matrix; definitions in ``docs/methods.md``).

    ``scale_up``/``scale_down`` steer each domain's targets in the ↑/↓ rows (``mode="scale"``: logits × s;
    ``"bias"``: logits + ln s). The dose–response steers each kind of target at: ablation (``dose_mask``),
    every factor of ``dose_scales`` (scale mode) and of ``dose_biases`` (bias mode: + ln s); the ↑/↓ rows
    are always among its points. Every targeted point is paired with ``n_controls`` control draws of the kind
    ``control`` names (``matched``: non-target experts of the same layers about as busy in the domain as the
    targets; ``random``: uniform in those layers), which carry the verdict, with ``n_reference`` draws of the
    other kind and, with ``busiest``, the most active non-target experts of those layers as references.
    A condition is *specific* when the target's Δ lies outside the control draws' distribution (a
    prediction test over sets, ``n_controls − 1`` df) and beyond them item by item (sign test), with
    Benjamini–Hochberg over every condition of the run at ``alpha``. ``selectivity`` ablates each domain's
    experts and evaluates every domain; a set is selective when it is specific on its own domain and no other
    domain's control-normalised loss exceeds ``max_off_target`` × its own. ``limit``: items per domain
    evaluated under every condition. Deltas come with ``ci`` paired-bootstrap intervals (``n_boot``
    resamples of the items). ``finetune`` trains the router-LoRA row (for domains given a training split)
    with the ``finetune_*`` settings of :func:`expertscope.finetune_router`. A domain whose original accuracy
    is at least ``saturation`` is labelled saturated.

    Budget (why the defaults): per domain, 1 + K·S·(2 + n_controls + n_reference) + K·(D − 1)·(1 +
    selectivity_controls) + 1 evaluations (K = 2 kinds with targets, S strengths, D domains); the verdict's
    control draws do not record routing changes (only the target and reference arms do), which makes them
    about a third cheaper. With the defaults (S = 7; 8 matched draws, 2 random references, busiest, 4 draws
    off-target) the demo's steering stage takes about 1.4–1.5× what 5 unverdicted draws took
    (docs/methods.md, "Budget"). Eight draws give the prediction test 7 degrees of freedom; fewer than 3
    distinct draws give no verdict.
    """

    scale_up: float = 1.2
    """Steering factor of the up rows."""
    scale_down: float = 0.8
    """Steering factor of the down rows."""
    mode: Literal["scale", "bias"] = "scale"
    """scale (logits x s, the paper's) or bias (logits + ln s)."""
    limit: int | None = 60
    """Test items per domain evaluated under every condition (None: all; the budget above)."""
    n_controls: int = 8
    """Control draws per targeted condition that carry the verdict (at least 3; 0: none, and no verdict)."""
    control: Literal["matched", "random"] = "matched"
    """Verdict controls: matched (equally busy experts of the same layers) or random (uniform in those layers)."""
    n_reference: int = 2
    """Draws of the other control kind, evaluated as a reference (no verdict)."""
    match_pool: float = 0.25
    """Matched controls: share of a layer's non-target experts (at least 3) nearest in activation to a target."""
    busiest: bool = True
    """Also steer the busiest non-target experts of the same layers (a reference control)."""
    alpha: float = 0.05
    """FDR level of the verdicts (Benjamini-Hochberg over every tested condition of the run)."""
    max_off_target: float = 1 / 3
    """Selective: another domain's control-normalised loss is at most this share of the set's own."""
    selectivity_controls: int = 4
    """Selectivity: verdict control draws also ablated on the other domains (their mean normalises a cell)."""
    dose_mask: bool = True
    """Dose-response: include ablation (the targets can never be selected)."""
    dose_scales: tuple[float, ...] = (0.5, 0.8, 1.2, 2.0)
    """Dose-response factors in scale mode, logits x s (comma-separated)."""
    dose_biases: tuple[float, ...] = (0.5, 2.0)
    """Dose-response factors in bias mode, logits + ln s (comma-separated)."""
    selectivity: bool = True
    """Ablate each domain's experts and evaluate every domain (the selectivity matrix)."""
    batch_size: int = 16
    """Texts per forward pass (results do not depend on it)."""
    max_new_tokens: int = 96
    """Generation limit for math."""
    n_boot: int = 1000
    """Bootstrap resamples for the CIs (0: none)."""
    ci: float = 0.95
    """Level of the bootstrap intervals."""
    seed: int = 0
    """Random seed (resamples, permutations, data sampling)."""
    saturation: float = 0.95
    """Original accuracy at or above which a domain is labelled saturated."""
    finetune: bool = True
    """Train the router-LoRA row."""
    finetune_layers: str = "last3"
    """Router LoRA: layers to adapt (e.g. last3, all, 0,2)."""
    finetune_rank: int = 8
    """Router LoRA: rank."""
    finetune_alpha: int = 16
    """Router LoRA: alpha."""
    finetune_lr: float = 1e-3
    """Router LoRA: learning rate."""
    finetune_epochs: int = 1
    """Router LoRA: epochs."""
    finetune_max_steps: int | None = None
    """Router LoRA: at most this many steps (None: the epochs')."""
    finetune_batch_size: int = 8
    """Router LoRA: examples per step."""

    def __post_init__(self) -> None:
        # Lists (from JSON manifests or callers) become tuples, so the frozen config stays hashable.
        object.__setattr__(self, "dose_scales", tuple(float(s) for s in self.dose_scales))
        object.__setattr__(self, "dose_biases", tuple(float(s) for s in self.dose_biases))
        super().__post_init__()

    def validate(self) -> None:
        for name in ("scale_up", "scale_down"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name}={value!r} is not positive and finite: pass a factor > 0, e.g. "
                                  "scale_up=1.2, scale_down=0.8")
        if any(not (s > 0 and math.isfinite(s)) for s in (*self.dose_scales, *self.dose_biases)):
            raise ConfigError(f"dose scales must be positive and finite, got {self.dose_scales + self.dose_biases}: "
                              "e.g. dose_scales=(0.5, 2.0)")
        for key in ("scale_up", "scale_down"):  # beyond-float32 factors too
            _finite_factor(key, getattr(self, key))
        for s in (*self.dose_scales, *self.dose_biases):
            _finite_factor("dose_scales", s)
        for name in ("finetune", "busiest", "dose_mask", "selectivity"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False" + (
                    ": set the LoRA through finetune_epochs, finetune_lr, finetune_max_steps, finetune_batch_size, ..."
                    if name == "finetune" else ""))
        for name in ("n_controls", "n_reference", "selectivity_controls"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a whole number >= 0: e.g. {name}=8")
        if not 0 < self.match_pool <= 1:
            raise ConfigError(f"match_pool={self.match_pool!r} must lie in (0, 1]: e.g. match_pool=0.25")
        if not 0 < self.alpha < 1 or not 0 <= self.max_off_target < 1:
            raise ConfigError("alpha must lie in (0, 1) and max_off_target in [0, 1): e.g. alpha=0.05, "
                              "max_off_target=0.33")
        _positive("limit", self.limit, allow_none=True)
        _positive("batch_size", self.batch_size)
        _positive("max_new_tokens", self.max_new_tokens)
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


@dataclass(frozen=True)
class EvalConfig(BaseConfig):
    """Settings of the evaluation stage (``expertscope eval``): :func:`expertscope.evaluate` per domain."""

    batch_size: int = 8
    """Texts per forward pass (results do not depend on it)."""
    max_new_tokens: int = 96
    """Generation limit for math."""

    def validate(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("max_new_tokens", self.max_new_tokens)


@dataclass(frozen=True)
class LmEvalConfig(BaseConfig):
    """Settings of the lm-evaluation-harness stage (``expertscope lm-eval``)."""

    tasks: tuple[str, ...] = ("expertscope_emotion", "expertscope_knowledge", "expertscope_math")
    """lm-eval tasks (comma-separated); the expertscope_* tasks run offline."""
    steer: str | None = None
    """A steering JSON (SteeringSpec.save) to apply."""
    include_path: str | None = None
    """Extra lm-eval task YAML directory."""
    limit: int | None = None
    """Texts per domain (None: all)."""
    n: int = 100
    """Examples generated per synthetic task."""
    batch_size: int = 8
    """Texts per forward pass (results do not depend on it)."""

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(t.strip() for t in self.tasks.split(",") if t.strip()))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        super().__post_init__()

    def validate(self) -> None:
        _positive("limit", self.limit, allow_none=True)
        _positive("n", self.n)
        _positive("batch_size", self.batch_size)
        if not self.tasks:
            raise ConfigError("tasks is empty: name at least one lm-eval task, e.g. expertscope_math")


#: The synthetic three-domain benchmark: the domains of a study given none.
DEMO_DOMAINS: tuple[str, ...] = (
    "emotion=synthetic:emotion@validation",
    "knowledge=synthetic:knowledge@validation",
    "math=synthetic:math@validation",
)

#: The second confirmation corpora of the synthetic benchmark: its test-bucket items, reworded.
DEMO_CONFIRM: tuple[str, ...] = (
    "emotion=synthetic:emotion@shifted",
    "knowledge=synthetic:knowledge@shifted",
    "math=synthetic:math@shifted",
)

# Flat keywords of the first StudyConfig -> the analysis config fields they set now (kept for one release).
# A None section means every section holding that field (the one concept shared by all analyses).
_LEGACY_STUDY_KEYWORDS: dict[str, tuple[str | None, str]] = {
    "z": (None, "z"), "entropy": ("domain_experts", "entropy"), "n_perm": ("domain_experts", "n_perm"),
    "n_boot": (None, "n_boot"), "batch_size": (None, "batch_size"), "max_length": (None, "max_length"),
    "causal_limit": ("causal", "limit"), "causal_method": ("causal", "method"),
    "steer_mode": ("intervention", "mode"), "scale_up": ("intervention", "scale_up"),
    "scale_down": ("intervention", "scale_down"),
}


@dataclass(frozen=True, init=False)
class StudyConfig(BaseConfig):
    """Settings of :func:`expertscope.run_study`: what to study, and each analysis's own config.

    The run-level fields say which model and data; ``profile``, ``domain_experts``, ``causal``, ``drivers``
    and ``intervention`` are the configs of the analyses the stages call, unchanged, so ``run_study`` with
    ``StudyConfig()`` runs every analysis at its API defaults. :meth:`replace_all` sets a setting that
    several analyses share (``seed``, ``batch_size``, ``n_boot``...) in all of them at once.
    """

    model: str = "demo"
    """Local HF model directory, a hub id, 'demo' or 'demo-deepseek' (the bundled demos)."""
    domains: tuple[str, ...] = ()
    """NAME=SOURCE[?text=FIELD&label=FIELD&labels=a,b,c...] specs (none: the synthetic benchmark)."""
    parts: tuple[float, ...] = (0.6, 0.2, 0.2)
    """Discovery, training and confirmation shares of each non-synthetic source (by a seeded hash of each text)."""
    allow_overlap: bool = False
    """Let confirmation or training items overlap the discovery items (every affected verdict then says so)."""
    confirm: tuple[str, ...] = ()
    """NAME=SOURCE: a second, independent corpus the pre-registered hypotheses are tested on (repeatable; default:
    the synthetic benchmark's shifted corpora when no domains are given; 'none': no second corpus)."""
    hypotheses: str | None = None
    """expertscope confirm: the hypotheses.json (written by a study) to test."""
    limit: int | None = 300
    """Texts per domain for profiling, domain experts, tokens and the causal rate (None: all)."""
    train_limit: int | None = 300
    """Training examples per domain for the router LoRA (None: all)."""
    dtype: str = "auto"
    """Model dtype: auto, float32, bfloat16 or float16."""
    device: str | None = None
    """cpu, cuda, cuda:1, mps ... (default: where the model loads)."""
    seed: int = 0
    """Random seed (resamples, permutations, data sampling)."""
    trust_remote_code: bool = False
    """Run the model repository's own code."""
    allow_pickle: bool = False
    """Allow pickled (.bin) weights from a trusted source."""
    executor: Literal["local", "process", "ray"] = "local"
    """Where profiling batches and steering evaluations run: local (this process), process (worker processes on
    this machine) or ray (Ray actors, kept for the whole run; pip install 'expertscope[ray]'). Results do not
    depend on it."""
    workers: int = 2
    """Worker processes or Ray actors (each loads the model once)."""
    gpus_per_worker: float = 0
    """GPUs per Ray actor (>1: device_map='auto')."""
    threads: int | None = None
    """torch CPU threads (None: torch's default; 1 is fastest for the small bundled demos)."""
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    domain_experts: DomainExpertConfig = dataclasses.field(default_factory=DomainExpertConfig)
    causal: CausalConfig = dataclasses.field(default_factory=lambda: CausalConfig(limit=120))
    drivers: DriverConfig = dataclasses.field(default_factory=DriverConfig)
    intervention: InterventionConfig = dataclasses.field(default_factory=InterventionConfig)
    evaluation: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    lm_eval: LmEvalConfig = dataclasses.field(default_factory=LmEvalConfig)

    def __init__(self, **kwargs: Any) -> None:
        legacy = {k: kwargs.pop(k) for k in list(kwargs) if k in _LEGACY_STUDY_KEYWORDS}
        unknown = sorted(set(kwargs) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(f"unknown StudyConfig field {unknown[0]!r}: use one of "
                              f"{sorted(f.name for f in fields(self))}")
        for f in fields(self):
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            cls = self.sections().get(f.name)
            if cls is not None and isinstance(value, dict):
                value = cls.from_dict(value)  # a section read back from a manifest
            if f.name in ("domains", "parts", "confirm") and isinstance(value, list):
                value = tuple(value)  # from a manifest (JSON lists)
            object.__setattr__(self, f.name, value)
        for key, value in legacy.items():
            section, name = _LEGACY_STUDY_KEYWORDS[key]
            self._set(name, value, None if section is None else [section])
        self.__post_init__()

    @classmethod
    def sections(cls) -> dict[str, type[BaseConfig]]:
        """The analysis configs the study holds, ``{field name: config class}``, in field order."""
        if cls not in _SECTIONS:
            hints = type_hints(cls)
            _SECTIONS[cls] = {f.name: hints[f.name] for f in fields(cls)
                              if isinstance(hints[f.name], type) and issubclass(hints[f.name], BaseConfig)}
        return dict(_SECTIONS[cls])

    def _set(self, name: str, value: Any, sections: list[str] | None = None) -> None:
        """Set ``name`` in place (construction only): in the named sections, or everywhere it exists."""
        names = {f.name for f in fields(self)}
        hit = False
        if sections is None and name in names and name not in self.sections():
            object.__setattr__(self, name, value)
            hit = True
        for sec, cls in self.sections().items():
            if (sections is None or sec in sections) and name in {f.name for f in fields(cls)}:
                object.__setattr__(self, sec, getattr(self, sec).replace(**{name: value}))
                hit = True
        if not hit:
            raise ConfigError(f"no StudyConfig setting {name!r}: use one of {sorted(names)}")

    def replace_all(self, **changes: Any) -> StudyConfig:
        """A copy with each ``name=value`` set in the run-level field and every analysis config holding it
        (``replace_all(seed=3)`` reseeds every analysis; ``replace_all(n_boot=200)`` every bootstrap)."""
        out = dataclasses.replace(self)
        for name, value in changes.items():
            out._set(name, value)
        out.validate()
        return out

    def validate(self) -> None:
        if isinstance(self.domains, str):
            from .errors import InputTypeError

            raise InputTypeError(f"domains must be a list of NAME=SOURCE specs, got one string {self.domains!r}: "
                                 "wrap it in a list")
        for name in ("limit", "train_limit", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}={value!r} is not a positive whole number: pass e.g. {name}=100, "
                                  "or None for all")
        parts = tuple(self.parts)
        if len(parts) != 3 or any(not (isinstance(x, int | float) and 0 <= x <= 1) for x in parts) \
                or abs(sum(parts) - 1) > 1e-9 or min(parts) == 0:
            raise ConfigError(f"parts={self.parts!r} must be three shares > 0 of discovery, training and "
                              "confirmation summing to 1: e.g. parts=0.6,0.2,0.2")
        if isinstance(self.confirm, str):
            from .errors import InputTypeError

            raise InputTypeError(f"confirm must be a list of NAME=SOURCE specs, got one string {self.confirm!r}: "
                                 "wrap it in a list")
        if "none" in tuple(self.confirm) and len(self.confirm) > 1:
            raise ConfigError("confirm='none' turns the second corpus off: give it alone, or give NAME=SOURCE specs")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers={self.workers!r} is not a positive whole number: pass e.g. workers=2")
        if not (isinstance(self.gpus_per_worker, int | float) and math.isfinite(self.gpus_per_worker)
                and self.gpus_per_worker >= 0):
            raise ConfigError(f"gpus_per_worker={self.gpus_per_worker!r} must be a finite number >= 0: e.g. 0 "
                              "(CPU) or 1")
        for sec, cls in self.sections().items():
            if not isinstance(getattr(self, sec), cls):
                raise ConfigError(f"{sec} must be a {cls.__name__}, got {type(getattr(self, sec)).__name__}")

    @property
    def domain_specs(self) -> tuple[str, ...]:
        """The domain specs studied: ``domains``, or the synthetic benchmark when none are given."""
        return self.domains or DEMO_DOMAINS

    @property
    def confirm_specs(self) -> tuple[str, ...]:
        """The second confirmation corpora: ``confirm``, or the synthetic benchmark's shifted corpora when no
        domains are given (``confirm=("none",)``: none)."""
        if tuple(self.confirm) == ("none",):
            return ()
        return tuple(self.confirm) or (() if self.domains else DEMO_CONFIRM)

    def split_specs(self, split: str) -> tuple[str, ...]:
        """The domain specs moved to another split (synthetic sources only; others are kept as given)."""
        out = []
        for spec in self.domain_specs:
            name, _, source = spec.partition("=")
            if source.startswith("synthetic:"):
                base, _, query = source.partition("?")
                source = base.split("@")[0] + f"@{split}" + (f"?{query}" if query else "")
            out.append(f"{name}={source}")
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        return cls(**d)


_SECTIONS: dict[type, dict[str, type[BaseConfig]]] = {}
