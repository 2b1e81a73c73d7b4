"""Routing overlap of two runs on the same texts (docs/methods.md §9): per layer, the mean over tokens of
``|S₁[t] ∩ S₂[t]| / k``, e.g. before and after router LoRA, steered and not, or two checkpoints.

Sequences are matched by (domain, sequence id) and compared only when both runs routed the same token ids
(a hash of them is stored with the routes); the rest are counted as unmatched and left out.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from .token_selections import SequenceRoutes, record_routes

COLUMNS = ["domain", "layer", "n_sequences", "n_tokens", "overlap", "ci_low", "ci_high", "changed", "n_unmatched"]


def _routes(x: Any, domains: Any, batch_size: int, max_length: int | None) -> SequenceRoutes:
    """Routes of one side: stored routes, a model routed now, or (model, context manager) routed inside it."""
    from ..models.model import MoEModel

    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], MoEModel):
        model, ctx = x
        if not isinstance(ctx, AbstractContextManager):
            raise ConfigError("pass (model, context) with a context manager such as es.steer(...)")
        if domains is None:
            raise ConfigError("routing_overlap of models needs the texts: pass domains=")
        with ctx:
            return record_routes(model, domains, batch_size=batch_size, max_length=max_length)
    if isinstance(x, MoEModel):
        if domains is None:
            raise ConfigError("routing_overlap of models needs the texts: pass domains=")
        return record_routes(x, domains, batch_size=batch_size, max_length=max_length)
    return as_sequence_routes(x)


def selection_intersections(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``(T, L)`` int: ``|S₁[t, l] ∩ S₂[t, l]|`` for routes ``(T, L, k)`` each."""
    return (r1[..., :, None] == r2[..., None, :]).any(-1).sum(-1)


def routing_overlap(
    a: Any,
    b: Any,
    domains: Any = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean ``|S₁ ∩ S₂| / k`` per (domain, layer), and pooled over domains (``domain="all"``).

    ``a`` and ``b``: run directories (or ``routes.safetensors`` files) of two profiles of the same texts,
    :class:`~expertscope.stats.profile.RoutingProfile` / :class:`SequenceRoutes` objects, models (routed
    over ``domains`` now) or ``(model, context)`` pairs, e.g. ``(model, es.steer(model, spec=...))``.
    Columns: ``n_sequences``/``n_tokens`` compared, ``overlap`` with a bootstrap 95% interval over sequences
    (``ci_low``/``ci_high``), ``changed`` (share of tokens whose selected set differs) and ``n_unmatched``
    (sequences left out: missing in one run or routed over different tokens).
    """
    from ..validation import check_positive

    check_positive(n_boot, "n_boot", allow_zero=True)
    check_positive(batch_size, "batch_size")
    check_positive(max_length, "max_length", allow_none=True)
    check_positive(seed, "seed", allow_zero=True)
    ra = _routes(a, domains, batch_size, max_length)
    rb = _routes(b, domains, batch_size, max_length)
    if ra.top_k != rb.top_k or len(ra.layers) != len(rb.layers):
        raise DataError(f"the runs differ in MoE layers ({len(ra.layers)} vs {len(rb.layers)}) or k "
                        f"({ra.top_k} vs {rb.top_k}): compare runs of the same model")
    per_domain: dict[str, list[tuple[np.ndarray, int]]] = {}
    unmatched: dict[str, int] = {}
    for key in sorted(set(ra.data) | set(rb.data)):
        dom = key[0]
        unmatched.setdefault(dom, 0)
        x, y = ra.data.get(key), rb.data.get(key)
        if x is None or y is None or x[1] != y[1] or x[0].shape != y[0].shape:
            unmatched[dom] += 1
            continue
        per_domain.setdefault(dom, []).append((selection_intersections(x[0], y[0]), len(x[0])))
    if not per_domain:
        raise DataError("the two runs routed no common texts: compare runs profiled on the same domains and texts")
    rows = []
    groups: list[tuple[str, list[tuple[np.ndarray, int]]]] = list(per_domain.items())
    groups.append(("all", [s for v in per_domain.values() for s in v]))
    rng = np.random.default_rng(seed)
    for dom, seqs in groups:
        inter = np.stack([s.sum(0) for s, _ in seqs])  # (S, L) summed intersections per sequence
        changed = np.stack([(s < ra.top_k).sum(0) for s, _ in seqs])
        toks = np.array([t for _, t in seqs], np.float64)
        n = toks.sum()
        lo = hi = np.full(len(ra.layers), np.nan)
        if n_boot > 0 and len(seqs) > 1:
            idx = rng.integers(0, len(seqs), size=(n_boot, len(seqs)))
            boots = inter[idx].sum(1) / (ra.top_k * toks[idx].sum(1))[:, None]
            lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
        for li, layer in enumerate(ra.layers):
            rows.append({"domain": dom, "layer": layer, "n_sequences": len(seqs), "n_tokens": int(n),
                         "overlap": inter[:, li].sum() / (ra.top_k * n), "ci_low": lo[li], "ci_high": hi[li],
                         "changed": changed[:, li].sum() / n,
                         "n_unmatched": sum(unmatched.values()) if dom == "all" else unmatched.get(dom, 0)})
    return pd.DataFrame(rows, columns=COLUMNS)


def overlap_by_domain(table: pd.DataFrame) -> pd.DataFrame:
    """Per domain, the overlap averaged over layers (tokens weigh equally within a layer)."""
    return table.groupby("domain", sort=False)["overlap"].mean().rename("overlap").reset_index()


def as_sequence_routes(obj: Any) -> SequenceRoutes:
    """A :class:`SequenceRoutes` from routes, a profile holding routes, or a run directory / routes file."""
    from .profile import RoutingProfile

    if isinstance(obj, SequenceRoutes):
        return obj
    if isinstance(obj, RoutingProfile):
        if obj.routes is None:
            raise DataError("this profile kept no per-token routes: profile again (keep_routes=True)")
        return obj.routes
    if isinstance(obj, str | Path):
        p = Path(obj)
        return SequenceRoutes.load(p / "routes.safetensors" if p.is_dir() else p)
    raise ConfigError(f"cannot read routes from a {type(obj).__name__}: pass a run directory, a "
                      "routes.safetensors file, a RoutingProfile or SequenceRoutes")

__all__ = ["as_sequence_routes", "overlap_by_domain", "routing_overlap", "selection_intersections"]
