"""Steering experts at inference (docs/methods.md §5): scale, bias or mask chosen experts' router logits before
routing.

``mode="scale"`` (the paper's): ``z_i ← s·z_i``; ``mode="bias"``: ``z_i ← z_i + ln s`` (multiplies expert i's
pre-normalisation probability by ``s``); ``mode="mask"`` (ablation): expert i can never be selected
(``z_i ← -inf``, or the family's equivalent before its own grouping, bias correction and top-k: DeepSeek-V3's
choice score), so each token goes to its next choice; ``scale`` is ignored. Scaling a negative logit moves it
the other way: ``s > 1`` makes a negative logit more negative. Applies to every token, prompt and generated;
``s = 1`` is bit-identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import BaseConfig
from ..errors import ConfigError
from ..io import write_json
from ..models.adapters.base import RouterSite
from ..models.hooks import RouterHooks
from ..models.model import MoEModel

Target = tuple[int, int]


@dataclass(frozen=True)
class SteeringSpec(BaseConfig):
    """What to steer: ``targets`` ``((layer, expert), ...)``, the factor ``scale`` and the ``mode``
    (``"mask"`` ignores ``scale``)."""

    targets: tuple[Target, ...] = ()
    scale: float = 1.2
    mode: Literal["scale", "bias", "mask"] = "scale"

    def validate(self) -> None:
        from ..validation import check_positive_finite

        check_positive_finite(self.scale, "scale")  # a number, > 0, finite, and within float32 (1e308 is not)
        object.__setattr__(self, "targets", tuple(sorted(set(_pairs(self.targets)))))

    def to_json(self) -> str:
        return json.dumps({"targets": [list(t) for t in self.targets], "scale": self.scale, "mode": self.mode})

    @classmethod
    def from_json(cls, text: str, where: str = "steering JSON") -> SteeringSpec:
        """Parse ``{"targets": [[layer, expert], ...], "scale": s, "mode": "scale"|"bias"}``; any other shape
        raises :class:`ConfigError` naming the problem."""
        shape = '{"targets": [[layer, expert], ...], "scale": 1.2, "mode": "scale"}'
        try:
            d = json.loads(text.removeprefix("\ufeff"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}): write {shape}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{where} holds a JSON {type(d).__name__}: write an object {shape}")
        unknown = sorted(set(d) - {"targets", "scale", "mode"})
        if unknown:
            raise ConfigError(f"{where} has an unknown key {unknown[0]!r}: write {shape}")
        targets = d.get("targets", [])
        if not isinstance(targets, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                        for x in t) for t in targets):
            raise ConfigError(f"{where}: targets must be a list of [layer, expert] pairs of integers >= 0, got "
                              f"{str(targets)[:40]}: write {shape}")
        scale = d.get("scale", 1.2)
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise ConfigError(f"{where}: scale {scale!r} is not a number: write e.g. \"scale\": 1.2")
        mode = d.get("mode", "scale")
        if not isinstance(mode, str):
            raise ConfigError(f"{where}: mode {mode!r} is not a string: use \"scale\", \"bias\" or \"mask\"")
        from ..errors import ExpertscopeError

        try:
            return cls(targets=tuple((a, b) for a, b in targets), scale=float(scale), mode=mode)  # type: ignore[arg-type]
        except ExpertscopeError as e:  # name the file: "steering file x.json: scale=nan is not finite ..."
            raise type(e)(f"{where}: {e}") from None

    def save(self, path: str | Path) -> None:
        write_json(path, json.loads(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> SteeringSpec:
        from ..io import read_text

        p = Path(path)
        if not p.exists():
            raise ConfigError(f"steering file {p} not found: check the path")
        return cls.from_json(read_text(p, "steering file"), where=f"steering file {p}")


def targets_from(source: Any, domain: str | None = None) -> list[Target]:
    """``(layer, expert)`` pairs from an explicit list, a domain-expert table or a driver table.

    Tables are DataFrames (or objects with ``.df``) with ``layer, expert`` and a flag column
    ``is_domain_expert`` or ``is_driver``; ``domain`` picks one domain's rows.
    """
    df = getattr(source, "df", source)
    if hasattr(df, "columns"):
        rows = df
        if domain is not None and "domain" in rows.columns:
            rows = rows[rows["domain"] == domain]
        flag = next((c for c in ("is_driver", "is_domain_expert") if c in rows.columns), None)
        if flag is None:
            raise ConfigError("the table has neither is_domain_expert nor is_driver: pass a domain or driver table")
        if "is_driver" in rows.columns and "is_domain_expert" in rows.columns:
            flag = "is_domain_expert"
        rows = rows[rows[flag].astype(bool)]
        return [(int(r.layer), int(r.expert)) for r in rows.itertuples()]
    return _pairs(source)


def _pairs(items: Any) -> list[Target]:
    """``[(layer, expert), ...]`` as int pairs; anything else raises :class:`InputTypeError` naming the shape."""
    from ..errors import InputTypeError

    def ok(t: Any) -> bool:
        return (isinstance(t, tuple | list) and len(t) == 2
                and all(hasattr(x, "__index__") and not isinstance(x, bool) for x in t))

    items = list(items) if hasattr(items, "__iter__") and not isinstance(items, str | bytes | dict) else items
    if not isinstance(items, list) or not all(ok(t) for t in items):
        raise InputTypeError(f"targets must be (layer, expert) pairs of integers, got {str(items)[:40]}: e.g. "
                             "targets=((0, 3), (1, 5)), or a domain-expert / driver table")
    return [(int(a), int(b)) for a, b in items]


@dataclass
class Steering:
    """A context manager (or ``attach``/``detach``) applying a :class:`SteeringSpec` to a model's routers.

    ``changed`` counts, per targeted layer, the router rows whose selected set (the router's own output)
    differs from what the same router input selects without steering (the direct effect at that layer);
    ``seen`` counts router rows. Both count router passes as the model makes them, padding and repeated
    prompts included, so they depend on batching: per-token counts independent of batch size come from
    :func:`expertscope.interventions.controls.routing_changes`.
    """

    model: MoEModel
    spec: SteeringSpec
    count_changes: bool = True
    changed: dict[int, int] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    _hooks: RouterHooks | None = None
    _pre: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..validation import check_type

        check_type(self.model, MoEModel, "model", "an MoEModel (es.load_model(...))")
        check_type(self.spec, SteeringSpec, "spec", "a SteeringSpec (SteeringSpec(targets=..., scale=1.2))")
        layers = {s.layer: s for s in self.model.sites}
        for layer, expert in self.spec.targets:
            if layer not in layers:
                raise ConfigError(f"steering target layer {layer} is not an MoE layer: choose from {sorted(layers)}")
            if not 0 <= expert < layers[layer].num_experts:
                raise ConfigError(
                    f"steering target expert {expert} does not exist at layer {layer}: "
                    f"choose 0..{layers[layer].num_experts - 1}"
                )

    def _transform(self, site: RouterSite, experts: list[int]) -> Any:
        s = self.spec.scale
        vec_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

        def transform(site: RouterSite, z: torch.Tensor) -> torch.Tensor:
            if self.count_changes:
                self._pre[site.layer] = z.detach()
            if self.spec.mode == "mask":  # the hooks' masks do it (and reach DeepSeek-V3's choice scores)
                return z
            key = (z.dtype, z.device)
            if key not in vec_cache:
                _check_fits(z.dtype, s if self.spec.mode == "scale" else abs(math.log(s)), site)
                base = 1.0 if self.spec.mode == "scale" else 0.0
                v = torch.full((z.shape[-1],), base, dtype=z.dtype, device=z.device)
                v[experts] = s if self.spec.mode == "scale" else math.log(s)
                vec_cache[key] = v
            new = z * vec_cache[key] if self.spec.mode == "scale" else z + vec_cache[key]
            _check_no_overflow(site, z, new, s)
            return new

        return transform

    def _count(self, site: RouterSite, call: Any) -> None:
        """Compare the router's own selection with what its unsteered logits select."""
        old = self._pre.pop(site.layer, None)
        if old is None:
            return
        with torch.no_grad():
            a, _ = site.adapter.site_route(site, old.reshape(-1, site.num_experts))
            b = call.indices
            diff = (a.sort(-1).values != b.sort(-1).values).any(-1)
            self.changed[site.layer] = self.changed.get(site.layer, 0) + int(diff.sum())
            self.seen[site.layer] = self.seen.get(site.layer, 0) + int(diff.numel())

    def attach(self) -> Steering:
        """Install the steering until :meth:`detach` (persistent use)."""
        if self._hooks is not None:
            return self
        by_layer: dict[int, list[int]] = {}
        for layer, expert in self.spec.targets:
            by_layer.setdefault(layer, []).append(expert)
        transforms = {layer: self._transform(self.model.site(layer), experts) for layer, experts in by_layer.items()}
        masks = by_layer if self.spec.mode == "mask" else None
        self._pre = {}
        self._hooks = RouterHooks(self.model, transforms=transforms, masks=masks,
                                  record=list(by_layer) if self.count_changes else False,
                                  on_call=self._count)
        self._hooks.__enter__()
        return self

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def __enter__(self) -> Steering:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @property
    def total_changed(self) -> int:
        return sum(self.changed.values())


def steer(
    model: MoEModel,
    targets: Iterable[Target] | Any = (),
    scale: float = 1.2,
    mode: Literal["scale", "bias", "mask"] = "scale",
    domain: str | None = None,
    spec: SteeringSpec | None = None,
    count_changes: bool = True,
) -> Steering:
    """Steer ``targets`` (pairs, a domain-expert or driver table, with ``domain``) by ``scale`` in ``mode``
    (``"mask"``: the targets can never be selected; ``scale`` is ignored).

    Use as ``with es.steer(model, targets, 1.2): ...`` or ``s = es.steer(...).attach(); ...; s.detach()``.
    ``count_changes=False`` skips the per-router-pass counts (``changed``/``seen``), which cost a re-route.
    """
    if spec is None:
        spec = SteeringSpec(targets=tuple(targets_from(targets, domain)), scale=scale, mode=mode)
    return Steering(model, spec, count_changes=count_changes)


def _check_fits(dtype: torch.dtype, value: float, site: RouterSite) -> None:
    """The steering factor (or its log) is representable in the router's dtype (float16 tops out at 65504)."""
    if dtype.is_floating_point and value > torch.finfo(dtype).max:
        raise ConfigError(f"steering scale {value:g} does not fit the {dtype} router logits at layer {site.layer} "
                          f"(largest {torch.finfo(dtype).max:g}): pass a factor near 1, e.g. 1.2")


def _check_no_overflow(site: RouterSite, z: torch.Tensor, new: torch.Tensor, scale: float) -> None:
    """Steered logits that overflow to ±inf (a huge scale times a large logit) would route on NaN: refuse."""
    if not bool(torch.isfinite(new).all()) and bool(torch.isfinite(z).all()):
        raise ConfigError(f"steering scale {scale:g} times the router logits at layer {site.layer} overflows "
                          f"{z.dtype}: pass a factor near 1, e.g. 1.2")
