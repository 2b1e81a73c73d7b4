"""Co-activation and expert paths (docs/methods.md §9): which experts a token selects together, within a layer and
across consecutive layers, as mergeable counts from expert indices alone.

Per domain, from each real token's selections ``S_l[t]`` (``routes`` ``(N, L, k)``, column 0 the top-1):

- pair counts ``C_l[a, b] = #{t : a, b ∈ S_l[t]}`` (the diagonal is the selection count ``n_l(a)``), so
  ``P(b | a) = C_l[a, b] / n_l(a)`` and its lift over independence ``P(b | a) / P(b)``, ``P(b) = n_l(b) / N``;
- transitions ``T_l[a, b] = #{t : a ∈ S_l[t], b ∈ S_{l+1}[t]}``, so ``P(b at l+1 | a at l) = T_l[a, b] / n_l(a)``;
- routing consistency ``I(S_l; S_{l+1})`` in bits: the mutual information of the pair distribution
  ``p(a, b) = T_l[a, b] / (N k²)`` (a selected expert of layer ``l`` and one of ``l+1`` drawn from the same
  token), whose marginals are the layers' selection shares ``n_l(a) / (N k)``; with ``k = 1`` it is exactly
  the mutual information of the two layers' choices;
- paths: the top-1 experts of ``path_length`` consecutive MoE layers, counted per start layer (the most
  frequent ones are the common routes through the network).

Everything is a sum over tokens: :meth:`CoactivationStats.add` streams batches, :meth:`merge` adds shards,
and the result does not depend on how tokens were batched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError, OutputError
from ..io import read_safetensors, write_safetensors

COACTIVATION_FORMAT_VERSION = 1


def one_hot_routes(routes: np.ndarray, num_experts: int) -> np.ndarray:
    """``(N, L, E)`` int64 indicator of the selected experts for routes ``(N, L, k)``."""
    N, L, _ = routes.shape
    M = np.zeros((N, L, num_experts), np.int64)
    rows = np.arange(N)[:, None, None]
    cols = np.arange(L)[None, :, None]
    M[rows, cols, routes.astype(np.int64)] = 1
    return M


#: Tokens per block of the co-activation counts (bounds the temporary indicator matrices).
_ROWS = 1 << 18

#: Layers per expert path when none is asked for (fewer when the model has fewer MoE layers).
DEFAULT_PATH_LENGTH = 3


def resolve_path_length(path_length: int | None, n_layers: int, option: str = "path_length") -> int:
    """The path length to use: ``path_length``, or :data:`DEFAULT_PATH_LENGTH` capped at ``n_layers`` when None.
    A length longer than the model's ``n_layers`` MoE layers is refused (it would be cut silently)."""
    from ..validation import check_positive

    if path_length is None:
        return max(1, min(DEFAULT_PATH_LENGTH, n_layers))
    check_positive(path_length, option)
    if path_length > n_layers:
        shown = f"{option} {path_length}" if option.startswith("--") else f"{option}={path_length}"
        raise ConfigError(f"{shown} is longer than the {n_layers} MoE layers: pass 1 to {n_layers}, or leave it "
                          f"out for {max(1, min(DEFAULT_PATH_LENGTH, n_layers))}")
    return path_length


