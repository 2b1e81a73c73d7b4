"""The whole study as a resumable pipeline of stages writing into one run directory.

Each stage reads what earlier stages wrote, writes its own outputs atomically and is recorded in the
manifest as complete; ``resume=True`` skips completed stages, so an interrupted run continues where it
stopped and ends with the same tables as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import BaseConfig, DomainExpertConfig, InterventionConfig
from .errors import ConfigError
from .progress import ProgressCallback
from .rundir import RunDir, open_run_dir

DEMO_DOMAINS = (
    "emotion=synthetic:emotion@validation",
    "knowledge=synthetic:knowledge@validation",
    "math=synthetic:math@validation",
)


@dataclass(frozen=True)
class StudyConfig(BaseConfig):
    """Settings of :func:`run_study`. With no ``domains`` the synthetic three-domain benchmark is used."""

    model: str = "demo"
    domains: tuple[str, ...] = ()
    limit: int | None = 300
    causal_limit: int | None = 120
    causal_method: Literal["exact", "fast", "hybrid", "fisher"] = "exact"
    eval_limit: int | None = 300
    train_limit: int | None = 300
    steer_mode: Literal["scale", "bias"] = InterventionConfig.mode
    scale_up: float = InterventionConfig.scale_up
    scale_down: float = InterventionConfig.scale_down
    batch_size: int = 16
    max_length: int = 512
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0
    z: float = 2.0
    entropy: Literal["bernoulli", "eq1"] = "bernoulli"
    n_boot: int = 1000
    n_perm: int | Literal["auto"] = "auto"
    trust_remote_code: bool = False

    def validate(self) -> None:
        from .data.checks import check_domain_specs
        from .validation import check_finite, check_positive, check_positive_finite

        if isinstance(self.domains, str):
            check_domain_specs(self.domains)  # refuses one string (it would be split into characters)

        for name in ("limit", "causal_limit", "eval_limit", "train_limit"):
            check_positive(getattr(self, name), name, allow_none=True)
        for name in ("batch_size", "max_length"):
            check_positive(getattr(self, name), name)
        check_positive(self.n_boot, "n_boot", allow_zero=True)
        if self.n_perm != "auto":
            check_positive(self.n_perm, "n_perm", allow_zero=True)
        check_finite(self.z, "z")
        check_positive_finite(self.scale_up, "scale_up")
        check_positive_finite(self.scale_down, "scale_down")

    def check_inputs(self, stages: Sequence[str] | None = None) -> None:
        """Check what can be checked before any expensive stage: device, model location, domain specs, and
        what the chosen ``stages`` (default: all) need of the domains."""
        from .data.checks import check_domain_specs, check_stage_inputs
        from .models.loading import resolve_source
        from .validation import check_device

        check_device(self.device)
        resolve_source(self.model)
        check_domain_specs(self.domain_specs)
        check_stage_inputs(self.domain_specs, stages if stages is not None else [n for n, _ in STAGES])

    @property
    def domain_specs(self) -> tuple[str, ...]:
        return self.domains or DEMO_DOMAINS

    def split_specs(self, split: str) -> tuple[str, ...]:
        """The domain specs moved to another split (synthetic sources only; others are kept as given)."""
        out = []
        for spec in self.domain_specs:
            name, _, source = spec.partition("=")
            if source.startswith("synthetic:"):
                source = source.split("@")[0] + f"@{split}"
            out.append(f"{name}={source}")
        return tuple(out)


@dataclass
class StudyContext:
    """What stages share: the config, the output directory, and lazily loaded model and domains."""

    config: StudyConfig
    out: Path
    _model: Any = None
    _domains: Any = None
    state: dict[str, Any] = field(default_factory=dict)
    progress: ProgressCallback | None = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from .models.loading import load_model

            c = self.config
            self._model = load_model(c.model, dtype=c.dtype, device=c.device, trust_remote_code=c.trust_remote_code)
        return self._model

    @property
    def domains(self) -> Any:
        if self._domains is None:
            from .data.sources import load_domains

            self._domains = load_domains(self.config.domain_specs, limit=self.config.limit, seed=self.config.seed)
        return self._domains

    def split_domains(self, split: str, limit: int | None) -> Any:
        """The domains' ``split`` (synthetic) — for real data the given sources are reused."""
        from .data.sources import load_domains

        return load_domains(self.config.split_specs(split), limit=limit, seed=self.config.seed)

    def drivers(self) -> Any:
        from .causal.drivers import DriverTable

        path = self.out / "drivers.parquet"
        return DriverTable.load(path) if path.exists() else None


