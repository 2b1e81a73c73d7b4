"""Disjoint parts of every source: discovery (profile, domain and driver experts), training (router LoRA) and
confirmation (steering, selectivity, routing overlap), so that no item both finds the experts and tests them.

The synthetic benchmark has its own splits (validation, train, test; disjoint by construction). Any other
source (a file, a hub dataset, a preset) is split by a seeded hash of each item's content
(:func:`item_hash`): an item's part depends only on its text and the seed, never on the order of the rows or
on ``--limit`` (the limit takes the first items *of the part*), and duplicated texts always share a part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

Part = Literal["discovery", "train", "confirm"]
PARTS: tuple[Part, ...] = ("discovery", "train", "confirm")

__all__ = ["PARTS", "Part", "digest", "item_hash", "part_of", "refuse_shared", "select_part", "shared_items"]


def item_hash(example: Any) -> str:
    """A stable hash of an item's content: its text, preceding context and choices (sha256, hex)."""
    ctx = "\x1e".join(example.context or ())
    choices = "\x1e".join(example.choices or ())
    return hashlib.sha256(f"{example.text}\x1f{ctx}\x1f{choices}".encode()).hexdigest()


def part_of(h: str, seed: int, fractions: Sequence[float]) -> Part:
    """The part of the item with hash ``h``: a uniform number from ``seed`` and ``h``, cut at the cumulative
    ``fractions`` (discovery, train, confirm)."""
    u = int(hashlib.sha256(f"{seed}:{h}".encode()).hexdigest()[:15], 16) / 16**15
    edge = 0.0
    for name, share in zip(PARTS, fractions, strict=True):
        edge += share
        if u < edge:
            return name
    return PARTS[-1]


def select_part(examples: Sequence[Any], part: Part, seed: int, fractions: Sequence[float]) -> list[Any]:
    """The examples of ``part``, in their order."""
    return [e for e in examples if part_of(item_hash(e), seed, fractions) == part]


def digest(examples: Iterable[Any]) -> dict[str, Any]:
    """How many items a stage read and a digest of their hashes (order-free): what the manifest records."""
    hashes = sorted(item_hash(e) for e in examples)
    return {"n": len(hashes), "digest": hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]}


def shared_items(seen: Mapping[str, Collection[str]], domains: Iterable[Any], digits: int = 64) -> dict[str, int]:
    """Per domain name of ``domains`` (``.name``, ``.examples``), how many of its items' hashes (their first
    ``digits`` hex digits) are among ``seen[name]``, summed over the domains of that name (a domain's
    confirmation, training and second-corpus parts); names with none are left out."""
    found: dict[str, int] = {}
    for d in domains:
        known = seen.get(d.name, ())
        n = sum(item_hash(e)[:digits] in known for e in d.examples)
        if n:
            found[d.name] = found.get(d.name, 0) + n
    return found


def refuse_shared(found: Mapping[str, int], allowed: bool, what: str) -> dict[str, int]:
    """``found`` (from :func:`shared_items`) when ``allowed`` or empty; else a one-line DataError naming the first
    domain and its count: ``domain 'x': N <what>: ... --allow-overlap``."""
    if found and not allowed:
        from ..errors import DataError

        name, n = next(iter(found.items()))
        raise DataError(f"domain {name!r}: {n} {what}: give new data or disjoint sources, or pass --allow-overlap "
                        "(every affected verdict then says so)")
    return dict(found)
