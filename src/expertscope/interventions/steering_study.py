"""The paper's Tables 1–2 on any model, with controls and calibrated verdicts (docs/methods.md): do the
experts a run names matter more than others of the same layers?

For every domain with a task, each kind of target (its domain experts, its drivers) is steered at every
strength of a dose–response (ablation by ``mask``, scale factors, bias shifts). Each targeted condition is
paired with ``n_controls`` control draws (by default "equally busy": non-target experts of the same layers
whose activation rate in the domain is close to the targets'), which carry the verdict, and with reference
controls (``n_reference`` uniform random draws of those layers, and the busiest non-target experts). All arms
are evaluated on the same items, so effects are paired. A condition is *specific* when the target's Δ lies
outside the control draws' distribution and beyond them item by item, corrected over every condition of the
run (:mod:`.verdicts`). A selectivity matrix ablates each domain's experts and evaluates every domain, with
the verdict controls on each domain, so that selectivity is judged on control-normalised effects. The
router-LoRA row is trained and evaluated like the paper's.

Outputs (:class:`InterventionResult`): ``table`` (Tables 1–2: original, ↑/↓ and mask rows per kind, router
LoRA), ``dose`` (every kind × strength), ``arms`` (every evaluated arm, with per-item correctness) and
``selectivity`` (the D×D matrix per kind).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from ..config import InterventionConfig, resolve_config
from ..data.types import Domain
from ..errors import ConfigError, DataError, ModelError
from ..execution import Executor, LocalExecutor
from ..io import read_table, write_table
from ..models.model import MoEModel
from ..progress import ProgressCallback
from ..stats.rules import bootstrap_weights, mcnemar_exact, mean_ci, paired_bootstrap_diff, sign_test
from .controls import (
    RoutingRecord,
    activation_rates,
    busiest_control,
    control_seed,
    matched_controls,
    random_controls,
    record_routing,
    routing_changes,
    set_activation,
)
from .steering import SteeringSpec, steer
from .verdicts import MIN_DRAWS, beyond_controls, resolution, selectivity_verdict, specific_verdicts

KINDS: tuple[Literal["domain", "driver"], ...] = ("domain", "driver")
CONDITIONS = ("original", "domain_up", "domain_down", "domain_mask", "driver_up", "driver_down", "driver_mask",
              "finetune_router")
TABLE_VERSION = 4

#: The columns of the steering table (and of the dose table, which adds ``kind``/``strength``), in order.
ROW_COLUMNS = ("domain", "task", "condition", "kind", "strength", "applicable", "reason", "mode", "scale",
               "n_targets", "n_parameters", "n", "n_truncated", "accuracy", "ci_low", "ci_high", "weighted_f1", "delta",
               "delta_lo", "delta_hi", "delta_f1", "p_exact", "items_gained", "items_lost", "negative_share",
               "changed_selections", "routed_tokens", "control", "control_draws", "target_activation",
               "control_activation", "control_delta", "control_delta_min", "control_delta_max", "control_sd",
               "control_rank", "diff", "diff_lo", "diff_hi", "t_vs_control", "p_set", "p_item", "p_vs_control",
               "q_vs_control", "n_tests", "specific", "reference", "reference_draws", "reference_delta",
               "reference_delta_min", "reference_delta_max", "reference_changed", "busiest_delta", "busiest_delta_lo",
               "busiest_delta_hi", "diff_busiest", "diff_busiest_lo", "diff_busiest_hi", "p_vs_busiest",
               "control_reason", "saturated")

#: What each control kind is called in verdicts ("beyond equally busy experts").
CONTROL_NAMES = {"matched": "equally busy experts", "random": "random experts of the layer"}

SELECTIVITY_COLUMNS = ("kind", "ablated", "evaluated", "n_targets", "n", "delta", "delta_lo", "delta_hi", "p_exact",
                       "changed_selections", "routed_tokens", "control", "control_draws", "control_delta",
                       "norm_delta", "norm_lo", "norm_hi", "off_target_share", "gap", "gap_lo", "gap_hi",
                       "selective", "selective_reason")

__all__ = ["CONDITIONS", "CONTROL_NAMES", "KINDS", "InterventionResult", "Strength", "intervention_study",
           "paired_bootstrap", "ranked_targets", "strengths"]


def _resampling(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` bootstrap counts of ``n`` items (seeded): one resampling shared by every arm of a
    comparison, so their intervals are joint."""
    return bootstrap_weights(n, n_boot, np.random.default_rng(seed)) if n else np.zeros((n_boot, 0))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
                     ) -> tuple[float, float, float]:
    """Mean of ``b - a`` over paired examples and its percentile bootstrap CI (examples resampled jointly)."""
    return tuple(paired_bootstrap_diff(a, b, n_boot, ci, rng=seed))  # type: ignore[return-value]


@dataclass(frozen=True)
class Strength:
    """One point of the dose–response: ``mode`` ``"mask"``, ``"scale"`` (logits × s) or ``"bias"`` (+ ln s)."""

    mode: Literal["mask", "scale", "bias"]
    scale: float = float("nan")

    @property
    def label(self) -> str:
        if self.mode == "mask":
            return "mask"
        return f"×{self.scale:g}" if self.mode == "scale" else f"+ln {self.scale:g}"

    @property
    def key(self) -> str:
        """The condition suffix: ``mask``, ``x0.5``, ``bias2``."""
        if self.mode == "mask":
            return "mask"
        return f"x{self.scale:g}" if self.mode == "scale" else f"bias{self.scale:g}"

    @property
    def identity(self) -> bool:
        return self.mode != "mask" and self.scale == 1.0

    def spec(self, targets: Sequence[tuple[int, int]]) -> SteeringSpec:
        return SteeringSpec(targets=tuple(targets), scale=1.0 if self.mode == "mask" else self.scale,
                            mode=self.mode)


