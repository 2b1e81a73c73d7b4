"""The whole study as a resumable pipeline of stages writing into one run directory.

Every command that writes a run (``run``, ``profile``, ``domains``, ``drivers``, ``steer-study``) is
:func:`run_study` with a set of stages. Before the first stage, :func:`prepare` checks everything that can be
checked without the model: the device, the model's location, every domain spec, every row each chosen stage
will read (labels, answers, choices), and settings that depend on the data (``n_perm`` against the number of
tests). Each stage reads what earlier stages wrote, writes its own tables atomically and is recorded in the
manifest as complete; ``resume=True`` skips completed stages, so an interrupted run continues where it
stopped and ends with the same tables as an uninterrupted one.

How to add a stage:

1. Write ``_stage_NAME(ctx) -> dict``: call one library function with the settings of ``ctx.config.<section>``
   (never a literal), write its tables into ``ctx.out``, return a small JSON summary for the manifest.
2. Register it with ``@stage("NAME", after="...", uses=("section", ...))``; ``uses`` names the
   :class:`~expertscope.config.StudyConfig` sections it reads. Every command running the stage then offers
   those sections' fields as options (the CLI generates them: a new config field needs no CLI code).
   ``in_study=False`` keeps it out of ``expertscope run`` (a command names it explicitly).
3. What the stage needs of the data goes into ``ROW_CHECKS`` (checked before the model loads).
4. A new command running a set of stages is one entry in ``cli/commands.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEMO_DOMAINS, StudyConfig
from .errors import ConfigError, DataError, OutputError
from .progress import ProgressCallback
from .rundir import RunDir, open_run_dir

__all__ = ["DEMO_DOMAINS", "STAGES", "StudyConfig", "StudyInputs", "prepare", "run_study", "stage",
           "study_fingerprint"]


@dataclass
class StudyInputs:
    """What :func:`prepare` parsed and checked once, before any stage: the model's source, the parsed domain
    specs, and the domains' rows (with the test and train splits when steering runs)."""

    model: Any
    specs: tuple[Any, ...]
    domains: list[Any]
    test: list[Any] | None = None
    train: list[Any] | None = None
    profile: Any = None
    """The input run's profile, read once before any stage (a run over another run's tables)."""

    def labels(self) -> dict[str, tuple[str, ...] | None]:
        """Each classification domain's label set, as read from its data (or its spec's ``?labels=``)."""
        return {d.name: d.labels for d in self.domains if d.task == "classification"}


@dataclass
class StudyContext:
    """What stages share: the config, the output directory, the checked inputs and the lazily loaded model.

    ``inputs_dir`` is another run directory whose tables the stages read when ``out`` does not hold them
    (``expertscope domains RUN_DIR -o OUT``)."""

    config: StudyConfig
    out: Path
    inputs: StudyInputs
    inputs_dir: Path | None = None
    _model: Any = None
    state: dict[str, Any] = field(default_factory=dict)
    progress: ProgressCallback | None = None
    _exec: Any = None

    @property
    def executor(self) -> Any:
        """Where the profile and steering stages run their items (None: in this process): made once, so worker
        processes started by one stage serve the next; :meth:`close` stops them."""
        if self._exec is None:
            self._exec = _executor(self.config)
        return self._exec

    def close(self) -> None:
        """Stop the run's worker processes, if any."""
        ex, self._exec = self._exec, None
        if ex is not None and hasattr(ex, "close"):
            ex.close()

    def __enter__(self) -> StudyContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self) -> Any:
        if self._model is None:
            import torch

            from .models.loading import load_model

            c = self.config
            torch.manual_seed(c.seed)
            self._model = load_model(self.inputs.model, dtype=c.dtype, device=c.device,
                                     trust_remote_code=c.trust_remote_code, allow_pickle=c.allow_pickle)
        return self._model

    @property
    def domains(self) -> list[Any]:
        return self.inputs.domains

    def path(self, name: str) -> Path:
        """``out/name``, or the input run's file of that name when this run has none."""
        here = self.out / name
        if here.exists() or self.inputs_dir is None:
            return here
        return self.inputs_dir / name

    def profile(self) -> Any:
        from .stats.profile import RoutingProfile

        if self.inputs.profile is not None:
            return self.inputs.profile
        return RoutingProfile.load(self.path("profile.safetensors").parent)

    def drivers(self) -> Any:
        from .causal.drivers import DriverTable

        path = self.path("drivers.parquet")
        return DriverTable.load(path) if path.exists() else None


Stage = Callable[[StudyContext], dict[str, Any]]

