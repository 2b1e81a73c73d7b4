"""Figures (PNG + SVG) and the self-contained HTML report of a run."""

from .figures import write_figures
from .html import build_html, load_tables, report

__all__ = ["build_html", "load_tables", "report", "write_figures"]
