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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


class _LogitsMode(TorchFunctionMode):
    """Applies ``handler`` to the result of the first ``F.linear`` call made while the mode is active."""

    def __init__(self, handler: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.handler = handler
        self.logits: torch.Tensor | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.logits is None and func is F.linear:
            out = self.handler(out)
            self.logits = out
        return out


def _resolve_sites(target: MoEModel | Iterable[RouterSite]) -> list[RouterSite]:
    sites = getattr(target, "sites", target)
    return list(sites)


class RouterHooks:
    """Context manager recording router decisions and/or transforming router logits.

    ``transforms`` maps MoE layer index → :data:`LogitTransform`; ``record`` is ``True`` (all layers),
    ``False``, or the layers to record. Recorded calls accumulate in ``calls[layer]`` (one
    :class:`RouterCall` per router forward, e.g. one per generation step).
    """

    def __init__(
        self,
        target: MoEModel | Iterable[RouterSite],
        transforms: Mapping[int, LogitTransform] | None = None,
        record: bool | Iterable[int] = False,
        detach: bool = True,
    ) -> None:
        self.sites = _resolve_sites(target)
        by_layer = {s.layer: s for s in self.sites}
        self.transforms = dict(transforms or {})
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
        self._active = [s for s in self.sites if s.layer in self.transforms or s.layer in self.record_layers]
        self._handles: list[Any] = []
        self._modes: dict[int, list[_LogitsMode]] = {}

    # ----- hook bodies ---------------------------------------------------------------------------
    def _pre_hook(self, site: RouterSite) -> Callable[..., None]:
        transform = self.transforms.get(site.layer)

        def handler(logits: torch.Tensor) -> torch.Tensor:
            return logits if transform is None else transform(site, logits)

        def pre(module: torch.nn.Module, args: Any) -> None:
            mode = _LogitsMode(handler)
            mode.__enter__()
            self._modes.setdefault(site.layer, []).append(mode)

        return pre

    def _post_hook(self, site: RouterSite) -> Callable[..., None]:
        record = site.layer in self.record_layers

        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            stack = self._modes.get(site.layer)
            if not stack:
                return
            mode = stack.pop()
            mode.__exit__(None, None, None)
            if output is None:  # the router raised; torch re-raises that error after this hook
                return
            if mode.logits is None:
                raise ModelError(
                    f"router at {site.path} computed its logits without F.linear: this router is not "
                    "supported by the installed expertscope; please report the model and transformers version"
                )
            if record:
                logits = mode.logits.reshape(-1, site.num_experts)
                idx, w = site.adapter.selection(site, output, logits)
                call = RouterCall(logits.float(), idx, w.float())
                if self.detach:
                    call = RouterCall(call.logits.detach(), call.indices.detach(), call.weights.detach())
                self.calls[site.layer].append(call)

        return post

    # ----- context management --------------------------------------------------------------------
    def __enter__(self) -> RouterHooks:
        try:
            for site in self._active:
                self._handles.append(site.module.register_forward_pre_hook(self._pre_hook(site)))
                self._handles.append(site.module.register_forward_hook(self._post_hook(site), always_call=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        # A mode left open only if a router raised before its forward hook ran.
        for stack in self._modes.values():
            while stack:
                stack.pop().__exit__(None, None, None)

    def clear(self) -> None:
        """Drop the recorded calls (between batches)."""
        for calls in self.calls.values():
            calls.clear()