#: The stages in order; each writes its tables into the run directory.
STAGES: list[tuple[str, Stage]] = []
#: The StudyConfig sections each stage reads (its commands offer their fields as options).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {}
#: Stages that ``expertscope run`` leaves out (a command names them).
OPTIONAL_STAGES: set[str] = set()
#: Stages that read only earlier tables: a run of these alone needs neither the model nor the data.
TABLE_ONLY_STAGES: set[str] = set()
#: Stages that use the model but not the domains.
NO_DATA_STAGES: set[str] = {"lm_eval"}
#: Run-level StudyConfig fields only some stages read (the others are read by every stage using the model).
RUN_FIELD_STAGES: dict[str, tuple[str, ...]] = {
    "train_limit": ("steering",), "executor": ("profile", "steering"), "workers": ("profile", "steering"),
    "gpus_per_worker": ("profile", "steering"),
}


def stage(name: str, uses: Sequence[str] = (), after: str | None = None, in_study: bool = True,
          tables_only: bool = False) -> Callable[[Stage], Stage]:
    """Register a stage function under ``name`` (after the stage ``after``, else last). ``uses``: the
    StudyConfig sections it reads; ``tables_only``: it reads earlier tables, never the model or data."""

    def register(fn: Stage) -> Stage:
        names = [n for n, _ in STAGES]
        at = names.index(after) + 1 if after in names else len(STAGES)
        STAGES.insert(at, (name, fn))
        STAGE_SECTIONS[name] = tuple(uses)
        if not in_study:
            OPTIONAL_STAGES.add(name)
        if tables_only:
            TABLE_ONLY_STAGES.add(name)
        return fn

    return register


def run_fields(stages: Sequence[str]) -> list[str]:
    """The run-level StudyConfig fields that matter to a run of ``stages``."""
    from dataclasses import fields

    sections = StudyConfig.sections()
    if all(n in TABLE_ONLY_STAGES for n in stages):
        return ["seed"]
    data = [n for n in stages if n not in NO_DATA_STAGES]
    uses = {**RUN_FIELD_STAGES, "domains": data, "limit": data}
    return [f.name for f in fields(StudyConfig) if f.name not in sections
            and any(n in stages for n in uses.get(f.name, stages))]


def study_stages() -> list[str]:
    """The stages of ``expertscope run``, in order."""
    return [n for n, _ in STAGES if n not in OPTIONAL_STAGES]


@stage("profile", uses=("profile",))
def _stage_profile(ctx: StudyContext) -> dict[str, Any]:
    from .stats.profile import RoutingProfile, checkpointer, profile
    from .stats.routing_mi import save_routing_mi

    c = ctx.config
    previous = RoutingProfile.load(ctx.out) if (ctx.out / "profile.safetensors").exists() else None
    prof = profile(ctx.model, ctx.domains, c.profile, resume_from=previous, on_batch=checkpointer(ctx.out),
                   progress=ctx.progress, executor=ctx.executor)
    prof.save(ctx.out)
    mi = save_routing_mi(prof, ctx.out)
    n, _ = prof.totals()
    return {"tokens": {d: int(x) for d, x in zip(prof.domains, n, strict=True)}, "truncated": prof.truncated,
            "max_length_used": prof.config.get("max_length_used"),
            "routing_mi_bits": {int(r.layer): round(float(r.mi_bits), 4) for r in mi.itertuples()}}


def _executor(c: StudyConfig) -> Any:
    from .execution import ModelSpec, make_executor

    if c.executor == "local":
        return None
    spec = ModelSpec(c.model, dtype=c.dtype, device=c.device, trust_remote_code=c.trust_remote_code,
                     allow_pickle=c.allow_pickle, threads=c.threads)
    return make_executor(c.executor, spec, workers=c.workers, gpus_per_worker=c.gpus_per_worker)


@stage("coactivation", after="profile", tables_only=True)
def _stage_coactivation(ctx: StudyContext) -> dict[str, Any]:
    from .stats.structure import save_coactivation_tables

    return save_coactivation_tables(ctx.profile(), ctx.out)


@stage("domain_experts", uses=("domain_experts",), tables_only=True)
def _stage_domain_experts(ctx: StudyContext) -> dict[str, Any]:
    from .stats.domain_experts import domain_experts

    drivers = ctx.drivers()
    table = domain_experts(ctx.profile(), ctx.config.domain_experts, drivers=None if drivers is None else drivers.df)
    table.save(ctx.out / "domain_experts.parquet")
    counts = {d: len(table.experts(d)) for d in table.settings["domains"]}
    return {"domain_experts": counts, "rule": table.settings["rule_text"]}


