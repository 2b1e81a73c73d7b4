"""The writing commands: each is :func:`expertscope.run_study` with a set of stages. Their options are
generated from the configs those stages read (:mod:`.options`); this file says only which stages, where
the output goes by default, and what to print."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import StudyConfig
from . import tables as T
from ._common import console, handle_errors, progress_bars
from .options import ForceOpt, OutOpt, ResumeOpt, ShowOpt, build_config, option_params, settings_for, with_options


@dataclass(frozen=True)
class Command:
    """A command = a stage set. ``defaults``: StudyConfig fields whose default differs for this command."""

    name: str
    stages: tuple[str, ...] | None
    out: str | None
    doc: str
    show: Callable[[Any, dict[str, Any], int], None]
    defaults: dict[str, Any] = field(default_factory=dict)
    rows: int = 10
    own: tuple[tuple[str, Any, Any], ...] = ()
    """The command's own options: ``(parameter, annotation, default)``, read by ``adjust``."""
    adjust: Callable[[StudyConfig, dict[str, Any]], StudyConfig] | None = None
    resumable: bool = True
    job: Callable[[StudyConfig, dict[str, Any]], None] | None = None
    """Runs instead of the stages with the built config and the command's own options (``plan``)."""
    intercept: Callable[[dict[str, Any], Path, bool, bool], bool] | None = None
    """Pops the command's own options; runs another job instead of the stages and returns True when they ask
    for one (``profile --routes``). Called with (options, out, resume, force)."""

    @property
    def kind(self) -> str:
        return "study" if self.name == "run" else self.name

    def base(self) -> StudyConfig:
        return with_options(StudyConfig(), self.defaults)


def _recorded_routes(kw: dict[str, Any], out: Path, resume: bool, force: bool) -> bool:
    from ..errors import ConfigError
    from ..pipeline.jobs import profile_recorded_routes

    routes = kw.pop("routes")
    opts = {k: kw.pop(k) for k in ("num_experts", "moe_layers", "top_k", "routes_format", "stream")}
    if routes and kw.get("domain"):
        raise ConfigError("--routes profiles recorded expert indices and -d names texts for a model: give one or the "
                          "other")
    if not routes:
        if any(v is not None for k, v in opts.items() if k not in ("routes_format", "stream")) or opts["stream"]:
            raise typer.BadParameter("--num-experts, --moe-layers, --top-k and --stream go with --routes NAME=FILE")
        return False
    summary = profile_recorded_routes(out, routes, opts["num_experts"], moe_layers=opts["moe_layers"],
                                      top_k=opts["top_k"], format=opts["routes_format"], stream=opts["stream"],
                                      resume=resume, force=force)
    T.show_recorded_routes(out, summary)
    return True


_ROUTES_OPTIONS = (
    ("routes", Annotated[list[str] | None, typer.Option(
        "--routes", help="NAME=FILE[,FILE...]: expert indices recorded by vLLM, SGLang or Megatron (a file, or a "
        "Megatron trace directory; one --routes per domain; no model is loaded). Needs --num-experts.")], None),
    ("num_experts", Annotated[int | None, typer.Option(help="--routes: routed experts per MoE layer.")], None),
    ("moe_layers", Annotated[int | None, typer.Option(help="--routes: MoE layers (SGLang routed_experts).")], None),
    ("top_k", Annotated[int | None, typer.Option(help="--routes: experts per token (SGLang; a dump of k < 8).")],
     None),
    ("routes_format", Annotated[str, typer.Option(help="--routes: auto, vllm, sglang, sglang-dump or megatron.")],
     "auto"),
    ("stream", Annotated[bool, typer.Option(help="--routes: read files in bounded memory (a day of serving: GBs); "
                                                 "keeps domain totals only, so no intervals per sequence.")], False),
)


