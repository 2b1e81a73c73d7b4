"""Per-token routes: the experts each real token selected at every MoE layer, per sequence.

A :class:`SequenceRoutes` keeps, per ``(domain, sequence id)``, an array ``(T, L, k)`` of expert indices
(column 0 the top-1: the model's selections ordered by gate weight, largest first) and a hash of the
sequence's token ids, so two runs can be compared token by token (:mod:`expertscope.stats.overlap`) only
when they routed the same tokens. Stored as ``uint8`` (E ≤ 256) or ``int16``: a few bytes per token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError, DataError, OutputError
from ..io import read_safetensors, write_safetensors

if TYPE_CHECKING:
    from ..models.model import MoEModel
    from ..routing import DomainInput, RoutedBatch
    from .coactivation import CoactivationStats

ROUTES_FORMAT_VERSION = 1


def token_hash(ids: Sequence[int] | np.ndarray | None) -> int:
    """A 63-bit hash of a sequence's token ids (``-1`` when unknown)."""
    if ids is None:
        return -1
    data = np.asarray(ids, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def route_dtype(num_experts: int) -> type[np.integer]:
    return np.uint8 if num_experts <= 256 else np.int16


@dataclass
class SequenceRoutes:
    """Routes of whole sequences: ``data[(domain, seq_id)] = (routes (T, L, k), token hash)``."""

    layers: list[int]
    num_experts: int
    top_k: int
    data: dict[tuple[str, int], tuple[np.ndarray, int]] = field(default_factory=dict)

    def add(self, domain: str, seq_id: int, routes: np.ndarray, tokens_hash: int = -1) -> None:
        """Add one sequence's routes ``(T, L, k)``; a sequence already present is a DataError."""
        key = (domain, int(seq_id))
        if key in self.data:
            raise DataError(f"sequence {seq_id} of domain {domain!r} already has routes: add each sequence once")
        routes = np.asarray(routes)
        if routes.ndim != 3 or routes.shape[1:] != (len(self.layers), self.top_k):
            raise DataError(f"routes of shape {routes.shape} do not match (tokens, {len(self.layers)} layers, "
                            f"k={self.top_k})")
        self.data[key] = (routes.astype(route_dtype(self.num_experts)), int(tokens_hash))

    @property
    def domains(self) -> list[str]:
        return list(dict.fromkeys(d for d, _ in sorted(self.data)))

    def sequences(self, domain: str | None = None) -> Iterator[tuple[str, int, np.ndarray, int]]:
        """``(domain, seq_id, routes, hash)`` in canonical order (domain name, then id)."""
        for (d, i) in sorted(self.data):
            if domain is None or d == domain:
                r, h = self.data[(d, i)]
                yield d, i, r, h

    def domain_routes(self, domain: str) -> np.ndarray:
        """All of ``domain``'s tokens ``(N, L, k)``, in canonical sequence order."""
        arrs = [r for _, _, r, _ in self.sequences(domain)]
        L, k = len(self.layers), self.top_k
        return np.concatenate(arrs) if arrs else np.zeros((0, L, k), route_dtype(self.num_experts))

    def merge(self, other: SequenceRoutes) -> SequenceRoutes:
        if (self.layers, self.num_experts, self.top_k) != (other.layers, other.num_experts, other.top_k):
            raise ConfigError("routes differ in layers, experts or k: merge routes of the same model only")
        out = SequenceRoutes(list(self.layers), self.num_experts, self.top_k, dict(self.data))
        for (d, i), (r, h) in other.data.items():
            out.add(d, i, r, h)
        return out

    def coactivation(self, path_length: int = 3) -> CoactivationStats:
        """Co-activation counts of every stored token (see :mod:`expertscope.stats.coactivation`)."""
        from .coactivation import CoactivationStats

        stats = CoactivationStats(list(self.layers), self.num_experts, self.top_k, path_length)
        for d in self.domains:
            stats.add(d, self.domain_routes(d))
        return stats

    # ----- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One safetensors file: ``routes`` ``(all tokens, L, k)``, and per sequence its domain index, id,
        length and token hash; written atomically."""
        domains = self.domains
        seqs = list(self.sequences())
        L, k = len(self.layers), self.top_k
        arrays = {
            "routes": (np.concatenate([s[2] for s in seqs]) if seqs
                       else np.zeros((0, L, k), route_dtype(self.num_experts))),
            "seq_domain": np.array([domains.index(s[0]) for s in seqs], np.int32),
            "seq_id": np.array([s[1] for s in seqs], np.int64),
            "seq_len": np.array([len(s[2]) for s in seqs], np.int64),
            "seq_hash": np.array([s[3] for s in seqs], np.int64),
        }
        meta = {"format": "expertscope.routes", "version": ROUTES_FORMAT_VERSION, "layers": self.layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "domains": domains}
        return write_safetensors(path, arrays, meta)

    @classmethod
    def load(cls, path: str | Path) -> SequenceRoutes:
        path = Path(path)
        if not path.exists():
            raise OutputError(f"no per-token routes at {path}: profile with keep_routes=True (the default)")
        a, header = read_safetensors(path, "routes")
        meta = json.loads(header.get("expertscope", "{}"))
        if meta.get("format") != "expertscope.routes" or meta.get("version", 0) > ROUTES_FORMAT_VERSION:
            raise OutputError(f"{path} is not a routes file this expertscope can read: upgrade expertscope")
        out = cls(list(meta["layers"]), int(meta["num_experts"]), int(meta["top_k"]))
        ends = np.cumsum(a["seq_len"])
        starts = ends - a["seq_len"]
        for d, i, s, e, h in zip(a["seq_domain"], a["seq_id"], starts, ends, a["seq_hash"], strict=True):
            out.data[(meta["domains"][int(d)], int(i))] = (a["routes"][s:e], int(h))
        return out


# ----- from the routing pass ---------------------------------------------------------------------------
def ordered_selection(indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``indices`` ``(N, k)`` reordered by gate weight, largest first (stable), so column 0 is the top-1."""
    order = torch.sort(weights, dim=1, descending=True, stable=True).indices
    return torch.gather(indices, 1, order)


def batch_routes(routed: RoutedBatch, layers: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """Per sequence of a routed batch: its real tokens' routes ``(T_i, L, k)`` (top-1 first) and token hash."""
    B, T = routed.mask.shape
    per_layer = [ordered_selection(routed.calls[layer].indices, routed.calls[layer].weights) for layer in layers]
    stacked = torch.stack(per_layer, dim=1).reshape(B, T, len(layers), -1).cpu().numpy()
    mask = routed.mask.cpu().numpy()
    ids = routed.input_ids.cpu().numpy()
    return [(stacked[b][mask[b]], token_hash(ids[b][mask[b]])) for b in range(B)]


def record_routes(model: MoEModel, domains: DomainInput, batch_size: int = 8, max_length: int | None = 512,
                  limit: int | None = None) -> SequenceRoutes:
    """Route every text of ``domains`` once (the model as it is now: under any active steering or adapter)
    and keep each sequence's per-token routes."""
    from ..routing import domain_texts, routing_pass

    texts = domain_texts(domains, limit)
    out = SequenceRoutes(list(model.layers), model.num_experts, model.top_k)
    for routed in routing_pass(model, texts, batch_size=batch_size, max_length=max_length):
        for i, (r, h) in zip(routed.ids, batch_routes(routed, model.layers), strict=True):
            out.add(routed.domain, i, r, h)
    return out


__all__ = ["SequenceRoutes", "batch_routes", "ordered_selection", "record_routes",
           "route_dtype", "token_hash"]
