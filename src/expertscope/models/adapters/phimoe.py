"""PhiMoE (``mlp.router``, an ``nn.Linear`` subclass): sparsemixer top-2, deterministic in eval mode."""

from __future__ import annotations

import torch

from .base import RouteOutput, RouterAdapter, RouterSite, register_adapter


@register_adapter
class PhimoeAdapter(RouterAdapter):
    family = "phimoe"
    class_names = ("transformers.models.phimoe.modeling_phimoe:PhimoeTopKRouter",)

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        w, idx = sparsemixer(logits, jitter_eps=0.01, training=False, top_k=top_k)
        return idx, w.float()

    def site_route(self, site: RouterSite, logits: torch.Tensor) -> RouteOutput:
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        w, idx = sparsemixer(logits, jitter_eps=site.module.router_jitter_noise, training=False, top_k=site.top_k)
        return idx, w.float()