def _confirm_config(config: StudyConfig, kw: dict[str, Any]) -> StudyConfig:
    """``confirm HYPOTHESES -d NAME=SOURCE``: the file to test, its model unless -m says otherwise, and the -d
    corpora as the second corpora (the hypotheses' discovery data is not read again)."""
    from ..interventions.hypotheses import Hypotheses

    path = kw.pop("hypotheses_file")
    hyp = Hypotheses.load(path)  # a changed or foreign file fails here, before anything loads
    config = config.replace(hypotheses=str(path))
    if kw.get("model") is None:
        config = config.replace(model=str(hyp.model["source"]))
    given = tuple(kw.pop("domain", None) or ())
    if given:
        config = config.replace(confirm=(*config.confirm, *given))
    return config


def _eval_config(config: StudyConfig, kw: dict[str, Any]) -> StudyConfig:
    from ..pipeline.jobs import eval_domains

    return eval_domains(config, kw.pop("data"), kw.pop("task"), kw.pop("split"))


def _plan_job(config: StudyConfig, opts: dict[str, Any]) -> None:
    from ..pipeline.plan import plan

    T.show_plan(plan(config, calibrate=opts["calibrate"], tflops=opts["tflops"], tokens=opts["tokens"]))


_PLAN_OPTIONS = (
    ("calibrate", Annotated[bool, typer.Option(help="Time the real model once (loads its weights) instead of "
                                                    "assuming a throughput.")], False),
    ("tflops", Annotated[float | None, typer.Option(help="Sustained TFLOP/s of the device when not calibrating "
                                                         "(default: one CPU core, 0.03).")], None),
    ("tokens", Annotated[int | None, typer.Option(help="Plan for inputs of this many tokens instead of the data's.")],
     None),
)


