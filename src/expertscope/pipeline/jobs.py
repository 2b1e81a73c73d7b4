"""Jobs that run outside the stage loop: the config of ``expertscope eval`` (:func:`eval_domains`), a profile
of routes recorded by a serving engine (:func:`profile_recorded_routes`, no model) and the synthetic
benchmark written as files (:func:`write_synthetic_benchmark`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import StudyConfig
from ..data import synthetic
from ..data.checks import spec_task
from ..data.sources import load_domain
from ..data.types import TASKS, check_domain_name, check_unique_names
from ..errors import ConfigError, DataError
from ..fingerprint import run_fingerprint
from ..integrations.engine_routes import FORMATS, profile_routes
from ..io import atomic_write, write_json
from ..rundir import make_manifest, open_run_dir
from ..stats.phases import save_phase_comparison
from ..stats.routing_mi import save_routing_mi
from ..stats.structure import save_coactivation_tables
from ..validation import check_choice, check_positive

__all__ = ["eval_domains", "profile_recorded_routes", "save_phases", "write_synthetic_benchmark"]


def eval_domains(config: StudyConfig, data: str | Path | None = None, task: str | None = None, split: str = "test"
                 ) -> StudyConfig:
    """The config of ``expertscope eval``: the ``data`` file (task from ``task`` or its first row's fields:
    choices, answer, label), or the synthetic benchmark's ``split`` (its domains of ``task``, 300 each unless
    ``config.limit``)."""
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


def save_phases(profile: Any, out: Path, seed: int = 0) -> dict[str, Any] | None:
    """After ``profile.save(out)``: each phase's directory (``out/phases/<phase>``) gets a manifest, so that it
    reads as a profile run of its own, and ``phase_comparison.parquet`` is written; returns its summary, or
    None when the profile has no phases to compare."""
    summary = save_phase_comparison(profile, out, seed=seed)  # the default domain-expert rule per phase
    if summary is None:
        return None
    for name, part in profile.phases.items():
        n, _ = part.totals()
        where = out / "phases" / name
        write_json(where / "manifest.json", make_manifest(
            "profile-phase", {"phase": name}, status="complete", fingerprint={"phase": name},
            outputs=sorted(p.name for p in where.iterdir() if p.name != "manifest.json"), model=part.model_info,
            phase=name, stages={"profile": {"tokens": {d: int(x) for d, x in zip(part.domains, n, strict=True)}}}))
    return summary


def profile_recorded_routes(out: str | Path, routes: Sequence[str], num_experts: int | None, *,
                            moe_layers: int | None = None, top_k: int | None = None, format: str = "auto",
                            stream: bool = False, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """``expertscope profile --routes``: a routing profile of expert indices recorded by a serving engine
    (vLLM, SGLang, Megatron; ``routes`` = ``NAME=FILE[,FILE...]`` specs: several files of one domain are
    concatenated; a FILE may be a Megatron trace directory; a name given twice is refused, as with ``-d``),
    written into the run directory ``out`` with its routing MI and co-activation tables, and, when the engine
    labelled prompt and generated tokens, each phase's profile (``phases/<phase>/``) and their comparison
    (``phase_comparison.parquet``); no model is loaded. ``stream``: files are read in bounded memory and only
    domain totals are kept. Returns the manifest's summary: ``tokens`` per domain, ``mi_bits`` per layer,
    ``notes`` per domain, ``phases`` (sentences) when there are phases."""
    if num_experts is None:
        raise ConfigError("--routes needs --num-experts E (routed experts per layer): e.g. --num-experts 64")
    check_positive(num_experts, "--num-experts")
    check_positive(moe_layers, "--moe-layers", allow_none=True)
    check_positive(top_k, "--top-k", allow_none=True)
    check_choice(format, "--routes-format", ("auto", *FORMATS))
    by_domain: dict[str, list[Path]] = {}
    for spec in routes:
        name, sep, given = spec.partition("=")
        if not sep or not name or not given:
            raise DataError(f"--routes {spec!r} is not NAME=FILE: e.g. --routes math=math.vllm.jsonl")
        check_domain_name(name)
        for file in given.split(","):
            if not Path(file).exists():
                raise DataError(f"--routes {spec}: no file {file}: check the path")
            by_domain.setdefault(name, []).append(Path(file))
    check_unique_names([s.partition("=")[0] for s in routes], "--routes (several files of one domain: NAME=A,B)")
    settings = {"routes": list(routes), "num_experts": num_experts, "moe_layers": moe_layers, "top_k": top_k,
                "format": format, "stream": stream}
    # a Megatron trace directory is fingerprinted by its trace files
    files = [g for fs in by_domain.values() for f in fs
             for g in (sorted(f.glob("router_trace_rank*.jsonl")) if f.is_dir() else [f])]
    with open_run_dir(out, "profile-routes", run_fingerprint(None, (), settings, files=files), settings,
                      resume=resume, force=force) as rd:
        prof = profile_routes(dict(by_domain), num_experts, num_layers=moe_layers, top_k=top_k,
                              format=format, stream=stream)  # type: ignore[arg-type]
        prof.save(rd.path)
        mi = save_routing_mi(prof, rd.path)
        coactivation = save_coactivation_tables(prof, rd.path)
        phases = save_phases(prof, rd.path)
        n, _ = prof.totals()
        summary: dict[str, Any] = {"tokens": {d: int(x) for d, x in zip(prof.domains, n, strict=True)},
                   "mi_bits": {int(r.layer): float(r.mi_bits) for r in mi.itertuples()},
                   "notes": {name: list(rec["notes"]) for name, rec in prof.config["recorded"].items()}}
        if phases is not None:
            summary["phases"] = phases
        rd.write_manifest("complete", model=prof.model_info, recorded=prof.config["recorded"],
                          coactivation=coactivation, tokens=summary["tokens"], mi_bits=summary["mi_bits"],
                          phases=phases)
    return summary


def write_synthetic_benchmark(out: str | Path, names: Sequence[str], sizes: dict[str, int], seed: int = 0,
                              force: bool = False) -> dict[str, dict[str, Any]]:
    """Write the seeded synthetic benchmark into the run directory ``out``: ``<domain>.<split>.jsonl`` of
    ``sizes[split]`` examples per domain, and a manifest (``expertscope data synth``); returns the files."""
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