@stage("drivers", uses=("causal", "drivers"))
def _stage_drivers(ctx: StudyContext) -> dict[str, Any]:
    from .causal import causal_effects, driver_experts
    from .stats.domain_experts import domain_experts

    c = ctx.config
    effects = causal_effects(ctx.model, ctx.domains, c.causal, layers=c.causal.only_layers,
                             experts=c.causal.only_experts, labels=c.causal.label_tokens,
                             checkpoint=ctx.out / "ce_checkpoint.jsonl", resume=True, progress=ctx.progress)
    effects.save(ctx.out)
    table = driver_experts(effects, c.drivers)
    table.save(ctx.out / "drivers.parquet")
    (ctx.out / "ce_checkpoint.jsonl").unlink(missing_ok=True)
    if (ctx.out / "domain_experts.parquet").exists():
        # The general experts exclude drivers: refresh this run's domain-expert table with them.
        domain_experts(ctx.profile(), c.domain_experts, drivers=table.df).save(ctx.out / "domain_experts.parquet")
    counts = {d: int(table.df[(table.df.domain == d) & table.df.is_driver].shape[0]) for d in table.df.domain.unique()}
    return {"drivers": counts, "rule": table.settings["rule_text"], "summary": [r["text"] for r in table.summary()],
            "timings": effects.settings.get("timings", {}), "skipped": effects.settings.get("skipped", 0),
            "resumed_rows": effects.settings.get("resumed_rows", 0),
            "engine_notes": effects.settings.get("engine_notes", [])}


@stage("replication", after="drivers")
def _stage_replication(ctx: StudyContext) -> dict[str, Any]:
    from .causal import CausalEffects, replicate_drivers
    from .config import DomainExpertConfig, DriverConfig
    from .stats.domain_experts import DomainExpertTable
    from .stats.replication import Replication, replicate_domain_experts

    # The halves get exactly the rules (configs) the saved tables were made with.
    parts = []
    if ctx.path("domain_experts.parquet").exists():
        dom = DomainExpertTable.load(ctx.path("domain_experts.parquet"))
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


@stage("causal_rate", uses=("causal",))
def _stage_causal_rate(ctx: StudyContext) -> dict[str, Any]:
    from .causal import causal_rate
    from .io import write_table

    c = ctx.config.causal
    drivers = ctx.drivers()
    rate = causal_rate(ctx.model, ctx.domains, drivers, batch_size=c.batch_size, max_length=c.max_length)
    write_table(ctx.out / "causal_rate.parquet", rate,
                meta={"table": "causal_rate", "driver_rule": drivers.settings["rule_text"]})
    peak = rate.loc[rate["causal_rate"].idxmax()] if len(rate) else None
    return {"peak": None if peak is None else {"domain": str(peak["domain"]), "layer": int(peak["layer"]),
                                                 "causal_rate": float(peak["causal_rate"])}}


@stage("tokens", uses=("profile",))
def _stage_tokens(ctx: StudyContext) -> dict[str, Any]:
    from .io import write_table
    from .stats.domain_experts import DomainExpertTable
    from .stats.tokens import flagged_experts, position_profile, record_tokens, token_associations

    c = ctx.config.profile
    record = record_tokens(ctx.model, ctx.domains, batch_size=c.batch_size, max_length=c.max_length)
    drivers = ctx.drivers()
    positions = position_profile(ctx.model, ctx.domains, drivers.df, record=record)
    write_table(ctx.out / "token_positions.parquet", positions, meta={"table": "token_positions"})
    experts = flagged_experts(DomainExpertTable.load(ctx.path("domain_experts.parquet")).df, drivers.df)
    assoc = token_associations(ctx.model, ctx.domains, experts, record=record)
    write_table(ctx.out / "token_associations.parquet", assoc, meta={"table": "token_associations"})
    return {"tokens": len(record.token_id) if hasattr(record, "token_id") else None,
            "associations": len(assoc)}


@stage("expert_map")
def _stage_expert_map(ctx: StudyContext) -> dict[str, Any]:
    from .io import write_table
    from .stats.expert_map import expert_map

    written = {}
    for rep in ("router", "output"):
        df = expert_map(ctx.model, ctx.profile(), representation=rep, seed=ctx.config.seed,
                        drivers=ctx.drivers().df, domains=ctx.domains if rep == "output" else None)
        write_table(ctx.out / f"expert_map_{rep}.parquet", df, meta={"table": "expert_map", "representation": rep})
        written[rep] = int(df["cluster"].nunique())
    return {"clusters": written}


