"""``MoEModel``: a causal LM, its tokenizer, and the router sites of its MoE layers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .adapters import find_adapter, supported_families
from .adapters.base import RouterSite
from .hooks import RouterHooks

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def discover_sites(model: nn.Module) -> list[RouterSite]:
    """Find every MoE router in ``model`` through the adapter registry; one site per MoE layer.

    The layer index is the first integer component of the router's module path (the decoder-layer index);
    dense layers have no router and so no site.
    """
    modules = dict(model.named_modules())
    sites: list[RouterSite] = []
    for path, module in modules.items():
        parent = modules.get(path.rpartition(".")[0]) if "." in path else model
        adapter = find_adapter(module, parent)
        if adapter is None:
            continue
        m = _LAYER_RE.search(path)
        layer = int(m.group(1)) if m else len(sites)
        sites.append(adapter.make_site(layer, path, module, parent))
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise ModelError(
            f"found {len(layers)} routers on {len(set(layers))} layers: models with several routers per layer "
            "are not supported yet; please report the model"
        )
    return sorted(sites, key=lambda s: s.layer)


def _looks_like_moe(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    if config is not None and any((getattr(config, k, 0) or 0) > 1 for k in keys):
        return True
    return any("expert" in type(m).__name__.lower() for m in model.modules())


def _probe_device(site: RouterSite) -> torch.device:
    hook = getattr(site.module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in site.module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _probe_dtype(site: RouterSite) -> torch.dtype:
    w = getattr(site.module, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else torch.float32


def _outputs_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, tuple | list):
        return isinstance(b, tuple | list) and len(a) == len(b) and all(map(_outputs_equal, a, b))
    return True  # non-tensor extras (aux losses as None, ...)


def verify_site(site: RouterSite, n_tokens: int = 32, seed: int = 0) -> None:
    """Check the adapter against the real router on random hidden states; raise ModelError on mismatch.

    Checks: (1) interception with no transform leaves the router's output bit-identical; (2) exactly one
    logits projection of shape ``(N, E)`` was intercepted; (3) the recorded selection has shape ``(N, k)``
    with valid expert ids; (4) the adapter's own ``route`` reproduces the model's selection (all tokens in
    fp32, ≥ 90% in lower precision where ties are common); for linear gates, the experts the block actually
    calls are counted instead.
    """
    dtype, device = _probe_dtype(site), _probe_device(site)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, site.adapter.hidden_size(site), generator=gen).to(device=device, dtype=dtype)
    adapter = site.adapter
    expert_counts: torch.Tensor | None = None
    with torch.no_grad():
        if site.info.get("selection_from") == "route":
            out0, out1, call, expert_counts = _verify_linear_gate(site, hidden)
        else:
            out0 = adapter.probe(site, hidden)
            with RouterHooks([site], record=True) as hooks:
                out1 = adapter.probe(site, hidden)
            call = hooks.calls[site.layer][0] if hooks.calls[site.layer] else None
    where = f"router {site.path} ({site.family})"
    if call is None:
        raise ModelError(f"{where}: no router call was recorded: please report the model")
    if not _outputs_equal(out0, out1):
        raise ModelError(f"{where}: interception changed the router output: please report the model")
    n, e, k = n_tokens, site.num_experts, site.top_k
    if tuple(call.logits.shape) != (n, e) or tuple(call.indices.shape) != (n, k):
        raise ModelError(
            f"{where}: expected logits {(n, e)} and selection {(n, k)}, got {tuple(call.logits.shape)} and "
            f"{tuple(call.indices.shape)}: please report the model"
        )
    if int(call.indices.min()) < 0 or int(call.indices.max()) >= e:
        raise ModelError(f"{where}: selected expert ids outside [0, {e}): please report the model")
    if expert_counts is not None:
        routed = torch.bincount(call.indices.flatten().cpu(), minlength=e)
        if not torch.equal(routed, expert_counts):
            raise ModelError(
                f"{where}: the block's experts saw {expert_counts.tolist()} tokens but the gate's routing "
                f"gives {routed.tolist()}: this block routes differently; please report the model"
            )
        return
    ref_idx, _ = adapter.site_route(site, call.logits.to(dtype))
    same = (ref_idx.sort(-1).values.cpu() == call.indices.sort(-1).values.cpu()).all(-1)
    needed = n if dtype == torch.float32 else int(0.9 * n)
    if int(same.sum()) < needed:
        raise ModelError(
            f"{where}: the adapter's routing disagrees with the model on {int((~same).sum())}/{n} tokens: "
            "this transformers version routes differently; please report the model and version"
        )
    site.info["route_check_tokens"] = int(same.sum())


def _verify_linear_gate(site: RouterSite, hidden: torch.Tensor) -> tuple[Any, Any, Any, torch.Tensor]:
    """Run the whole 4.x block, counting the rows each expert module receives."""
    block = site.block
    assert block is not None
    counts = torch.zeros(site.num_experts, dtype=torch.long)
    handles = []
    experts = block.experts
    if not isinstance(experts, nn.ModuleList):
        raise ModelError(f"{site.path}: the block's experts are not a ModuleList: please report the model")
    for i, expert in enumerate(experts):
        def count(_m: nn.Module, args: Any, i: int = i) -> None:
            counts[i] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        handles.append(expert.register_forward_pre_hook(count))
    try:
        x = hidden.unsqueeze(0)
        out0 = site.module(hidden)
        with RouterHooks([site], record=True) as hooks:
            out1 = site.module(hidden)
            counts.zero_()
            block(x)
        call = hooks.calls[site.layer][-1] if hooks.calls[site.layer] else None
    finally:
        for h in handles:
            h.remove()
    return out0, out1, call, counts


@dataclass
class MoEModel:
    """A causal LM with its tokenizer and one :class:`RouterSite` per MoE layer (sorted by layer)."""

    model: nn.Module
    tokenizer: Any = None
    sites: list[RouterSite] = field(default_factory=list)
    source: str = "<in-memory>"
    revision: str | None = None

    @classmethod
    def from_model(
        cls, model: nn.Module, tokenizer: Any = None, source: str = "<in-memory>", verify: bool = True
    ) -> MoEModel:
        """Wrap a loaded model: find its routers, refuse models it cannot adapt, self-check each router."""
        sites = discover_sites(model)
        name = type(model).__name__
        if not sites:
            if _looks_like_moe(model):
                raise ModelError(
                    f"{name} has MoE layers but no router expertscope can adapt: supported router families "
                    f"are {', '.join(supported_families())}"
                )
            raise ModelError(f"{name} has no MoE layers: expertscope needs a Mixture-of-Experts model")
        if verify:
            for site in sites:
                verify_site(site)
                site.verified = True
        model.eval()
        return cls(model=model, tokenizer=tokenizer, sites=sites, source=source)

    # ----- structure -----------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """MoE layer indices (decoder-layer numbering, dense layers excluded)."""
        return [s.layer for s in self.sites]

    def site(self, layer: int) -> RouterSite:
        for s in self.sites:
            if s.layer == layer:
                return s
        raise ModelError(f"no MoE layer {layer}: choose from MoE layers {self.layers}")

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (the maximum, should layers differ)."""
        return max(s.num_experts for s in self.sites)

    @property
    def top_k(self) -> int:
        return max(s.top_k for s in self.sites)

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.model.parameters() if p.device.type != "meta")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def context_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        n = getattr(config, "max_position_embeddings", None)
        return int(n) if n else None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for manifests."""
        return {
            "source": self.source,
            "revision": self.revision,
            "architecture": type(self.model).__name__,
            "families": sorted({s.family for s in self.sites}),
            "moe_layers": self.layers,
            "num_experts": {s.layer: s.num_experts for s in self.sites},
            "top_k": {s.layer: s.top_k for s in self.sites},
            "num_shared_experts": {s.layer: s.num_shared for s in self.sites},
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
        }

    def hooks(self, transforms: Any = None, record: bool | Any = False) -> RouterHooks:
        """Shorthand for :class:`RouterHooks` on this model."""
        return RouterHooks(self, transforms=transforms, record=record)
