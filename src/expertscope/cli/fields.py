"""Config fields as command-line text: each field's help (the docstring under it in the config's source),
its metavar, and a command-line value parsed as the field's type. The configs themselves (``config.py``) are
the schema only."""

from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

from ..errors import ConfigError

_DOCS: dict[type, dict[str, str]] = {}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring line under each field of a dataclass (or a ``#:`` comment above it): CLI help text."""
    if cls in _DOCS:
        return _DOCS[cls]
    out: dict[str, str] = _DOCS.setdefault(cls, {})
    for klass in reversed(cls.__mro__):
        found = _class_source(klass)
        if found is None:
            continue
        body, lines = found
        stmts = getattr(body, "body", [])
        for i, node in enumerate(stmts):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            nxt = stmts[i + 1] if i + 1 < len(stmts) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                out[node.target.id] = " ".join(nxt.value.value.split())
            elif node.lineno >= 2 and lines[node.lineno - 2].strip().startswith("#:"):
                out[node.target.id] = lines[node.lineno - 2].strip()[2:].strip()
    return out


@functools.cache
def _module_classes(module: str) -> tuple[dict[str, ast.ClassDef], list[str]]:
    """The top-level class definitions of ``module`` by name and its source lines, parsed once."""
    import sys

    try:
        text = inspect.getsource(sys.modules[module])
    except (KeyError, OSError, TypeError):
        return {}, []
    return {n.name: n for n in ast.parse(text).body if isinstance(n, ast.ClassDef)}, text.splitlines()


def _class_source(klass: type) -> tuple[ast.AST, list[str]] | None:
    """``klass``'s definition node and the source lines its line numbers count in. A module-level class is
    found in its module's tree, parsed once per module (``inspect.getsource`` of a class parses the whole
    module for every class: 0.7 s of every command line's start); any other class from its own source."""
    if "." not in klass.__qualname__:
        classes, lines = _module_classes(klass.__module__)
        if klass.__name__ in classes:
            return classes[klass.__name__], lines
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return None
    return ast.parse(source).body[0], source.splitlines()


def field_metavar(tp: Any) -> str:
    """The one notation of an option's value in ``--help``: ``<int>``, ``<float|none>``, ``<scale|bias>``,
    ``<list>`` (comma-separated)."""
    flat = _flat(tp)
    opts = [a for a in flat if a is not type(None)]
    lits = [v for a in opts if get_origin(a) is Literal for v in get_args(a)]
    kinds = [a.__name__ if isinstance(a, type) else "list" for a in opts if get_origin(a) is not Literal]
    none = ["none"] if type(None) in flat else []
    return "<" + "|".join([*map(str, lits), *kinds, *none]) + ">"


def _flat(tp: Any) -> list[Any]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return [x for a in get_args(tp) for x in _flat(a)]
    return [tp]


def parse_field_value(text: str, tp: Any, name: str) -> Any:
    """A string (a command-line value) as a value of the field type ``tp``; one-line ConfigError naming ``name``."""
    opts = _flat(tp)
    s = text.strip()
    if type(None) in opts and s.lower() in ("none", "all"):
        return None
    for a in opts:
        if get_origin(a) is Literal and s in map(str, get_args(a)):
            return next(v for v in get_args(a) if str(v) == s)
    for a in opts:
        try:
            if a is int:
                return int(s)
            if a is float:
                v = float(s)
                if not math.isfinite(v):
                    raise ConfigError(f"{name} {text} is not finite: pass a finite number, e.g. 2.0")
                return v
            if a is str:
                return s
            if get_origin(a) is tuple:
                kind = get_args(a)[0]
                return tuple(kind(x.strip()) for x in s.split(",") if x.strip())
        except ConfigError:
            raise
        except ValueError:
            continue
    raise ConfigError(f"{name} {text!r} is not valid: pass {field_metavar(tp)}")


__all__ = ["field_docs", "field_metavar", "parse_field_value"]
