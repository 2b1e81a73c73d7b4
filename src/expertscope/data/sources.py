"""Loading domains from local files (JSONL/JSON/CSV/Parquet), Hugging Face datasets, presets, or the
synthetic generator.

A domain spec on the command line is ``NAME=SOURCE`` with an optional field mapping as a query string:
``math=data/gsm.jsonl?text=question&answer=final``. SOURCE is a file path, ``hf:ID[:CONFIG][@SPLIT]``,
``preset:gsm8k|mmlu|emotion`` (hub datasets formatted for their evaluation task), or
``synthetic:emotion|knowledge|math[@SPLIT]`` (generated offline).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ..errors import DataError
from ..validation import check_positive, check_text, parse_limit
from .parts import Part, select_part
from .types import FIELD_KEYS, Domain, DomainSpec, Example, TaskName, check_unique_names

_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Preset:
    """A hub dataset and how its rows become :class:`Example` s for one evaluation task."""

    hub_id: str
    config: str | None
    split: str
    task: TaskName
    convert: Callable[[dict[str, Any]], Example]


def _gsm8k(row: dict[str, Any]) -> Example:
    solution = str(row["answer"])
    final = solution.split("####")[-1].strip().replace(",", "")
    return Example(text=str(row["question"]), answer=final, solution=solution)


def _mmlu(row: dict[str, Any]) -> Example:
    answer = row["answer"]
    label = _LETTERS[int(answer)] if not isinstance(answer, str) else answer.strip().upper()
    return Example(text=str(row["question"]), choices=tuple(map(str, row["choices"])), label=label,
                   meta={"subject": row.get("subject")})


# dair-ai/emotion label ids, in that dataset's order.
_EMOTION_NAMES = ("sadness", "joy", "love", "anger", "fear", "surprise")


def _emotion(row: dict[str, Any]) -> Example:
    label = row["label"]
    return Example(text=str(row["text"]), label=_EMOTION_NAMES[int(label)] if not isinstance(label, str) else label)


PRESETS: dict[str, Preset] = {
    "gsm8k": Preset("openai/gsm8k", "main", "test", "math", _gsm8k),
    "mmlu": Preset("cais/mmlu", "all", "test", "multiple_choice", _mmlu),
    "emotion": Preset("dair-ai/emotion", "split", "test", "classification", _emotion),
}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    from ..io import read_text

    if not path.exists():
        raise DataError(f"data file {path} not found: check the path")
    if path.is_dir():
        raise DataError(f"{path} is a directory: pass a .jsonl, .json, .csv or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            for lineno, line in enumerate(read_text(path, "data file").splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}): fix or remove that "
                                        "line") from None
                    _check_row(row, f"{path}:{lineno}")
                    rows.append(row)
            return rows
        if suffix == ".json":
            try:
                data = json.loads(read_text(path, "data file"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): fix the file") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{path} holds a JSON {type(data).__name__}: write a list of objects "
                                '([{"text": ...}, ...]) or {"data": [...]}')
            for i, row in enumerate(data):
                _check_row(row, f"{path} item {i}")
            return data
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            try:
                return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", encoding="utf-8-sig",
                                   dtype=str).to_dict("records")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 (invalid byte at offset {e.start}): save it as UTF-8") from None
        if suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    raise DataError(f"unsupported data file type {suffix!r} for {path}: use .jsonl, .json, .csv or .parquet")


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__} ({str(row)[:30]}), not an object: write one "
                        '{"text": ...} object per row')


def rows_to_examples(rows: Sequence[dict[str, Any]], fields: dict[str, str], where: str) -> list[Example]:
    """Map raw rows to examples. ``fields`` maps Example field → column name (``text`` required)."""
    if not rows:
        raise DataError(f"{where} has no rows: check the source")
    fields = {"text": "text", **fields}
    columns = set(rows[0])
    for key, col in fields.items():
        if (key == "text" or col != key) and col not in columns:
            raise DataError(
                f"{where} has no field {col!r} (fields: {', '.join(sorted(map(str, columns)))}): "
                f"pass the right one with --{key}-field or NAME=SOURCE?{key}=FIELD"
            )
    out = []
    for i, row in enumerate(rows):
        values: dict[str, Any] = {}
        for key in FIELD_KEYS:
            col = fields.get(key, key)
            if col in row and row[col] is not None and not (isinstance(row[col], float) and row[col] != row[col]):
                values[key] = row[col]
        text = check_text(values.get("text", ""), f"{where} row {i}", fields.get("text", "text"))
        if not text.strip():
            raise DataError(f"{where} row {i} has an empty {fields.get('text', 'text')!r}: remove it or fix the field")
        if isinstance(values.get("choices"), str):
            try:
                values["choices"] = json.loads(values["choices"])
            except json.JSONDecodeError:
                raise DataError(f"{where} row {i}: choices {values['choices'][:30]!r} is not a JSON list: "
                                'write e.g. ["a", "b"]') from None
        values.setdefault("id", str(i))
        out.append(Example.from_dict(values, where=f"{where} row {i}"))
    return out


def _load_hub(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError("loading hub datasets needs the `datasets` package: pip install 'expertscope[hub]'") from None
    import logging

    quiet = [logging.getLogger(n) for n in ("huggingface_hub", "datasets")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)  # one error line, not one warning per retry
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # datasets raises many types for offline / unknown ids
        raise DataError(
            f"cannot load dataset {hub_id!r} ({type(e).__name__}: offline, or no such dataset/split): "
            "download it and pass a local file as NAME=path.jsonl"
        ) from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return [dict(r) for r in ds]


def parse_domain_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"NAME=SOURCE?field=col&..."`` → ``(name, source, query)`` (see :meth:`DomainSpec.parse`)."""
    d = DomainSpec.parse(spec)
    return d.name, d.source, d.query()


