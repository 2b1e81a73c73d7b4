"""How every figure of the report looks and is saved: the palette, rc settings, panel grids and
:func:`save_figure` (PNG and SVG, atomically, reproducibly). Figures are built on
:class:`matplotlib.figure.Figure` directly (rendered by the Agg and SVG backends), so nothing touches pyplot's
global state or needs a display. Colours: the Okabe–Ito palette for categories and cividis for magnitudes,
both readable with colour-vision deficiencies and in greyscale print.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_path, make_dirs

#: Okabe & Ito (2008) colour-blind-safe palette (black last, yellow late: it prints faintly).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

SEQUENTIAL = "cividis"

TYPE_COLOURS = {"general": "#56B4E9", "domain": "#0072B2", "driver": "#D55E00", "both": "#CC79A7",
                "other": "#E69F00", "below uniform": "#DDDDDD"}

MAX_PANELS = 12

_RC: dict[Any, Any] = {  # rc names; matplotlib's stub spells every key as a Literal
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "svg.hashsalt": "expertscope", "svg.fonttype": "none", "figure.dpi": 100,
    # layouts are always named per figure; these two make set_layout_engine(None) mean "no engine" in _save
    "figure.autolayout": False, "figure.constrained_layout.use": False,
}

def integer_ticks(ax: Any, x: bool = True, y: bool = False) -> None:
    """Whole-number ticks on the axes of counts and positions (MoE layers, expert ids): never 0.5 or 1.25."""
    from matplotlib.ticker import MaxNLocator

    if x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba`` (by its relative luminance)."""
    r, g, b = (float(c) for c in rgba[:3])
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def _empty(df: pd.DataFrame | None, *cols: str) -> bool:
    return df is None or len(df) == 0 or any(c not in df.columns for c in cols)

def _figure(n_panels: int, ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0)) -> tuple[Any, list[Any]]:
    """A Figure with ``n_panels`` axes on a grid of at most ``ncols`` columns; unused axes removed."""
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]

def save_figure(fig: Any, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name.png`` (150 dpi) and ``name.svg`` atomically, cropped to hold every artist (legends
    included); no timestamps, so reruns give equal files."""
    import matplotlib as mpl

    out = make_dirs(out_dir)
    paths = []
    with mpl.rc_context(_RC):
        # One layout and one bounding box for both files (savefig would redo both per format). The box is
        # the tight one: it grows the saved area to hold every artist, so a figure legend wider than its
        # panels (the t-SNE map's clusters + "driver expert") is never clipped.
        fig.set_dpi(150)
        fig.draw_without_rendering()
        bbox = fig.get_tightbbox(fig._get_renderer()).padded(0.05)
        # No engine at all, not "none" (a placeholder engine): with any engine set, savefig draws the whole
        # figure once more before it renders, per format, to settle a layout that is already fixed.
        fig.set_layout_engine(None)
        for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            path = out / f"{name}.{fmt}"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=150, metadata=meta, facecolor="white", bbox_inches=bbox)
            paths.append(path)
    return paths

def _pick(values: Sequence[Any], limit: int = MAX_PANELS) -> tuple[list[Any], bool]:
    """At most ``limit`` values, evenly spaced, and whether some were left out."""
    values = list(values)
    if len(values) <= limit:
        return values, False
    idx = np.unique(np.linspace(0, len(values) - 1, limit).round().astype(int))
    return [values[i] for i in idx], True

def _colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]

def _domains(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["domain"].astype(str)))

def _styled(build: Any) -> Any:
    """Run a figure builder with the package's rc settings (fonts, spines) in force."""
    import matplotlib as mpl

    with mpl.rc_context(_RC):
        return build()

def _shared_legend(fig: Any, axes: Sequence[Any], ncols: int) -> None:
    """One legend below the panels with each label once (the first panel's handle), none when no panel
    has a labelled artist."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols, frameon=False)

def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


__all__ = ["MAX_PANELS", "OKABE_ITO", "SEQUENTIAL", "TYPE_COLOURS", "save_figure"]
