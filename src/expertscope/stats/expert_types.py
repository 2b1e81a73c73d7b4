"""Each expert's type in each domain (domain expert, driver, both, general, another domain's, below uniform):
the join of the domain-expert and driver tables, computed where the tables are read (Fig. 2 and its reading)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def expert_types(domain_experts: pd.DataFrame, drivers: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each (domain, layer, expert) row of the domain-expert table with a ``type``.

    ``both``/``domain``/``driver``: flagged for this domain (driver flags from ``drivers`` when given, else
    the table's ``is_driver``); ``general``: the table's ``is_general``; ``other``: activated above uniform
    here but flagged for another domain; ``below uniform``: not activated above ``k/E`` in this domain.
    """
    df = domain_experts.copy()
    if drivers is not None and len(drivers) and {"domain", "layer", "expert", "is_driver"} <= set(drivers.columns):
        key = drivers[["domain", "layer", "expert", "is_driver"]].rename(columns={"is_driver": "_drv"})
        df = df.merge(key, on=["domain", "layer", "expert"], how="left")
        df["_drv"] = df["_drv"].fillna(False).astype(bool)
    else:
        df["_drv"] = df["is_driver"].astype(bool) if "is_driver" in df.columns else False
    dom = df["is_domain_expert"].astype(bool) if "is_domain_expert" in df.columns else pd.Series(False, df.index)
    gen = df["is_general"].astype(bool) if "is_general" in df.columns else pd.Series(False, df.index)
    uniform = df["uniform_rate"] if "uniform_rate" in df.columns else 0.0
    active = df["activation_rate"] > uniform
    df["type"] = np.select(
        [dom & df["_drv"], dom, df["_drv"], ~active, gen],
        ["both", "domain", "driver", "below uniform", "general"], default="other")
    return df.drop(columns="_drv")


def drivers_measured(domain_experts: pd.DataFrame, drivers: pd.DataFrame | None = None) -> bool:
    """Were drivers looked for: a driver table, or driver flags set on the domain-expert table? Recorded routes
    have no causal effects, and there "no driver experts" would be a false zero."""
    if drivers is not None and len(drivers) and "is_driver" in drivers.columns:
        return True
    return "is_driver" in domain_experts.columns and bool(domain_experts["is_driver"].fillna(False).astype(bool).any())


__all__ = ["drivers_measured", "expert_types"]
