"""Router interception: record and transform router logits before the model's own routing.

One context manager, :class:`RouterHooks`, installs a forward pre-hook and an always-called forward hook
on each chosen router. The pre-hook enters a ``TorchFunctionMode`` that is active only during that
router's forward; the mode intercepts the router's first ``F.linear`` call (its logits projection),
applies the transform, and lets the model's own softmax/sigmoid, grouping and top-k run unchanged on the
result. The forward hook leaves the mode and reads the selection from the router's output. Hooks (rather
than replacing ``forward``) keep this correct under accelerate's offload wrappers. All hooks are removed
in ``finally``, also after an exception inside the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError, ModelError
from .adapters.base import RouterSite

if TYPE_CHECKING:
    from .model import MoEModel

#: ``transform(site, logits) -> logits``; logits ``(N, E)`` in the router's own dtype, N = tokens of the call.
LogitTransform = Callable[[RouterSite, torch.Tensor], torch.Tensor]


@dataclass
class RouterCall:
    """What one router call decided, for the ``N`` tokens it saw (batch-major, padding included).

    ``logits`` ``(N, E)`` fp32, after any transform, exactly what the routing used; ``indices`` ``(N, k)``
    int64, the selected experts; ``weights`` ``(N, k)`` fp32, the gate weights multiplying their outputs.
    """

    logits: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


#: ``after(func, args, out) -> out``: sees every torch call the router makes after its logits (masking).
AfterLogits = Callable[[Any, tuple, Any], Any]


class _LogitsMode(TorchFunctionMode):
    """Applies ``handler`` to the result of the first ``F.linear`` call made while the mode is active, and
    ``after`` (if given) to every later call's result (a mask reaching a family's choice scores)."""

    def __init__(self, handler: Callable[[torch.Tensor], torch.Tensor], after: AfterLogits | None = None) -> None:
        super().__init__()
        self.handler = handler
        self.after = after
        self.logits: torch.Tensor | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.logits is None:
            if func is F.linear:
                out = self.handler(out)
                self.logits = out
        elif self.after is not None:
            out = self.after(func, args, out)
        return out


def _resolve_sites(target: MoEModel | Iterable[RouterSite]) -> list[RouterSite]:
    from ..errors import InputTypeError

    sites = getattr(target, "sites", target)
    expected = "an MoEModel (es.load_model(...)) or a list of its RouterSites (model.sites)"
    if isinstance(sites, str | bytes) or not hasattr(sites, "__iter__"):
        raise InputTypeError(f"target is a {type(target).__name__}, not {expected}")
    out = list(cast("Iterable[RouterSite]", sites))
    bad = next((s for s in out if not isinstance(s, RouterSite)), None)
    if bad is not None:
        raise InputTypeError(f"target holds a {type(bad).__name__}, not a RouterSite: pass {expected}")
    return out


class _Interceptor:
    """The one pair of hooks on a router module, shared by every active :class:`RouterHooks`.

    Sharing keeps a single ``TorchFunctionMode`` per router call, so several users (steering while
    recording, say) never leave torch's mode stack out of order. Transforms apply in the order the users
    were entered; every recorder sees the final logits, the ones the routing used.
    """

    def __init__(self, site: RouterSite) -> None:
        self.site = site
        self.clients: list[RouterHooks] = []
        self.handles: list[Any] = []
        self.modes: list[_LogitsMode] = []
        self.choice_seen = True

    def add(self, client: RouterHooks) -> None:
        if not self.clients:
            m = self.site.module
            self.handles = [
                m.register_forward_pre_hook(self._pre),
                m.register_forward_hook(self._post, always_call=True),
            ]
        self.clients.append(client)

    def remove(self, client: RouterHooks) -> None:
        if client in self.clients:
            self.clients.remove(client)
        if not self.clients:
            for h in self.handles:
                h.remove()
            self.handles = []
            while self.modes:  # left open only if a router raised before its forward hook ran
                self.modes.pop().__exit__(None, None, None)
            _INTERCEPTORS.pop(self.site.module, None)

    def _masked(self) -> list[int]:
        """The experts some active client masks at this layer (never selectable), sorted."""
        out: set[int] = set()
        for client in self.clients:
            out.update(client.masks.get(self.site.layer, ()))
        return sorted(out)

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        for client in self.clients:
            fn = client.transforms.get(self.site.layer)
            if fn is not None:
                logits = fn(self.site, logits)
        masked = self._masked()
        if masked:
            # -inf before the family's own softmax/sigmoid, grouping and top-k: the token goes to its next choice.
            logits = self.site.adapter.mask_logits(self.site, logits, masked)
        return logits

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        masked = self._masked()
        after = None
        if masked and self.site.adapter.masks_choice:
            # Families that add a correction after the logits (DeepSeek-V3's bias) need the mask there too.
            self.choice_seen = False

            def after(func: Any, fargs: tuple, out: Any) -> Any:
                new = self.site.adapter.mask_choice(self.site, func, fargs, out, masked)
                if new is not out:
                    self.choice_seen = True
                return new
        mode = _LogitsMode(self._transform, after)
        mode.__enter__()
        self.modes.append(mode)

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self.modes:
            return
        mode = self.modes.pop()
        mode.__exit__(None, None, None)
        if output is None:  # the router raised; torch re-raises that error after this hook
            return
        site = self.site
        if mode.logits is None:
            raise ModelError(
                f"router at {site.path} computed its logits without F.linear: this router is not "
                "supported by the installed expertscope; please report the model and transformers version"
            )
        if mode.after is not None and not self.choice_seen:
            raise ModelError(
                f"router at {site.path}: the mask could not reach its choice scores (the {site.family} code "
                "changed); mode='mask' is not supported for this router: please report the transformers version"
            )
        recorders = [c for c in self.clients if site.layer in c.record_layers]
        if not recorders:
            return
        logits = mode.logits.reshape(-1, site.num_experts)
        idx, w = site.adapter.selection(site, output, logits)
        call = RouterCall(logits.float(), idx, w.float())
        detached = RouterCall(call.logits.detach(), call.indices.detach(), call.weights.detach())
        for c in recorders:
            if c.on_call is not None:
                c.on_call(site, detached if c.detach else call)
            else:
                c.calls[site.layer].append(detached if c.detach else call)


_INTERCEPTORS: weakref.WeakKeyDictionary[torch.nn.Module, _Interceptor] = weakref.WeakKeyDictionary()


class RouterHooks:
    """Context manager recording router decisions and/or transforming router logits.

    ``transforms`` maps MoE layer index → :data:`LogitTransform`; ``masks`` maps a layer to experts that can
    never be selected there (their logits set to ``-inf``, or the family's equivalent, before its own
    softmax/sigmoid, grouping, bias correction and top-k: the token goes to its next choice); ``record`` is
    ``True`` (all layers), ``False``, or the layers to record. Recorded calls accumulate in ``calls[layer]``
    (one :class:`RouterCall` per router forward, e.g. one per generation step), or go to
    ``on_call(site, call)`` instead when given (nothing is kept). Several RouterHooks may be active at once
    on the same model; their transforms compose in the order they were entered, masks apply after them.
    """

    def __init__(
        self,
        target: MoEModel | Iterable[RouterSite],
        transforms: Mapping[int, LogitTransform] | None = None,
        record: bool | Iterable[int] = False,
        detach: bool = True,
        masks: Mapping[int, Iterable[int]] | None = None,
        on_call: Callable[[RouterSite, RouterCall], None] | None = None,
    ) -> None:
        self.sites = _resolve_sites(target)
        by_layer = {s.layer: s for s in self.sites}
        self.transforms = dict(transforms or {})
        self.masks = {int(layer): sorted({int(e) for e in experts}) for layer, experts in (masks or {}).items()}
        self.on_call = on_call
        for layer, experts in self.masks.items():
            site = by_layer.get(layer)
            if site is None:
                raise ConfigError(f"no MoE layer {layer} to mask: choose from MoE layers {sorted(by_layer)}")
            bad = [e for e in experts if not 0 <= e < site.num_experts]
            if bad:
                raise ConfigError(f"expert {bad[0]} does not exist at layer {layer}: choose 0..{site.num_experts - 1}")
            if site.num_experts - len(experts) < site.top_k:
                raise ConfigError(
                    f"masking {len(experts)} of {site.num_experts} experts at layer {layer} leaves fewer than its "
                    f"top-{site.top_k}: mask at most {site.num_experts - site.top_k}")
        unknown = sorted(set(self.transforms) - set(by_layer))
        if unknown:
            raise ConfigError(
                f"no MoE layer {unknown[0]} in this model: choose from MoE layers {sorted(by_layer)}"
            )
        if record is True:
            self.record_layers = set(by_layer)
        elif record is False:
            self.record_layers = set()
        else:
            self.record_layers = set(record)
            bad = sorted(self.record_layers - set(by_layer))
            if bad:
                raise ConfigError(f"no MoE layer {bad[0]} to record: choose from MoE layers {sorted(by_layer)}")
        self.detach = detach
        self.calls: dict[int, list[RouterCall]] = {layer: [] for layer in sorted(self.record_layers)}
        self._active = [s for s in self.sites
                        if s.layer in self.transforms or s.layer in self.record_layers or self.masks.get(s.layer)]
        self._entered: list[_Interceptor] = []

    def __enter__(self) -> RouterHooks:
        try:
            for site in self._active:
                icpt = _INTERCEPTORS.get(site.module)
                if icpt is None:
                    icpt = _INTERCEPTORS[site.module] = _Interceptor(site)
                icpt.add(self)
                self._entered.append(icpt)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._entered:
            self._entered.pop().remove(self)

    def clear(self) -> None:
        """Drop the recorded calls (between batches)."""
        for calls in self.calls.values():
            calls.clear()