COMMANDS = (
    Command("run", None, "runs/study", """Run the whole study into one directory: profile → domain experts → driver
    experts → replication → causal rate → tokens → expert map → steering study → report.html.

    With no options it is run_study(StudyConfig()): the bundled demo model, the synthetic emotion / knowledge /
    math domains, every analysis at its API defaults.

    Examples:

      expertscope run

      expertscope run --resume                      # continue an interrupted run in runs/study

      expertscope run -m ./Mixtral-8x7B --dtype bfloat16 --device cuda -d sa=sa.jsonl?task=classification -o runs/mx
    """, T.show_run),
    Command("profile", ("profile",), "runs/profile", """Capture the routing of MODEL over each domain and save the
    profile (profile.safetensors, routing_mi.parquet), or read routes a serving engine recorded (--routes).

    Examples:

      expertscope profile -m demo -d emotion=synthetic:emotion -d math=synthetic:math -o runs/p

      expertscope profile -m ./Qwen1.5-MoE-A2.7B -d sa=emotion.jsonl -d math=gsm8k.jsonl?text=question -o runs/q

      expertscope profile --routes code=code.vllm.jsonl --routes math=math.vllm.jsonl --num-experts 128 -o runs/r
    """, T.show_profile, {"limit": None}, own=_ROUTES_OPTIONS, intercept=_recorded_routes),
    Command("domains", ("domain_experts",), None, """Find the domain experts in a saved profile; print the top ones
    and write domain_experts.parquet/.csv.

    RUN_DIR is a profile (or study) run. Without -o the table is added to RUN_DIR, unless RUN_DIR already holds
    one (a study's later tables were built from it): then write elsewhere with -o, or pass --force to move the
    old table aside.

    Examples:

      expertscope domains runs/p

      expertscope domains runs/study --domain-rule z --z 2 --entropy eq1 -o runs/study-z
    """, T.show_domains),
    Command("drivers", ("drivers", "replication", "causal_rate"), "runs/drivers", """Causal effect of every
    (layer, expert) on the prediction; driver experts; their replication; causal rate.

    Writes ce.parquet, drivers.parquet/.csv, replication.parquet (drivers on disjoint halves),
    causal_rate.parquet/.csv and manifest.json into --out; checkpoints
    after every batch (continue with --resume).

    Examples:

      expertscope drivers -m demo -d math=synthetic:math -d sa=synthetic:emotion -o runs/d

      expertscope drivers -m ./my-moe -d qa=qa.jsonl --causal-method hybrid --driver-rule top --top 2 -o runs/d2
    """, T.show_drivers, {"limit": None, "causal-limit": None}),
    Command("steer-study", ("profile", "domain_experts", "drivers", "steering"), "runs/steer-study", """Steer domain
    and driver experts up and down, LoRA-tune the last routers, and compare accuracy.

    Finds the domain and driver experts first (on the validation split), then evaluates each domain's test split
    under every condition, with paired bootstrap CIs of the change against the original model.

    Examples:

      expertscope steer-study --model demo

      expertscope steer-study --steer-mode bias --scale-up 1.5 --scale-down 0.67 -o runs/bias
    """, T.show_steering),
    Command("eval", ("eval",), None, """Score a model: label log-likelihood (classification, over each domain's own
    labels), letter scores (multiple choice), greedy math.

    Without --data it scores the synthetic benchmark's three domains (--split, default test; 300 examples each
    unless --limit). With --out it writes results.json, predictions and a manifest.

    Examples:

      expertscope eval --model demo

      expertscope eval --model ./my-moe --data mmlu.jsonl --task multiple_choice --limit 200
    """, T.show_eval, {"limit": None}, own=(
        ("task", Annotated[str | None, typer.Option(help="classification, multiple_choice or math (default: "
                                                         "inferred / all).")], None),
        ("data", Annotated[Path | None, typer.Option(help="JSONL examples; without it, the synthetic benchmark.")],
         None),
        ("split", Annotated[str, typer.Option(help="Synthetic split to score: train, validation or test.")], "test")),
        adjust=_eval_config, resumable=False),
    Command("confirm", ("confirmation", "report"), "runs/confirm", """Test the hypotheses a study pre-registered
    (RUN_DIR/hypotheses.json) on new data, or on another checkpoint of the same architecture.

    Each hypothesis names a domain's exact expert set and predicts the change in accuracy when it is masked,
    down- or up-weighted, beyond equally busy control experts, and that masking it costs its own domain most.
    The data given with -d (names as in the hypotheses) must share no item with the discovery data. Writes
    confirmation.parquet/.csv (predicted beside observed), the steering tables and report.html.

    Examples:

      expertscope confirm runs/study/hypotheses.json                 # the demo's shifted corpora

      expertscope confirm runs/study/hypotheses.json -d math=gsm8k_new.jsonl?task=math -o runs/confirm-gsm8k

      expertscope confirm runs/study/hypotheses.json -m ./demo-finetuned -o runs/confirm-ft
    """, T.show_confirmation, adjust=_confirm_config),
    Command("lm-eval", ("lm_eval",), "runs/lm-eval", """Evaluate MODEL with lm-evaluation-harness, optionally with
    experts steered.

    Examples:

      expertscope lm-eval --model demo

      expertscope lm-eval --model demo --steer runs/study/steer_math_driver_up.json --tasks expertscope_math
    """, T.show_lm_eval, resumable=False),
    Command("plan", None, None, """What `expertscope run` with these options would cost, before any weight is
    loaded: forward passes, forward-equivalents, peak memory and time per stage, from the model's config.json
    and the data. Time assumes a throughput unless --calibrate times the model once.

    Examples:

      expertscope plan

      expertscope plan -m ./granite-3.0-1b-a400m --calibrate -d sa=emotion.jsonl -d math=gsm8k.jsonl?task=math

      expertscope plan -m ./Mixtral-8x7B --dtype bfloat16 --tflops 300      # an H100 at about 30% of its peak
    """, T.show_run, resumable=False, own=_PLAN_OPTIONS, job=_plan_job),
)


