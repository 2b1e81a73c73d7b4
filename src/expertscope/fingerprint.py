"""Fingerprints: what decides a run's results, recorded in its manifest and compared on ``--resume``.

The model by its files' digests (a hub id by id and revision), each domain by its parsed
:class:`~expertscope.data.types.DomainSpec`, its file's digest and its classification label set, and every
result-changing setting. :func:`fingerprint_difference` names the first difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data.types import DomainSpec

if TYPE_CHECKING:
    from .models.loading import ModelSource

#: Files up to this size are hashed whole; larger ones by size, head, middle and tail (weights can be 100s of GB).
FULL_HASH_BYTES = 64 << 20
_SAMPLE = 1 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file; files above :data:`FULL_HASH_BYTES` are hashed by size plus three 1 MiB samples."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            for offset in (0, size // 2, size - _SAMPLE):
                fh.seek(offset)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def model_fingerprint(model: str | ModelSource, revision: str | None = None) -> dict[str, Any]:
    """``{"model", "revision", "files"}``: a local directory's files (weights, config, tokenizer) by digest.

    A hub id is fingerprinted by its id and revision only (its files are not fetched here).
    """
    from .models.loading import ModelSource  # lazily: torch is not needed to compare fingerprints

    source = ModelSource.resolve(model)
    files: dict[str, str] | None = None
    if source.local:
        files = {p.name: file_digest(p) for p in sorted(Path(source.path).iterdir())
                 if p.is_file() and not p.name.startswith(".") and p.suffix not in (".md", ".txt")}
    return {"model": source.name, "revision": revision, "files": files}


def data_fingerprint(specs: Sequence[str | DomainSpec], fields: dict[str, str] | None = None,
                     labels: dict[str, tuple[str, ...] | None] | None = None) -> dict[str, Any]:
    """Each domain (by name, in order) → its source, effective field mapping, the local file's digest, and
    (when given) its classification label set as read from the data.

    ``fields`` is the mapping given for every domain (``--text-field``...); a spec's own ``?text=...`` wins.
    Two spellings of the same data (``--text-field q`` and ``?text=q``) give the same fingerprint.
    """
    out: dict[str, Any] = {"order": []}
    for spec in map(DomainSpec.parse, specs):
        path = Path(spec.source).expanduser()
        is_file = spec.kind == "file" and path.is_file()
        out["order"].append(spec.name)
        out[spec.name] = {"source": spec.source, "fields": {**(fields or {}), **spec.query()},
                          "sha256": file_digest(path) if is_file else None}
        if labels is not None and labels.get(spec.name) is not None:
            out[spec.name]["labels"] = list(labels[spec.name] or ())
    return out


def run_fingerprint(model: str | ModelSource | None, domains: Sequence[str | DomainSpec] = (),
                    settings: dict[str, Any] | None = None, revision: str | None = None,
                    files: Sequence[str | os.PathLike[str]] = (), fields: dict[str, str] | None = None,
                    labels: dict[str, tuple[str, ...] | None] | None = None) -> dict[str, Any]:
    """What decides a run's results: model (with weights digest), data (with digests), settings, extra files.

    ``settings`` should not repeat the domain specs or field mapping (they are fingerprinted by meaning in
    ``data``); keys ``domains`` and ``fields`` are dropped from it.
    """
    fp: dict[str, Any] = {}
    if model is not None:
        fp["model"] = model_fingerprint(model, revision)
    if domains:
        fp["data"] = data_fingerprint(domains, fields, labels)
    if files:
        fp["files"] = {str(f): file_digest(f) for f in files}
    kept = {k: v for k, v in (settings or {}).items() if k not in ("domains", "fields")}
    fp["settings"] = json.loads(json.dumps(kept, default=str))
    return fp


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}


def fingerprint_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first difference between two fingerprints as ``"key: old → new"``, or None if they match."""
    a, b = _flatten(old), _flatten(new)
    for key in list(b) + [k for k in a if k not in b]:
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            label = key.removeprefix("settings.")
            return f"{label}: {_short(a.get(key, '<absent>'))} → {_short(b.get(key, '<absent>'))}"
    return None


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


__all__ = ["data_fingerprint", "file_digest", "fingerprint_difference", "model_fingerprint", "run_fingerprint"]
