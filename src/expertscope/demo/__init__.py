"""The bundled demo: a small Mixtral-style MoE trained on the synthetic three-domain benchmark."""

from __future__ import annotations

from pathlib import Path


def demo_model_path() -> Path:
    """The directory of the shipped demo model (a standard Hugging Face model directory)."""
    return Path(__file__).parent / "assets" / "model"


__all__ = ["demo_model_path"]