def _build(cmd: Command) -> Callable[..., Any]:
    from .. import pipeline
    from ..data.types import DomainSpec
    from ..pipeline.registry import PIPELINE

    stages = list(cmd.stages) if cmd.stages is not None else PIPELINE.study()
    settings = settings_for(PIPELINE.sections(stages), PIPELINE.run_fields(stages))
    base = cmd.base()
    P = inspect.Parameter
    own: list[inspect.Parameter] = []
    if cmd.name == "domains":
        own.append(P("run_dir", P.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(
            help="A directory written by `expertscope profile` or `expertscope run`.")]))
    if cmd.name == "confirm":
        own.append(P("hypotheses_file", P.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(
            help="The hypotheses.json a study wrote (RUN_DIR/hypotheses.json).")]))
    own += [P("out", P.KEYWORD_ONLY, default=None, annotation=OutOpt),
            P("force", P.KEYWORD_ONLY, default=False, annotation=ForceOpt),
            P("show", P.KEYWORD_ONLY, default=cmd.rows, annotation=ShowOpt)]
    if cmd.resumable and cmd.name != "domains":
        own.append(P("resume", P.KEYWORD_ONLY, default=False, annotation=ResumeOpt))
    own += [P(name, P.KEYWORD_ONLY, default=default, annotation=ann) for name, ann, default in cmd.own]
    if "profile" in stages or "drivers" in stages:  # old per-command field options, hidden, for one release
        own += [P(f"{k}_field", P.KEYWORD_ONLY, default=None,
                  annotation=Annotated[str | None, typer.Option(f"--{k}-field", hidden=True)])
                for k in ("text", "label", "answer")]
    if cmd.name == "domains":  # `domains --top` printed rows: now --show
        own.append(P("top_rows", P.KEYWORD_ONLY, default=None,
                     annotation=Annotated[int | None, typer.Option("--top", hidden=True)]))

    def command(**kw: Any) -> None:
        out, force, show, resume = kw.pop("out"), kw.pop("force"), kw.pop("show"), kw.pop("resume", False)
        fields = {k: kw.pop(f"{k}_field", None) for k in ("text", "label", "answer")}
        show = kw.pop("top_rows", None) or show
        run_dir = kw.pop("run_dir", None)
        own_opts = {name: kw.pop(name) for name, _, _ in cmd.own} if cmd.job is not None else {}
        if cmd.intercept is not None and cmd.intercept(kw, Path(out or run_dir or cmd.out or "."), resume, force):
            return
        start = base if run_dir is None else pipeline.config_of_run(run_dir, base)
        if cmd.adjust is not None:
            start = cmd.adjust(build_config(start, settings, {k: v for k, v in kw.items() if k == "limit"}), kw)
        config = build_config(start, settings, kw)
        if any(fields.values()):
            config = config.replace(domains=tuple(str(DomainSpec.parse(s).with_fields(fields))
                                                  for s in config.domain_specs))
        if cmd.job is not None:
            cmd.job(config, own_opts)
            return
        out = out or run_dir or cmd.out
        out = None if out is None else Path(out)
        names = list(cmd.stages) if cmd.stages is not None else PIPELINE.study()
        t0 = time.perf_counter()

        def on_stage(name: str, event: str) -> None:
            i = names.index(name) + 1 if name in names else 0
            if event == "start":
                console.print(f"[bold cyan][{i}/{len(names)}][/] {name} …  ({time.perf_counter() - t0:.0f}s elapsed)")
            elif event == "skip":
                console.print(f"[dim][{i}/{len(names)}] {name}: already complete, skipped[/]")

        with progress_bars() as bar:
            manifest = pipeline.run_study(config, out, resume=resume, force=force, on_stage=on_stage, stages=cmd.stages,
                                 kind=cmd.kind, progress=bar, inputs_dir=run_dir, resumable=cmd.resumable)
        title = {"run": "study", "steer-study": "steering study"}.get(cmd.name, cmd.name)
        console.print(f"[bold green]{title} complete[/] in {time.perf_counter() - t0:.0f}s"
                      + (f" → {out}" if out else ""))
        cmd.show(out, manifest, show)

    params = [*own, *option_params(settings, base)]  # the signature typer reads: generated options + own
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__, command.__name__ = cmd.doc, f"{cmd.name.replace('-', '_')}_cmd"
    return command


def register(app: typer.Typer) -> None:
    for cmd in COMMANDS:
        app.command(cmd.name)(handle_errors(_build(cmd)))