Stage = Callable[[StudyContext], dict[str, Any]]


def _stage_profile(ctx: StudyContext) -> dict[str, Any]:
    from .stats.profile import RoutingProfile, checkpointer, profile

    c = ctx.config
    previous = RoutingProfile.load(ctx.out) if (ctx.out / "profile.safetensors").exists() else None
    prof = profile(ctx.model, ctx.domains, batch_size=c.batch_size, max_length=c.max_length,
                   resume_from=previous, on_batch=checkpointer(ctx.out), progress=ctx.progress)
    prof.save(ctx.out)
    from .stats.routing_mi import save_routing_mi

    mi = save_routing_mi(prof, ctx.out)
    n, _ = prof.totals()
    return {"tokens": {d: int(x) for d, x in zip(prof.domains, n, strict=True)}, "truncated": prof.truncated,
            "routing_mi_bits": {int(r.layer): round(float(r.mi_bits), 4) for r in mi.itertuples()}}


def _stage_coactivation(ctx: StudyContext) -> dict[str, Any]:
    from .stats.profile import RoutingProfile
    from .stats.structure import save_coactivation_tables

    return save_coactivation_tables(RoutingProfile.load(ctx.out), ctx.out)


def _stage_domain_experts(ctx: StudyContext) -> dict[str, Any]:
    from .stats.domain_experts import domain_experts
    from .stats.profile import RoutingProfile

    c = ctx.config
    cfg = DomainExpertConfig(z=c.z, entropy=c.entropy, n_boot=c.n_boot, n_perm=c.n_perm, seed=c.seed)
    table = domain_experts(RoutingProfile.load(ctx.out), cfg)
    table.save(ctx.out / "domain_experts.parquet")
    counts = {d: len(table.experts(d)) for d in table.settings["domains"]}
    return {"domain_experts": counts, "rule": table.settings["rule_text"]}


def _stage_drivers(ctx: StudyContext) -> dict[str, Any]:
    from .causal import causal_effects, driver_experts
    from .stats.domain_experts import domain_experts
    from .stats.profile import RoutingProfile

    c = ctx.config
    doms = [d.head(c.causal_limit) for d in ctx.domains]
    effects = causal_effects(ctx.model, doms, method=c.causal_method, batch_size=c.batch_size,
                             max_length=c.max_length, checkpoint=ctx.out / "ce_checkpoint.npz", resume=True,
                             progress=ctx.progress)
    effects.save(ctx.out)
    table = driver_experts(effects, seed=c.seed, n_boot=c.n_boot)
    table.save(ctx.out / "drivers.parquet")
    (ctx.out / "ce_checkpoint.npz").unlink(missing_ok=True)
    # The general experts exclude drivers: refresh the domain-expert table with them.
    cfg = DomainExpertConfig(z=c.z, entropy=c.entropy, n_boot=c.n_boot, n_perm=c.n_perm, seed=c.seed)
    domain_experts(RoutingProfile.load(ctx.out), cfg, drivers=table.df).save(ctx.out / "domain_experts.parquet")
    counts = {d: int(table.df[(table.df.domain == d) & table.df.is_driver].shape[0]) for d in table.df.domain.unique()}
    return {"drivers": counts, "rule": table.settings["rule_text"], "summary": [r["text"] for r in table.summary()],
            "timings": effects.settings.get("timings", {}),
            "skipped": effects.settings.get("skipped", 0)}


