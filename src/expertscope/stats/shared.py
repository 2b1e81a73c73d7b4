"""Shared experts in tables.

Shared experts (Qwen2-MoE's shared expert, DeepSeek's ``n_shared_experts``) are always on: every token uses
them, so they have no routing statistics and are never domain or driver candidates. The model's manifest
records how many each MoE layer has (``num_shared_experts``). Tables show them as their own rows, marked
``shared=True``, numbered after the routed experts (``E, E+1, ...``), with activation rate 1 and NaN where a
routed statistic has no meaning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


def shared_counts(model_info: Mapping[str, Any] | None) -> dict[int, int]:
    """``{layer: number of shared experts}`` from a model description (``MoEModel.describe()``); layers
    without shared experts are left out. JSON round trips turn the layer keys into strings: both are read."""
    raw = (model_info or {}).get("num_shared_experts") or {}
    return {int(layer): int(n) for layer, n in raw.items() if int(n) > 0}


def shared_rows(domains: Sequence[str], counts: Mapping[int, int], num_experts: int,
                columns: Sequence[str]) -> pd.DataFrame:
    """One row per (domain, layer, shared expert) with ``columns``: ``expert`` = ``num_experts + j``,
    ``shared`` True, ``activation_rate`` 1.0, boolean flags False, other numbers NaN."""
    rows = []
    for d in domains:
        for layer, n in sorted(counts.items()):
            for j in range(n):
                rows.append({"domain": d, "layer": layer, "expert": num_experts + j})
    out = pd.DataFrame(rows, columns=["domain", "layer", "expert"])
    for c in columns:
        if c in ("domain", "layer", "expert"):
            continue
        if c == "shared":
            out[c] = True
        elif c == "activation_rate":
            out[c] = 1.0
        elif c.startswith("is_"):
            out[c] = False
        else:
            out[c] = np.nan
    return out[list(columns)]


def with_shared_rows(df: pd.DataFrame, model_info: Mapping[str, Any] | None, num_experts: int) -> pd.DataFrame:
    """``df`` (rows of routed experts, with ``domain, layer, expert``) with a ``shared`` column (False) and,
    when the model has shared experts, their rows appended (sorted by domain order, layer, expert)."""
    df = df.assign(shared=False)
    counts = shared_counts(model_info)
    if not counts or not len(df):
        return df
    extra = shared_rows(list(dict.fromkeys(df["domain"])), counts, num_experts, list(df.columns))
    order = {d: i for i, d in enumerate(dict.fromkeys(df["domain"]))}
    out = pd.concat([df, extra], ignore_index=True)
    key = out["domain"].map(order)
    out = out.assign(_d=key).sort_values(["_d", "layer", "expert"], kind="stable").drop(columns="_d")
    return out.reset_index(drop=True)