@stage("steering", uses=("intervention",))
def _stage_steering(ctx: StudyContext) -> dict[str, Any]:
    from .interventions.study import intervention_study
    from .stats.domain_experts import DomainExpertTable

    assert ctx.inputs.test is not None and ctx.inputs.train is not None  # prepare() loads them for this stage
    result = intervention_study(ctx.model, ctx.inputs.test, DomainExpertTable.load(ctx.path("domain_experts.parquet")),
                                ctx.drivers(), train={d.name: d for d in ctx.inputs.train},
                                config=ctx.config.intervention, progress=ctx.progress,
                                adapter_dir=ctx.out / "router_lora", executor=ctx.executor)
    result.save(ctx.out)
    t = result.table
    # Not-applicable conditions (no targets) are recorded as null, never as a number.
    return {"accuracy": {f"{r.domain}/{r.condition}": round(float(r.accuracy), 4) if r.applicable else None
                         for r in t.itertuples()}}


@stage("routing_overlap", uses=("intervention", "causal"))
def _stage_routing_overlap(ctx: StudyContext) -> dict[str, Any]:
    """How far steering and the router LoRA moved the routing, on the first ``causal.limit`` test texts."""
    from .interventions.routing_change import routing_changes
    from .io import write_table
    from .stats.domain_experts import DomainExpertTable

    assert ctx.inputs.test is not None  # prepare() loads them for this stage
    c = ctx.config
    table = routing_changes(
        ctx.model, [d.head(c.causal.limit) for d in ctx.inputs.test],
        DomainExpertTable.load(ctx.path("domain_experts.parquet")), ctx.drivers(),
        adapter_dir=ctx.path("router_lora"), batch_size=c.causal.batch_size, max_length=c.causal.max_length,
        config=c.intervention)
    write_table(ctx.out / "routing_overlap.parquet", table, meta={"table": "routing_overlap"})
    ok = table[table.applicable]
    means = ok.groupby(["domain", "condition"])["overlap"].mean()
    return {"overlap": {f"{d}/{k}": round(float(v), 4) for (d, k), v in means.items()}}


@stage("report", tables_only=True)
def _stage_report(ctx: StudyContext) -> dict[str, Any]:
    from .report import report

    if "mark_complete" in ctx.state:  # the report is the last stage: show the run as complete in it
        ctx.state["mark_complete"]()
    path = report(ctx.out)
    return {"report": path.name}


@stage("eval", uses=("evaluation",), in_study=False)
def _stage_eval(ctx: StudyContext) -> dict[str, Any]:
    import json

    from .evaluation import evaluate
    from .io import atomic_write, write_json

    c = ctx.config.evaluation
    results = {}
    for d in ctx.domains:
        n = len(d)

        def advance(k: int, name: str = d.name, total: int = n) -> None:
            done = ctx.state.setdefault("eval_done", {})
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


@stage("lm_eval", uses=("lm_eval",), in_study=False)
def _stage_lm_eval(ctx: StudyContext) -> dict[str, Any]:
    from .integrations.lm_eval import SYNTHETIC_TASKS, lm_eval_steered, task_manager, write_synthetic_tasks
    from .interventions.steering import SteeringSpec
    from .io import write_json

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


def eval_domains(config: StudyConfig, data: str | Path | None = None, task: str | None = None, split: str = "test"
                 ) -> StudyConfig:
    """The config of ``expertscope eval``: the ``data`` file (task from ``task`` or its first row's fields:
    choices, answer, label), or the synthetic benchmark's ``split`` (its domains of ``task``, 300 each unless
    ``config.limit``)."""
    import re

    from .data import synthetic
    from .data.checks import spec_task
    from .data.sources import load_domain
    from .data.types import TASKS

    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if split not in synthetic.SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(synthetic.SPLITS)}")
    if data is not None:
        if Path(data).is_dir():
            raise DataError(f"data file {data} is a directory: pass a .jsonl, .json, .csv or .parquet file")
        if not Path(data).is_file():
            raise DataError(f"data file {data} does not exist: check the --data path")
        spec = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(data).stem)}={data}"
        if task is None:
            first = load_domain(spec, limit=1).examples[0]
            task = ("multiple_choice" if first.choices is not None else "math" if first.answer is not None
                    else "classification" if first.label is not None else None)
            if task is None:
                raise DataError(f"{data} has no label, answer or choices: add them, or pass --task")
        return config.replace(domains=(f"{spec}?task={task}",))
    specs = [s for s in config.split_specs(split) if task is None or spec_task(s) == task]
    if config.limit is None:  # the synthetic benchmark's own size when no limit is given
        specs = [s if "?" in s else f"{s}?limit=300" for s in specs]
    return config.replace(domains=tuple(specs))