def strengths(cfg: InterventionConfig) -> list[Strength]:
    """The dose–response points in order: mask, scale factors ascending, bias factors ascending. The paper's
    ↑/↓ rows (``scale_up``/``scale_down`` in ``mode``) are always among them."""
    scales = set(cfg.dose_scales) | ({cfg.scale_up, cfg.scale_down} if cfg.mode == "scale" else set())
    biases = set(cfg.dose_biases) | ({cfg.scale_up, cfg.scale_down} if cfg.mode == "bias" else set())
    out: list[Strength] = [Strength("mask")] if cfg.dose_mask else []
    out += [Strength("scale", s) for s in sorted(scales) if s != 1.0]
    out += [Strength("bias", s) for s in sorted(biases) if s != 1.0]
    return out


def ranked_targets(table: Any, domain: str, kind: Literal["domain", "driver"]) -> list[tuple[int, int]]:
    """A domain's flagged experts, strongest first (specificity for domain experts, CE for drivers)."""
    df = getattr(table, "df", table)
    if df is None or len(df) == 0:
        return []
    rows = df[df["domain"] == domain]
    flag, key = ("is_domain_expert", "specificity") if kind == "domain" else ("is_driver", "ce_mean")
    if flag not in rows.columns:
        raise ConfigError(f"the {kind} table has no {flag!r} column: pass a table made by expertscope")
    rows = rows[rows[flag].fillna(False).astype(bool)]
    if key in rows.columns:
        rows = rows.sort_values(key, ascending=False, kind="stable")
    return [(int(r.layer), int(r.expert)) for r in rows.itertuples()]


@dataclass
class InterventionResult:
    """``table``: Tables 1–2 (one row per domain × condition); ``dose``: one row per domain × kind × strength;
    ``arms``: every evaluated arm (target, random draws, busiest) with per-item correctness;
    ``selectivity``: Δ of each evaluated domain when another domain's experts are ablated."""

    table: pd.DataFrame
    dose: pd.DataFrame = field(default_factory=pd.DataFrame)
    arms: pd.DataFrame = field(default_factory=pd.DataFrame)
    selectivity: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: dict[str, Any] = field(default_factory=dict)

    FILES: ClassVar[dict[str, str]] = {"table": "steering.parquet", "dose": "steering_dose.parquet",
                                       "arms": "steering_arms.parquet",
                                       "selectivity": "steering_selectivity.parquet"}

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        for attr, name in self.FILES.items():
            version = {"version": TABLE_VERSION} if attr == "table" else {}
            write_table(d / name, getattr(self, attr), meta={"table": name.removesuffix(".parquet"), **version,
                                                             **self.settings})

    @classmethod
    def load(cls, directory: str | Path) -> InterventionResult:
        d = Path(directory)
        table, meta = read_table(d / cls.FILES["table"])
        rest = {attr: read_table(d / name)[0] if (d / name).exists() else pd.DataFrame()
                for attr, name in cls.FILES.items() if attr != "table"}
        return cls(table, rest["dose"], rest["arms"], rest["selectivity"], meta)


# ----- evaluation with caching ----------------------------------------------------------------------------
Key = tuple[str, tuple[tuple[int, int], ...], str, float]
#: One planned arm: ``(domain, targets, strength, label, record routing changes)``.
_PlanItem = tuple[Domain, tuple[tuple[int, int], ...], "Strength", str, bool]


@dataclass
class _Measured:
    """One evaluated arm: the task's EvalResult, per-item correctness and routing changes per real token
    (``changed``/``routed`` None when the arm did not record them: verdict control draws)."""

    result: Any
    correct: np.ndarray
    changed: int | None
    routed: int | None


def _count(x: int | None) -> float:
    return float("nan") if x is None else float(x)


