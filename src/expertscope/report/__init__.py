"""Figures (PNG + SVG) and the self-contained HTML report of a run."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use: the CLI reads :mod:`.views` without loading matplotlib and the figure code.
_LAZY = {"write_figures": ".figures", "build_html": ".html", "load_tables": ".html", "report": ".html"}

if TYPE_CHECKING:
    from .figures import write_figures
    from .html import build_html, load_tables, report


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'expertscope.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = ["build_html", "load_tables", "report", "write_figures"]