def _stage_causal_rate(ctx: StudyContext) -> dict[str, Any]:
    from .causal import causal_rate
    from .io import write_table

    c = ctx.config
    rate = causal_rate(ctx.model, ctx.domains, ctx.drivers(), batch_size=c.batch_size, max_length=c.max_length)
    write_table(ctx.out / "causal_rate.parquet", rate, meta={"table": "causal_rate"})
    peak = rate.loc[rate["causal_rate"].idxmax()] if len(rate) else None
    return {"peak": None if peak is None else {"domain": str(peak["domain"]), "layer": int(peak["layer"]),
                                                 "causal_rate": float(peak["causal_rate"])}}


def _stage_tokens(ctx: StudyContext) -> dict[str, Any]:
    from .io import write_table
    from .stats.domain_experts import DomainExpertTable
    from .stats.tokens import flagged_experts, position_profile, record_tokens, token_associations

    c = ctx.config
    record = record_tokens(ctx.model, ctx.domains, batch_size=c.batch_size, max_length=c.max_length)
    drivers = ctx.drivers()
    positions = position_profile(ctx.model, ctx.domains, drivers.df, record=record)
    write_table(ctx.out / "token_positions.parquet", positions, meta={"table": "token_positions"})
    experts = flagged_experts(DomainExpertTable.load(ctx.out / "domain_experts.parquet").df, drivers.df)
    assoc = token_associations(ctx.model, ctx.domains, experts, record=record)
    write_table(ctx.out / "token_associations.parquet", assoc, meta={"table": "token_associations"})
    return {"tokens": len(record.token_id) if hasattr(record, "token_id") else None,
            "associations": len(assoc)}


def _stage_expert_map(ctx: StudyContext) -> dict[str, Any]:
    from .io import write_table
    from .stats.expert_map import expert_map
    from .stats.profile import RoutingProfile

    c = ctx.config
    written = {}
    for rep in ("router", "output"):
        df = expert_map(ctx.model, RoutingProfile.load(ctx.out), representation=rep, seed=c.seed,
                        drivers=ctx.drivers().df, domains=ctx.domains if rep == "output" else None)
        write_table(ctx.out / f"expert_map_{rep}.parquet", df, meta={"table": "expert_map", "representation": rep})
        written[rep] = int(df["cluster"].nunique())
    return {"clusters": written}


def _stage_steering(ctx: StudyContext) -> dict[str, Any]:
    from .interventions.study import intervention_study
    from .stats.domain_experts import DomainExpertTable

    c = ctx.config
    test = ctx.split_domains("test", c.eval_limit)
    train = {d.name: d for d in ctx.split_domains("train", c.train_limit)}
    result = intervention_study(
        ctx.model, test, DomainExpertTable.load(ctx.out / "domain_experts.parquet"), ctx.drivers(), train=train,
        config=InterventionConfig(mode=c.steer_mode, scale_up=c.scale_up, scale_down=c.scale_down,
                                  sweep_scales=(0.6, 0.8, 1.0, 1.2, 1.4), sweep_counts=(1, 2, 4),
                                  finetune_epochs=1, finetune_batch_size=8, finetune_lr=5e-3,
                                  batch_size=c.batch_size, n_boot=c.n_boot, seed=c.seed),
        adapter_dir=ctx.out / "router_lora",
    )
    result.save(ctx.out)
    t = result.table
    # Not-applicable conditions (no targets) are recorded as null, never as a number.
    return {"accuracy": {f"{r.domain}/{r.condition}": round(float(r.accuracy), 4) if r.applicable else None
                         for r in t.itertuples()}}


