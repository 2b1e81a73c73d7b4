"""Driver experts and the causal rate (SPEC §3).

A driver expert of domain ``D`` at layer ``l``: ``CE_{l,i}(D)`` at least ``z`` standard deviations (ddof=0)
above the mean CE of that layer's experts on ``D``. The causal rate of layer ``l`` on ``D``: the fraction of
``D``'s real tokens whose selected set at ``l`` holds at least one driver expert of that layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError
from ..io import read_table, write_table
from ..models.model import MoEModel
from ..routing import DomainInput, domain_texts, routing_pass
from .effects import CausalEffects

TABLE_VERSION = 1


@dataclass
class DriverTable:
    """One row per (domain, layer, expert); ``settings`` holds the rule, thresholds and the CE settings."""

    df: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def drivers(self, domain: str | None = None) -> pd.DataFrame:
        """Rows flagged as drivers (of ``domain`` if given), largest CE first."""
        rows = self.df[self.df["is_driver"]]
        if domain is not None:
            rows = rows[rows["domain"] == domain]
        return rows.sort_values(["domain", "ce_mean"], ascending=[True, False])

    def targets(self, domain: str) -> list[tuple[int, int]]:
        """``(layer, expert)`` pairs of ``domain``'s drivers, for steering."""
        return [(int(r.layer), int(r.expert)) for r in self.drivers(domain).itertuples()]

    def by_layer(self, domain: str) -> dict[int, set[int]]:
        """``{layer: {driver experts}}`` of ``domain`` (every layer present, possibly empty)."""
        out: dict[int, set[int]] = {int(x): set() for x in self.df["layer"].unique()}
        for layer, expert in self.targets(domain):
            out[layer].add(expert)
        return out

    def save(self, path: str | Path) -> None:
        write_table(path, self.df, meta={"table": "driver_experts", "version": TABLE_VERSION, **self.settings})

    @classmethod
    def load(cls, path: str | Path) -> DriverTable:
        df, meta = read_table(path)
        return cls(df, meta)


def driver_experts(effects: CausalEffects, rule: str = "z", z: float = 2.0, top: int = 1) -> DriverTable:
    """Flag driver experts per (domain, layer) from domain-mean CE (SPEC §3).

    ``rule="z"`` (SPEC): ``ce_mean >= layer_mean + z * layer_sd`` over the layer's computed experts (ddof=0),
    and ``layer_sd > 0``. ``rule="top"``: the ``top`` experts of each layer (threshold = the top-th value).
    The threshold of every (domain, layer) is in the table; the CE settings travel in ``settings``.
    """
    if rule not in ("z", "top"):
        raise ConfigError(f"rule={rule!r} is not a valid option: use 'z' or 'top'")
    if rule == "top" and top < 1:
        raise ConfigError(f"top={top} is not positive: pass 1 or more")
    df = effects.mean_by_domain()
    parts = []
    for (_d, _l), g in df.groupby(["domain", "layer"], sort=False):
        g = g.copy()
        vals = g["ce_mean"].to_numpy()
        ok = ~np.isnan(vals)
        mu = float(vals[ok].mean()) if ok.any() else np.nan
        sd = float(vals[ok].std()) if ok.any() else np.nan
        if rule == "z":
            thr = mu + z * sd
            is_drv = ok & (vals >= thr) & (sd > 0)
        else:
            srt = np.sort(vals[ok])[::-1]
            thr = float(srt[min(top, len(srt)) - 1]) if len(srt) else np.nan
            is_drv = ok & (vals >= thr) & (vals > 0)
        g["layer_mean"], g["layer_sd"], g["threshold"] = mu, sd, thr
        g["is_driver"] = is_drv
        g["rank"] = pd.Series(vals, index=g.index).rank(ascending=False, method="min").astype("Int64")
        parts.append(g)
    out = pd.concat(parts, ignore_index=True)
    cols = ["domain", "layer", "expert", "ce_mean", "ce_sd", "n_inputs", "layer_mean", "layer_sd", "threshold",
            "is_driver", "rank", "exact"]
    settings = {
        "rule": rule, "z": z if rule == "z" else None, "top": top if rule == "top" else None,
        "rule_text": (f"CE(D) >= layer mean + {z} sd (ddof=0) of the layer's experts" if rule == "z"
                      else f"the {top} largest CE(D) of each layer"),
        "causal_effects": effects.settings,
    }
    return DriverTable(out[cols], settings)