class _Runner:
    """Evaluates a domain's task with targets steered, once per distinct (domain, targets, strength)."""

    def __init__(self, model: MoEModel, cfg: InterventionConfig, on_eval: Callable[[str], None] | None,
                 progress: ProgressCallback | None) -> None:
        self.model, self.cfg, self.on_eval, self.progress = model, cfg, on_eval, progress
        self.done: dict[Key, _Measured] = {}
        self.reference: dict[str, tuple[list[list[int]], RoutingRecord]] = {}
        self.lora: dict[tuple[str, str], tuple[_Measured, int]] = {}
        self.evaluations = 0
        self.total = 0
        self.finished = 0
        self.adapter_dir: Path | None = None

    @staticmethod
    def key(dom: Domain, targets: Sequence[tuple[int, int]], s: Strength | None) -> Key:
        if s is None or not targets or s.identity:
            return (dom.name, (), "none", 1.0)
        return (dom.name, tuple(sorted(targets)), s.mode, 1.0 if s.mode == "mask" else s.scale)

    def _tick(self, label: str) -> None:
        if self.on_eval:
            self.on_eval(label)

    def _step(self) -> None:
        self.finished += 1
        if self.progress is not None:
            self.progress("steering", self.finished, max(self.total, self.finished))

    def evaluate(self, dom: Domain, targets: Sequence[tuple[int, int]], s: Strength | None, label: str,
                 record: bool = True) -> _Measured:
        """``dom`` evaluated with ``targets`` steered at ``s`` (once per key); ``record``: also count its routing
        changes (an arm measured without them is measured again when they are asked for)."""
        from ..evaluation import evaluate

        key = self.key(dom, targets, s)
        if key in self.done and (self.done[key].changed is not None or not record):
            return self.done[key]
        self._tick(f"{dom.name}: {label}")
        self.evaluations += 1
        if key[2] == "none":
            res = evaluate(self.model, dom.task, dom, batch_size=self.cfg.batch_size,
                           max_new_tokens=self.cfg.max_new_tokens)
            seqs = _sequences(self.model, dom, res)
            self.reference[dom.name] = (seqs, record_routing(self.model, seqs, self.cfg.batch_size))
            m = _Measured(res, _correct(res), 0, self.reference[dom.name][1].n_tokens * len(self.model.layers))
        else:
            assert s is not None
            m = _measure(self.model, dom, s.spec(targets), self.cfg, *self._reference(dom), record=record)
        self.done[key] = m
        self._step()
        return m

    def prefetch(self, plan: Sequence[_PlanItem],
                 lora: Sequence[tuple[Domain, Domain]], executor: Executor | None) -> None:
        """Run every planned steered arm and router LoRA (``(domain, its training split)``) not yet done
        through ``executor`` (None: in this process); the domains' unsteered runs first, here (the others count
        routing changes against them). The LoRA trainings go first and math (generation) before the other
        tasks, so that with several workers the longest items do not finish last; no result depends on the
        order."""
        todo: dict[Any, tuple[Domain, str, tuple[Any, ...]]] = {}
        for dom, train in lora:
            if ("lora", dom.name) not in self.lora:
                todo[("lora", dom.name)] = (dom, "finetune_router (training)", ("lora", dom.name, train))
        record: dict[Any, bool] = {}
        for dom, targets, st, label, rec in sorted(plan, key=lambda p: p[0].task != "math"):
            key = self.key(dom, targets, st)
            record[key] = record.get(key, False) or rec
            if key[2] != "none" and (key not in self.done or (record[key] and self.done[key].changed is None)):
                todo[key] = (dom, todo[key][1] if key in todo else label, ("arm", dom.name, targets, st, record[key]))
        for dom in [p[0] for p in plan] + [d for d, _ in lora]:
            self._reference(dom)
        if not todo:
            return
        factory = functools.partial(_ArmWorker, domains={d.name: d for d, *_ in todo.values()},
                                    references=self.reference, cfg=self.cfg, adapter_dir=self.adapter_dir)
        items = [item for *_, item in todo.values()]
        results = (executor or LocalExecutor()).run_items(self.model, items, factory)
        for (key, (dom, label, _)), m in zip(todo.items(), results, strict=True):
            self._tick(f"{dom.name}: {label}")
            if key[0] == "lora":
                self.lora[key] = m
            else:
                self.evaluations += 1
                self.done[key] = m
            self._step()

    def _reference(self, dom: Domain) -> tuple[list[list[int]], RoutingRecord]:
        if dom.name not in self.reference:
            self.evaluate(dom, [], None, "original")
        return self.reference[dom.name]

    def finetune(self, dom: Domain, train: Domain) -> tuple[_Measured, int]:
        """The router-LoRA arm of ``dom`` (trained on ``train``): its measurement and trainable parameters."""
        if ("lora", dom.name) not in self.lora:
            self.prefetch([], [(dom, train)], None)
        return self.lora[("lora", dom.name)]


def _sequences(model: MoEModel, dom: Domain, base: Any) -> list[list[int]]:
    """Each item's tokens for counting routing changes: its prompt, and for generation the unsteered model's
    continuation (the tokens it generates from)."""
    from ..data import prompts

    tok = model.tokenizer
    seqs = []
    for ex, pred in zip(dom.examples, base.predictions, strict=True):
        ids = list(tok(prompts.prompt(str(dom.task), ex), add_special_tokens=True)["input_ids"])
        if dom.task == "math" and pred.get("generation"):
            ids += list(tok(str(pred["generation"]), add_special_tokens=False)["input_ids"])
        seqs.append(ids)
    return seqs