def _stage_routing_overlap(ctx: StudyContext) -> dict[str, Any]:
    """How far steering and the router LoRA moved the routing, on the first ``causal_limit`` test texts."""
    from .interventions.routing_change import routing_changes
    from .io import write_table
    from .stats.domain_experts import DomainExpertTable

    c = ctx.config
    table = routing_changes(
        ctx.model, ctx.split_domains("test", c.causal_limit),
        DomainExpertTable.load(ctx.out / "domain_experts.parquet"), ctx.drivers(), adapter_dir=ctx.out / "router_lora",
        batch_size=c.batch_size, max_length=c.max_length,
        config=InterventionConfig(mode=c.steer_mode, scale_up=c.scale_up, n_boot=c.n_boot, seed=c.seed))
    write_table(ctx.out / "routing_overlap.parquet", table, meta={"table": "routing_overlap"})
    ok = table[table.applicable]
    means = ok.groupby(["domain", "condition"])["overlap"].mean()
    return {"overlap": {f"{d}/{k}": round(float(v), 4) for (d, k), v in means.items()}}


def _stage_report(ctx: StudyContext) -> dict[str, Any]:
    from .report import report

    if "mark_complete" in ctx.state:  # the report is the last stage: show the run as complete in it
        ctx.state["mark_complete"]()
    path = report(ctx.out)
    return {"report": path.name}


#: The stages in order; each writes its tables into the run directory.
STAGES: list[tuple[str, Stage]] = [
    ("profile", _stage_profile),
    ("coactivation", _stage_coactivation),
    ("domain_experts", _stage_domain_experts),
    ("drivers", _stage_drivers),
    ("causal_rate", _stage_causal_rate),
    ("tokens", _stage_tokens),
    ("expert_map", _stage_expert_map),
    ("steering", _stage_steering),
    ("routing_overlap", _stage_routing_overlap),
    ("report", _stage_report),
]


def run_study(
    config: StudyConfig,
    out: str | Path,
    resume: bool = False,
    force: bool = False,
    on_stage: Callable[[str, str], None] | None = None,
    stages: Sequence[str] | None = None,
    kind: str = "study",
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Run the stages (all, or the named ones in pipeline order) into ``out``; returns the final manifest.

    ``on_stage(name, "start"|"done"|"skip")`` reports the stages, ``progress(task, done, total)`` the batches
    within them; ``kind`` names the run in its manifest.
    """
    chosen = [(n, f) for n, f in STAGES if stages is None or n in stages]
    unknown = sorted(set(stages or ()) - {n for n, _ in STAGES})
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}: choose from {', '.join(n for n, _ in STAGES)}")
    config.check_inputs([n for n, _ in chosen])
    fingerprint = study_fingerprint(config)
    with open_run_dir(out, kind, fingerprint, config.to_dict(), resume=resume, force=force) as rd:
        return _run_stages(rd, config, chosen, on_stage, progress)


def study_fingerprint(config: StudyConfig) -> dict[str, Any]:
    """What decides a study's tables: the model's files, the domain data, and every setting."""
    from .rundir import run_fingerprint

    return run_fingerprint(config.model, config.domain_specs, config.to_dict())


def _run_stages(rd: RunDir, config: StudyConfig, chosen: list[tuple[str, Stage]],
                on_stage: Callable[[str, str], None] | None, progress: ProgressCallback | None = None
                ) -> dict[str, Any]:
    old = rd.previous
    done: dict[str, Any] = dict(old.get("stages", {}))
    ctx = StudyContext(config, rd.path, progress=progress)
    t_start = time.perf_counter()

    def save(status: str) -> dict[str, Any]:
        model_info = ctx._model.describe() if ctx._model is not None else old.get("model")
        return rd.write_manifest(status, seed=config.seed, model=model_info, stages=done,
                                 planned_stages=[n for n, _ in chosen])  # the report's banner names what is missing

    save("running")
    ctx.state["mark_complete"] = lambda: save("complete")
    for name, stage in chosen:
        if done.get(name, {}).get("status") == "complete":
            if on_stage:
                on_stage(name, "skip")
            continue
        if on_stage:
            on_stage(name, "start")
        t = time.perf_counter()
        result = stage(ctx)
        done[name] = {"status": "complete", "seconds": round(time.perf_counter() - t, 3), **result}
        save("running")
        if on_stage:
            on_stage(name, "done")
    done["_total_seconds"] = {"status": "info", "seconds": round(time.perf_counter() - t_start, 3)}
    return save("complete")