@dataclass
class CoactivationStats:
    """Mergeable co-activation, transition and path counts per domain (``L`` MoE layers, ``E`` experts).

    ``pairs[d]`` ``(L, E, E)`` int64; ``transitions[d]`` ``(L-1, E, E)`` int64; ``n_tokens[d]`` int;
    ``paths[d]`` the path counts as ``(keys, counts)``: ``keys`` ``(P, 1 + window)`` int64 rows of (start layer
    position, top-1 experts of ``window`` consecutive layers), unique and sorted; ``counts`` ``(P,)`` int64.
    """

    layers: list[int]
    num_experts: int
    top_k: int
    path_length: int = 3
    domains: list[str] = field(default_factory=list)
    n_tokens: dict[str, int] = field(default_factory=dict)
    pairs: dict[str, np.ndarray] = field(default_factory=dict)
    transitions: dict[str, np.ndarray] = field(default_factory=dict)
    paths: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path_length < 1:
            raise ConfigError(f"path_length must be at least 1, got {self.path_length}: e.g. path_length=3")

    @property
    def window(self) -> int:
        """Layers per path: ``path_length`` capped at the number of MoE layers."""
        return min(self.path_length, len(self.layers))

    def _ensure(self, domain: str) -> None:
        if domain not in self.pairs:
            L, E = len(self.layers), self.num_experts
            self.domains.append(domain)
            self.n_tokens[domain] = 0
            self.pairs[domain] = np.zeros((L, E, E), np.int64)
            self.transitions[domain] = np.zeros((max(L - 1, 0), E, E), np.int64)
            self.paths[domain] = (np.zeros((0, 1 + self.window), np.int64), np.zeros(0, np.int64))

    def add(self, domain: str, routes: np.ndarray) -> None:
        """Add the routes ``(N, L, k)`` (expert indices, column 0 the top-1) of ``N`` real tokens of ``domain``."""
        routes = np.asarray(routes)
        L, E = len(self.layers), self.num_experts
        if routes.ndim != 3 or routes.shape[1] != L or routes.shape[2] != self.top_k:
            raise DataError(f"routes of shape {routes.shape} do not match (tokens, {L} layers, k={self.top_k})")
        if routes.size and (routes.min() < 0 or routes.max() >= E):
            raise DataError(f"expert indices outside 0..{E - 1}: check num_experts")
        self._ensure(domain)
        if not len(routes):
            return
        self.n_tokens[domain] += len(routes)
        for a in range(0, len(routes), _ROWS):  # bounded temporary memory
            self._add_counts(domain, routes[a:a + _ROWS])

    def _add_counts(self, domain: str, routes: np.ndarray) -> None:
        from scipy.sparse import csr_matrix

        L, E, k = len(self.layers), self.num_experts, routes.shape[2]
        N = len(routes)
        pairs, trans = self.pairs[domain], self.transitions[domain]
        # per layer a sparse (N, E) indicator of the k selected experts: the counts are its sparse products,
        # about N·k² work per layer instead of N·E² for dense indicators
        indptr = np.arange(0, N * k + 1, k)
        ones = np.ones(N * k, np.int64)
        prev = None
        for li in range(L):
            M = csr_matrix((ones, routes[:, li].ravel().astype(np.int64), indptr), shape=(N, E))
            pairs[li] += (M.T @ M).toarray()
            if prev is not None:
                trans[li - 1] += (prev.T @ M).toarray()
            prev = M
        m = self.window
        top1 = routes[:, :, 0].astype(np.int64)
        found = [self.paths[domain]]
        for start in range(L - m + 1):
            keys = np.column_stack([np.full(N, start, np.int64), top1[:, start:start + m]])
            found.append(_count_rows(keys, np.ones(N, np.int64)))
        self.paths[domain] = _count_rows(np.concatenate([f[0] for f in found]),
                                         np.concatenate([f[1] for f in found]))

    def merge(self, other: CoactivationStats) -> CoactivationStats:
        """A new object holding the counts of both (disjoint token sets)."""
        if (self.layers, self.num_experts, self.top_k, self.path_length) != (
                other.layers, other.num_experts, other.top_k, other.path_length):
            raise ConfigError("co-activation counts differ in layers, experts, k or path length: merge alike ones")
        out = CoactivationStats(list(self.layers), self.num_experts, self.top_k, self.path_length)
        for src in (self, other):
            for d in src.domains:
                out._ensure(d)
                out.n_tokens[d] += src.n_tokens[d]
                out.pairs[d] = out.pairs[d] + src.pairs[d]
                out.transitions[d] = out.transitions[d] + src.transitions[d]
                (ka, ca), (kb, cb) = out.paths[d], src.paths[d]
                out.paths[d] = _count_rows(np.concatenate([ka, kb]), np.concatenate([ca, cb]))
        return out

    # ----- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (per domain index ``i``: ``pairs.i``, ``transitions.i``, ``path_start.i``, ``path_experts.i``,
        ``path_count.i``) and the metadata to rebuild the object."""
        arrays: dict[str, np.ndarray] = {}
        m = self.window
        for i, d in enumerate(self.domains):
            arrays[f"pairs.{i}"] = self.pairs[d]
            arrays[f"transitions.{i}"] = self.transitions[d]
            keys, counts = self.paths[d]
            arrays[f"path_start.{i}"] = np.ascontiguousarray(keys[:, 0])
            arrays[f"path_experts.{i}"] = np.ascontiguousarray(keys[:, 1:]).reshape(len(keys), m)
            arrays[f"path_count.{i}"] = counts
        meta = {"format": "expertscope.coactivation", "version": COACTIVATION_FORMAT_VERSION,
                "layers": self.layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "path_length": self.path_length, "domains": self.domains, "n_tokens": self.n_tokens}
        return arrays, meta

    @classmethod
    def from_state_dict(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> CoactivationStats:
        out = cls(list(meta["layers"]), int(meta["num_experts"]), int(meta["top_k"]), int(meta["path_length"]))
        for i, d in enumerate(meta["domains"]):
            out._ensure(d)
            out.n_tokens[d] = int(meta["n_tokens"][d])
            out.pairs[d] = np.asarray(arrays[f"pairs.{i}"])
            out.transitions[d] = np.asarray(arrays[f"transitions.{i}"])
            start = np.asarray(arrays[f"path_start.{i}"], np.int64)
            experts = np.asarray(arrays[f"path_experts.{i}"], np.int64).reshape(len(start), -1)
            out.paths[d] = _count_rows(np.column_stack([start, experts]),
                                       np.asarray(arrays[f"path_count.{i}"], np.int64))
        return out

    def save(self, path: str | Path) -> Path:
        """One safetensors file (arrays, metadata in its header), written atomically."""
        arrays, meta = self.state_dict()
        return write_safetensors(path, arrays, meta)

    @classmethod
    def load(cls, path: str | Path) -> CoactivationStats:
        path = Path(path)
        if not path.exists():
            raise OutputError(f"no co-activation counts at {path}: profile first (expertscope profile)")
        arrays, header = read_safetensors(path, "co-activation counts")
        meta = json.loads(header.get("expertscope", "{}"))
        if meta.get("format") != "expertscope.coactivation":
            raise OutputError(f"{path} is not a co-activation file written by expertscope")
        return cls.from_state_dict(arrays, meta)

    # ----- tables --------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per (domain, layer, expert_a, expert_b ≠ a): ``count`` (tokens selecting both), ``n_a``,
        ``n_tokens`` (the domain's tokens), ``p_b_given_a`` (NaN when ``a`` is never selected), ``p_b`` and
        ``lift = p_b_given_a / p_b``."""
        frames = []
        E = self.num_experts
        a, b = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
        off = a != b
        for d in self.domains:
            N = self.n_tokens[d]
            for li, layer in enumerate(self.layers):
                C = self.pairs[d][li]
                n = np.diag(C).astype(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    p_ba = C / n[:, None]
                    p_b = n / N if N else np.full(E, np.nan)
                    lift = p_ba / p_b[None, :]
                frames.append(pd.DataFrame({
                    "domain": d, "layer": layer, "expert_a": a[off], "expert_b": b[off],
                    "count": C[off], "n_a": n[a[off]].astype(np.int64), "n_tokens": N, "p_b_given_a": p_ba[off],
                    "p_b": p_b[b[off]], "lift": lift[off],
                }))
        return _concat(frames, ["domain", "layer", "expert_a", "expert_b", "count", "n_a", "n_tokens", "p_b_given_a",
                                "p_b", "lift"])

    def transitions_frame(self) -> pd.DataFrame:
        """One row per (domain, layer → next_layer, expert_a, expert_b): ``count`` (tokens with ``a`` at the
        layer and ``b`` at the next), ``p_b_given_a = P(b at next | a at layer)``, ``p_b`` (share of tokens
        selecting ``b`` at the next layer) and ``lift``."""
        frames = []
        E = self.num_experts
        a, b = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
        for d in self.domains:
            N = self.n_tokens[d]
            for li in range(len(self.layers) - 1):
                T = self.transitions[d][li]
                n_a = np.diag(self.pairs[d][li]).astype(np.float64)
                n_b = np.diag(self.pairs[d][li + 1]).astype(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    p = T / n_a[:, None]
                    p_b = n_b / N if N else np.full(E, np.nan)
                    lift = p / p_b[None, :]
                frames.append(pd.DataFrame({
                    "domain": d, "layer": self.layers[li], "next_layer": self.layers[li + 1],
                    "expert_a": a.ravel(), "expert_b": b.ravel(), "count": T.ravel(),
                    "p_b_given_a": p.ravel(), "p_b": p_b[b.ravel()], "lift": lift.ravel(),
                }))
        return _concat(frames, ["domain", "layer", "next_layer", "expert_a", "expert_b", "count", "p_b_given_a",
                                "p_b", "lift"])

    def consistency_frame(self) -> pd.DataFrame:
        """Routing consistency per (domain, layer → next_layer): ``mi_bits = I(S_l; S_{l+1})`` (module
        docstring), ``mi_norm`` = MI / min(H_l, H_{l+1}) in [0, 1], and ``n_tokens``."""
        rows = []
        for d in self.domains:
            for li in range(len(self.layers) - 1):
                T = self.transitions[d][li].astype(np.float64)
                mi, norm = pair_mutual_information(T)
                rows.append({"domain": d, "layer": self.layers[li], "next_layer": self.layers[li + 1],
                             "mi_bits": mi, "mi_norm": norm, "n_tokens": self.n_tokens[d]})
        return pd.DataFrame(rows, columns=["domain", "layer", "next_layer", "mi_bits", "mi_norm", "n_tokens"])

    def paths_frame(self, top: int = 10) -> pd.DataFrame:
        """The ``top`` most frequent top-1 paths per (domain, start layer): ``path`` (``"3>5>1"``, expert per
        layer), ``layers`` (``"0>1>2"``), ``count`` and ``share`` of the domain's tokens. Ties by path order."""
        from ..validation import check_positive

        check_positive(top, "top")
        rows = []
        m = self.window
        for d in self.domains:
            N = self.n_tokens[d]
            keys, counts = self.paths[d]
            for s in np.unique(keys[:, 0]).tolist():
                sel = keys[:, 0] == s
                ks, cs = keys[sel, 1:], counts[sel]
                order = np.lexsort((*ks.T[::-1], -cs))[:top]  # by count, then by path
                ranked = [(tuple(int(x) for x in ks[j]), int(cs[j])) for j in order]
                for rank, (p, c) in enumerate(ranked, 1):
                    rows.append({"domain": d, "start_layer": self.layers[s], "rank": rank,
                                 "layers": ">".join(str(x) for x in self.layers[s:s + m]),
                                 "path": ">".join(str(x) for x in p), "count": c, "share": c / N if N else np.nan})
        return pd.DataFrame(rows, columns=["domain", "start_layer", "rank", "layers", "path", "count", "share"])


def _count_rows(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``keys`` ``(n, w)`` (sorted) and the sum of ``counts`` over each; rows of small
    non-negative integers are packed into one int64 first (much faster than sorting rows)."""
    if not len(keys):
        return keys.reshape(0, keys.shape[1]).astype(np.int64), counts.astype(np.int64)
    base = int(keys.max()) + 1
    if base ** keys.shape[1] < 2 ** 62:
        code = keys @ (base ** np.arange(keys.shape[1] - 1, -1, -1, dtype=np.int64))
        _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    else:
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=counts, minlength=len(first))
    return keys[first], np.rint(summed).astype(np.int64)


def pair_mutual_information(T: np.ndarray) -> tuple[float, float]:
    """Mutual information (bits) of the joint distribution ``T / T.sum()`` ``(E, E)``, and it divided by the
    smaller marginal entropy (NaN when either marginal is constant or ``T`` is empty)."""
    total = T.sum()
    if total <= 0:
        return float("nan"), float("nan")
    p = T / total
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / (pa[:, None] * pb[None, :])[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log2(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log2(pb[pb > 0])).sum())
    h = min(ha, hb)
    return max(mi, 0.0), (max(mi, 0.0) / h if h > 0 else float("nan"))


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


__all__ = ["CoactivationStats", "one_hot_routes", "pair_mutual_information"]
