"""The paper's Tables 1–2 on any model: evaluate each domain's task with domain or driver experts steered
up and down, and with a router-only LoRA; plus sweeps over the scale and the number of targeted experts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..data.types import Domain
from ..errors import ConfigError, DataError
from ..io import read_table, write_table
from ..models.model import MoEModel
from .steering import SteeringSpec, steer

CONDITIONS = ("original", "domain_up", "domain_down", "driver_up", "driver_down", "finetune_router")
TABLE_VERSION = 1


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
                     ) -> tuple[float, float, float]:
    """Mean of ``b - a`` over paired examples and its percentile bootstrap CI (examples resampled)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return float(d.mean()), float(lo), float(hi)


def ranked_targets(table: Any, domain: str, kind: Literal["domain", "driver"]) -> list[tuple[int, int]]:
    """A domain's flagged experts, strongest first (specificity for domain experts, CE for drivers)."""
    df = getattr(table, "df", table)
    if df is None or len(df) == 0:
        return []
    rows = df[df["domain"] == domain]
    flag, key = ("is_domain_expert", "specificity") if kind == "domain" else ("is_driver", "ce_mean")
    if flag not in rows.columns:
        raise ConfigError(f"the {kind} table has no {flag!r} column: pass a table made by expertscope")
    rows = rows[rows[flag].astype(bool)]
    if key in rows.columns:
        rows = rows.sort_values(key, ascending=False, kind="stable")
    return [(int(r.layer), int(r.expert)) for r in rows.itertuples()]


@dataclass
class InterventionResult:
    """``table``: one row per (domain, condition); ``sweep``: accuracy per (domain, targets, scale, count)."""

    table: pd.DataFrame
    sweep: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        write_table(d / "steering.parquet", self.table, meta={"table": "steering", "version": TABLE_VERSION,
                                                             **self.settings})
        write_table(d / "steering_sweep.parquet", self.sweep, meta={"table": "steering_sweep", **self.settings})

    @classmethod
    def load(cls, directory: str | Path) -> InterventionResult:
        table, meta = read_table(Path(directory) / "steering.parquet")
        sweep, _ = read_table(Path(directory) / "steering_sweep.parquet")
        return cls(table, sweep, meta)


