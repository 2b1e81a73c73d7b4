"""The building blocks of a report page: sortable, filterable tables, figures, readings, notes and
inline-SVG heatmaps with hover values. Each returns an HTML string; values are escaped here."""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .copy import CAPTIONS, COLUMN_HELP
from .sentences import format_number

#: Rows a table embeds at most (the page shows ``rows`` of them at a time); the full table is the file.
MAX_ROWS = 3000

# ----- blocks: what a section is made of -----------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)

def _cell(v: Any) -> tuple[str, str | None]:
    """A table cell's text and its sort key (``data-v``: the full-precision number; ``None`` for text)."""
    if isinstance(v, bool | np.bool_):
        return ("yes" if v else ""), ("1" if v else "0")
    if isinstance(v, int | np.integer):
        return str(int(v)), str(int(v))
    if isinstance(v, float | np.floating):
        f = float(v)
        return format_number(f), (None if np.isnan(f) else repr(f))
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "", None
    return _e(v), None

def table_html(df: pd.DataFrame | None, columns: list[str] | None = None, rows: int = 15,
               title: str | None = None, source: str | None = None) -> str:
    """``df`` (only ``columns`` that exist, in that order) as an explorable table: click a header to sort,
    type in the box to filter, ``rows`` rows shown at a time. Each row carries its ``domain`` for the domain
    selector; numbers keep their full precision in ``data-v`` for sorting. At most :data:`MAX_ROWS` rows are
    embedded (``source`` names the file holding all of them). Cells are escaped."""
    if df is None or not len(df):
        return (f"<h3>{_e(title)}</h3>" if title else "") + "<p class='note'>(no rows)</p>"
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    # A column with nothing in it (e.g. every steering condition applicable: no status) only takes room.
    cols = [c for c in cols if not (df[c].isna() | df[c].astype(str).eq("")).all()] or cols
    shown = df[cols].head(MAX_ROWS)
    numeric = {c: pd.api.types.is_numeric_dtype(shown[c]) for c in cols}  # flags too: first click puts "yes" first
    head = "".join(
        f"<th data-col='{_e(c)}' data-num='{int(numeric[c])}' aria-sort='none' tabindex='0' "
        f"title='{_e(COLUMN_HELP.get(c, c))} (click to sort)'>{_e(c)}</th>" for c in cols)
    domains = df["domain"].astype(str).head(MAX_ROWS).tolist() if "domain" in df.columns else None
    body = []
    for i, r in enumerate(shown.itertuples(index=False)):
        cells = []
        for v in r:
            text, key = _cell(v)
            cells.append(f"<td data-v='{key}'>{text}</td>" if key is not None else f"<td>{text}</td>")
        attr = f" data-domain='{_e(domains[i])}'" if domains is not None else ""
        body.append(f"<tr{attr}>{''.join(cells)}</tr>")
    cut = (f"<p class='note'>The first {MAX_ROWS} of {len(df)} rows; "
           f"{_e(source) if source else 'the table file'} holds all of them.</p>") if len(df) > MAX_ROWS else ""
    bar = ("<div class='xt-bar'><input type='search' class='xt-q' aria-label='filter rows' "
           "placeholder='filter: words, column=value or column&gt;number'>"
           "<span class='xt-n'></span><button type='button' class='xt-more' hidden>show all</button></div>")
    return ((f"<h3>{_e(title)}</h3>" if title else "") +
            f"<div class='xt' data-page='{int(rows)}'>{bar}<div class='xt-scroll'><table class='tbl'><thead><tr>"
            f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{cut}</div>")

def _figure_html(paths: list[Path] | None, caption: str) -> str:
    png = next((p for p in paths or [] if p.suffix == ".png"), None)
    if png is None:
        return ""
    raw = png.read_bytes()
    # Figures are saved at 150 dpi; shown at 100 dpi they have the size they were designed at (fonts match
    # the text) rather than 1.5 times it. The PNG header holds the width in pixels (bytes 16-19).
    width = int.from_bytes(raw[16:20], "big") * 2 // 3 if raw[:8] == b"\x89PNG\r\n\x1a\n" else 0
    style = f" style='width:{width}px'" if width else ""
    data = base64.b64encode(raw).decode("ascii")
    return (f"<figure><img alt='{_e(caption)}'{style} src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")

def figure(figures: dict[str, list[Path]], name: str, **fill: str) -> str:
    """The figure ``name`` (as written by :func:`write_figures`) inlined as PNG, captioned from
    :data:`~.copy.CAPTIONS` (the longest caption key ``name`` starts with; ``fill`` fills its
    ``{placeholders}``); ``""`` if the figure was not drawn."""
    key = max((k for k in CAPTIONS if name.startswith(k)), key=len, default=None)
    caption = CAPTIONS[key].format(**fill) if key else ""
    return _figure_html(figures.get(name), caption)

def reading(lines: Sequence[str]) -> str:
    """A section's plain-language reading: sentences from :mod:`.findings` (a :class:`Sentence` about one
    domain is shown only when that domain, or all, is selected)."""
    items = [x for x in lines if x]
    if not items:
        return ""
    lis = "".join(f"<li data-domain='{_e(d)}'>{_e(x)}</li>" if (d := getattr(x, "domain", None)) else
                  f"<li>{_e(x)}</li>" for x in items)
    return f"<div class='reading'><strong>Reading.</strong><ul>{lis}</ul></div>"

def note(text: str) -> str:
    """A short note under a figure or table (text from :mod:`.findings`)."""
    return f"<p class='note'>{_e(text)}</p>" if text else ""

def details(summary: str, body: str) -> str:
    """``body`` folded away under ``summary`` (long tables a reader opens on demand)."""
    return f"<details><summary>{_e(summary)}</summary>{body}</details>" if body else ""

def _colours(values: np.ndarray, cmap: str, scale: tuple[float, float] | None = None
             ) -> tuple[list[str], float, float]:
    """Hex colours of ``values`` on ``cmap`` scaled to ``scale`` (default: their finite range); grey for NaN."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if scale is not None:
        lo, hi = scale
    span = hi - lo if hi > lo else 1.0
    cm = colormaps[cmap]
    return [to_hex(cm((v - lo) / span)) if np.isfinite(v) else "#e6e6e6" for v in values], lo, hi

def heatmap(df: pd.DataFrame | None, value: str, *, label: str, unit: str = "", flag: str | None = None,
            flag_label: str = "", rows: str = "layer", cols: str = "expert", by: str | None = "domain",
            cmap: str = "cividis_r", caption: str = "", shared: bool = True) -> str:
    """One inline-SVG heatmap of ``value`` (``rows`` × ``cols``) per ``by`` value, on one colour scale for all of
    them so that domains compare (``shared=False``: a scale each; darker = larger with the default map), and
    cells where ``flag`` is true boxed; ``by=None``: one
    heatmap of all rows. Hovering a cell shows ``rows``, ``cols`` and the value as the tables print it
    (``data-v``); a heatmap per domain carries ``data-domain`` for the domain selector. ``""`` when ``df``
    lacks the columns."""
    if df is None or not len(df) or not {value, rows, cols, by or rows} <= set(df.columns):
        return ""
    row_keys = sorted(df[rows].unique())
    col_keys = sorted(df[cols].unique())
    nr, nc = len(row_keys), len(col_keys)
    cw = float(max(3, min(36, 640 // max(nc, 1))))  # a few experts get wide cells: domains side by side read
    ch = float(max(4, min(24, 360 // max(nr, 1))))
    ml, mt, mb = min(200, max(44, 7 * max(len(str(r)) for r in row_keys) + 10)), 18, 40  # room for row labels
    width, height = max(ml + nc * cw + 12, ml + 330), mt + nr * ch + mb
    rstep, cstep = max(1, -(-nr // 32)), max(1, -(-nc // 24))
    out = []
    groups = [(str(d), g) for d, g in df.groupby(df[by].astype(str), sort=False)] if by else [("", df)]
    every = df[value].to_numpy(dtype=float)
    every = every[np.isfinite(every)]
    scale = (float(every.min()), float(every.max())) if shared and every.size else None
    for k, (d, g) in enumerate(groups):
        grid = g.pivot_table(index=rows, columns=cols, values=value, aggfunc="mean").reindex(
            index=row_keys, columns=col_keys)
        vals = grid.to_numpy(dtype=float)
        fl = (g.pivot_table(index=rows, columns=cols, values=flag, aggfunc="max").reindex(
            index=row_keys, columns=col_keys).fillna(False).to_numpy(dtype=bool)
            if flag and flag in g.columns else np.zeros_like(vals, dtype=bool))
        colours, lo, hi = _colours(vals.ravel(), cmap, scale)
        cells, boxes = [], []
        for i in range(nr):
            for j in range(nc):
                v = vals[i, j]
                f = " data-f='1'" if fl[i, j] else ""
                cells.append(f"<rect x='{j * cw:g}' y='{i * ch:g}' width='{cw:g}' height='{ch:g}' "
                             f"fill='{colours[i * nc + j]}' data-v='{format_number(v)}'{f}/>")
                if fl[i, j]:
                    boxes.append(f"<rect x='{j * cw + 1:g}' y='{i * ch + 1:g}' width='{cw - 2:g}' height='{ch - 2:g}' "
                                 "fill='none' stroke='#D55E00' stroke-width='2' pointer-events='none'/>")
        rlab = "".join(f"<text x='{ml - 4}' y='{mt + (i + 0.5) * ch:g}' text-anchor='end' dominant-baseline='middle'>"
                       f"{_e(row_keys[i])}</text>" for i in range(0, nr, rstep))
        clab = "".join(f"<text x='{ml + (j + 0.5) * cw:g}' y='{mt - 5}' text-anchor='middle'>{_e(col_keys[j])}</text>"
                       for j in range(0, nc, cstep))
        gid = "hm" + hashlib.sha1(f"{value}|{rows}|{cols}|{label}|{d}|{k}".encode()).hexdigest()[:10]
        stops = "".join(f"<stop offset='{t:g}' stop-color='{c}'/>" for t, c in
                        zip(np.linspace(0, 1, 9), _colours(np.linspace(0, 1, 9), cmap)[0], strict=True))
        bar_y = mt + nr * ch + 10
        legend = (f"<defs><linearGradient id='{gid}'>{stops}</linearGradient></defs>"
                  f"<rect x='{ml}' y='{bar_y}' width='140' height='8' fill='url(#{gid})'/>"
                  f"<text x='{ml}' y='{bar_y + 20}'>{_e(format_number(lo))}</text>"
                  f"<text x='{ml + 140}' y='{bar_y + 20}' text-anchor='end'>{_e(format_number(hi))} {_e(unit)}</text>"
                  f"<text x='{ml + 160}' y='{bar_y + 8}'>{_e(rows)} ↓ · {_e(cols)} →</text>")
        meta = {"rows": "|".join(map(str, row_keys)), "cols": "|".join(map(str, col_keys)), "rname": rows,
                "cname": cols, "vname": label, "unit": unit, "fname": flag_label, "cw": f"{cw:g}", "ch": f"{ch:g}"}
        attrs = " ".join(f"data-{a}='{_e(b)}'" for a, b in meta.items())
        head = (f"<figure data-domain='{_e(d)}'><figcaption><strong>{_e(d)}</strong></figcaption>" if by
                else "<figure>")
        out.append(
            head + f"<svg class='hm' xmlns='http://www.w3.org/2000/svg' width='{width:g}' height='{height:g}' "
            f"viewBox='0 0 {width:g} {height:g}' font-size='10' font-family='sans-serif' role='img' "
            f"aria-label='{_e(label)} per {_e(rows)} and {_e(cols)}, {_e(d)}' {attrs}>"
            f"{rlab}{clab}<g transform='translate({ml},{mt})'>{''.join(cells)}{''.join(boxes)}</g>{legend}</svg>"
            "</figure>")
    cap = f"<p class='note'>{_e(caption)}</p>" if caption else ""
    return f"<div class='hms'>{''.join(out)}</div>{cap}"

def _safe(fn: Callable[..., list[Any]], *args: Any) -> list[Any]:
    try:
        return fn(*args)
    except Exception as e:  # a reading is a courtesy: never lose the report over one
        return [f"(no reading: {type(e).__name__})"]


__all__ = ["MAX_ROWS", "details", "figure", "heatmap", "note", "reading", "table_html"]
