"""transformers-4.x style gates: a plain ``nn.Linear(H, E)`` inside a block whose forward does
softmax → top-k (→ renormalise) over an ``nn.ModuleList`` of expert modules.

Matched by structure: an ``nn.Linear`` whose parent has ``experts`` (a ModuleList of E modules, E the
gate's output size) and a ``top_k``. ``shared_expert_gate`` (``Linear(H, 1)``) never matches.
The block's routing is reproduced by :meth:`route`; the self-check compares it with which expert modules
the real block calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import RouteOutput, RouterAdapter, RouterSite, module_attr, register_adapter, softmax_topk


@register_adapter
class LinearGateAdapter(RouterAdapter):
    family = "linear-gate (transformers 4.x)"

    @classmethod
    def matches(cls, module: nn.Module, parent: nn.Module | None) -> bool:
        if type(module) is not nn.Linear or parent is None:
            return False
        experts = getattr(parent, "experts", None)
        return (
            isinstance(experts, nn.ModuleList)
            and len(experts) == module.out_features
            and module.out_features > 1
            and (hasattr(parent, "top_k") or hasattr(parent, "num_experts_per_tok"))
        )

    def num_experts(self, module: nn.Module, parent: nn.Module | None) -> int:
        return int(module_attr(module, "out_features"))

    def top_k(self, module: nn.Module, parent: nn.Module | None) -> int:
        return int(getattr(parent, "top_k", None) or module_attr(parent, "num_experts_per_tok"))

    def _renormalise(self, parent: nn.Module | None) -> bool:
        # Mixtral 4.x always renormalises; Qwen/OLMoE 4.x blocks carry norm_topk_prob.
        return bool(getattr(parent, "norm_topk_prob", True))

    def selection(self, site: RouterSite, output: Any, logits: torch.Tensor) -> RouteOutput:
        # The gate returns logits only; the block routes them as route() does (checked by verify).
        return self.site_route(site, logits)

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        return softmax_topk(logits, top_k, renormalise=True)

    def site_route(self, site: RouterSite, logits: torch.Tensor) -> RouteOutput:
        return softmax_topk(logits, site.top_k, renormalise=self._renormalise(site.block))

    def make_site(self, layer: int, path: str, module: nn.Module, parent: nn.Module | None) -> RouterSite:
        site = super().make_site(layer, path, module, parent)
        site.info["selection_from"] = "route"  # the gate returns logits only
        return site