def profile_recorded_routes(out: str | Path, routes: Sequence[str], num_experts: int | None, *,
                            moe_layers: int | None = None, top_k: int | None = None, format: str = "auto",
                            resume: bool = False, force: bool = False) -> dict[str, Any]:
    """``expertscope profile --routes``: a routing profile of expert indices recorded by a serving engine
    (vLLM, SGLang, Megatron; ``routes`` = ``NAME=FILE`` specs, several files per name are concatenated),
    written into the run directory ``out`` with its routing MI and co-activation tables; no model is loaded.
    Returns the manifest's summary: ``tokens`` per domain, ``mi_bits`` per layer, ``notes`` per domain."""
    from .errors import DataError
    from .fingerprint import run_fingerprint
    from .integrations.routes import FORMATS, RecordedRoutes, load_routes, profile_routes
    from .stats.routing_mi import save_routing_mi
    from .stats.structure import save_coactivation_tables
    from .validation import check_choice, check_positive

    if num_experts is None:
        raise ConfigError("--routes needs --num-experts E (routed experts per layer): e.g. --num-experts 64")
    check_positive(num_experts, "--num-experts")
    check_positive(moe_layers, "--moe-layers", allow_none=True)
    check_positive(top_k, "--top-k", allow_none=True)
    check_choice(format, "--routes-format", ("auto", *FORMATS))
    by_domain: dict[str, list[Path]] = {}
    for spec in routes:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise DataError(f"--routes {spec!r} is not NAME=FILE: e.g. --routes math=math.vllm.jsonl")
        if not Path(file).is_file():
            raise DataError(f"--routes {spec}: no file {file}: check the path")
        by_domain.setdefault(name, []).append(Path(file))
    settings = {"routes": list(routes), "num_experts": num_experts, "moe_layers": moe_layers, "top_k": top_k,
                "format": format}
    files = [f for fs in by_domain.values() for f in fs]
    with open_run_dir(out, "profile-routes", run_fingerprint(None, (), settings, files=files), settings,
                      resume=resume, force=force) as rd:
        merged = {}
        for name, fs in by_domain.items():
            parts = [load_routes(f, format, num_layers=moe_layers, top_k=top_k) for f in fs]  # type: ignore[arg-type]
            merged[name] = parts[0] if len(parts) == 1 else RecordedRoutes(
                [s for p in parts for s in p.sequences], "+".join(sorted({p.format for p in parts})),
                ", ".join(p.source for p in parts), sum(p.prefix_cached for p in parts),
                [n for p in parts for n in p.notes])
        prof = profile_routes(merged, num_experts, top_k=top_k)
        prof.save(rd.path)
        mi = save_routing_mi(prof, rd.path)
        coactivation = save_coactivation_tables(prof, rd.path)
        n, _ = prof.totals()
        summary: dict[str, Any] = {"tokens": {d: int(x) for d, x in zip(prof.domains, n, strict=True)},
                   "mi_bits": {int(r.layer): float(r.mi_bits) for r in mi.itertuples()},
                   "notes": {name: list(rec["notes"]) for name, rec in prof.config["recorded"].items()}}
        rd.write_manifest("complete", model=prof.model_info, recorded=prof.config["recorded"],
                          coactivation=coactivation, tokens=summary["tokens"], mi_bits=summary["mi_bits"])
    return summary


def write_synthetic_benchmark(out: str | Path, names: Sequence[str], sizes: dict[str, int], seed: int = 0,
                              force: bool = False) -> dict[str, dict[str, Any]]:
    """Write the seeded synthetic benchmark into the run directory ``out``: ``<domain>.<split>.jsonl`` of
    ``sizes[split]`` examples per domain, and a manifest (``expertscope data synth``); returns the files."""
    import json

    from .data import synthetic
    from .fingerprint import run_fingerprint
    from .io import atomic_write

    unknown = [d for d in names if d not in synthetic.DOMAINS]
    if unknown or not names:
        raise ConfigError(f"unknown domain(s) {unknown or names}: use a subset of {', '.join(synthetic.DOMAINS)}")
    if min(sizes.values()) < 0:
        raise ConfigError("a split size is negative: pass sizes >= 0")
    settings = {"seed": seed, "sizes": sizes, "domains": list(names)}
    files: dict[str, dict[str, Any]] = {}
    with open_run_dir(out, "synthetic-data", run_fingerprint(None, (), settings), settings, force=force,
                      resumable=False) as rd:
        for name in names:
            for split, n in sizes.items():
                dom = synthetic.generate(name, n, seed=seed, split=split)
                with atomic_write(rd.path / f"{name}.{split}.jsonl") as fh:
                    for ex in dom.examples:
                        fh.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
                files[f"{name}.{split}.jsonl"] = {"domain": name, "split": split, "task": dom.task, "n": len(dom)}
        rd.write_manifest("complete", config=settings, files=files)
    return files


