"""The stage functions: each calls one library function with the settings of ``ctx.config.<section>``,
writes its tables into ``ctx.out`` atomically and returns a small JSON summary for the manifest. Their records
(order, settings, tables, needs) are in :mod:`.registry`."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ..causal import CausalEffects, causal_effects, causal_rate, driver_experts, replicate_drivers
from ..config import DomainExpertConfig, DriverConfig
from ..evaluation import evaluate
from ..integrations.lm_eval import SYNTHETIC_TASKS, lm_eval_steered, task_manager, write_synthetic_tasks
from ..interventions.hypotheses import COLUMNS as CONFIRMATION_COLUMNS
from ..interventions.hypotheses import Confirmation, Hypotheses, compare, confirm, pre_register
from ..interventions.overlap import routing_changes
from ..interventions.steering import SteeringSpec
from ..interventions.steering_study import InterventionResult, intervention_study
from ..io import atomic_write, write_json, write_table
from ..report import report as write_report
from ..stats.domain_experts import domain_experts
from ..stats.expert_map import expert_map
from ..stats.profile import RoutingProfile, checkpointer, profile
from ..stats.replication import Replication, replicate_domain_experts
from ..stats.routing_mi import save_routing_mi
from ..stats.structure import save_coactivation_tables
from ..stats.tokens import flagged_experts, position_profile, record_tokens, token_associations
from .context import StudyContext
from .jobs import save_phases


def _df(table: Any) -> Any:
    return None if table is None else table.df


def profile_stage(ctx: StudyContext) -> dict[str, Any]:
    c = ctx.config
    previous = RoutingProfile.load(ctx.out) if (ctx.out / "profile.safetensors").exists() else None
    prof = profile(ctx.model, ctx.domains, c.profile, resume_from=previous, on_batch=checkpointer(ctx.out),
                   progress=ctx.progress, executor=ctx.executor)
    prof.save(ctx.out)
    ctx.keep("profile", prof)
    mi = save_routing_mi(prof, ctx.out)
    n, _ = prof.totals()
    out = {"tokens": {d: int(x) for d, x in zip(prof.domains, n, strict=True)}, "truncated": prof.truncated,
           "max_length_used": prof.config.get("max_length_used"),
           "routing_mi_bits": {int(r.layer): round(float(r.mi_bits), 4) for r in mi.itertuples()}}
    phases = save_phases(prof, ctx.out, seed=c.seed)
    if phases is not None:
        out["phases"] = phases
    return out


def coactivation(ctx: StudyContext) -> dict[str, Any]:
    return save_coactivation_tables(ctx.profile(), ctx.out)


def drivers(ctx: StudyContext) -> dict[str, Any]:
    c = ctx.config
    effects = causal_effects(ctx.model, ctx.domains, c.causal, drivers=c.drivers,
                             checkpoint=ctx.out / "ce_checkpoint.jsonl",
                             resume=True, progress=ctx.progress)
    effects.save(ctx.out)
    table = driver_experts(effects, c.drivers)
    table.save(ctx.out / "drivers.parquet")
    ctx.keep("drivers", table)
    (ctx.out / "ce_checkpoint.jsonl").unlink(missing_ok=True)
    counts = {d: int(table.df[(table.df.domain == d) & table.df.is_driver].shape[0]) for d in table.df.domain.unique()}
    return {"drivers": counts, "rule": table.settings["rule_text"], "summary": [r["text"] for r in table.summary()],
            "timings": effects.settings.get("timings", {}), "skipped": effects.settings.get("skipped", 0),
            "resumed_rows": effects.settings.get("resumed_rows", 0),
            "engine_notes": effects.settings.get("engine_notes", [])}


def domain_experts_stage(ctx: StudyContext) -> dict[str, Any]:
    # Drivers run first, so "general" (neither domain expert nor driver) is final when this table is written.
    table = domain_experts(ctx.profile(), ctx.config.domain_experts, drivers=_df(ctx.drivers()))
    table.save(ctx.out / "domain_experts.parquet")
    ctx.keep("domain_experts", table)
    counts = {d: len(table.experts(d)) for d in table.settings["domains"]}
    return {"domain_experts": counts, "rule": table.settings["rule_text"]}


def replication(ctx: StudyContext) -> dict[str, Any]:
    # The halves get exactly the rules (configs) the saved tables were made with.
    parts = []
    dom = ctx.domain_experts()
    if dom is not None:
        parts.append(replicate_domain_experts(ctx.profile(), ctx.domains, seed=ctx.config.seed, full=dom.df,
                                              config=DomainExpertConfig.from_dict(dom.settings["config"])))
    drv = ctx.drivers()
    if drv is not None and (ctx.out / "ce.parquet").exists():
        parts.append(replicate_drivers(CausalEffects.load(ctx.out), ctx.domains, seed=ctx.config.seed, full=drv.df,
                                       config=DriverConfig.from_dict(drv.settings["config"])))
    rep = Replication.concat(parts)
    rep.save(ctx.out / "replication.parquet")
    return {"jaccard": {f"{r.kind}/{r.domain}": None if r.jaccard != r.jaccard else round(float(r.jaccard), 3)
                        for r in rep.summary.itertuples()}}


def causal_rate_stage(ctx: StudyContext) -> dict[str, Any]:
    c = ctx.config.causal
    drv = ctx.drivers()
    rate = causal_rate(ctx.model, ctx.domains, drv, batch_size=c.batch_size, max_length=c.max_length)
    write_table(ctx.out / "causal_rate.parquet", rate,
                meta={"table": "causal_rate", "driver_rule": drv.settings["rule_text"]})
    peak = rate.loc[rate["causal_rate"].idxmax()] if len(rate) else None
    return {"peak": None if peak is None else {"domain": str(peak["domain"]), "layer": int(peak["layer"]),
                                                 "causal_rate": float(peak["causal_rate"])}}


def tokens(ctx: StudyContext) -> dict[str, Any]:
    c = ctx.config.profile
    record = record_tokens(ctx.model, ctx.domains, batch_size=c.batch_size, max_length=c.max_length)
    drv = ctx.drivers()
    positions = position_profile(ctx.model, ctx.domains, drv.df, record=record)
    write_table(ctx.out / "token_positions.parquet", positions, meta={"table": "token_positions"})
    experts = flagged_experts(ctx.domain_experts().df, drv.df)
    assoc = token_associations(ctx.model, ctx.domains, experts, record=record)
    write_table(ctx.out / "token_associations.parquet", assoc, meta={"table": "token_associations"})
    return {"tokens": len(record.token_id) if hasattr(record, "token_id") else None,
            "associations": len(assoc)}


def expert_map_stage(ctx: StudyContext) -> dict[str, Any]:
    written = {}
    for rep in ("router", "output"):
        df = expert_map(ctx.model, ctx.profile(), representation=rep, seed=ctx.config.seed,
                        drivers=ctx.drivers().df, domains=ctx.domains if rep == "output" else None)
        write_table(ctx.out / f"expert_map_{rep}.parquet", df, meta={"table": "expert_map", "representation": rep})
        written[rep] = int(df["cluster"].nunique())
    return {"clusters": written}


def hypotheses_stage(ctx: StudyContext) -> dict[str, Any]:
    """Pre-register what discovery found, before any confirmation item is evaluated (hypotheses.json)."""
    prof, dom, drv = ctx.profile(), ctx.domain_experts(), ctx.drivers()
    rules = {"domain": dom.settings.get("rule_text", "") if dom is not None else "",
             "driver": drv.settings.get("rule_text", "") if drv is not None else ""}
    hyp = pre_register(dom, drv, ctx.config.intervention, model_source=str(ctx.config.model), layers=prof.layers,
                       num_experts=prof.num_experts, discovery=ctx.domains, rules=rules, seed=ctx.config.seed)
    hyp.save(ctx.out / "hypotheses.json")
    return {"hypotheses": len(hyp.hypotheses), "hash": hyp.hash}


def confirmation(ctx: StudyContext) -> dict[str, Any]:
    """Pre-registered against observed: on the study's confirmation part (its steering tables, when present) and on
    each second corpus (a steering study of exactly the registered sets), in confirmation.parquet."""
    c = ctx.config
    hyp = Hypotheses.load(c.hypotheses or ctx.path("hypotheses.json"))
    parts, results = [], {}
    if c.hypotheses is None and ctx.path("steering_dose.parquet").exists():
        sources = {d.name: d.source or d.name for d in ctx.inputs.test or []}
        parts.append(compare(hyp, InterventionResult.load(ctx.out), "the confirmation part", sources,
                             ctx.inputs.overlap, hyp.config().saturation))
    if ctx.inputs.second:
        done = confirm(hyp, ctx.model, ctx.inputs.second, config=hyp.config().replace(limit=c.intervention.limit),
                       allow_overlap=c.allow_overlap, corpus="the second corpus", executor=ctx.executor,
                       progress=ctx.progress)
        second = ctx.out / "confirmation" if c.hypotheses is None else ctx.out
        assert done.result is not None
        done.result.save(second)
        parts.append(done.table)
        results = {d.name: d.source for d in ctx.inputs.second}
    filled = [p for p in parts if len(p)]  # pandas warns on concatenating empty frames
    table = pd.concat(filled, ignore_index=True) if filled else pd.DataFrame(columns=list(CONFIRMATION_COLUMNS))
    Confirmation(table, None, {"hypotheses_hash": hyp.hash, "second": results,
                               "overlap": dict(ctx.inputs.overlap)}).save(ctx.out)
    counts = table["outcome"].value_counts().to_dict() if len(table) else {}
    return {"hypotheses_hash": hyp.hash, "outcomes": {str(k): int(v) for k, v in counts.items()},
            "corpora": sorted(set(table["corpus"])) if len(table) else []}


def steering(ctx: StudyContext) -> dict[str, Any]:
    assert ctx.inputs.test is not None and ctx.inputs.train is not None  # prepare() loads them for this stage
    result = intervention_study(ctx.model, ctx.inputs.test, ctx.domain_experts(), ctx.drivers(),
                                train={d.name: d for d in ctx.inputs.train}, config=ctx.config.intervention,
                                progress=ctx.progress, adapter_dir=ctx.out / "router_lora", executor=ctx.executor)
    result.settings["overlap"] = dict(ctx.inputs.overlap)  # the report says so on every affected verdict
    result.save(ctx.out)
    # Not-applicable conditions (no targets) are recorded as null, never as a number.
    return {"accuracy": {f"{r.domain}/{r.condition}": round(float(r.accuracy), 4) if r.applicable else None
                         for r in result.table.itertuples()}}


def routing_overlap(ctx: StudyContext) -> dict[str, Any]:
    """How far steering and the router LoRA moved the routing, on the first ``causal.limit`` test texts."""
    assert ctx.inputs.test is not None  # prepare() loads them for this stage
    c = ctx.config
    table = routing_changes(ctx.model, [d.head(c.causal.limit) for d in ctx.inputs.test], ctx.domain_experts(),
                            ctx.drivers(), adapter_dir=ctx.path("router_lora"), batch_size=c.causal.batch_size,
                            max_length=c.causal.max_length, config=c.intervention)
    write_table(ctx.out / "routing_overlap.parquet", table, meta={"table": "routing_overlap"})
    means = table[table.applicable].groupby(["domain", "condition"])["overlap"].mean()
    return {"overlap": {f"{d}/{k}": round(float(v), 4) for (d, k), v in means.items()}}


def report(ctx: StudyContext) -> dict[str, Any]:
    if ctx.on_report is not None:  # the report is the last stage: show the run as complete in it
        ctx.on_report()
    return {"report": write_report(ctx.out).name}


def evaluation(ctx: StudyContext) -> dict[str, Any]:
    c = ctx.config.evaluation
    done: dict[str, int] = {}
    results = {}
    for d in ctx.domains:
        n = len(d)

        def advance(k: int, name: str = d.name, total: int = n) -> None:
            done[name] = done.get(name, 0) + k
            if ctx.progress:
                ctx.progress(f"eval {name}", done[name], total)

        res = evaluate(ctx.model, d.task, d, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                       device=ctx.config.device, on_batch=advance)
        results[d.name] = res
        if ctx.out is not None:
            with atomic_write(ctx.out / f"predictions.{d.name}.jsonl") as fh:
                for rec in res.predictions:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    summary = {name: {k: v for k, v in r.to_dict().items() if k != "predictions"} for name, r in results.items()}
    if ctx.out is not None:
        write_json(ctx.out / "results.json", summary)
    return {"results": summary, "context_length": getattr(ctx.model, "context_length", None)}


def lm_eval(ctx: StudyContext) -> dict[str, Any]:
    c = ctx.config.lm_eval
    spec = SteeringSpec.load(c.steer) if c.steer else None
    synthetic = [d for d, t in SYNTHETIC_TASKS.items() if t in c.tasks]
    task_dir = c.include_path
    if synthetic:
        task_dir = str(ctx.out / "tasks")
        write_synthetic_tasks(task_dir, synthetic, n=c.n)
    manager = task_manager(c.tasks, task_dir)
    result = lm_eval_steered(ctx.model, c.tasks, steering=spec, include_path=task_dir, limit=c.limit,
                             batch_size=c.batch_size, manager=manager)
    scores = {t: {k: v for k, v in r.items() if isinstance(v, int | float)} for t, r in result["results"].items()}
    write_json(ctx.out / "lm_eval_results.json", {"results": scores})
    return {"results": scores}

