"""The bundled demos: small MoEs trained on the synthetic three-domain benchmark.

``demo`` is Mixtral-style (8 experts, top-2); ``demo-deepseek`` is DeepSeek-MoE-like (16 fine-grained routed
experts, top-4, plus a shared expert; a Qwen2-MoE model).
"""

from __future__ import annotations

from pathlib import Path

DEMO_NAMES: dict[str, str] = {"demo": "model", "demo-deepseek": "model-deepseek"}
"""``--model`` name of each bundled demo -> its directory under ``assets/``."""


def demo_model_path(name: str = "demo") -> Path:
    """The directory of a shipped demo model (a standard Hugging Face model directory)."""
    if name not in DEMO_NAMES:
        from ..errors import ConfigError

        raise ConfigError(f"unknown demo {name!r}: use one of {', '.join(DEMO_NAMES)}")
    return Path(__file__).parent / "assets" / DEMO_NAMES[name]


__all__ = ["DEMO_NAMES", "demo_model_path"]