def _check_lm_eval(config: StudyConfig) -> None:
    """lm-eval's task names and steering file, checked before the model loads."""
    from .integrations.lm_eval import SYNTHETIC_TASKS, task_manager
    from .interventions.steering import SteeringSpec

    c = config.lm_eval
    if c.steer:
        SteeringSpec.load(c.steer)
    synthetic = [t for t in c.tasks if t in SYNTHETIC_TASKS.values()]
    others = [t for t in c.tasks if t not in synthetic]
    if others:
        task_manager(others, None if synthetic else c.include_path)  # unknown names fail here, fast


# ----- checks before the first stage ----------------------------------------------------------------------
def _check_task_rows(domains: Sequence[Any]) -> None:
    """Every row of every task domain has what its task needs (label in the domain's label set, answer,
    choices): the evaluation and the decision positions read them."""
    from .evaluation import validate_examples

    for d in domains:
        if d.task is None:
            continue
        if d.task == "classification" and (d.labels is not None and len(d.labels) < 2):
            raise DataError(f"domain {d.name!r} has one label ({d.labels[0]!r}): classification needs two or more; "
                            "check the label field, or give the set with ?labels=a,b,c")
        try:
            validate_examples(d.task, d.examples, d.labels)
        except DataError as e:
            raise DataError(f"domain {d.name!r}: {e}") from None


def _check_eval_rows(domains: Sequence[Any]) -> None:
    for d in domains:
        if d.task is None:
            raise DataError(f"domain {d.name!r} has no task to evaluate: add ?task=classification|multiple_choice|"
                            "math to its spec (or --task)")
    _check_task_rows(domains)


#: What each stage needs of the domains' rows, checked before the model loads.
ROW_CHECKS: dict[str, Callable[[StudyInputs], None]] = {
    "drivers": lambda inp: _check_task_rows(inp.domains),
    "eval": lambda inp: _check_eval_rows(inp.domains),
    "steering": lambda inp: _check_task_rows([*(inp.test or ()), *(inp.train or ())]),
}


def _check_n_perm(config: StudyConfig, inputs: StudyInputs) -> None:
    """Refuse a permutation count too small for the number of tests D·L·E before the model loads (the
    smallest p-value 1/(n_perm+1) could never pass Benjamini–Hochberg), when the model's config tells L and E."""
    cfg = config.domain_experts
    shape = inputs.model.moe_shape()
    if cfg.rule != "fdr" or cfg.n_perm == "auto" or cfg.test == "normal" or shape is None or len(inputs.domains) < 2:
        return
    n_layers, n_experts = shape
    m = len(inputs.domains) * n_layers * n_experts
    if cfg.test == "auto":  # the same choice domain_experts makes: permutation when its work fits the budget
        work = float(cfg.n_perm) * len(inputs.domains) * sum(len(d) for d in inputs.domains) * (2 * m + 1)
        if work > cfg.perm_budget:
            return
    if int(cfg.n_perm) + 1 < m / cfg.alpha:
        raise ConfigError(f"n_perm={cfg.n_perm} is too few for {m} tests ({len(inputs.domains)} domains × "
                          f"{n_layers} MoE layers × {n_experts} experts): the smallest p-value 1/(n_perm+1) cannot "
                          f"pass BH at alpha={cfg.alpha}; pass --n-perm {math.ceil(m / cfg.alpha)} or more, or 'auto'")


def prepare(config: StudyConfig, stages: Sequence[str] | None = None) -> StudyInputs:
    """Parse and check every input once, before any stage or model load: device, model source, domain specs,
    every row each chosen stage reads, and data-dependent settings. Raises one-line errors naming the fix."""
    from .data.checks import check_domain_specs, check_stage_inputs
    from .data.sources import load_domains
    from .models.loading import ModelSource
    from .validation import check_device

    chosen = list(stages) if stages is not None else study_stages()
    if all(n in TABLE_ONLY_STAGES for n in chosen):
        return StudyInputs(None, (), [])  # earlier tables only: no model, no data
    check_device(config.device)
    source = ModelSource.resolve(config.model)
    if "lm_eval" in chosen:
        _check_lm_eval(config)
    if all(n in NO_DATA_STAGES for n in chosen):
        return StudyInputs(source, (), [])
    specs = check_domain_specs(config.domain_specs)
    check_stage_inputs(specs, chosen)
    inputs = StudyInputs(source, specs, load_domains(specs, limit=config.limit, seed=config.seed))
    if "steering" in chosen or "routing_overlap" in chosen:
        inputs.test = load_domains(config.split_specs("test"), limit=config.intervention.limit, seed=config.seed)
        inputs.train = load_domains(config.split_specs("train"), limit=config.train_limit, seed=config.seed)
    for name in chosen:
        if name in ROW_CHECKS:
            ROW_CHECKS[name](inputs)
    if "domain_experts" in chosen:
        _check_n_perm(config, inputs)
    return inputs


