"""Figures (PNG + SVG) and the self-contained HTML report of a run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

# Imported on first use: the CLI reads :mod:`.views` without loading matplotlib and the figure code.
_LAZY = {"write_figures": ".figures", "build_html": ".html", "load_tables": ".html", "report": ".html"}

if TYPE_CHECKING:
    from .figures import write_figures
    from .html import build_html, load_tables, report


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = ["build_html", "load_tables", "report", "write_figures"]
