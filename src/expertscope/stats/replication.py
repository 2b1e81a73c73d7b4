"""Replication: do the experts a rule flags come back on a second, disjoint sample?

Each domain's inputs are split into two disjoint halves by a seeded hash of their text
(:func:`split_halves`); the rule runs unchanged on each half, and every expert flagged on the whole set or
on either half gets its status: found in both halves, in one, or in neither. Per domain, the Jaccard index
of the two halves' sets says how well the rule's output replicates (definitions in ``docs/methods.md``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..io import read_table, write_table
from .profile import STAT_NAMES, RoutingProfile
from .rules import jaccard

if TYPE_CHECKING:
    from ..config import DomainExpertConfig

TABLE_VERSION = 1

#: Columns of the per-expert replication table, in order.
COLUMNS = ("kind", "domain", "layer", "expert", "in_full", "in_half_a", "in_half_b", "status", "replicates")
#: Columns of the per-domain summary.
SUMMARY_COLUMNS = ("kind", "domain", "n_inputs_a", "n_inputs_b", "n_full", "n_half_a", "n_half_b", "n_both",
                   "jaccard", "n_full_replicated")


def text_hash(text: str, seed: int) -> int:
    """A 64-bit hash of ``text`` under ``seed`` (BLAKE2b; the same on every machine and Python run)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest(), "big")


def split_halves(texts: Sequence[str], seed: int = 0) -> np.ndarray:
    """``(N,)`` int: 0 or 1, the half of each text. Texts are ordered by their seeded hash (ties: the text),
    and the first ``⌈N/2⌉`` in that order form half 0, so the halves differ in size by at most one, do not
    depend on the order the texts come in, and a repeated text never lands in both halves (repeats of a
    text stay together, which can make the halves differ by more than one)."""
    n = len(texts)
    unique = sorted(set(texts), key=lambda t: (text_hash(t, seed), t))
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    half_of: dict[str, int] = {}
    taken = 0
    for t in unique:
        half_of[t] = 0 if taken < (n + 1) // 2 else 1
        taken += counts[t]
    return np.array([half_of[t] for t in texts], dtype=np.int64)


@dataclass
class Replication:
    """Replication of one or both rules: ``df`` one row per (kind, domain, layer, expert) flagged on the whole
    set or on either half (:data:`COLUMNS`); ``summary`` one row per (kind, domain) (:data:`SUMMARY_COLUMNS`);
    ``kind`` is ``"domain"`` (domain experts) or ``"driver"``.

    ``status``: ``"both"`` (flagged in both halves), ``"one"`` or ``"neither"``; ``replicates``: flagged on
    the whole set and in both halves. ``jaccard`` = |A ∩ B| / |A ∪ B| of the halves' sets (NaN when both
    are empty).
    """

    df: pd.DataFrame
    summary: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def replicated(self, kind: str, domain: str) -> list[tuple[int, int]]:
        """``(layer, expert)`` of ``domain``'s ``kind`` experts flagged on the whole set and in both halves."""
        rows = self.df[(self.df["kind"] == kind) & (self.df["domain"] == domain) & self.df["replicates"]]
        return [(int(r.layer), int(r.expert)) for r in rows.itertuples()]

    def save(self, path: str | Path) -> None:
        meta = {"table": "replication", "version": TABLE_VERSION, **self.settings,
                "summary": self.summary.to_dict("records")}
        write_table(path, self.df, meta=meta)

    @classmethod
    def load(cls, path: str | Path) -> Replication:
        df, meta = read_table(path)
        summary = pd.DataFrame(meta.pop("summary", []), columns=list(SUMMARY_COLUMNS))
        return cls(df, summary, meta)

    @staticmethod
    def concat(parts: Sequence[Replication]) -> Replication:
        """Domain-expert and driver replication in one table (settings under each kind)."""
        settings: dict[str, Any] = {}
        for p in parts:
            settings.update(p.settings)
        return Replication(pd.concat([p.df for p in parts], ignore_index=True),
                           pd.concat([p.summary for p in parts], ignore_index=True), settings)


Experts = set[tuple[int, int]]


