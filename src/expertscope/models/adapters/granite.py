"""GraniteMoE (``block_sparse_moe.router``): fp32 logits, top-k, softmax over the k."""

from __future__ import annotations

import torch

from .base import RouteOutput, RouterAdapter, register_adapter, topk_then_softmax

_TM = "transformers.models"


@register_adapter
class GraniteMoeAdapter(RouterAdapter):
    family = "granitemoe"
    class_names = (
        f"{_TM}.granitemoe.modeling_granitemoe:GraniteMoeTopKRouter",
        f"{_TM}.granitemoeshared.modeling_granitemoeshared:GraniteMoeSharedTopKRouter",
    )

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        return topk_then_softmax(logits, top_k)