def load_domain(
    spec: str | DomainSpec | None = None,
    *,
    name: str | None = None,
    source: str | None = None,
    fields: dict[str, str] | None = None,
    task: TaskName | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    part: Part | None = None,
    part_seed: int = 0,
    part_fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> Domain:
    """Load one domain from ``spec`` (``NAME=SOURCE?...``) or from ``name`` + ``source``.

    Sources: a local JSONL/JSON/CSV/Parquet file; ``hf:ID[:CONFIG][@SPLIT]``; ``preset:NAME``; or
    ``synthetic:DOMAIN[@SPLIT]``. ``fields`` maps Example fields to column names; ``task`` ties the domain to
    an evaluation task (presets and synthetic domains set it), which decides the prompt text profiled.
    ``part``: keep only that part of a non-synthetic source (:mod:`.parts`: a hash of each item's text with
    ``part_seed``, cut at ``part_fractions``), before ``limit``; a synthetic source's part is its split.
    """
    fields = dict(fields or {})
    labels: tuple[str, ...] | None = None
    limit_s = None
    if spec is not None:
        parsed = DomainSpec.parse(spec)
        name, source = parsed.name, parsed.source
        fields.update(parsed.field_map)
        task = cast("TaskName | None", parsed.task or task)  # Domain checks the name is a task
        split, limit_s, labels = parsed.split or split, parsed.limit, parsed.labels
    if not name or not source:
        raise DataError("a domain needs a name and a source: e.g. --domain math=data/math.jsonl")
    limit = parse_limit(limit_s, str(spec)) if limit_s is not None else limit
    check_positive(limit, "limit", allow_none=True)  # 0 must not mean "all", nor -1 "all but the last"
    if source.startswith("preset:"):
        key = source.split(":", 1)[1]
        if key not in PRESETS:
            raise DataError(f"unknown preset {key!r}: use one of {', '.join(PRESETS)}")
        p = PRESETS[key]
        rows = _load_hub(p.hub_id, p.config, split or p.split)
        own = _EMOTION_NAMES if key == "emotion" else None
        examples = [p.convert(r) for r in (rows if part else rows[: limit or None])]
        if part:
            examples = _of_part(name, examples, part, part_seed, part_fractions)[: limit or None]
        return Domain(name, examples, task or p.task, source, labels or own)
    if source.startswith("synthetic:"):
        from .synthetic import generate

        kind, _, sp = source.split(":", 1)[1].partition("@")
        generated = generate(kind, n=limit or 200, seed=seed, split=sp or split or "test")
        dom = generated if isinstance(generated, Domain) else Domain(name, list(generated), None, source)
        return Domain(name, dom.examples, task or dom.task or _synthetic_task(kind), source, labels)
    if source.startswith("hf:"):
        ident, _, sp = source[3:].partition("@")
        hub_id, _, config = ident.partition(":")
        rows = _load_hub(hub_id, config or None, sp or split or "train")
        where = f"dataset {hub_id}"
    else:
        path = Path(source).expanduser()
        rows = _read_rows(path)
        where = str(path)
    if task == "classification" and labels is None:
        labels = data_labels(rows, fields.get("label", "label"))  # the whole file's, whatever the limit
    if part:
        examples = _of_part(name, rows_to_examples(rows, fields, where), part, part_seed, part_fractions)
        return Domain(name, examples[: limit or None], task, source, labels)
    if limit:
        rows = rows[:limit]
    return Domain(name, rows_to_examples(rows, fields, where), task, source, labels)


def _of_part(name: str, examples: list[Example], part: Part, seed: int, fractions: Sequence[float]) -> list[Example]:
    """The examples of ``part``; a DataError naming the fix when the part is empty."""
    chosen = select_part(examples, part, seed, fractions)
    if not chosen and examples:
        shares = ",".join(f"{x:g}" for x in fractions)
        raise DataError(f"domain {name!r} has no {part} items: its {len(examples)} item(s) all fell in the other "
                        f"parts (--parts {shares}): give the domain more items")
    return chosen


def data_labels(rows: Sequence[dict[str, Any]], column: str) -> tuple[str, ...] | None:
    """A classification domain's label set from its data: the distinct values of ``column``, sorted
    (None when no row has one)."""
    found = {str(r[column]) for r in rows if r.get(column) is not None and r.get(column) == r.get(column)}
    return tuple(sorted(found)) or None


def _synthetic_task(kind: str) -> TaskName | None:
    tasks: dict[str, TaskName] = {"emotion": "classification", "knowledge": "multiple_choice", "math": "math"}
    return tasks.get(kind)


def load_domains(specs: Sequence[str | DomainSpec], limit: int | None = None, seed: int = 0,
                 **defaults: Any) -> list[Domain]:
    """Load several ``NAME=SOURCE`` specs; names must be unique."""
    if isinstance(specs, str):
        from ..errors import InputTypeError

        raise InputTypeError(f"specs must be a list of NAME=SOURCE strings, got one string {specs!r}: wrap it in a "
                             "list")
    if not isinstance(specs, Sequence) or isinstance(specs, bytes):
        from ..errors import InputTypeError

        raise InputTypeError(f"specs is a {type(specs).__name__}, not a list of NAME=SOURCE strings: e.g. "
                             "['math=math.jsonl', 'sa=sa.jsonl']")
    doms = [load_domain(s, limit=limit, seed=seed, **defaults) for s in specs]
    check_unique_names([d.name for d in doms])
    return doms