def intervention_study(
    model: MoEModel,
    domains: Sequence[Domain],
    domain_table: Any = None,
    driver_table: Any = None,
    train: dict[str, Domain] | None = None,
    scale_up: float = 1.2,
    scale_down: float = 0.8,
    mode: Literal["scale", "bias"] = "scale",
    sweep_scales: Sequence[float] = (0.6, 0.8, 1.0, 1.2, 1.4, 1.6),
    sweep_counts: Sequence[int] = (1, 2, 4, 8),
    finetune: dict[str, Any] | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
    on_eval: Callable[[str], None] | None = None,
) -> InterventionResult:
    """Evaluate every domain (with a ``task``) under each condition of :data:`CONDITIONS`.

    ``domain_table``/``driver_table`` give each domain's targets; ``train`` maps a domain to its training
    split for the router LoRA (skipped without it, or with ``finetune=None`` and no train). Deltas against
    ``original`` come with paired bootstrap CIs over examples; ``changed_selections`` counts tokens whose
    selected set the steering changed (summed over layers; -1 where not counted: the router-LoRA row, whose
    ``n_targets`` is its trainable parameter count). ``on_eval(label)`` reports progress.
    """
    from ..evaluation import evaluate

    if scale_up <= 0 or scale_down <= 0 or any(s <= 0 for s in sweep_scales):
        raise ConfigError("scales must be positive: e.g. --scale-up 1.2 --scale-down 0.8")
    tasked = [d for d in domains if d.task is not None]
    if not tasked:
        raise DataError("no domain has an evaluation task: use presets, synthetic domains or ?task=... in the spec")
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def run(dom: Domain, targets: list[tuple[int, int]], scale: float, label: str) -> tuple[Any, int, int]:
        if on_eval:
            on_eval(f"{dom.name}: {label}")
        if not targets or scale == 1.0:
            return evaluate(model, dom.task, dom, batch_size=batch_size), 0, 0
        with steer(model, spec=SteeringSpec(targets=tuple(targets), scale=scale, mode=mode)) as s:
            res = evaluate(model, dom.task, dom, batch_size=batch_size)
        return res, s.total_changed, sum(s.seen.values())

    for dom in tasked:
        dom_targets = ranked_targets(domain_table, dom.name, "domain") if domain_table is not None else []
        drv_targets = ranked_targets(driver_table, dom.name, "driver") if driver_table is not None else []
        base, _, _ = run(dom, [], 1.0, "original")
        base_correct = np.array([bool(p["correct"]) for p in base.predictions])

        def add_row(condition: str, res: Any, n_targets: int, scale: float, changed: int, seen: int,
                    dom: Domain = dom, base: Any = base, base_correct: np.ndarray = base_correct) -> None:
            correct = np.array([bool(p["correct"]) for p in res.predictions])
            delta, lo, hi = paired_bootstrap(base_correct, correct, n_boot, seed)
            f1 = res.weighted_f1
            rows.append({
                "domain": dom.name, "task": dom.task, "condition": condition, "mode": mode, "scale": scale,
                "n_targets": n_targets, "n": res.n, "accuracy": res.accuracy, "ci_low": res.ci_low,
                "ci_high": res.ci_high, "weighted_f1": f1 if f1 is not None else np.nan,
                "delta": delta, "delta_lo": lo, "delta_hi": hi,
                "delta_f1": (f1 - base.weighted_f1) if f1 is not None and base.weighted_f1 is not None else np.nan,
                "changed_selections": changed, "routed_tokens": seen,
            })

        add_row("original", base, 0, 1.0, 0, 0)
        for condition, targets, scale in (
            ("domain_up", dom_targets, scale_up), ("domain_down", dom_targets, scale_down),
            ("driver_up", drv_targets, scale_up), ("driver_down", drv_targets, scale_down),
        ):
            res, changed, seen = run(dom, targets, scale, condition)
            add_row(condition, res, len(targets), scale, changed, seen)
        if train and dom.name in train and finetune is not None:
            from .router_lora import finetune_router

            if on_eval:
                on_eval(f"{dom.name}: finetune_router (training)")
            ft = finetune_router(model, train[dom.name], task=dom.task, seed=seed, **finetune)
            try:
                res = evaluate(model, dom.task, dom, batch_size=batch_size)
            finally:
                ft.unload()
            # n_targets holds the adapter's trainable parameters; routing changes are not counted for LoRA.
            add_row("finetune_router", res, ft.trainable_parameters, float("nan"), -1, -1)
        for kind, targets in (("domain", dom_targets), ("driver", drv_targets)):
            if not targets:
                continue
            for scale in sweep_scales:
                res = base if scale == 1.0 else run(dom, targets, scale, f"sweep {kind} ×{scale}")[0]
                sweep_rows.append({"domain": dom.name, "targets": kind, "sweep": "scale", "scale": scale,
                                   "n_targets": len(targets), "accuracy": res.accuracy, "ci_low": res.ci_low,
                                   "ci_high": res.ci_high})
            for count in sweep_counts:
                if count > len(targets):
                    continue
                res = run(dom, targets[:count], scale_up, f"sweep {kind} top-{count}")[0]
                sweep_rows.append({"domain": dom.name, "targets": kind, "sweep": "count", "scale": scale_up,
                                   "n_targets": count, "accuracy": res.accuracy, "ci_low": res.ci_low,
                                   "ci_high": res.ci_high})
    settings = {"scale_up": scale_up, "scale_down": scale_down, "mode": mode, "n_boot": n_boot, "seed": seed,
                "sweep_scales": list(sweep_scales), "sweep_counts": list(sweep_counts), "finetune": finetune,
                "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 3),
                "note": ("scale mode multiplies logits: a negative logit scaled by s > 1 moves down"
                         if mode == "scale" else "bias mode adds ln(s) to the targeted logits")}
    return InterventionResult(pd.DataFrame(rows), pd.DataFrame(sweep_rows), settings)
