"""``expertscope eval``: task accuracy with 95 % intervals (docs/methods.md §7)."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..evaluation.evaluate import DEFAULT_MAX_NEW_TOKENS
from ._common import handle_errors, out_console, progress

if TYPE_CHECKING:
    from ..data.types import Example
    from ..evaluation import EvalResult
    from ..rundir import RunDir


def read_examples(path: Path) -> list[Example]:
    """Examples from a JSONL file (one :meth:`Example.to_dict`-style object per line).

    Raises :class:`DataError` naming the line for invalid JSON or a row without ``text``.
    """
    from ..data.types import Example
    from ..errors import DataError
    from ..io import read_text

    if not path.exists():
        raise DataError(f"data file {path} does not exist: check the --data path")
    examples = []
    for lineno, line in enumerate(read_text(path, "data file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}): write one object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object: write one "
                            '{"text": ...} object per line')
        if "text" not in row:
            raise DataError(f"{path}:{lineno} has no 'text' field: every row needs the input text")
        examples.append(Example.from_dict(row, where=f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"data file {path} holds no examples: add one JSON object per line")
    return examples


def infer_task(examples: list[Example]) -> str:
    """The task the examples' fields imply: choices: multiple_choice, answer: math, label: classification."""
    from ..errors import DataError

    first = examples[0]
    if first.choices is not None:
        return "multiple_choice"
    if first.answer is not None:
        return "math"
    if first.label is not None:
        return "classification"
    raise DataError("the examples have no label, answer or choices: add them, or pass --task")


def _table(rows: list[tuple[str, EvalResult]]) -> Any:
    from rich.table import Table

    table = Table(title="Evaluation (accuracy with Wilson 95% CI)")
    for col in ("domain", "task", "n", "accuracy", "95% CI", "weighted F1", "truncated"):
        table.add_column(col, justify="left" if col in ("domain", "task") else "right")
    for name, r in rows:
        f1 = "-" if r.weighted_f1 is None else f"{r.weighted_f1:.3f}"
        table.add_row(name, r.task, str(r.n), f"{r.accuracy:.3f}", f"[{r.ci_low:.3f}, {r.ci_high:.3f}]", f1,
                      str(r.n_truncated))
    return table


def eval_command(
    model: Annotated[str, typer.Option("--model", help="'demo', a model directory or a hub id.")] = "demo",
    task: Annotated[
        str | None, typer.Option(help="classification, multiple_choice or math (default: inferred / all).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="JSONL examples; without it, the synthetic benchmark.")] = None,
    split: Annotated[str, typer.Option(help="Synthetic split to score: train, validation or test.")] = "test",
    limit: Annotated[int | None, typer.Option(help="Score only the first N examples (per domain).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass (scores do not depend on it).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic benchmark.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Generation limit for math.")] = DEFAULT_MAX_NEW_TOKENS,
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, float32, bfloat16, float16.")] = "auto",
    device: Annotated[str | None, typer.Option(help="Device, e.g. cpu or cuda:0.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write results.json, predictions and a manifest here.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing eval directory given with --out.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (1 is fastest for tiny models).")] = None,
) -> None:
    """Score a model: label log-likelihood (classification), letter scores (multiple choice), greedy math.

    Without --data it scores the synthetic benchmark's three domains (--split, default test; 300 examples
    each unless --limit).

    Examples:

      expertscope eval --model demo

      expertscope eval --model ./my-moe --data mmlu.jsonl --task multiple_choice --limit 200
    """
    import torch

    from ..models.loading import load_model
    from ..rundir import open_run_dir, run_fingerprint

    _check_options(task, split, limit, batch_size, max_new_tokens, threads, device, model, out)
    # Read and check the data before loading the model, so bad input fails fast.
    jobs = _eval_jobs(data, task, split, limit, seed)
    if threads is not None:
        torch.set_num_threads(threads)
    config = {"model": model, "task": task, "data": None if data is None else str(data), "split": split,
              "limit": limit, "batch_size": batch_size, "seed": seed, "max_new_tokens": max_new_tokens,
              "dtype": dtype, "device": device}
    # The output directory is locked (and checked) before the model loads; nothing is written on failure.
    run = (open_run_dir(out, "eval", run_fingerprint(model, (), config, files=[data] if data else ()), config,
                        force=force, resumable=False) if out is not None else contextlib.nullcontext())
    with run as rd:
        torch.manual_seed(seed)
        moe = load_model(model, dtype=dtype, device=device)
        results = _run_jobs(moe, jobs, batch_size, max_new_tokens, device)
        out_console.print(_table(results))
        cut = {name: r.n_truncated for name, r in results if r.n_truncated}
        if cut:
            cap = getattr(moe, "context_length", None)
            out_console.print(f"[yellow]prompts cut from the left to fit the {cap}-token context:[/] {cut}")
        if rd is not None:
            _write(rd, results)


def _check_options(task: str | None, split: str, limit: int | None, batch_size: int, max_new_tokens: int,
                   threads: int | None, device: str | None, model: str, out: Path | None) -> None:
    """One-line errors for option values no run can use, before anything is loaded or written."""
    from ..data import synthetic
    from ..data.types import TASKS
    from ..errors import ConfigError
    from ..models.loading import resolve_source
    from ..rundir import check_out_dir
    from ..validation import check_device

    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if split not in synthetic.SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(synthetic.SPLITS)}")
    for flag, value in (("--limit", limit), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens),
                        ("--threads", threads)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} is not positive: pass 1 or more")
    check_device(device)
    resolve_source(model)
    if out is not None:
        check_out_dir(out)


def _eval_jobs(data: Path | None, task: str | None, split: str, limit: int | None, seed: int
               ) -> list[tuple[str, str, list[Example]]]:
    """``(name, task, examples)`` to score: the --data file, or the synthetic domains (of --task, if given);
    every job's examples checked against its task."""
    from ..data import synthetic
    from ..evaluation import validate_examples

    jobs: list[tuple[str, str, list[Example]]] = []
    if data is not None:
        examples = read_examples(data)[:limit]
        jobs.append((data.stem, task or infer_task(examples), examples))
    else:
        n = limit or 300
        for name in synthetic.DOMAINS:
            if task is None or synthetic.DOMAIN_TASKS[name] == task:
                dom = synthetic.generate(name, n, seed=seed, split=split)
                jobs.append((name, synthetic.DOMAIN_TASKS[name], dom.examples))
    for _, job_task, exs in jobs:
        validate_examples(job_task, exs)
    return jobs


def _run_jobs(moe: Any, jobs: list[tuple[str, str, list[Example]]], batch_size: int, max_new_tokens: int,
              device: str | None) -> list[tuple[str, EvalResult]]:
    """Score every job, one progress bar each."""
    from ..evaluation import evaluate

    results: list[tuple[str, EvalResult]] = []
    with progress() as p:
        for name, job_task, exs in jobs:
            bar = p.add_task(f"eval {name}", total=len(exs))
            res = evaluate(
                moe,
                job_task,
                exs,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                device=device,
                on_batch=functools.partial(p.advance, bar),
            )
            results.append((name, res))
    return results


def _write(rd: RunDir, results: list[tuple[str, EvalResult]]) -> None:
    from ..io import atomic_write, write_json

    summary = {name: {k: v for k, v in r.to_dict().items() if k != "predictions"} for name, r in results}
    write_json(rd.path / "results.json", summary)
    for name, r in results:
        with atomic_write(rd.path / f"predictions.{name}.jsonl") as fh:
            for rec in r.predictions:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    rd.write_manifest("complete", results=summary)


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to ``app``."""
    app.command("eval")(handle_errors(eval_command))
