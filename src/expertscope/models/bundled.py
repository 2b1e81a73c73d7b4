"""Where the bundled demo models live. The paths sit here, below the loader, so that loading a model never
imports the demo's training code (``demo/`` depends on the library, never the reverse)."""

from __future__ import annotations

from pathlib import Path

DEMO_NAMES: dict[str, str] = {"demo": "model", "demo-deepseek": "model-deepseek"}
"""``--model`` name of each bundled demo -> its directory under ``expertscope/demo/assets/``."""

ASSETS = Path(__file__).resolve().parents[1] / "demo" / "assets"


def demo_model_path(name: str = "demo") -> Path:
    """The directory of a shipped demo model (a standard Hugging Face model directory)."""
    if name not in DEMO_NAMES:
        from ..errors import ConfigError

        raise ConfigError(f"unknown demo {name!r}: use one of {', '.join(DEMO_NAMES)}")
    return ASSETS / DEMO_NAMES[name]


__all__ = ["ASSETS", "DEMO_NAMES", "demo_model_path"]
