"""How far the interventions moved the routing: the overlap ``|S₁ ∩ S₂| / k`` of each token's selections
with and without steering (domain / driver experts up) and with a saved router LoRA, per domain and layer.

Nothing is re-trained: the router adapters are the ones the intervention study saved
(``intervention_study(..., adapter_dir=...)`` writes one per domain).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import InterventionConfig
from ..data.types import Domain
from ..models.model import MoEModel
from ..stats.overlap import routing_overlap
from ..stats.token_selections import record_routes
from .steering import SteeringSpec, steer
from .steering_study import ranked_targets

COLUMNS = ["domain", "condition", "applicable", "reason", "layer", "n_tokens", "overlap", "ci_low", "ci_high",
           "changed"]


def routing_changes(
    model: MoEModel,
    domains: Sequence[Domain],
    domain_table: Any = None,
    driver_table: Any = None,
    adapter_dir: str | Path | None = None,
    config: InterventionConfig | None = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
) -> pd.DataFrame:
    """One row per (domain, condition, layer): the routing overlap with the unsteered model on the domain's
    texts, for ``domain_up`` / ``driver_up`` (the domain's experts at ``config.scale_up`` in ``config.mode``)
    and ``finetune_router`` (the adapter saved in ``adapter_dir/<domain>``). A condition with nothing to
    apply is one row with ``applicable=False``, its reason, and NaN numbers."""
    from .router_lora import load_router_adapter

    cfg = config or InterventionConfig()
    rows: list[dict[str, Any]] = []
    for dom in domains:
        texts = {dom.name: dom.texts}
        base = record_routes(model, texts, batch_size=batch_size, max_length=max_length)
        for kind in ("domain", "driver"):
            table = domain_table if kind == "domain" else driver_table
            targets = ranked_targets(table, dom.name, kind) if table is not None else []
            cond = f"{kind}_up"
            if not targets:
                rows.append(_na(dom.name, cond, f"no {kind} experts"))
                continue
            with steer(model, spec=SteeringSpec(targets=tuple(targets), scale=cfg.scale_up, mode=cfg.mode)):
                moved = record_routes(model, texts, batch_size=batch_size, max_length=max_length)
            rows += _rows(dom.name, cond, routing_overlap(base, moved, n_boot=cfg.n_boot, seed=cfg.seed))
        path = Path(adapter_dir) / dom.name if adapter_dir is not None else None
        if path is None or not (path / "adapter_config.json").exists():
            rows.append(_na(dom.name, "finetune_router", "no saved router adapter"))
            continue
        peft = load_router_adapter(model, path)
        try:
            moved = record_routes(model, texts, batch_size=batch_size, max_length=max_length)
        finally:
            peft.unload()
        rows += _rows(dom.name, "finetune_router", routing_overlap(base, moved, n_boot=cfg.n_boot, seed=cfg.seed))
    return pd.DataFrame(rows, columns=COLUMNS)


def _rows(domain: str, condition: str, table: pd.DataFrame) -> list[dict[str, Any]]:
    sub = table[table.domain == domain]
    return [{"domain": domain, "condition": condition, "applicable": True, "reason": "", "layer": int(r.layer),
             "n_tokens": int(r.n_tokens), "overlap": float(r.overlap), "ci_low": float(r.ci_low),
             "ci_high": float(r.ci_high), "changed": float(r.changed)} for r in sub.itertuples()]


def _na(domain: str, condition: str, reason: str) -> dict[str, Any]:
    nan = float("nan")
    return {"domain": domain, "condition": condition, "applicable": False, "reason": reason, "layer": -1,
            "n_tokens": 0, "overlap": nan, "ci_low": nan, "ci_high": nan, "changed": nan}


__all__ = ["routing_changes"]
