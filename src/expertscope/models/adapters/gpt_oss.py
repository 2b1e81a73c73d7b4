"""GPT-OSS (``mlp.router``, with bias): top-k on the logits, softmax over the k."""

from __future__ import annotations

import torch

from .base import RouteOutput, RouterAdapter, register_adapter, topk_then_softmax


@register_adapter
class GptOssAdapter(RouterAdapter):
    family = "gpt-oss"
    class_names = ("transformers.models.gpt_oss.modeling_gpt_oss:GptOssTopKRouter",)

    def route(self, logits: torch.Tensor, top_k: int) -> RouteOutput:
        return topk_then_softmax(logits, top_k)
