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

from ..config import InterventionConfig, resolve_config
from ..data.types import Domain
from ..errors import ConfigError, DataError
from ..io import read_table, write_table
from ..models.model import MoEModel
from .steering import SteeringSpec, steer

CONDITIONS = ("original", "domain_up", "domain_down", "driver_up", "driver_down", "finetune_router")
TABLE_VERSION = 2

#: The columns of the steering table, in order.
ROW_COLUMNS = ("domain", "task", "condition", "applicable", "reason", "mode", "scale", "n_targets", "n",
               "accuracy", "ci_low", "ci_high", "weighted_f1", "delta", "delta_lo", "delta_hi", "delta_f1",
               "changed_selections", "routed_tokens", "saturated")


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
    config: InterventionConfig | None = None,
    *,
    on_eval: Callable[[str], None] | None = None,
    adapter_dir: str | Path | None = None,
    **overrides: Any,
) -> InterventionResult:
    """Evaluate every domain (with a ``task``) under each condition of :data:`CONDITIONS`.

    Settings come from ``config`` (an :class:`~expertscope.config.InterventionConfig`) and/or keyword
    overrides of its fields; a keyword contradicting an explicit ``config`` raises ConfigError.
    ``domain_table``/``driver_table`` give each domain's targets; ``train`` maps a domain to its training
    split for the router LoRA. Deltas against ``original`` come with paired bootstrap CIs over examples;
    ``changed_selections`` counts tokens whose selected set the steering changed (summed over layers; -1
    where not counted: the router-LoRA row, whose ``n_targets`` is its trainable parameter count).

    A condition with nothing to measure (a domain with no domain or driver experts, no training split for
    the LoRA) is one row with ``applicable=False``, the ``reason`` in words, and NaN in every measured column:
    never an accuracy equal to the original with a CI of [0, 0]. ``saturated`` marks domains whose original
    accuracy is at least ``config.saturation``. ``on_eval(label)`` reports progress. ``adapter_dir``: save
    each domain's router adapter in ``adapter_dir/<domain>`` (for the routing-overlap stage).
    """
    cfg = resolve_config(InterventionConfig, config, overrides)
    tasked = [d for d in domains if d.task is not None]
    if not tasked:
        raise DataError("no domain has an evaluation task: use presets, synthetic domains or ?task=... in the spec")
    t0 = time.perf_counter()
    runner = _Runner(model, cfg, on_eval)
    runner.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    for dom in tasked:
        targets = {"domain": _domain_targets(domain_table, dom.name, "domain"),
                   "driver": _domain_targets(driver_table, dom.name, "driver")}
        base = runner.evaluate(dom, [], 1.0, "original")
        saturated = bool(base.accuracy >= cfg.saturation)
        dom_rows = [_row(dom, "original", cfg, base, base, 0, 1.0, 0, 0)]
        dom_rows += _steering_rows(runner, dom, base, targets, cfg)
        dom_rows.append(_finetune_row(runner, dom, base, (train or {}).get(dom.name), cfg))
        rows += [{**r, "saturated": saturated} for r in dom_rows]
        sweep_rows += _sweep_rows(runner, dom, base, targets, cfg)
    settings = {**cfg.to_dict(), "sweep_scales": list(cfg.sweep_scales), "sweep_counts": list(cfg.sweep_counts),
                "seconds": round(time.perf_counter() - t0, 3),
                "note": ("scale mode multiplies logits: a negative logit scaled by s > 1 moves down"
                         if cfg.mode == "scale" else "bias mode adds ln(s) to the targeted logits")}
    return InterventionResult(pd.DataFrame(rows, columns=ROW_COLUMNS), pd.DataFrame(sweep_rows), settings)



@dataclass
class _Targets:
    """One kind of a domain's targets, strongest first; ``missing`` says in words why there are none."""

    experts: list[tuple[int, int]]
    missing: str = ""


