"""DeepSeek-MoE-16B style remote-code ``MoEGate``: softmax, top-k, not renormalised; returns
``(topk_idx, topk_weight, aux_loss)`` and takes ``(batch, seq, hidden)``.

Remote classes are created at load time from the checkpoint's own code, so this adapter matches by class
name plus structure (a ``weight`` of shape ``(E, H)`` and ``top_k``/``n_routed_experts`` attributes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import RouteOutput, RouterAdapter, RouterSite, module_attr, register_adapter, softmax_topk


@register_adapter
class RemoteMoEGateAdapter(RouterAdapter):
    family = "deepseek-moe (remote MoEGate)"

    @classmethod
    def matches(cls, module: nn.Module, parent: nn.Module | None) -> bool:
        return (
            type(module).__name__ == "MoEGate"
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and hasattr(module, "top_k")
            and hasattr(module, "n_routed_experts")
        )

    def num_experts(self, module: nn.Module, parent: nn.Module | None) -> int:
        return int(module_attr(module, "n_routed_experts"))

    def num_shared(self, module: nn.Module, parent: nn.Module | None) -> int:
        config = getattr(parent, "config", None)
        return int(getattr(config, "n_shared_experts", 0) or 0)

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        return softmax_topk(logits, top_k, renormalise=False)

    def site_route(self, site: RouterSite, logits: torch.Tensor) -> RouteOutput:
        norm = bool(getattr(site.module, "norm_topk_prob", False)) and site.top_k > 1
        return softmax_topk(logits, site.top_k, renormalise=norm)

    def probe(self, site: RouterSite, hidden: torch.Tensor) -> Any:
        return site.module(hidden.unsqueeze(0))