def _measure(model: MoEModel, dom: Domain, spec: SteeringSpec, cfg: InterventionConfig, seqs: list[list[int]],
             ref: RoutingRecord, record: bool = True) -> _Measured:
    """One steered arm: ``dom``'s task evaluated under ``spec``, and (``record``) its routing changes over
    ``seqs`` against the unsteered record ``ref``; a recorded masked arm is checked for its masked experts (the
    target arm of every mask condition records, so each router family's mask is checked)."""
    from ..evaluation import evaluate

    with steer(model, spec=spec, count_changes=False):
        res = evaluate(model, dom.task, dom, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    if not record:
        return _Measured(res, _correct(res), None, None)
    rec = record_routing(model, seqs, cfg.batch_size, steering=steer(model, spec=spec, count_changes=False))
    if spec.mode == "mask":
        _check_masked(rec, spec.targets)
    changed, routed = routing_changes(ref, rec)
    return _Measured(res, _correct(res), changed, routed)


def _finetune(model: MoEModel, dom: Domain, train: Domain, cfg: InterventionConfig, seqs: list[list[int]],
              ref: RoutingRecord, adapter_dir: Path | None) -> tuple[_Measured, int]:
    """Train the router LoRA on ``train`` (saved in ``adapter_dir/<domain>``), evaluate ``dom`` and count its
    routing changes, unload: ``(measurement, trainable parameters)``."""
    from ..evaluation import evaluate
    from .router_lora import finetune_router

    ft = finetune_router(model, train, task=dom.task, **cfg.finetune_kwargs())
    if adapter_dir is not None:
        ft.save(adapter_dir / dom.name)
    try:
        res = evaluate(model, dom.task, dom, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
        changed, routed = routing_changes(ref, record_routing(model, seqs, cfg.batch_size))
    finally:
        ft.unload()
    return _Measured(res, _correct(res), changed, routed), int(ft.trainable_parameters)


class _ArmWorker:
    """An executor worker (see :mod:`expertscope.execution`) on ``model``: ``("arm", domain, targets,
    strength)`` evaluates a steered arm, ``("lora", domain, training split)`` the router LoRA. Picklable, so
    worker processes build their own."""

    def __init__(self, model: MoEModel, domains: dict[str, Domain],
                 references: dict[str, tuple[list[list[int]], RoutingRecord]], cfg: InterventionConfig,
                 adapter_dir: Path | None) -> None:
        self.model, self.domains, self.references, self.cfg, self.adapter_dir = (model, domains, references, cfg,
                                                                                 adapter_dir)

    def __call__(self, item: tuple[Any, ...]) -> Any:
        dom = self.domains[item[1]]
        if item[0] == "lora":
            return _finetune(self.model, dom, item[2], self.cfg, *self.references[dom.name], self.adapter_dir)
        return _measure(self.model, dom, item[3].spec(item[2]), self.cfg, *self.references[dom.name],
                        record=item[4])


def _check_masked(rec: RoutingRecord, targets: Sequence[tuple[int, int]]) -> None:
    """A masked expert selected anywhere means the mask did not reach this router's choice: stop."""
    for layer, expert in targets:
        if any(bool((t == expert).any()) for t in rec.selections[layer]):
            raise ModelError(f"mask of expert {expert} at layer {layer} did not remove it from the router's "
                             "selection: mode='mask' is not supported for this router; please report the model")


def _correct(res: Any) -> np.ndarray:
    return np.array([bool(p["correct"]) for p in res.predictions], dtype=float)


# ----- the study ------------------------------------------------------------------------------------------
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


Sets = list[tuple[tuple[int, int], ...]]


@dataclass
class _Arms:
    """The arms of one (domain, kind): targets, the verdict's control draws (``control`` names their kind),
    the reference draws of the other kind, the busiest control, and the domain's activation rates."""

    target: tuple[tuple[int, int], ...]
    controls: Sets
    reference: Sets
    busiest: tuple[tuple[int, int], ...]
    control: str = "matched"
    reference_kind: str = "random"
    reason: str = ""
    activation: dict[tuple[int, int], float] = field(default_factory=dict)


def _draws(kind: str, targets: list[tuple[int, int]], activation: dict[tuple[int, int], float],
           num: dict[int, int], n: int, cfg: InterventionConfig, rng: np.random.Generator) -> tuple[Sets, str]:
    """``n`` distinct control sets of ``kind`` (matched or random), and a reason when there are fewer."""
    if n == 0:
        return [], ""
    if kind == "matched":
        return matched_controls(targets, activation, num, n, rng, cfg.match_pool)
    draws, reason = random_controls(targets, num, n, rng)
    distinct = list(dict.fromkeys(draws))  # a repeated set would understate the spread between sets
    if len(distinct) < len(draws):
        reason = f"only {len(distinct)} distinct random control sets exist for {n} draws"
    return distinct, reason


def _arms(model: MoEModel, cfg: InterventionConfig, dom: str, kind: str, targets: list[tuple[int, int]],
          activation: dict[tuple[int, int], float]) -> _Arms:
    num = {s.layer: s.num_experts for s in model.sites}
    rng = control_seed(cfg.seed, dom, kind)
    control = cfg.control
    controls, reason = _draws(control, targets, activation, num, cfg.n_controls, cfg, rng)
    notes = [reason] if reason else []
    if control == "matched" and not controls and cfg.n_controls:  # no rates (or no room): fall back, said
        control = "random"
        controls, reason = _draws("random", targets, activation, num, cfg.n_controls, cfg, rng)
        notes.append("verdict against random experts of the layer instead" + (f" ({reason})" if reason else ""))
    if cfg.n_controls == 0:
        notes.append("n_controls=0: no verdict")
    elif len(controls) < MIN_DRAWS:
        notes.append(f"{len(controls)} distinct control sets: fewer than {MIN_DRAWS}, no verdict")
    other = "random" if control == "matched" else "matched"
    ref_rng = control_seed(cfg.seed, dom, kind, "reference")
    reference, ref_reason = _draws(other, targets, activation, num, cfg.n_reference, cfg, ref_rng)
    if ref_reason and cfg.n_reference:
        notes.append(f"reference: {ref_reason}")
    if not cfg.busiest:
        busiest: tuple[tuple[int, int], ...] = ()
        notes.append("busiest control switched off")
    elif activation:
        busiest, breason = busiest_control(targets, activation, num)
        notes += [breason] if breason else []
    else:
        busiest = ()
        notes.append("no activation rates (domain table): no busiest control")
    return _Arms(tuple(sorted(targets)), controls, reference, busiest, control, other, "; ".join(notes), activation)


def intervention_study(
    model: MoEModel,
    domains: Sequence[Domain],
    domain_table: Any = None,
    driver_table: Any = None,
    train: dict[str, Domain] | None = None,
    config: InterventionConfig | None = None,
    *,
    on_eval: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
    adapter_dir: str | Path | None = None,
    executor: Executor | None = None,
    **overrides: Any,
) -> InterventionResult:
    """Evaluate every domain (with a ``task``) under each targeted condition with its controls, and give each
    condition a calibrated verdict.

    Settings come from ``config`` (an :class:`~expertscope.config.InterventionConfig`) and/or keyword
    overrides of its fields; a keyword contradicting an explicit ``config`` raises ConfigError. Each domain's
    first ``config.limit`` items are evaluated under every condition. ``domain_table``/``driver_table`` give
    each domain's targets (the domain table's ``activation_rate`` also matches the controls and picks the
    busiest control); ``train`` maps a domain to its training split for the router LoRA.

    A condition is ``specific`` when its BH q-value over every tested condition of the run (``n_tests``) is at
    most ``alpha`` and the interval of ``diff`` (Δ target − mean Δ of the verdict controls) excludes 0 beyond
    the data's resolution (:mod:`expertscope.interventions.verdicts`); ``control`` names the controls it was
    compared with. A condition with nothing to measure (no domain or driver experts, no training split) is a
    row with ``applicable=False``, the ``reason`` in words and NaN in every measured column.
    ``changed_selections`` counts (real token, MoE layer) selections that differ from the unsteered run over
    each item's own tokens (prompt, plus the unsteered continuation for generation), out of
    ``routed_tokens``: independent of batch size (recorded for the target and reference arms).
    ``negative_share``: the share of the targets' logits (unsteered, over the same tokens) that are negative:
    scale mode moves those the other way. ``on_eval(label)`` names each evaluation; ``progress("steering",
    done, total)`` counts them. ``adapter_dir``: save each domain's router adapter in ``adapter_dir/<domain>``
    (read by the routing-overlap stage). ``executor`` (an :class:`~expertscope.execution.Executor`; None: this
    process) evaluates the steered arms, e.g. in worker processes; the results equal the in-process ones when
    the workers compute alike (pin the threads).
    """
    cfg = resolve_config(InterventionConfig, config, overrides)
    tasked = [d.head(cfg.limit) for d in domains if d.task is not None]
    if not tasked:
        raise DataError("no domain has an evaluation task: use presets, synthetic domains or ?task=... in the spec")
    t0 = time.perf_counter()
    runner = _Runner(model, cfg, on_eval, progress)
    runner.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    points = strengths(cfg)
    targets = {d.name: {k: _domain_targets(domain_table if k == "domain" else driver_table, d.name, k)
                        for k in KINDS} for d in tasked}
    arms = {d.name: {k: _arms(model, cfg, d.name, k, targets[d.name][k].experts, activation_rates(domain_table,
                                                                                                   d.name))
                     for k in KINDS if targets[d.name][k].experts} for d in tasked}
    plan = _plan(tasked, arms, points, cfg)
    lora = [(d, (train or {})[d.name]) for d in tasked if cfg.finetune and (train or {}).get(d.name) is not None]
    keys = {runner.key(d, [], None) for d in tasked} | {runner.key(d, t, s) for d, t, s, *_ in plan}
    runner.total = len(keys) + len(lora)
    if progress is not None:
        progress("steering", 0, runner.total)
    runner.prefetch(plan, lora, executor)

    dose_rows: list[dict[str, Any]] = []
    arm_rows: list[dict[str, Any]] = []
    saturated: dict[str, bool] = {}
    for dom in tasked:
        base = runner.evaluate(dom, [], None, "original")
        saturated[dom.name] = bool(base.result.accuracy >= cfg.saturation)
        for kind in KINDS:
            t = targets[dom.name][kind]
            for s in points:
                if not t.experts:
                    dose_rows.append(_not_applicable(dom, f"{kind}_{s.key}", kind, s, t.missing))
                    continue
                row, arm_detail = _controlled(runner, dom, kind, s, arms[dom.name][kind], base, cfg)
                dose_rows.append(row)
                arm_rows += arm_detail
    dose = pd.DataFrame([{**r, "saturated": saturated[r["domain"]]} for r in dose_rows], columns=ROW_COLUMNS)
    _verdicts(dose, cfg)

    rows: list[dict[str, Any]] = []
    for dom in tasked:
        base = runner.evaluate(dom, [], None, "original")
        dom_rows = [_original_row(dom, cfg, base)]
        for kind in KINDS:
            for cond, s in _paper_points(cfg, kind):
                match = dose[(dose["domain"] == dom.name) & (dose["kind"] == kind) & (dose["strength"] == s.label)]
                dom_rows.append({**match.iloc[0].to_dict(), "condition": cond})
        dom_rows.append(_finetune_row(runner, dom, base, (train or {}).get(dom.name), cfg))
        rows += [{**r, "saturated": saturated[dom.name]} for r in dom_rows]
    table = pd.DataFrame(rows, columns=ROW_COLUMNS)
    selectivity, off_arms = (_selectivity(runner, tasked, arms, dose, cfg) if cfg.selectivity
                             else (pd.DataFrame(columns=SELECTIVITY_COLUMNS), []))
    settings = {**cfg.to_dict(), "dose_scales": list(cfg.dose_scales), "dose_biases": list(cfg.dose_biases),
                "strengths": [s.label for s in points], "evaluations": runner.evaluations,
                "n_tests": int(dose["p_vs_control"].notna().sum()),
                "seconds": round(time.perf_counter() - t0, 3),
                "verdict": (f"specific: BH q <= {cfg.alpha} over every tested condition of the run, on the larger of "
                            "a prediction test of the target's delta against the control draws' deltas (Student t, "
                            "draws - 1 df) and a sign test over items; and the interval of delta(target) - mean "
                            "delta(controls) clear of 0 beyond the data's resolution. selective: specific under "
                            f"ablation on its own domain, a loss there, and every other domain's control-normalised "
                            f"loss at most {cfg.max_off_target:.2g} x its own"),
                "note": ("scale mode multiplies logits: a negative logit scaled by s > 1 moves down; bias mode adds "
                         "ln s; mask removes the expert from selection (the token goes to its next choice)")}
    return InterventionResult(table, dose, pd.DataFrame(arm_rows + off_arms), selectivity, settings)


def _verdicts(dose: pd.DataFrame, cfg: InterventionConfig) -> None:
    """Fill ``q_vs_control``, ``n_tests`` and ``specific`` of every tested dose row at once (in place)."""
    tol = [resolution(int(n), int(m)) if n == n and m == m else float("nan")  # NaN: not applicable
           for n, m in zip(dose["n"], dose["control_draws"], strict=True)]
    q, specific = specific_verdicts(dose["p_vs_control"].to_numpy(float), dose["diff_lo"].to_numpy(float),
                                    dose["diff_hi"].to_numpy(float), np.asarray(tol, float), cfg.alpha)
    dose["q_vs_control"] = q
    dose["specific"] = specific
    dose["n_tests"] = int(dose["p_vs_control"].notna().sum())


def _paper_points(cfg: InterventionConfig, kind: str) -> list[tuple[str, Strength]]:
    mode: Literal["scale", "bias"] = cfg.mode
    out = [(f"{kind}_up", Strength(mode, cfg.scale_up)), (f"{kind}_down", Strength(mode, cfg.scale_down))]
    return out + ([(f"{kind}_mask", Strength("mask"))] if cfg.dose_mask else [])


def _plan(tasked: list[Domain], arms: dict[str, dict[Any, _Arms]], points: list[Strength], cfg: InterventionConfig
          ) -> list[_PlanItem]:
    """Every steered arm the study evaluates, in the order it reads them: ``(domain, targets, strength, label,
    record)``; only the target and reference arms record routing changes (the verdict draws and the busiest
    control only score the task)."""
    plan: list[_PlanItem] = []
    for dom in tasked:
        for kind, a in arms[dom.name].items():
            for s in points:
                label = f"{kind} {s.label}"
                plan.append((dom, a.target, s, label, True))
                plan += [(dom, c, s, f"{label} {a.control} control {i + 1}/{len(a.controls)}", False)
                         for i, c in enumerate(a.controls)]
                plan += [(dom, c, s, f"{label} {a.reference_kind} reference {i + 1}/{len(a.reference)}", True)
                         for i, c in enumerate(a.reference)]
                if a.busiest:
                    plan.append((dom, a.busiest, s, f"{label} busiest control", False))
    if cfg.selectivity:
        mask = Strength("mask")
        for kind in KINDS:
            for i in tasked:
                if kind not in arms[i.name]:
                    continue
                a = arms[i.name][kind]
                for j in tasked:
                    plan.append((j, a.target, mask, f"{kind} mask of {i.name}", True))
                    plan += [(j, c, mask, f"{kind} mask of {i.name} control {n + 1}/{len(a.controls)}", False)
                             for n, c in enumerate(_off_target_draws(a, i, j, cfg))]
    return plan


def _stats_row(dom: Domain, condition: str, kind: str, s: Strength, n_targets: int, m: _Measured, base: _Measured,
               cfg: InterventionConfig, idx: np.ndarray, negative_share: float) -> dict[str, Any]:
    """A measured row: accuracy, its change against ``base`` with interval and exact test."""
    res = m.result
    delta, lo, hi = mean_ci(m.correct - base.correct, idx, cfg.ci)
    p, gained, lost = mcnemar_exact(base.correct, m.correct)
    f1, f1_base = res.weighted_f1, base.result.weighted_f1
    nan = float("nan")
    return {
        "domain": dom.name, "task": dom.task, "condition": condition, "kind": kind, "strength": s.label,
        "applicable": True, "reason": "", "mode": s.mode, "scale": s.scale if s.mode != "mask" else nan,
        "n_targets": n_targets, "n_parameters": nan, "n": res.n, "n_truncated": res.n_truncated,
        "accuracy": res.accuracy,
        "ci_low": res.ci_low, "ci_high": res.ci_high, "weighted_f1": f1 if f1 is not None else nan,
        "delta": delta, "delta_lo": lo, "delta_hi": hi,
        "delta_f1": (f1 - f1_base) if f1 is not None and f1_base is not None else nan,
        "p_exact": p, "items_gained": gained, "items_lost": lost, "negative_share": negative_share,
        "changed_selections": _count(m.changed), "routed_tokens": _count(m.routed),
    }


def _original_row(dom: Domain, cfg: InterventionConfig, base: _Measured) -> dict[str, Any]:
    idx = _resampling(len(base.correct), cfg.n_boot, cfg.seed)
    row = _stats_row(dom, "original", "", Strength("scale", 1.0), 0, base, base, cfg, idx, float("nan"))
    return {**row, "strength": "", "mode": "none", "p_exact": float("nan"), "specific": np.nan}


def _condition_resampling(cfg: InterventionConfig, n: int, *names: str) -> np.ndarray:
    """One resampling of a condition's items, shared by every comparison in it (target and controls jointly)."""
    return _resampling(n, cfg.n_boot, int(control_seed(cfg.seed, *names).integers(2**31)))


def _controlled(runner: _Runner, dom: Domain, kind: str, s: Strength, a: _Arms, base: _Measured,
                cfg: InterventionConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The target arm at strength ``s`` beside its controls: one dose row (its verdict filled in later, over
    the whole run) and one row per arm."""
    _, ref = runner._reference(dom)
    label = f"{kind} {s.label}"
    tgt = runner.evaluate(dom, a.target, s, label)
    ctrl = [runner.evaluate(dom, c, s, f"{label} {a.control} control {i + 1}/{len(a.controls)}", record=False)
            for i, c in enumerate(a.controls)]
    refs = [runner.evaluate(dom, c, s, f"{label} {a.reference_kind} reference {i + 1}/{len(a.reference)}")
            for i, c in enumerate(a.reference)]
    busy = runner.evaluate(dom, a.busiest, s, f"{label} busiest control", record=False) if a.busiest else None
    idx = _condition_resampling(cfg, len(base.correct), dom.name, kind, s.key)
    row = _stats_row(dom, f"{kind}_{s.key}", kind, s, len(a.target), tgt, base, cfg, idx,
                     ref.negative_share(a.target))
    nan = float("nan")
    row.update({c: nan for c in ROW_COLUMNS if c not in row})
    row.update(specific=np.nan, control=a.control, reference=a.reference_kind, control_reason=a.reason,
               target_activation=set_activation(a.target, a.activation),
               control_activation=float(np.mean([set_activation(c, a.activation) for c in a.controls]))
               if a.controls else nan)
    if ctrl:
        b = beyond_controls(tgt.correct, np.array([c.correct for c in ctrl]), base.correct, idx, cfg.ci)
        row.update(control_draws=b.draws, control_delta=b.control_delta, control_delta_min=b.control_min,
                   control_delta_max=b.control_max, control_sd=b.control_sd, control_rank=b.rank, diff=b.diff,
                   diff_lo=b.diff_lo, diff_hi=b.diff_hi, t_vs_control=b.t, p_set=b.p_set, p_item=b.p_item,
                   p_vs_control=b.p)
    else:
        row.update(control_draws=0)
    if refs:
        deltas = [float((r.correct - base.correct).mean()) for r in refs]
        row.update(reference_draws=len(refs), reference_delta=float(np.mean(deltas)), reference_delta_min=min(deltas),
                   reference_delta_max=max(deltas), reference_changed=float(np.mean([_count(r.changed) for r in refs])))
    else:
        row.update(reference_draws=0)
    if busy is not None:
        bd, blo, bhi = mean_ci(busy.correct - base.correct, idx, cfg.ci)
        dd, dlo, dhi = mean_ci(tgt.correct - busy.correct, idx, cfg.ci)
        row.update(busiest_delta=bd, busiest_delta_lo=blo, busiest_delta_hi=bhi, diff_busiest=dd,
                   diff_busiest_lo=dlo, diff_busiest_hi=dhi, p_vs_busiest=sign_test(tgt.correct - busy.correct)[0])
    arms: list[tuple[str, str, int, tuple[tuple[int, int], ...], _Measured]] = [("target", "target", -1, a.target, tgt)]
    arms += [(a.control, "verdict", i, c, m) for i, (c, m) in enumerate(zip(a.controls, ctrl, strict=True))]
    arms += [(a.reference_kind, "reference", i, c, m) for i, (c, m) in enumerate(zip(a.reference, refs, strict=True))]
    if busy is not None:
        arms.append(("busiest", "reference", -1, a.busiest, busy))
    detail = [{**_arm_row(dom, dom.name, kind, s, arm, role, draw, experts, m, base, a),
               "negative_share": ref.negative_share(experts)} for arm, role, draw, experts, m in arms]
    return row, detail


def _not_applicable(dom: Domain, condition: str, kind: str, s: Strength | None, reason: str) -> dict[str, Any]:
    """A condition with nothing to measure: the reason, and NaN wherever a number would be measured."""
    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS, float("nan"))
    row.update(domain=dom.name, task=dom.task, condition=condition, kind=kind, applicable=False, reason=reason,
               strength=s.label if s is not None else "", mode=s.mode if s is not None else "lora",
               scale=s.scale if s is not None and s.mode != "mask" else float("nan"), specific=np.nan,
               control_reason="", control="", reference="", n_targets=0 if s is not None else float("nan"))
    return row


def _finetune_row(runner: _Runner, dom: Domain, base: _Measured, train: Domain | None,
                  cfg: InterventionConfig) -> dict[str, Any]:
    """The router-LoRA row (mode ``lora``): its trainable parameter count in ``n_parameters``."""
    if not cfg.finetune:
        return _not_applicable(dom, "finetune_router", "", None, "router LoRA switched off (finetune=False)")
    if train is None:
        return _not_applicable(dom, "finetune_router", "", None, "no training split given")
    m, n_params = runner.finetune(dom, train)
    idx = _resampling(len(base.correct), cfg.n_boot, cfg.seed)
    row = _stats_row(dom, "finetune_router", "", Strength("scale", 1.0), 0, m, base, cfg, idx, float("nan"))
    nan = float("nan")
    return {**{c: nan for c in ROW_COLUMNS}, **row, "strength": "", "mode": "lora", "scale": nan,
            "n_targets": nan, "n_parameters": n_params, "specific": np.nan, "control": "", "reference": "",
            "control_reason": "no controls for LoRA"}


def _selectivity(runner: _Runner, tasked: list[Domain], arms: dict[str, dict[Any, _Arms]], dose: pd.DataFrame,
                 cfg: InterventionConfig) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Ablate each domain's experts of each kind and evaluate every domain, beside the same verdict control
    draws ablated there: per cell Δ with its interval, the control-normalised effect ``norm_delta`` (Δ target −
    mean Δ controls, item-bootstrap interval), its share of the own domain's (``off_target_share``), the raw gap
    ``Δ(i, j) − Δ(i, i)`` (items of the two domains resampled independently), and the set's verdict
    (``selective``, with ``selective_reason``; the same on every row of the set). Also the arms evaluated on
    the other domains (rows of the arms table with ``ablated`` ≠ ``domain``)."""
    mask = Strength("mask")
    rows: list[dict[str, Any]] = []
    arm_rows: list[dict[str, Any]] = []
    for kind in KINDS:
        for i in tasked:
            if kind not in arms[i.name]:
                continue
            a = arms[i.name][kind]
            cells = []
            boots: dict[str, np.ndarray] = {}
            for j in tasked:
                base = runner.evaluate(j, [], None, "original")
                m = runner.evaluate(j, a.target, mask, f"{kind} mask of {i.name}")
                draws = _off_target_draws(a, i, j, cfg)
                ctrl = [runner.evaluate(j, c, mask, f"{kind} mask of {i.name} control", record=False) for c in draws]
                d = m.correct - base.correct
                idx = _condition_resampling(cfg, len(d), "selectivity", kind, i.name, j.name)
                delta, lo, hi = mean_ci(d, idx, cfg.ci)
                nd, nlo, nhi = (mean_ci(m.correct - np.mean([c.correct for c in ctrl], axis=0), idx, cfg.ci) if ctrl
                                else (float("nan"),) * 3)
                cdelta = float(np.mean([(c.correct - base.correct).mean() for c in ctrl])) if ctrl else float("nan")
                cells.append({"kind": kind, "ablated": i.name, "evaluated": j.name, "n_targets": len(a.target),
                              "n": m.result.n, "delta": delta, "delta_lo": lo, "delta_hi": hi,
                              "p_exact": mcnemar_exact(base.correct, m.correct)[0],
                              "changed_selections": _count(m.changed), "routed_tokens": _count(m.routed),
                              "control": a.control, "control_draws": len(ctrl), "control_delta": cdelta,
                              "norm_delta": nd, "norm_lo": nlo, "norm_hi": nhi})
                boots[j.name] = idx @ d / max(len(d), 1)  # the resampled means
                if j.name != i.name:
                    arm_rows += [_arm_row(j, i.name, kind, mask, a.control, "verdict", n, c, mc, base, a)
                                 for n, (c, mc) in enumerate(zip(draws, ctrl, strict=True))]
                    arm_rows.append(_arm_row(j, i.name, kind, mask, "target", "target", -1, a.target, m, base, a))
            own = next(c for c in cells if c["evaluated"] == i.name)
            mask_row = dose[(dose["domain"] == i.name) & (dose["kind"] == kind) & (dose["mode"] == "mask")]
            spec = mask_row["specific"].iloc[0] if len(mask_row) else None
            verdict, why = selectivity_verdict(
                own["norm_delta"], None if spec is None or spec != spec else bool(spec),
                {c["evaluated"]: c["norm_delta"] for c in cells if c is not own}, cfg.max_off_target)
            for c in cells:
                gap = glo = ghi = share = float("nan")
                if c is not own:
                    g = boots[c["evaluated"]] - boots[i.name]  # independent resamples of two domains' items
                    gap = c["delta"] - own["delta"]
                    glo, ghi = (float(x) for x in np.percentile(g, [100 * (1 - cfg.ci) / 2, 100 * (1 + cfg.ci) / 2]))
                    share = c["norm_delta"] / own["norm_delta"] if own["norm_delta"] else float("nan")
                rows.append({**c, "off_target_share": share, "gap": gap, "gap_lo": glo, "gap_hi": ghi,
                             "selective": verdict if verdict is not None else np.nan, "selective_reason": why})
    return pd.DataFrame(rows, columns=SELECTIVITY_COLUMNS), arm_rows


def _off_target_draws(a: _Arms, i: Domain, j: Domain, cfg: InterventionConfig) -> Sets:
    """The verdict draws ablated on domain ``j`` for ``i``'s set: all of them on ``i`` itself (the mask
    condition's own), the first ``selectivity_controls`` elsewhere (their mean normalises the cell)."""
    return a.controls if j.name == i.name else a.controls[:cfg.selectivity_controls]


def _arm_row(dom: Domain, ablated: str, kind: str, s: Strength, arm: str, role: str, draw: int,
             experts: tuple[tuple[int, int], ...], m: _Measured, base: _Measured, a: _Arms) -> dict[str, Any]:
    """One row of the arms table: an arm steered with ``ablated``'s ``experts`` and evaluated on ``dom``."""
    return {"domain": dom.name, "ablated": ablated, "kind": kind, "strength": s.label, "mode": s.mode,
            "scale": s.scale if s.mode != "mask" else float("nan"), "arm": arm, "role": role, "draw": draw,
            "experts": ";".join(f"{layer}:{e}" for layer, e in experts), "n": m.result.n,
            "activation": set_activation(experts, a.activation), "accuracy": m.result.accuracy,
            "delta": float((m.correct - base.correct).mean()), "negative_share": float("nan"),
            "changed_selections": _count(m.changed), "routed_tokens": _count(m.routed),
            "correct": "".join(str(int(c)) for c in m.correct)}
