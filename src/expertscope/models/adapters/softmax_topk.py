"""Softmax → top-k routers: Mixtral (always renormalised), Qwen2-MoE, Qwen3-MoE, OLMoE and their copies
(renormalised iff ``norm_topk_prob``)."""

from __future__ import annotations

import torch
from torch import nn

from .base import RouteOutput, RouterAdapter, RouterSite, register_adapter, softmax_topk

_TM = "transformers.models"


@register_adapter
class MixtralAdapter(RouterAdapter):
    family = "mixtral"
    class_names = (f"{_TM}.mixtral.modeling_mixtral:MixtralTopKRouter",)

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        return softmax_topk(logits, top_k, renormalise=True)


@register_adapter
class QwenMoeAdapter(RouterAdapter):
    """Qwen2-MoE (with a sigmoid-gated shared expert), Qwen3-MoE, OLMoE and same-code descendants."""

    family = "qwen-moe"
    class_names = (
        f"{_TM}.qwen2_moe.modeling_qwen2_moe:Qwen2MoeTopKRouter",
        f"{_TM}.qwen3_moe.modeling_qwen3_moe:Qwen3MoeTopKRouter",
        f"{_TM}.olmoe.modeling_olmoe:OlmoeTopKRouter",
        f"{_TM}.flex_olmo.modeling_flex_olmo:FlexOlmoTopKRouter",
        f"{_TM}.qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeTextTopKRouter",
    )

    def site_route(self, site: RouterSite, logits: torch.Tensor) -> RouteOutput:
        return softmax_topk(logits, site.top_k, renormalise=bool(getattr(site.module, "norm_topk_prob", False)))

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        return softmax_topk(logits, top_k, renormalise=False)

    def make_site(self, layer: int, path: str, module: nn.Module, parent: nn.Module | None) -> RouterSite:
        site = super().make_site(layer, path, module, parent)
        site.info["norm_topk_prob"] = bool(getattr(module, "norm_topk_prob", False))
        return site
