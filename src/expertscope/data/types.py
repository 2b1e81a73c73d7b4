"""The data types every part of expertscope shares: one example, one domain."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

from .prompts import profile_text

TaskName = Literal["classification", "multiple_choice", "math"]
TASKS: tuple[str, ...] = ("classification", "multiple_choice", "math")
#: Example fields a domain spec may map to a column (``?text=question``).
FIELD_KEYS = ("text", "label", "answer", "choices", "solution", "context", "id")
#: Query keys of a domain spec that are settings, not field mappings.
SPEC_KEYS = ("task", "split", "limit", "labels")


#: A domain name: it names files and directories of a run (adapters, predictions), so it is a safe identifier:
#: letters, digits, '_', '-' or '.', starting with a letter, digit or '_' (never '.' or '..'), at most 64.
DOMAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")


def check_domain_name(name: Any) -> str:
    """``name`` when it is a valid domain name (:data:`DOMAIN_NAME`); else a one-line error naming the rule.
    The one rule for every domain name: ``Domain``, ``-d``, ``--confirm``, ``--routes``."""
    from ..errors import DataError, InputTypeError

    if not isinstance(name, str):
        raise InputTypeError(f"domain name {name!r} is a {type(name).__name__}, not a string: name it, e.g. "
                             "Domain('math', examples)")
    if not name.strip():
        raise DataError("a domain name is empty: name it, e.g. Domain('math', examples) or -d math=FILE")
    if not DOMAIN_NAME.fullmatch(name):
        raise DataError(f"domain name {name!r} must be letters, digits, '_', '-' or '.' (1 to 64, starting with a "
                        "letter, digit or '_'): rename it")
    return name


def check_unique_names(names: Any, option: str = "--domain") -> None:
    """No two domain names equal, or equal but for case (their files would collide on a case-insensitive disk)."""
    from ..errors import DataError

    seen: dict[str, str] = {}
    for n in names:
        key = str(n).casefold()
        if key in seen:
            what = "is used twice" if seen[key] == n else f"and {seen[key]!r} differ only in case"
            raise DataError(f"domain name {n!r} {what}: give each {option} its own name")
        seen[key] = str(n)


@dataclass(frozen=True)
class DomainSpec:
    """One ``NAME=SOURCE[?key=value&...]`` domain spec, parsed once (at the edge) and passed on as a value.

    ``fields`` maps Example fields to columns; ``task``, ``split``, ``limit`` and ``labels`` (a
    classification domain's own label set, ``?labels=positive,negative,neutral``) are the spec's settings.
    ``kind`` is ``file``, ``hf``, ``preset`` or ``synthetic``. ``str(spec)`` gives the spec back as written.
    """

    name: str
    source: str
    fields: tuple[tuple[str, str], ...] = ()
    task: str | None = None
    split: str | None = None
    limit: str | None = None
    labels: tuple[str, ...] | None = None
    text: str = ""

    @classmethod
    def parse(cls, spec: str | DomainSpec) -> DomainSpec:
        """Parse ``"NAME=SOURCE?field=col&task=...&labels=a,b"``; raises DataError naming the fix."""
        from ..errors import DataError, InputTypeError

        if isinstance(spec, DomainSpec):
            return spec
        if not isinstance(spec, str):
            raise InputTypeError(f"domain spec {spec!r} is a {type(spec).__name__}, not a NAME=SOURCE string")
        if "=" not in spec:
            raise DataError(f"domain {spec!r} is not NAME=SOURCE: e.g. --domain math=data/math.jsonl")
        name, _, rest = spec.partition("=")
        source, _, query = rest.partition("?")
        check_domain_name(name)
        pairs = dict(parse_qsl(query)) if query else {}
        bad = sorted(set(pairs) - set(FIELD_KEYS) - set(SPEC_KEYS))
        if bad:
            raise DataError(f"unknown field key {bad[0]!r} in {spec!r}: use {', '.join(FIELD_KEYS)}, "
                            f"{', '.join(SPEC_KEYS)}")
        labels = None
        if "labels" in pairs:
            labels = tuple(x.strip() for x in pairs["labels"].split(",") if x.strip())
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise DataError(f"labels={pairs['labels']!r} in {spec!r} must name two or more distinct labels: "
                                "e.g. ?labels=positive,negative,neutral")
        return cls(name=name, source=source, fields=tuple((k, v) for k, v in pairs.items() if k in FIELD_KEYS),
                   task=pairs.get("task"), split=pairs.get("split"), limit=pairs.get("limit"), labels=labels,
                   text=spec)

    @property
    def kind(self) -> Literal["file", "hf", "preset", "synthetic"]:
        for prefix in ("hf", "preset", "synthetic"):
            if self.source.startswith(prefix + ":"):
                return prefix
        return "file"

    @property
    def field_map(self) -> dict[str, str]:
        return dict(self.fields)

    def query(self) -> dict[str, str]:
        """The spec's query as a dict, as the first parser returned it (fields and settings)."""
        out = dict(self.fields)
        for key in ("task", "split", "limit"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.labels is not None:
            out["labels"] = ",".join(self.labels)
        return out

    def with_fields(self, fields: dict[str, str | None]) -> DomainSpec:
        """This spec with ``fields`` (Example field -> column) added where it maps none of its own."""
        extra = "&".join(f"{k}={v}" for k, v in fields.items() if v and k not in self.field_map)
        return self if not extra else DomainSpec.parse(f"{self}{'&' if '?' in str(self) else '?'}{extra}")

    def __str__(self) -> str:
        return self.text or f"{self.name}={self.source}"


@dataclass(frozen=True)
class Example:
    """One item of a domain.

    ``text`` is the raw input (an utterance, a question, a word problem). Task fields are optional:
    ``label`` is the class name (classification) or the answer letter ``"A"``–``"D"`` (multiple choice);
    ``answer`` is the final number of a math problem as a string, ``solution`` its worked solution;
    ``choices`` are the options of a multiple-choice question; ``context`` is preceding dialogue.
    """

    text: str
    label: str | None = None
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    solution: str | None = None
    context: tuple[str, ...] | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            from ..errors import InputTypeError

            raise InputTypeError(f"Example text is a {type(self.text).__name__}, not a string: pass text=str(...) "
                                 "only if that is really the text")
        from ..validation import check_unicode

        for key in ("text", "label", "answer", "solution", "id"):  # tokenizers refuse lone surrogates
            if isinstance(getattr(self, key), str):
                check_unicode(getattr(self, key), "example", key)
        for key in ("choices", "context"):
            for v in getattr(self, key) or ():
                if isinstance(v, str):
                    check_unicode(v, "example", key)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the empty fields left out."""
        out: dict[str, Any] = {"text": self.text}
        for key in ("label", "answer", "choices", "solution", "context", "id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "example") -> Example:
        """An example from a JSON-style dict; ``text``, ``solution`` and ``context`` must be strings (numbers
        are accepted for ``label``/``answer``/``choices``, which are often numeric). ``where`` names the row in
        errors."""
        from ..validation import check_text

        if not isinstance(d, dict):
            from ..errors import DataError

            raise DataError(f"{where} is a {type(d).__name__}, not an object: write one {{\"text\": ...}} object")
        check_text(d.get("text"), where)
        if d.get("solution") is not None:
            check_text(d["solution"], where, "solution")
        for key in ("choices", "context"):
            v = d.get(key)
            if v is not None and (isinstance(v, str | bytes | dict) or not hasattr(v, "__iter__")):
                from ..errors import DataError

                raise DataError(f"{where}: field {key!r} is a {type(v).__name__}, not a list: write e.g. "
                                f'"{key}": ["a", "b"]')
        for c in d.get("context") or ():
            check_text(c, where, "context")
        for c in d.get("choices") or ():
            if not isinstance(c, int | float) or isinstance(c, bool):  # a string, or no number: must be text
                check_text(c, where, "choices")
        for key in ("label", "answer", "id"):  # numbers are fine (str() of them is exact); lists and dicts are not
            v = d.get(key)
            if v is not None and (not isinstance(v, str | int | float) or isinstance(v, bool)):
                from ..errors import DataError

                raise DataError(f"{where}: field {key!r} is a {type(v).__name__} ({str(v)[:30]}), not a string or "
                                "number: write one value")
            if isinstance(v, str):
                check_text(v, where, key)
        return cls(
            text=d["text"],
            label=None if d.get("label") is None else str(d["label"]),
            answer=None if d.get("answer") is None else str(d["answer"]),
            choices=None if d.get("choices") is None else tuple(str(c) for c in d["choices"]),
            solution=d.get("solution"),
            context=None if d.get("context") is None else tuple(str(c) for c in d["context"]),
            id=None if d.get("id") is None else str(d["id"]),
            meta=dict(d.get("meta") or {}),
        )


@dataclass
class Domain:
    """A named collection of examples, optionally tied to an evaluation task.

    ``texts`` are what profiling feeds the model: the task's prompt for each example when ``task`` is set
    (so routing is measured on exactly what evaluation shows the model), else the raw text.
    """

    name: str
    examples: list[Example]
    task: TaskName | None = None
    source: str | None = None
    labels: tuple[str, ...] | None = None
    """A classification domain's label set (from its data, or the spec's ``?labels=``); evaluation scores
    these labels. None: the task's standard set."""

    def __post_init__(self) -> None:
        from ..errors import InputTypeError

        check_domain_name(self.name)
        if isinstance(self.examples, str | bytes | dict) or not isinstance(self.examples, Sequence):
            raise InputTypeError(f"domain {self.name!r}: examples is a {type(self.examples).__name__}, not a list "
                                 "of Example: e.g. [Example('a text'), ...]")
        bad = next((e for e in self.examples if not isinstance(e, Example)), None)
        if bad is not None:
            raise InputTypeError(f"domain {self.name!r}: examples holds a {type(bad).__name__} ({str(bad)[:30]!r}), "
                                 "not an Example: wrap each text, e.g. Example('a text')")
        if self.task is not None and self.task not in TASKS:
            from ..errors import ConfigError

            raise ConfigError(f"unknown task {self.task!r} for domain {self.name!r}: use one of {TASKS}")

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @property
    def texts(self) -> list[str]:
        if self.task is None:
            return [ex.text for ex in self.examples]
        return [profile_text(self.task, ex) for ex in self.examples]

    def head(self, n: int | None) -> Domain:
        """The first ``n`` examples (all when ``n`` is None)."""
        return self if n is None else Domain(self.name, self.examples[:n], self.task, self.source, self.labels)


def as_domains(domains: Domain | Sequence[Domain] | dict[str, Sequence[str]]) -> list[Domain]:
    """Normalise the accepted domain inputs to a list of :class:`Domain`.

    Accepts one Domain, a list of them, or ``{name: [text, ...]}``.
    """
    from ..errors import InputTypeError
    from ..validation import check_text

    expected = "a Domain, a list of Domains, or {name: [text, ...]}"
    if isinstance(domains, Domain):
        return [domains]
    if isinstance(domains, dict):
        out = []
        for name, texts in domains.items():
            if not isinstance(name, str):
                raise InputTypeError(f"domain name {name!r} is a {type(name).__name__}: expected {expected}")
            if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
                raise InputTypeError(f"domain {name!r} maps to a {type(texts).__name__}, not a list of texts: "
                                     f"expected {expected}, e.g. {{{name!r}: [\"text one\", \"text two\"]}}")
            out.append(Domain(name, [Example(text=check_text(t, f"domain {name!r} item {i}"))
                                     for i, t in enumerate(texts)]))
        return out
    if isinstance(domains, str | bytes) or not isinstance(domains, Sequence):
        raise InputTypeError(f"domains is a {type(domains).__name__}: expected {expected}")
    bad = next((d for d in domains if not isinstance(d, Domain)), None)
    if bad is not None:
        raise InputTypeError(f"domains holds a {type(bad).__name__} ({str(bad)[:30]!r}): expected {expected}")
    return list(domains)