def _domain_targets(table: Any, domain: str, kind: Literal["domain", "driver"]) -> _Targets:
    """The targets of ``domain`` of one kind, or the reason there are none (the largest effect, if known)."""
    if table is None:
        return _Targets([], f"no {kind}-expert table given")
    experts = ranked_targets(table, domain, kind)
    if experts:
        return _Targets(experts)
    df = getattr(table, "df", table)
    key, unit = ("ce_mean", " nats") if kind == "driver" else ("specificity", "")
    rows = df[df["domain"] == domain] if df is not None and len(df) else None
    if rows is not None and key in rows.columns and len(rows):
        label = "largest mean CE" if kind == "driver" else "largest specificity"
        return _Targets([], f"no {kind} experts ({label} {float(rows[key].max()):.3g}{unit})")
    return _Targets([], f"no {kind} experts")


class _Runner:
    """Evaluates a domain's task, steering given targets; counts routing changes."""

    def __init__(self, model: MoEModel, cfg: InterventionConfig, on_eval: Callable[[str], None] | None) -> None:
        self.model, self.cfg, self.on_eval = model, cfg, on_eval
        self.changed = self.seen = 0
        # Steering is deterministic, so a condition met twice (a sweep point equal to an up/down row, s = 1
        # equal to the original) is evaluated once: same numbers, less time.
        self._done: dict[tuple[str, tuple[tuple[int, int], ...], float], tuple[Any, int, int]] = {}
        self.evaluations = 0
        self.adapter_dir: Path | None = None

    def evaluate(self, dom: Domain, targets: Sequence[tuple[int, int]], scale: float, label: str) -> Any:
        """The task's EvalResult with ``targets`` steered by ``scale``; routing counts in ``changed/seen``."""
        from ..evaluation import evaluate

        key = (dom.name, tuple(sorted(targets)) if scale != 1.0 else (), scale if targets else 1.0)
        if key in self._done:
            res, self.changed, self.seen = self._done[key]
            return res
        if self.on_eval:
            self.on_eval(f"{dom.name}: {label}")
        self.changed = self.seen = 0
        self.evaluations += 1
        if not targets or scale == 1.0:
            res = evaluate(self.model, dom.task, dom, batch_size=self.cfg.batch_size)
        else:
            spec = SteeringSpec(targets=tuple(targets), scale=scale, mode=self.cfg.mode)
            with steer(self.model, spec=spec) as s:
                res = evaluate(self.model, dom.task, dom, batch_size=self.cfg.batch_size)
            self.changed, self.seen = s.total_changed, sum(s.seen.values())
        self._done[key] = (res, self.changed, self.seen)
        return res


def _correct(res: Any) -> np.ndarray:
    return np.array([bool(p["correct"]) for p in res.predictions])


def _row(dom: Domain, condition: str, cfg: InterventionConfig, res: Any, base: Any, n_targets: int,
         scale: float, changed: int, seen: int) -> dict[str, Any]:
    """One measured row: accuracy with its CI, and the paired-bootstrap change against ``base``."""
    delta, lo, hi = paired_bootstrap(_correct(base), _correct(res), cfg.n_boot, cfg.seed, cfg.ci)
    f1, f1_base = res.weighted_f1, base.weighted_f1
    return {
        "domain": dom.name, "task": dom.task, "condition": condition, "applicable": True, "reason": "",
        "mode": cfg.mode, "scale": scale, "n_targets": n_targets, "n": res.n, "accuracy": res.accuracy,
        "ci_low": res.ci_low, "ci_high": res.ci_high, "weighted_f1": f1 if f1 is not None else np.nan,
        "delta": delta, "delta_lo": lo, "delta_hi": hi,
        "delta_f1": (f1 - f1_base) if f1 is not None and f1_base is not None else np.nan,
        "changed_selections": changed, "routed_tokens": seen,
    }


