"""DeepSeek-V2 (softmax, greedy or group-limited greedy, scaled, never renormalised) and DeepSeek-V3
(sigmoid, bias-corrected grouped top-k, unbiased weights renormalised iff ``norm_topk_prob``, scaled)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import RouteOutput, RouterAdapter, RouterSite, module_attr, register_adapter

_TM = "transformers.models"


def _group_mask(scores: torch.Tensor, group_scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Boolean mask ``(N, E)`` of the experts inside each token's ``topk_group`` best groups."""
    n, e = scores.shape
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return gmask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e).bool()


@register_adapter
class DeepseekV2Adapter(RouterAdapter):
    family = "deepseek-v2"
    class_names = (f"{_TM}.deepseek_v2.modeling_deepseek_v2:DeepseekV2TopkRouter",)

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        return self._route(logits, top_k, "greedy", 1, 1, 1.0)

    def site_route(self, site: RouterSite, logits: torch.Tensor) -> RouteOutput:
        m: Any = site.module  # routing settings are plain attributes (nn.Module types them Tensor | Module)
        return self._route(logits, site.top_k, m.topk_method, m.num_group, m.topk_group, m.routed_scaling_factor)

    @staticmethod
    def _route(
        logits: torch.Tensor, top_k: int, method: str, n_group: int, topk_group: int, scale: float
    ) -> RouteOutput:
        scores = logits.float().softmax(dim=-1)
        if method == "group_limited_greedy":
            n, e = scores.shape
            group_scores = scores.view(n, n_group, e // n_group).max(dim=-1).values
            scores = scores.masked_fill(~_group_mask(scores, group_scores, n_group, topk_group), 0.0)
        w, idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
        return idx, w * scale

    def make_site(self, layer: int, path: str, module: nn.Module, parent: nn.Module | None) -> RouterSite:
        site = super().make_site(layer, path, module, parent)
        site.info.update(topk_method=module_attr(module, "topk_method"),
                         routed_scaling_factor=float(module_attr(module, "routed_scaling_factor")))
        return site


@register_adapter
class DeepseekV3Adapter(RouterAdapter):
    """Also GLM-4-MoE and dots.llm1, whose routers are DeepSeek-V3's."""

    family = "deepseek-v3"
    class_names = (
        f"{_TM}.deepseek_v3.modeling_deepseek_v3:DeepseekV3TopkRouter",
        f"{_TM}.glm4_moe.modeling_glm4_moe:Glm4MoeTopkRouter",
        f"{_TM}.dots1.modeling_dots1:Dots1TopkRouter",
    )

    #: A -inf logit gives sigmoid 0, but the correction bias is added after it for the choice: the mask
    #: must set the choice score (``sigmoid + e_score_correction_bias``) itself to -inf, before grouping.
    masks_choice = True

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        scores = logits.float().sigmoid()
        w, idx = torch.topk(scores, top_k, dim=-1)
        return idx, w

    def mask_choice(self, site: RouterSite, func: Any, args: tuple, out: Any, experts: list[int]) -> Any:
        bias = getattr(site.module, "e_score_correction_bias", None)
        if (bias is None or not isinstance(out, torch.Tensor) or out.shape[-1] != site.num_experts
                or not any(a is bias for a in args)):
            return out
        idx = torch.as_tensor(experts, dtype=torch.long, device=out.device)
        return out.index_fill(-1, idx, float("-inf"))

    def site_route(self, site: RouterSite, logits: torch.Tensor) -> RouteOutput:
        m: Any = site.module  # routing settings are plain attributes (nn.Module types them Tensor | Module)
        scores = logits.float().sigmoid()
        choice = scores + m.e_score_correction_bias.float()
        n, e = scores.shape
        group_scores = choice.view(n, m.num_group, e // m.num_group).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_group_mask(scores, group_scores, m.num_group, m.topk_group), float("-inf"))
        idx = torch.topk(choice, k=site.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if m.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * m.routed_scaling_factor

    def make_site(self, layer: int, path: str, module: nn.Module, parent: nn.Module | None) -> RouterSite:
        site = super().make_site(layer, path, module, parent)
        m: Any = module
        site.info.update(n_group=int(m.num_group), topk_group=int(m.topk_group), norm_topk_prob=bool(m.norm_topk_prob))
        return site