# ----- causal rate ---------------------------------------------------------------------------------
def causal_rate_from_selections(
    selections: Mapping[int, np.ndarray | torch.Tensor], drivers: Mapping[int, Iterable[int]]
) -> dict[int, tuple[int, int]]:
    """Per layer ``(tokens whose selected set holds >= 1 driver, tokens)``.

    ``selections[layer]`` ``(N, k)`` the selected expert ids of N real tokens; ``drivers[layer]`` the driver
    experts of that layer (missing or empty: none).
    """
    out = {}
    for layer, sel in selections.items():
        s = np.asarray(sel.cpu() if isinstance(sel, torch.Tensor) else sel)
        d = np.fromiter(drivers.get(layer, ()), dtype=np.int64)
        hit = np.isin(s, d).any(axis=1) if s.size else np.zeros(0, bool)
        out[layer] = (int(hit.sum()), int(s.shape[0]))
    return out


def causal_rate(
    model: MoEModel,
    domains: DomainInput,
    drivers: DriverTable | pd.DataFrame,
    batch_size: int = 8,
    max_length: int | None = 512,
    limit: int | None = None,
) -> pd.DataFrame:
    """Causal rate per (domain, layer) from one routing pass over each domain's texts.

    Returns ``domain, layer, n_tokens, n_driver_tokens, causal_rate, n_drivers, drivers``; a domain's drivers
    are those of ``drivers`` with the same domain name (a layer without drivers has rate 0).
    """
    table = drivers if isinstance(drivers, DriverTable) else DriverTable(drivers)
    texts_by_domain = domain_texts(domains, limit)
    known = set(table.df["domain"])
    drv = {name: table.by_layer(name) if name in known else {} for name in texts_by_domain}
    counts = {name: {layer: [0, 0] for layer in model.layers} for name in texts_by_domain}
    for routed in routing_pass(model, texts_by_domain, batch_size, max_length):
        real = routed.real()
        sel = {layer: call.indices[real] for layer, call in routed.calls.items()}
        for layer, (hit, n) in causal_rate_from_selections(sel, drv[routed.domain]).items():
            counts[routed.domain][layer][0] += hit
            counts[routed.domain][layer][1] += n
    rows = []
    for name in texts_by_domain:
        for layer in model.layers:
            hit, n = counts[name][layer]
            ds = sorted(drv[name].get(layer, set()))
            rows.append({"domain": name, "layer": layer, "n_tokens": n, "n_driver_tokens": hit,
                         "causal_rate": hit / n if n else float("nan"), "n_drivers": len(ds),
                         "drivers": ",".join(map(str, ds))})
    return pd.DataFrame(rows)


def spearman_by_layer(a: CausalEffects, b: CausalEffects) -> pd.DataFrame:
    """Spearman rank correlation of domain-mean CE between two results, per (domain, layer)."""
    from scipy.stats import spearmanr

    ma, mb = a.mean_by_domain(), b.mean_by_domain()
    m = ma.merge(mb, on=["domain", "layer", "expert"], suffixes=("_a", "_b"))
    rows = []
    for (d, layer), g in m.groupby(["domain", "layer"], sort=False):
        x, y = g["ce_mean_a"].to_numpy(), g["ce_mean_b"].to_numpy()
        ok = ~(np.isnan(x) | np.isnan(y))
        rho = spearmanr(x[ok], y[ok]).statistic if ok.sum() > 2 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0 \
            else float("nan")
        rows.append({"domain": d, "layer": int(layer), "spearman": float(rho), "n_experts": int(ok.sum())})
    return pd.DataFrame(rows)


__all__: Sequence[str] = ("DriverTable", "causal_rate", "causal_rate_from_selections", "driver_experts",
                          "spearman_by_layer")
