"""Running the stages into one run directory: :func:`run_study`.

Every command that writes a run (``run``, ``profile``, ``domains``, ``drivers``, ``steer-study``, ``eval``,
``lm-eval``) is :func:`run_study` with a set of stages. Before the first stage, :func:`~.prepare.prepare`
checks everything that can be checked without the model. Each stage reads what earlier stages wrote (handed
over in memory within a run), writes its own tables atomically and is recorded in the manifest as complete;
``resume=True`` skips completed stages, so an interrupted run continues where it stopped and ends with the
same tables as an uninterrupted one. New, resumed and added-to runs go through the same loop
(:func:`_run_stages`); they differ only in how the directory is opened and the manifest kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import StudyConfig
from ..errors import ConfigError, OutputError
from ..fingerprint import file_digest, run_fingerprint
from ..io import check_output_file, make_dirs, read_json, write_json
from ..progress import ProgressCallback
from ..rundir import lock_dir, open_run_dir
from ..stats.profile import RoutingProfile
from .context import StudyContext, StudyInputs
from .prepare import prepare
from .registry import PIPELINE, Stage

__all__ = ["NOT_RESULTS", "config_of_run", "run_study", "study_fingerprint"]

#: Run-level settings that decide how the work is spread, not the results: left out of the fingerprint.
NOT_RESULTS = ("executor", "workers", "gpus_per_worker", "threads")


def study_fingerprint(config: StudyConfig, inputs: StudyInputs | None = None,
                      stages: Sequence[str] | None = None) -> dict[str, Any]:
    """What decides a run's tables: the model's files, the domain data (with each classification domain's
    label set), the run-level settings, and the settings of the analyses the chosen stages run."""
    inputs = inputs or prepare(config, stages)
    names = list(stages or PIPELINE.study())
    used = set(PIPELINE.sections(names))
    sections = StudyConfig.sections()
    run = PIPELINE.run_fields(names)
    settings = {k: v for k, v in config.to_dict().items()
                if k not in NOT_RESULTS and (k in used if k in sections else k in run)}
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

    Everything is checked before the first stage (:func:`~.prepare.prepare`); nothing is written when a check
    fails. ``on_stage(name, "start"|"done"|"skip")`` reports the stages, ``progress(task, done, total)`` the
    batches within them; ``kind`` names the run in its manifest. ``inputs_dir``: another run directory to read
    earlier stages' tables from; when it is ``out`` itself the stages are added to that run, and a table it
    already holds is refused (``force`` moves the old one aside). ``out=None`` runs stages that can work
    without a directory (``eval``) and writes nothing. ``resumable=False``: a command without ``--resume``,
    whose dead run in ``out`` is replaced on rerun.
    """
    from ..validation import check_type

    config = config if config is not None else StudyConfig()
    if not isinstance(config, StudyConfig):
        raise ConfigError(f"config must be a StudyConfig, got {type(config).__name__}: pass StudyConfig(...)")
    if out is not None:
        check_type(out, (str, os.PathLike), "out", "a directory path (str or Path), or None to write nothing")
    if inputs_dir is not None:
        check_type(inputs_dir, (str, os.PathLike), "inputs_dir", "a run directory path (str or Path)")
    if stages is not None:
        check_type(stages, (list, tuple), "stages", f"a list of stage names ({', '.join(PIPELINE.names())})")
        if not stages:
            raise ConfigError("stages=[] runs nothing: name the stages to run, or pass None for the whole study")
    unknown = sorted(set(stages or ()) - set(PIPELINE.names()))
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}: choose from {', '.join(PIPELINE.names())}")
    chosen = PIPELINE.chosen(stages)
    names = [s.name for s in chosen]
    src = None if inputs_dir is None else Path(inputs_dir)
    inputs = prepare(config, names)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if src is not None and (src / "profile.safetensors").exists():
        inputs.profile = RoutingProfile.load(src)  # a damaged input fails here, before any stage starts
    if out is None:
        with StudyContext(config, None, inputs, progress=progress) as ctx:  # type: ignore[arg-type]
            return {"status": "complete", "stages": {s.name: s.run(ctx) for s in chosen}}
    if src is not None and Path(out).resolve() == src.resolve():
        return _add_stages(config, src, inputs, chosen, force, on_stage, progress)
    fingerprint = study_fingerprint(config, inputs, names)
    if src is not None:
        fingerprint["inputs"] = _inputs_digest(src)
    with (open_run_dir(out, kind, fingerprint, config.to_dict(), resume=resume, force=force,
                       resumable=resumable) as rd,
          StudyContext(config, rd.path, inputs, src, progress=progress) as ctx):
        old = rd.previous
        labels = {k: list(v) for k, v in inputs.labels().items() if v is not None}

        def save(status: str, done: dict[str, Any]) -> dict[str, Any]:
            model = ctx.model_loaded.describe() if ctx.model_loaded is not None else old.get("model")
            return rd.write_manifest(status, seed=config.seed, model=model, stages=done, labels=labels,
                                     planned_stages=names)  # the report's banner names what is missing

        return _run_stages(ctx, chosen, dict(old.get("stages", {})), save, on_stage)