# ----- the pipeline ---------------------------------------------------------------------------------------
#: Run-level settings that decide how the work is spread, not the results: left out of the fingerprint.
NOT_RESULTS = ("executor", "workers", "gpus_per_worker", "threads")


def study_fingerprint(config: StudyConfig, inputs: StudyInputs | None = None,
                      stages: Sequence[str] | None = None) -> dict[str, Any]:
    """What decides a run's tables: the model's files, the domain data (with each classification domain's
    label set), the run-level settings, and the settings of the analyses the chosen stages run."""
    from .fingerprint import run_fingerprint

    inputs = inputs or prepare(config, stages)
    names = list(stages or study_stages())
    used = {s for n in names for s in STAGE_SECTIONS.get(n, ())}
    sections = StudyConfig.sections()
    settings = {k: v for k, v in config.to_dict().items()
                if k not in NOT_RESULTS and (k in used if k in sections else k in run_fields(names))}
    return run_fingerprint(inputs.model, inputs.specs, settings, labels=inputs.labels())


def run_study(
    config: StudyConfig | None = None,
    out: str | Path | None = "runs/study",
    resume: bool = False,
    force: bool = False,
    on_stage: Callable[[str, str], None] | None = None,
    stages: Sequence[str] | None = None,
    kind: str = "study",
    progress: ProgressCallback | None = None,
    inputs_dir: str | Path | None = None,
    resumable: bool = True,
) -> dict[str, Any]:
    """Run the stages (``expertscope run``'s, or the named ones in pipeline order) into ``out``; returns the
    final manifest.

    Everything is checked before the first stage (:func:`prepare`); nothing is written when a check fails.
    ``on_stage(name, "start"|"done"|"skip")`` reports the stages, ``progress(task, done, total)`` the batches
    within them; ``kind`` names the run in its manifest. ``inputs_dir``: another run directory to read earlier
    stages' tables from; when it is ``out`` itself the stages are added to that run, and a table it already
    holds is refused (``force`` moves the old one aside). ``out=None`` runs stages that can work without a
    directory (``eval``) and writes nothing. ``resumable=False``: a command without ``--resume``, whose dead
    run in ``out`` is replaced on rerun.
    """
    config = config if config is not None else StudyConfig()
    if not isinstance(config, StudyConfig):
        raise ConfigError(f"config must be a StudyConfig, got {type(config).__name__}: pass StudyConfig(...)")
    known = [n for n, _ in STAGES]
    unknown = sorted(set(stages or ()) - set(known))
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}: choose from {', '.join(known)}")
    names = [n for n in known if n in stages] if stages is not None else study_stages()
    chosen = [(n, f) for n, f in STAGES if n in names]
    src = None if inputs_dir is None else Path(inputs_dir)
    inputs = prepare(config, names)
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    if src is not None and (src / "profile.safetensors").exists():
        from .stats.profile import RoutingProfile

        inputs.profile = RoutingProfile.load(src)  # a damaged input fails here, before any stage starts
    if out is None:
        with StudyContext(config, None, inputs, progress=progress) as ctx:  # type: ignore[arg-type]
            return {"status": "complete", "stages": {name: fn(ctx) for name, fn in chosen}}
    if src is not None and Path(out).resolve() == src.resolve():
        return _add_stages(config, src, inputs, chosen, force, on_stage, progress)
    fingerprint = study_fingerprint(config, inputs, names)
    if src is not None:
        fingerprint["inputs"] = _inputs_digest(src)
    settings = config.to_dict()
    with (open_run_dir(out, kind, fingerprint, settings, resume=resume, force=force, resumable=resumable) as rd,
          StudyContext(config, rd.path, inputs, src, progress=progress) as ctx):
        return _run_stages(rd, ctx, chosen, on_stage)


