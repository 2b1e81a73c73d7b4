"""The bundled demos: small MoEs trained on the synthetic three-domain benchmark.

``demo`` is Mixtral-style (8 experts, top-2); ``demo-deepseek`` is DeepSeek-MoE-like (16 fine-grained routed
experts, top-4, plus a shared expert; a Qwen2-MoE model).
"""

from __future__ import annotations

from ..models.bundled import DEMO_NAMES, demo_model_path

__all__ = ["DEMO_NAMES", "demo_model_path"]