def compare_sets(kind: str, full: Mapping[str, Experts], halves: Sequence[Mapping[str, Experts]],
                 sizes: Mapping[str, tuple[int, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-expert (:data:`COLUMNS`) and per-domain (:data:`SUMMARY_COLUMNS`) tables of rule ``kind`` from
    the flagged sets of the whole set (``full``), the two halves, and the halves' sizes per domain."""
    rows, summ = [], []
    for d in full:
        a, b, f = halves[0].get(d, set()), halves[1].get(d, set()), full[d]
        for layer, expert in sorted(f | a | b):
            ina, inb = (layer, expert) in a, (layer, expert) in b
            rows.append({"kind": kind, "domain": d, "layer": layer, "expert": expert,
                         "in_full": (layer, expert) in f, "in_half_a": ina, "in_half_b": inb,
                         "status": "both" if ina and inb else "one" if ina or inb else "neither",
                         "replicates": (layer, expert) in f and ina and inb})
        summ.append({"kind": kind, "domain": d, "n_inputs_a": sizes[d][0], "n_inputs_b": sizes[d][1],
                     "n_full": len(f), "n_half_a": len(a), "n_half_b": len(b), "n_both": len(a & b),
                     "jaccard": jaccard(a, b), "n_full_replicated": len(f & a & b)})
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.astype({"in_full": bool, "in_half_a": bool, "in_half_b": bool, "replicates": bool})
    return df, pd.DataFrame(summ, columns=list(SUMMARY_COLUMNS))


def _texts_of(texts: Mapping[str, Sequence[str]] | None, domain: str, index: np.ndarray) -> list[str]:
    """The texts to hash: the inputs' own texts when given, else a stand-in naming the input's index."""
    if texts is None:
        return [f"#{int(i)}" for i in index]
    ts = texts[domain]
    return [ts[int(i)] for i in index]


def halves_by_domain(domain: np.ndarray, index: np.ndarray, texts: Any = None, seed: int = 0) -> np.ndarray:
    """``(N,)`` the half (0/1) of each input, given its domain name ``domain`` ``(N,)`` and its index within
    the domain ``index`` ``(N,)``: :func:`split_halves` per domain of the inputs' texts (``texts``:
    ``{domain: texts}`` or the domains themselves; without them the input's index is hashed)."""
    txt = _as_texts(texts)
    half = np.zeros(len(domain), np.int64)
    for d in dict.fromkeys(domain.tolist()):
        m = domain == d
        half[m] = split_halves(_texts_of(txt, str(d), index[m]), seed)
    return half


def half_sizes(domain: np.ndarray, half: np.ndarray) -> dict[str, tuple[int, int]]:
    """``{domain: (inputs in half 0, inputs in half 1)}``."""
    return {str(d): (int(((domain == d) & (half == 0)).sum()), int(((domain == d) & (half == 1)).sum()))
            for d in dict.fromkeys(domain.tolist())}


def _as_texts(texts: Any) -> Mapping[str, Sequence[str]] | None:
    if texts is None or isinstance(texts, Mapping):
        return texts
    from ..routing import domain_texts

    return domain_texts(texts)


def flagged_sets(df: pd.DataFrame, flag: str) -> dict[str, set[tuple[int, int]]]:
    """``{domain: {(layer, expert) where df[flag]}}`` for every domain of ``df`` (empty sets kept)."""
    out: dict[str, set[tuple[int, int]]] = {}
    for d in dict.fromkeys(df["domain"].astype(str)):
        g = df[(df["domain"].astype(str) == d) & df[flag].fillna(False).astype(bool)]
        out[d] = {(int(r.layer), int(r.expert)) for r in g.itertuples()}
    return out


def subset_profile(profile: RoutingProfile, keep: np.ndarray) -> RoutingProfile:
    """A profile of the sequences where ``keep`` ``(S,)`` (over ``profile.seq_domain`` order) is True; the
    domains and their order are kept."""
    out = RoutingProfile(layers=list(profile.layers), num_experts=profile.num_experts, top_k=profile.top_k,
                         domains=list(profile.domains), model_info=dict(profile.model_info),
                         config=dict(profile.config), truncated=dict(profile.truncated))
    dom, ids, tok = profile.seq_domain, profile.seq_id, profile.seq_tokens
    stats = {name: profile.seq_stats(name) for name in STAT_NAMES}
    for d, name in enumerate(profile.domains):
        m = keep & (dom == d)
        if m.any():
            out.add(name, ids[m].tolist(), tok[m], {k: v[m] for k, v in stats.items()})
    return out


def replicate_domain_experts(
    profile: RoutingProfile, texts: Any = None, config: DomainExpertConfig | None = None, seed: int = 0,
    full: pd.DataFrame | None = None, **overrides: Any,
) -> Replication:
    """Domain experts (:func:`expertscope.domain_experts`, same ``config``/overrides) on the whole profile
    and on two disjoint halves of each domain's sequences, split by :func:`split_halves` of their texts.

    ``texts``: ``{domain: texts}`` or the profiled domains, indexed like the profile's ``seq_id`` (without
    them the split hashes the sequence index). ``full``: the whole-profile table already computed (rows
    with ``domain, layer, expert, is_domain_expert``), so that "found on the whole set" is exactly what
    that table says; computed when None. Returns a :class:`Replication` of kind ``"domain"``.
    """
    from .domain_experts import domain_experts

    names = np.asarray(profile.domains, dtype=object)[profile.seq_domain]
    half = halves_by_domain(names, profile.seq_id, texts, seed)
    run: Callable[[RoutingProfile], Any] = lambda p: domain_experts(p, config, **overrides)  # noqa: E731
    tables = [run(subset_profile(profile, half == h)) for h in (0, 1)]
    full_df = run(profile).df if full is None else full
    sizes = half_sizes(names, half)
    df, summary = compare_sets("domain", flagged_sets(full_df, "is_domain_expert"),
                               [flagged_sets(t.df, "is_domain_expert") for t in tables], sizes)
    settings = {"domain": {"split_seed": seed, "rule_text": tables[0].settings.get("rule_text", ""),
                           "config": tables[0].settings.get("config", {}),
                           "hashed": "index" if texts is None else "text"}}
    return Replication(df, summary, settings)


__all__ = ["COLUMNS", "SUMMARY_COLUMNS", "Replication", "compare_sets", "flagged_sets", "half_sizes",
           "halves_by_domain", "replicate_domain_experts", "split_halves", "subset_profile", "text_hash"]