def _not_applicable(dom: Domain, condition: str, cfg: InterventionConfig, scale: float, reason: str
                    ) -> dict[str, Any]:
    """A condition with nothing to measure: the reason, and NaN wherever a number would be measured."""
    nan = float("nan")
    return {
        "domain": dom.name, "task": dom.task, "condition": condition, "applicable": False, "reason": reason,
        "mode": cfg.mode, "scale": scale, "n_targets": 0, "n": nan, "accuracy": nan, "ci_low": nan,
        "ci_high": nan, "weighted_f1": nan, "delta": nan, "delta_lo": nan, "delta_hi": nan, "delta_f1": nan,
        "changed_selections": nan, "routed_tokens": nan,
    }


def _steering_rows(runner: _Runner, dom: Domain, base: Any, targets: dict[str, _Targets],
                   cfg: InterventionConfig) -> list[dict[str, Any]]:
    """The ↑/↓ rows for domain and driver experts."""
    rows = []
    for kind in ("domain", "driver"):
        t = targets[kind]
        for direction, scale in (("up", cfg.scale_up), ("down", cfg.scale_down)):
            condition = f"{kind}_{direction}"
            if not t.experts:
                rows.append(_not_applicable(dom, condition, cfg, scale, t.missing))
                continue
            res = runner.evaluate(dom, t.experts, scale, condition)
            rows.append(_row(dom, condition, cfg, res, base, len(t.experts), scale, runner.changed, runner.seen))
    return rows


def _finetune_row(runner: _Runner, dom: Domain, base: Any, train: Domain | None,
                  cfg: InterventionConfig) -> dict[str, Any]:
    """The router-LoRA row: train on ``train``, evaluate, unload (``n_targets``: trainable parameters)."""
    from ..evaluation import evaluate
    from .router_lora import finetune_router

    if not cfg.finetune:
        return _not_applicable(dom, "finetune_router", cfg, float("nan"), "router LoRA switched off (finetune=False)")
    if train is None:
        return _not_applicable(dom, "finetune_router", cfg, float("nan"), "no training split given")
    if runner.on_eval:
        runner.on_eval(f"{dom.name}: finetune_router (training)")
    ft = finetune_router(runner.model, train, task=dom.task, **cfg.finetune_kwargs())
    if runner.adapter_dir is not None:
        ft.save(runner.adapter_dir / dom.name)
    try:
        res = evaluate(runner.model, dom.task, dom, batch_size=cfg.batch_size)
    finally:
        ft.unload()
    # Routing changes are not counted for the LoRA: -1.
    return _row(dom, "finetune_router", cfg, res, base, ft.trainable_parameters, float("nan"), -1, -1)


def _sweep_rows(runner: _Runner, dom: Domain, base: Any, targets: dict[str, _Targets],
                cfg: InterventionConfig) -> list[dict[str, Any]]:
    """Accuracy over the scale sweep and over the number of strongest targets (kinds with targets only)."""
    rows = []
    for kind in ("domain", "driver"):
        experts = targets[kind].experts
        if not experts:
            continue
        for scale in cfg.sweep_scales:
            res = base if scale == 1.0 else runner.evaluate(dom, experts, scale, f"sweep {kind} ×{scale}")
            rows.append({"domain": dom.name, "targets": kind, "sweep": "scale", "scale": scale,
                         "n_targets": len(experts), "accuracy": res.accuracy, "ci_low": res.ci_low,
                         "ci_high": res.ci_high})
        for count in cfg.sweep_counts:
            if count > len(experts):
                continue
            res = runner.evaluate(dom, experts[:count], cfg.scale_up, f"sweep {kind} top-{count}")
            rows.append({"domain": dom.name, "targets": kind, "sweep": "count", "scale": cfg.scale_up,
                         "n_targets": count, "accuracy": res.accuracy, "ci_low": res.ci_low,
                         "ci_high": res.ci_high})
    return rows