def _add_stages(config: StudyConfig, out: Path, inputs: StudyInputs, chosen: list[Stage], force: bool,
                on_stage: Callable[[str, str], None] | None, progress: ProgressCallback | None) -> dict[str, Any]:
    """Add stages to the run in ``out`` (``expertscope domains RUN_DIR``). A stage that run already holds is
    refused: its later tables and report were built from it; ``force`` moves the old files aside first."""
    with lock_dir(out, option="-o"):
        m = read_json(out / "manifest.json", "manifest")
        done = m.setdefault("stages", {})
        held = [s.name for s in chosen
                if done.get(s.name, {}).get("status") == "complete" or (out / f"{s.name}.parquet").exists()]
        if held and not force:
            raise OutputError(f"{out} already holds {held[0]}.parquet (from its {m.get('kind', 'earlier')} run; its "
                              "later tables and report were built from it): write elsewhere with -o NEW_DIR, or pass "
                              "--force to move the old table aside")
        listed = m.get("outputs")
        before = {p.name for p in out.iterdir()}
        aside = out / ".replaced-tables" / time.strftime("%Y%m%dT%H%M%S")
        for name in held:
            make_dirs(aside)
            for p in [out / f for f in done.pop(name, {}).get("files", [])] or list(out.glob(f"{name}.*")):
                if p.exists():
                    os.replace(p, aside / p.name)
            m.setdefault("replaced", {})[name] = str(aside.relative_to(out))

        def save(status: str, stages: dict[str, Any]) -> dict[str, Any]:
            if isinstance(listed, list):  # the entries this command adds are the run's too (a --force moves them)
                new = {p.name for p in out.iterdir()} - before - {"manifest.json", ".expertscope.lock"}
                m["outputs"] = sorted(set(listed) | new | {".replaced-tables"} & {p.name for p in out.iterdir()})
            write_json(out / "manifest.json", m)  # an added-to run keeps its own status
            return dict(m)

        with StudyContext(config, out, inputs, progress=progress) as ctx:
            return _run_stages(ctx, chosen, done, save, on_stage, total=False)


def _run_stages(ctx: StudyContext, chosen: list[Stage], done: dict[str, Any],
                save: Callable[[str, dict[str, Any]], dict[str, Any]], on_stage: Callable[[str, str], None] | None,
                total: bool = True) -> dict[str, Any]:
    """The one stage loop: skip the complete stages (after checking that their files are still whole), run the
    others in order, and record each in ``done`` (status, seconds, the files it wrote, the settings of the
    sections it read, its summary), saving the manifest after each. ``save(status, done)`` writes it."""
    out = ctx.out
    t_start = time.perf_counter()
    save("running", done)
    ctx.on_report = lambda: save("complete", done)
    pending = [s for s in chosen if done.get(s.name, {}).get("status") != "complete"]
    if any(s.needs_model for s in pending):
        ctx.model  # noqa: B018  (loaded before the first stage: a model that cannot load fails before any stage)
    for s in chosen:  # a resumed run skips complete stages: their files must still be whole
        if s not in pending:
            for f in done[s.name].get("files", []):
                check_output_file(out / f, f"{f} (from the complete stage {s.name})")
    for s in chosen:
        if s not in pending:
            if on_stage:
                on_stage(s.name, "skip")
            continue
        if on_stage:
            on_stage(s.name, "start")
        t = time.perf_counter()
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        result = s.run(ctx)
        files = sorted(p.name for p in out.iterdir()
                       if p.is_file() and before.get(p.name) != p.stat().st_mtime_ns and p.name != "manifest.json")
        done[s.name] = {"status": "complete", "seconds": round(time.perf_counter() - t, 3), "files": files,
                        "settings": {sec: getattr(ctx.config, sec).to_dict() for sec in s.sections},
                        **({"items": ctx.inputs.items(s.parts)} if s.needs_data else {}), **result}
        save("running", done)
        if on_stage:
            on_stage(s.name, "done")
    if total:
        done["_total_seconds"] = {"status": "info", "seconds": round(time.perf_counter() - t_start, 3)}
    return save("complete", done)


def config_of_run(run_dir: str | Path, base: StudyConfig | None = None) -> StudyConfig:
    """The StudyConfig a run directory was written with (its manifest); an older manifest gives ``base`` with
    its model and domains."""
    run_dir, base = Path(run_dir), base or StudyConfig()
    if not (run_dir / "manifest.json").is_file():
        raise OutputError(f"{run_dir} has no manifest.json: pass the output directory of an expertscope run")
    saved = read_json(run_dir / "manifest.json", "manifest").get("config") or {}
    try:
        return StudyConfig.from_dict(saved)
    except (ConfigError, TypeError):
        return base.replace(model=str(saved.get("model", base.model)), domains=tuple(saved.get("domains") or ()))


def _inputs_digest(src: Path) -> dict[str, Any]:
    m = read_json(src / "manifest.json", "manifest") if (src / "manifest.json").exists() else {}
    files = {p.name: file_digest(p) for p in sorted(src.glob("*.safetensors"))}
    return {"dir": str(src), "kind": m.get("kind"), "files": files}