def _add_stages(config: StudyConfig, out: Path, inputs: StudyInputs, chosen: list[tuple[str, Stage]], force: bool,
                on_stage: Callable[[str, str], None] | None, progress: ProgressCallback | None) -> dict[str, Any]:
    """Add stages to the run in ``out`` (``expertscope domains RUN_DIR``). A stage that run already holds is
    refused: its later tables and report were built from it; ``force`` moves the old files aside first."""
    import os

    from .io import read_json, write_json
    from .rundir import lock_dir

    with lock_dir(out, option="-o"):
        m = read_json(out / "manifest.json", "manifest")
        done = m.setdefault("stages", {})
        held = [n for n, _ in chosen if done.get(n, {}).get("status") == "complete" or (out / f"{n}.parquet").exists()]
        if held and not force:
            raise OutputError(f"{out} already holds {held[0]}.parquet (from its {m.get('kind', 'earlier')} run; its "
                              "later tables and report were built from it): write elsewhere with -o NEW_DIR, or pass "
                              "--force to move the old table aside")
        aside = out / ".replaced-tables" / time.strftime("%Y%m%dT%H%M%S")
        for name in held:
            aside.mkdir(parents=True, exist_ok=True)
            for p in [out / f for f in done.get(name, {}).get("files", [])] or list(out.glob(f"{name}.*")):
                if p.exists():
                    os.replace(p, aside / p.name)
            m.setdefault("replaced", {})[name] = str(aside.relative_to(out))
        with StudyContext(config, out, inputs, progress=progress) as ctx:
            for name, fn in chosen:
                if on_stage:
                    on_stage(name, "start")
                before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
                t = time.perf_counter()
                result = fn(ctx)
                files = sorted(p.name for p in out.iterdir() if before.get(p.name) != p.stat().st_mtime_ns)
                done[name] = {"status": "complete", "seconds": round(time.perf_counter() - t, 3), "files": files,
                              "settings": {s: getattr(config, s).to_dict() for s in STAGE_SECTIONS.get(name, ())},
                              **result}
                write_json(out / "manifest.json", m)
                if on_stage:
                    on_stage(name, "done")
        return dict(m)


def config_of_run(run_dir: str | Path, base: StudyConfig | None = None) -> StudyConfig:
    """The StudyConfig a run directory was written with (its manifest); an older manifest gives ``base`` with
    its model and domains."""
    from .io import read_json

    run_dir, base = Path(run_dir), base or StudyConfig()
    if not (run_dir / "manifest.json").is_file():
        raise OutputError(f"{run_dir} has no manifest.json: pass the output directory of an expertscope run")
    saved = read_json(run_dir / "manifest.json", "manifest").get("config") or {}
    try:
        return StudyConfig.from_dict(saved)
    except (ConfigError, TypeError):
        return base.replace(model=str(saved.get("model", base.model)), domains=tuple(saved.get("domains") or ()))


def _inputs_digest(src: Path) -> dict[str, Any]:
    from .fingerprint import file_digest
    from .io import read_json

    m = read_json(src / "manifest.json", "manifest") if (src / "manifest.json").exists() else {}
    files = {p.name: file_digest(p) for p in sorted(src.glob("*.safetensors"))}
    return {"dir": str(src), "kind": m.get("kind"), "files": files}


def _run_stages(rd: RunDir, ctx: StudyContext, chosen: list[tuple[str, Stage]],
                on_stage: Callable[[str, str], None] | None) -> dict[str, Any]:
    old = rd.previous
    done: dict[str, Any] = dict(old.get("stages", {}))
    t_start = time.perf_counter()
    labels = {k: list(v) for k, v in ctx.inputs.labels().items() if v is not None}

    def save(status: str) -> dict[str, Any]:
        model_info = ctx._model.describe() if ctx._model is not None else old.get("model")
        return rd.write_manifest(status, seed=ctx.config.seed, model=model_info, stages=done, labels=labels,
                                 planned_stages=[n for n, _ in chosen])  # the report's banner names what is missing

    save("running")
    ctx.state["mark_complete"] = lambda: save("complete")
    pending = [n for n, _ in chosen if done.get(n, {}).get("status") != "complete"]
    if any(n not in TABLE_ONLY_STAGES for n in pending):
        ctx.model  # noqa: B018  (loaded before the first stage: a model that cannot load fails before any stage)
    from .io import check_output_file

    for name, _ in chosen:  # a resumed run skips complete stages: their files must still be whole
        if done.get(name, {}).get("status") == "complete":
            for f in done[name].get("files", []):
                check_output_file(rd.path / f, f"{f} (from the complete stage {name})")
    for name, fn in chosen:
        if done.get(name, {}).get("status") == "complete":
            if on_stage:
                on_stage(name, "skip")
            continue
        if on_stage:
            on_stage(name, "start")
        t = time.perf_counter()
        before = {p.name: p.stat().st_mtime_ns for p in rd.path.iterdir()}
        result = fn(ctx)
        files = sorted(p.name for p in rd.path.iterdir()
                       if p.is_file() and before.get(p.name) != p.stat().st_mtime_ns and p.name != "manifest.json")
        done[name] = {"status": "complete", "seconds": round(time.perf_counter() - t, 3), "files": files, **result}
        save("running")
        if on_stage:
            on_stage(name, "done")
    done["_total_seconds"] = {"status": "info", "seconds": round(time.perf_counter() - t_start, 3)}
    return save("complete")
