"""Every figure of a report, drawn once: :func:`write_figures` draws the figures whose tables are present
(:mod:`.paper_figures`, :mod:`.beyond_figures`) and keeps those whose tables and drawing code are unchanged."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_path
from .beyond_figures import fig_coactivation, fig_dose, fig_paths, fig_routing_overlap, fig_selectivity, pooled_lift
from .paper_figures import (
    fig_causal_heatmap,
    fig_causal_layers,
    fig_causal_rate,
    fig_cwas,
    fig_expert_map,
    fig_expert_types,
    fig_positions,
    fig_routing_mi,
    fig_steering,
    fig_steering_sweep,
)

# ----- all -----------------------------------------------------------------------------------------------
#: The figures of a report: ``(name, draw, the tables it draws)``; ``draw(first table, out_dir, *the others)``.
_FIGURES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("fig1_cwas", fig_cwas, ("domain_experts",)),
    ("fig2_expert_types", fig_expert_types, ("domain_experts", "drivers")),
    ("fig3_causal_rate", fig_causal_rate, ("causal_rate",)),
    ("fig4_positions", fig_positions, ("positions",)),
    ("fig6_causal_layers", fig_causal_layers, ("drivers",)),
    ("fig7_causal_heatmap", fig_causal_heatmap, ("drivers",)),
    ("fig_steering", fig_steering, ("steering",)),
    ("fig_routing_mi", fig_routing_mi, ("routing_mi",)),
    ("fig_steering_sweep", fig_steering_sweep, ("steering_sweep",)),
    ("fig_dose", fig_dose, ("steering_dose",)),
    ("fig_selectivity", fig_selectivity, ("steering_selectivity",)),
    ("fig_coactivation", fig_coactivation, ("coactivation",)),
    ("fig_paths", fig_paths, ("paths",)),
    ("fig_routing_overlap", fig_routing_overlap, ("routing_overlap",)),
]

#: Where a figure directory records what each figure was drawn from (see :func:`write_figures`).
FIGURE_INDEX = ".figures.json"

def _source_digest() -> str:
    """What the drawing depends on besides the tables: the figure modules and the expert classification they
    draw with (their source), and the versions of matplotlib, numpy and pandas."""
    import hashlib

    import matplotlib as mpl

    from ..stats import expert_types as types_mod
    from . import beyond_figures, figure_style, paper_figures

    h = hashlib.sha256(f"{mpl.__version__}|{np.__version__}|{pd.__version__}".encode())
    for mod in (figure_style, paper_figures, beyond_figures, types_mod):
        h.update(Path(str(mod.__file__)).read_bytes())
    return h.hexdigest()


def _timeless(meta: Any) -> Any:
    """``meta`` without what says when or how long rather than what: wall times (``seconds``, ``*_s``,
    ``*_seconds``) and timestamps (``created``), at any depth."""
    if isinstance(meta, dict):
        return {k: _timeless(v) for k, v in meta.items() if not (
            k in ("seconds", "created") or str(k).endswith(("_s", "_seconds")))}
    if isinstance(meta, (list, tuple)):
        return [_timeless(v) for v in meta]
    return meta

def _table_digest(df: pd.DataFrame | None) -> str:
    """A content hash of a table: columns, dtypes, index, every value and its metadata (``attrs``: a rule's
    settings read back from the file, less its wall times: a stage rerun to the same values keeps its
    figures); ``"none"`` for a missing table."""
    import hashlib

    if df is None:
        return "none"
    h = hashlib.sha256(repr([(str(c), str(t)) for c, t in df.dtypes.items()]).encode())
    h.update(repr((len(df), sorted(_timeless(df.attrs).items(), key=lambda kv: str(kv[0])))).encode())
    try:
        h.update(pd.util.hash_pandas_object(df, index=True).to_numpy().tobytes())
    except TypeError:  # a cell pandas cannot hash (a list): its text stands in
        h.update(df.to_csv().encode())
    return h.hexdigest()

def _read_index(fig_dir: Path) -> dict[str, Any]:
    import json

    try:
        index = json.loads((fig_dir / FIGURE_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}

def _kept(fig_dir: Path, index: dict[str, Any], name: str, key: str) -> dict[str, str] | None:
    """``{file name: digest}`` of figure ``name`` in ``fig_dir`` if it was drawn from ``key`` and its files are
    unchanged since."""
    from ..fingerprint import file_digest

    entry = index.get(name)
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("files"), dict):
        return None
    files: dict[str, str] = entry["files"]
    ok = all((fig_dir / f).is_file() and file_digest(fig_dir / f) == d for f, d in files.items())
    return files if ok and files else None

def _figure_key(source: str, name: str, digests: list[str]) -> str:
    import hashlib

    return hashlib.sha256("|".join([source, name, *digests]).encode()).hexdigest()

def write_figures(tables: dict[str, pd.DataFrame | None], out_dir: str | Path,
                  reuse_from: str | Path | Sequence[str | Path] | None = None,
                  names: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Every figure whose tables are present (of ``names`` only, if given). ``tables`` keys:
    ``domain_experts``, ``drivers``, ``causal_rate``, ``positions``, ``expert_map`` (or ``expert_map:<name>``
    for several), ``steering``, ``steering_sweep``, ... Returns ``{figure name: written paths}`` for the
    figures written.

    Nothing is drawn twice: ``out_dir/.figures.json`` records, per figure, a hash of the tables it was drawn
    from (and of the drawing code and versions) and of the files written. A figure whose inputs are unchanged
    and whose files are intact is kept as it is; one found so in a ``reuse_from`` directory (another figure
    directory, e.g. the run's own; the first that has it) is copied. Everything else is drawn.
    """
    import shutil

    from ..fingerprint import file_digest
    from ..io import write_json

    out = Path(out_dir)
    jobs = list(_FIGURES)
    for key in sorted(k for k in tables if k == "expert_map" or k.startswith("expert_map:")):
        fname = "fig5_expert_map" + ("" if key == "expert_map" else "_" + key.split(":", 1)[1])
        jobs.append((fname, functools.partial(fig_expert_map, name=fname), (key,)))
    if names is not None:
        jobs = [job for job in jobs if job[0] in names]
    source = _source_digest()
    here = _read_index(out)
    sources = [reuse_from] if isinstance(reuse_from, (str, Path)) else list(reuse_from or [])
    others = [(d, _read_index(d)) for d in map(Path, sources) if d != out]
    index: dict[str, Any] = {}
    result: dict[str, list[Path]] = {}
    for fname, draw, inputs in jobs:
        dfs = [tables.get(k) for k in inputs]
        if all(df is None for df in dfs):
            continue
        key = _figure_key(source, fname, [_table_digest(df) for df in dfs])
        files = _kept(out, here, fname, key)
        for other, there in others:
            if files is not None:
                break
            files = _kept(other, there, fname, key)
            for f in files or {}:
                with atomic_path(out / f) as tmp:
                    shutil.copyfile(other / f, tmp)
        if files is None:
            files = {p.name: file_digest(p) for p in draw(dfs[0], out, *dfs[1:])}
        if files:
            result[fname] = [out / f for f in files]
            index[fname] = {"key": key, "files": files}
    if index or here:
        write_json(out / FIGURE_INDEX, index)
    return result


__all__ = ["FIGURE_INDEX", "fig_causal_heatmap", "fig_causal_layers", "fig_causal_rate", "fig_coactivation",
           "fig_cwas", "fig_dose", "fig_expert_map", "fig_expert_types", "fig_paths", "fig_positions",
           "fig_routing_mi", "fig_routing_overlap", "fig_selectivity", "fig_steering", "fig_steering_sweep",
           "pooled_lift", "write_figures"]
