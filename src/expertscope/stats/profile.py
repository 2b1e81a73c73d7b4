"""Routing profiles: mergeable sufficient statistics of router decisions per (domain, layer, expert).

A :class:`RoutingProfile` keeps, for every profiled sequence, its real-token count and per (layer, expert):
selections, sums of ``h(p̃)`` in both entropy forms (docs/methods.md §2), gate-weight sums and sums of
``w·‖f_i(x)‖₂`` (output-aware importance, docs/methods.md §9; NaN where not computed). Domain totals are
derived from those rows in a canonical order (by domain, then sequence id), so a profile assembled from
shards (``merge``) equals, bit for bit, the profile of the same batches added in one process. With
``keep_sequences=False`` only running totals are kept: memory is then constant in the number of texts,
and bootstraps/permutations are unavailable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..config import ProfileConfig, resolve_config
from ..errors import ConfigError, DataError, InputTypeError, OutputError
from ..execution import Executor, LocalExecutor
from ..io import atomic_path, make_dirs, write_json
from ..models.model import MoEModel
from ..progress import ProgressCallback
from ..routing import DomainInput, domain_texts, effective_max_length, ensure_pad, plan_batches, route_batch
from .coactivation import resolve_path_length
from .entropy import bernoulli_entropy, eq1_entropy, topk_renormalised

if TYPE_CHECKING:
    from .coactivation import CoactivationStats
    from .token_selections import SequenceRoutes

PROFILE_FORMAT_VERSION = 1
STAT_NAMES = ("sel", "h_bern", "h_eq1", "gate", "onorm")


@dataclass
class _Totals:
    """Running sums for one domain: ``n_tokens`` scalar; each stat ``(L, E)``."""

    n_tokens: int
    stats: dict[str, np.ndarray]


@dataclass
class RoutingProfile:
    """Sufficient statistics of routing over domains.

    Arrays (``S`` sequences, ``L`` MoE layers, ``E`` experts): ``seq_domain`` ``(S,)`` index into
    ``domains``; ``seq_id`` ``(S,)`` the sequence's index in its domain; ``seq_tokens`` ``(S,)`` real tokens;
    ``seq_stats[name]`` ``(S, L, E)``: ``sel`` (int64 selection counts), ``h_bern``, ``h_eq1``, ``gate``,
    ``onorm`` (float64 sums over the sequence's tokens). ``routes`` (per-token selections, when kept) and
    ``coactivation`` (co-activation and path counts) are filled in the same pass.
    """

    layers: list[int]
    num_experts: int
    top_k: int
    domains: list[str] = field(default_factory=list)
    keep_sequences: bool = True
    model_info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    _rows: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)
    _totals: dict[str, _Totals] = field(default_factory=dict, repr=False)
    _keys: set[tuple[str, int]] = field(default_factory=set, repr=False)
    routes: SequenceRoutes | None = field(default=None, repr=False)
    coactivation: CoactivationStats | None = field(default=None, repr=False)
    phases: dict[str, RoutingProfile] = field(default_factory=dict, repr=False)
    """The same statistics over each phase's tokens (``"prompt"``, ``"generated"``), when phases were recorded:
    ``profile --generate N`` or routes an engine labelled. Sequence ids are shared with this profile."""

    def phase(self, name: str) -> RoutingProfile:
        """The profile of one phase's tokens (every table of a profile can be made from it)."""
        if name not in self.phases:
            have = ", ".join(self.phases) or "none (profile with --generate N, or routes that label phases)"
            raise ConfigError(f"this profile has no {name!r} phase: its phases are {have}")
        return self.phases[name]

    # ----- building ------------------------------------------------------------------------------
    def _domain_index(self, name: str) -> int:
        if name not in self.domains:
            self.domains.append(name)
        return self.domains.index(name)

    def add(
        self, domain: str, seq_ids: Sequence[int], n_tokens: np.ndarray, stats: dict[str, np.ndarray],
        routes: Sequence[tuple[np.ndarray, int]] | None = None,
    ) -> None:
        """Add sequences of one domain: ``n_tokens`` ``(B,)``, each ``stats[name]`` ``(B, L, E)``; ``routes``
        (optional) each sequence's per-token selections ``(T_i, L, k)`` (top-1 first) and token hash, which
        feed ``coactivation`` and, when kept, ``routes``."""
        d = self._domain_index(domain)
        keys = [(domain, int(i)) for i in seq_ids]
        dup = next((k for k in keys if k in self._keys), None)
        if dup is not None:
            raise DataError(f"sequence {dup[1]} of domain {dup[0]!r} was already profiled: profile each text once")
        self._keys.update(keys)
        if "onorm" not in stats:  # callers from before output norms existed: not computed
            stats = {**stats, "onorm": np.full(np.shape(stats["sel"]), np.nan)}
        if routes is not None:
            self._add_routes(domain, seq_ids, routes)
        if self.keep_sequences:
            self._rows.append({
                "seq_domain": np.full(len(keys), d, dtype=np.int32),
                "seq_id": np.asarray(seq_ids, dtype=np.int64),
                "seq_tokens": np.asarray(n_tokens, dtype=np.int64),
                **{name: np.asarray(stats[name]) for name in STAT_NAMES},
            })
        else:
            t = self._totals.get(domain)
            if t is None:
                t = self._totals[domain] = _Totals(0, {
                    name: np.zeros((len(self.layers), self.num_experts), dtype=stats[name].dtype)
                    for name in STAT_NAMES
                })
            t.n_tokens += int(np.sum(n_tokens))
            for name in STAT_NAMES:
                t.stats[name] += stats[name].sum(axis=0)

    def _add_routes(self, domain: str, seq_ids: Sequence[int], routes: Sequence[tuple[np.ndarray, int]]) -> None:
        from .coactivation import CoactivationStats
        from .token_selections import SequenceRoutes

        if self.coactivation is None:
            self.coactivation = CoactivationStats(list(self.layers), self.num_experts, self.top_k,
                                                  int(self.config.get("path_length") or 3))
        L, k = len(self.layers), self.top_k
        batch = [r for r, _ in routes]
        self.coactivation.add(domain, np.concatenate(batch) if batch else np.zeros((0, L, k), np.int64))
        if self.config.get("keep_routes", True) and self.keep_sequences:
            if self.routes is None:
                self.routes = SequenceRoutes(list(self.layers), self.num_experts, self.top_k)
            for i, (r, h) in zip(seq_ids, routes, strict=True):
                self.routes.add(domain, int(i), r, h)

    def has(self, domain: str, seq_id: int) -> bool:
        return (domain, int(seq_id)) in self._keys

    # ----- canonical arrays ----------------------------------------------------------------------
    def _compact(self) -> dict[str, np.ndarray]:
        """All sequence rows concatenated and sorted by (domain name, sequence id)."""
        if not self.keep_sequences:
            raise ConfigError("this profile kept no per-sequence statistics: profile with keep_sequences=True")
        if not self._rows:
            L, E = len(self.layers), self.num_experts
            empty: dict[str, np.ndarray] = {
                "seq_domain": np.zeros(0, np.int32), "seq_id": np.zeros(0, np.int64),
                "seq_tokens": np.zeros(0, np.int64),
                "sel": np.zeros((0, L, E), np.int64),
            }
            empty.update({n: np.zeros((0, L, E), np.float64) for n in STAT_NAMES[1:]})
            return empty
        if len(self._rows) > 1:
            cat = {k: np.concatenate([r[k] for r in self._rows]) for k in self._rows[0]}
            self._rows = [cat]
        rows = self._rows[0]
        names = np.asarray(self.domains, dtype=object)[rows["seq_domain"]]
        order = np.lexsort((rows["seq_id"], names))
        if not np.array_equal(order, np.arange(len(order))):
            rows = {k: v[order] for k, v in rows.items()}
            self._rows = [rows]
        return rows

    @property
    def seq_domain(self) -> np.ndarray:
        return self._compact()["seq_domain"]

    @property
    def seq_id(self) -> np.ndarray:
        return self._compact()["seq_id"]

    @property
    def seq_tokens(self) -> np.ndarray:
        return self._compact()["seq_tokens"]

    def seq_stats(self, name: str) -> np.ndarray:
        return self._compact()[name]

    @property
    def num_sequences(self) -> dict[str, int]:
        if not self.keep_sequences:
            return {}
        counts = np.bincount(self.seq_domain, minlength=len(self.domains))
        return {d: int(c) for d, c in zip(self.domains, counts, strict=True)}

    def totals(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-domain totals: ``n_tokens`` ``(D,)`` and each stat ``(D, L, E)``, domains in ``self.domains``."""
        D, L, E = len(self.domains), len(self.layers), self.num_experts
        if not self.keep_sequences:
            n = np.array([self._totals[d].n_tokens if d in self._totals else 0 for d in self.domains], np.int64)
            out = {
                name: np.stack([self._totals[d].stats[name] for d in self.domains]) if D else
                np.zeros((0, L, E)) for name in STAT_NAMES
            }
            return n, out
        rows = self._compact()
        n = np.zeros(D, np.int64)
        out = {name: np.zeros((D, L, E), rows[name].dtype) for name in STAT_NAMES}
        for d in range(D):
            m = rows["seq_domain"] == d
            n[d] = rows["seq_tokens"][m].sum()
            for name in STAT_NAMES:
                out[name][d] = rows[name][m].sum(axis=0)
        return n, out

    # ----- tables --------------------------------------------------------------------------------
    def to_frame(self, entropy: str = "bernoulli", conditional: bool = False, shared: bool = True
                 ) -> pd.DataFrame:
        """One row per (domain, layer, expert): ``n_tokens``, activation rate ``A`` (``activation_rate``),
        entropy ``H`` (``entropy``: mean ``h(p̃)`` per token, or per selecting token with ``conditional``),
        ``cwas`` = ``(1 - H)·A``, ``gate_mean`` (mean gate weight when selected; NaN if never selected) and
        ``lift`` = ``A / mean of A over the other domains`` (NaN with a single domain or when all are 0,
        inf when only this domain selects the expert), ``importance`` = mean ``w·‖f_i(x)‖₂`` over the tokens
        that select the expert (output-aware importance; NaN when never selected or not computed, e.g. for
        recorded routes), ``weighted_activation`` = the gate weight the expert receives per token on average
        (``A × gate_mean``; NaN where gate weights are not known). Works for any number of domains, one included.

        ``entropy`` is ``"bernoulli"`` (base 2) or ``"eq1"`` (``-p ln p``). With ``shared`` (default), the
        model's always-on shared experts are added as rows marked ``shared=True`` (see
        :mod:`expertscope.stats.shared`); routed rows have ``shared=False``.
        """
        from .shared import with_shared_rows

        if entropy not in ("bernoulli", "eq1"):
            raise ConfigError(f"entropy={entropy!r} is not a valid option: use 'bernoulli' or 'eq1'")
        n, tot = self.totals()
        D, L, E = len(self.domains), len(self.layers), self.num_experts
        nn = n[:, None, None].astype(np.float64)
        sel = tot["sel"].astype(np.float64)
        hsum = tot["h_bern" if entropy == "bernoulli" else "h_eq1"]
        with np.errstate(invalid="ignore", divide="ignore"):
            A = np.where(nn > 0, sel / np.maximum(nn, 1), np.nan)
            H = (np.where(sel > 0, hsum / np.maximum(sel, 1), np.nan) if conditional
                 else np.where(nn > 0, hsum / np.maximum(nn, 1), np.nan))
            gate_mean = np.where(sel > 0, tot["gate"] / np.maximum(sel, 1), np.nan)
            importance = np.where(sel > 0, tot["onorm"] / np.maximum(sel, 1), np.nan)
            others = (A.sum(axis=0, keepdims=True) - A) / (D - 1) if D > 1 else np.full_like(A, np.nan)
            lift = np.where((A == 0) & (others == 0), np.nan, A / others)
        dd, ll, ee = np.meshgrid(np.arange(D), np.arange(L), np.arange(E), indexing="ij")
        df = pd.DataFrame({
            "domain": np.asarray(self.domains, dtype=object)[dd.ravel()],
            "layer": np.asarray(self.layers, dtype=np.int64)[ll.ravel()],
            "expert": ee.ravel(),
            "n_tokens": n[dd.ravel()],
            "activation_rate": A.ravel(),
            "entropy": H.ravel(),
            "cwas": ((1.0 - H) * A).ravel(),
            "gate_mean": gate_mean.ravel(),
            "lift": lift.ravel(),
            "importance": importance.ravel(),
            "weighted_activation": np.where(nn > 0, tot["gate"] / np.maximum(nn, 1), np.nan).ravel(),
        })
        return with_shared_rows(df, self.model_info, E) if shared else df.assign(shared=False)

    # ----- combining -----------------------------------------------------------------------------
    def _check_compatible(self, other: RoutingProfile) -> None:
        if (self.layers, self.num_experts, self.top_k) != (other.layers, other.num_experts, other.top_k):
            raise ConfigError(
                "profiles differ in layers, experts or top-k: merge only profiles of the same model"
            )
        if self.keep_sequences != other.keep_sequences:
            raise ConfigError("cannot merge a profile with per-sequence statistics and one without: rerun both alike")

    def merge(self, other: RoutingProfile) -> RoutingProfile:
        """A new profile holding the statistics of the union of both (disjoint) sets of sequences."""
        self._check_compatible(other)
        overlap = self._keys & other._keys
        if overlap:
            d, i = sorted(overlap)[0]
            raise DataError(f"both profiles hold sequence {i} of domain {d!r}: merge disjoint shards only")
        out = RoutingProfile(
            layers=list(self.layers), num_experts=self.num_experts, top_k=self.top_k,
            keep_sequences=self.keep_sequences, model_info=dict(self.model_info or other.model_info),
            config=dict(self.config or other.config),
        )
        for p in (self, other):
            for d, c in p.truncated.items():
                out.truncated[d] = out.truncated.get(d, 0) + c
            if p.keep_sequences:
                for r in p._rows:
                    names = [p.domains[i] for i in r["seq_domain"]]
                    remap = np.array([out._domain_index(n) for n in names], np.int32)
                    out._rows.append({**r, "seq_domain": remap})
            else:
                for d in p.domains:
                    out._domain_index(d)
                    t = p._totals.get(d)
                    if t is None:
                        continue
                    mine = out._totals.get(d)
                    if mine is None:
                        out._totals[d] = _Totals(t.n_tokens, {k: v.copy() for k, v in t.stats.items()})
                    else:
                        mine.n_tokens += t.n_tokens
                        for k in STAT_NAMES:
                            mine.stats[k] = mine.stats[k] + t.stats[k]
            out._keys |= p._keys
        for name in ("routes", "coactivation"):
            a, b = getattr(self, name), getattr(other, name)
            setattr(out, name, a.merge(b) if a is not None and b is not None else (a if b is None else b))
        for ph in dict.fromkeys([*self.phases, *other.phases]):
            a, b = self.phases.get(ph), other.phases.get(ph)
            out.phases[ph] = a.merge(b) if a is not None and b is not None else (a if b is None else b)  # type: ignore[assignment]
        return out

    # ----- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``profile.safetensors`` (arrays, with the metadata in its header: one atomic file) and a
        readable copy of the metadata as ``profile.json``."""
        from safetensors.numpy import save_file

        directory = make_dirs(directory)
        arrays: dict[str, np.ndarray] = {}
        if self.keep_sequences:
            arrays = {k: np.ascontiguousarray(v) for k, v in self._compact().items()}
        else:
            for d, t in self._totals.items():
                i = self.domains.index(d)
                arrays[f"total_tokens.{i}"] = np.array([t.n_tokens], np.int64)
                arrays.update({f"total_{k}.{i}": v for k, v in t.stats.items()})
        meta = {
            "format": "expertscope.profile", "version": PROFILE_FORMAT_VERSION,
            "layers": self.layers, "num_experts": self.num_experts, "top_k": self.top_k,
            "domains": self.domains, "keep_sequences": self.keep_sequences,
            "model": self.model_info, "config": self.config, "truncated": self.truncated,
            "keys": None if self.keep_sequences else [[d, i] for d, i in sorted(self._keys)],
            "phases": list(self.phases),
        }
        for ph, part in self.phases.items():  # before the header that names them
            part.save(directory / "phases" / ph)
        with atomic_path(directory / "profile.safetensors") as tmp:
            save_file(arrays, str(tmp), metadata={"expertscope": json.dumps(meta, default=str)})
        write_json(directory / "profile.json", {k: v for k, v in meta.items() if k != "keys"})
        if self.routes is not None:
            self.routes.save(directory / "routes.safetensors")
        if self.coactivation is not None:
            self.coactivation.save(directory / "coactivation.safetensors")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RoutingProfile:
        """Read a profile written by :meth:`save`."""
        from ..io import read_safetensors

        if not isinstance(directory, str | os.PathLike):
            raise InputTypeError(f"directory is a {type(directory).__name__}, not a path: pass the run directory")
        directory = Path(directory)
        path = directory / "profile.safetensors"
        if not path.exists():
            raise OutputError(f"no profile in {directory}: run `expertscope profile --out {directory}` first")
        arrays, header = read_safetensors(path, "profile")
        try:
            meta = json.loads(header.get("expertscope", "{}"))
        except json.JSONDecodeError:
            meta = {}
        if not isinstance(meta, dict) or meta.get("format") != "expertscope.profile":
            raise OutputError(f"{path} is not an expertscope profile (no profile header): rerun `expertscope "
                              "profile` (with --force) to write one")
        if meta.get("version", 0) > PROFILE_FORMAT_VERSION:
            raise OutputError(
                f"{path} is not a profile this expertscope can read (version {meta.get('version')}): "
                "upgrade expertscope"
            )
        try:
            _fill_missing_stats(arrays, meta)
            return cls._from_arrays(meta, arrays, directory)
        except (KeyError, IndexError, TypeError, ValueError) as e:  # a header that does not match its arrays
            raise OutputError(f"{path} is an incomplete profile ({type(e).__name__}: {str(e)[:80]}): rerun "
                              "`expertscope profile` (with --force)") from None

    @classmethod
    def _from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], directory: Path) -> RoutingProfile:
        p = cls(
            layers=list(meta["layers"]), num_experts=int(meta["num_experts"]), top_k=int(meta["top_k"]),
            domains=list(meta["domains"]), keep_sequences=bool(meta["keep_sequences"]),
            model_info=meta.get("model", {}), config=meta.get("config", {}),
            truncated={k: int(v) for k, v in meta.get("truncated", {}).items()},
        )
        if p.keep_sequences:
            if len(arrays.get("seq_id", [])):
                p._rows = [dict(arrays)]
            p._keys = {(p.domains[d], int(i)) for d, i in zip(arrays.get("seq_domain", []),
                                                               arrays.get("seq_id", []), strict=True)}
        else:
            for i, d in enumerate(p.domains):
                if f"total_tokens.{i}" in arrays:
                    p._totals[d] = _Totals(int(arrays[f"total_tokens.{i}"][0]),
                                           {k: arrays[f"total_{k}.{i}"] for k in STAT_NAMES})
            p._keys = {(d, int(i)) for d, i in meta.get("keys") or []}
        from .coactivation import CoactivationStats
        from .token_selections import SequenceRoutes

        if (directory / "routes.safetensors").exists():
            p.routes = SequenceRoutes.load(directory / "routes.safetensors")
        if (directory / "coactivation.safetensors").exists():
            p.coactivation = CoactivationStats.load(directory / "coactivation.safetensors")
        for ph in meta.get("phases") or []:
            p.phases[ph] = cls.load(directory / "phases" / ph)
        return p


def _fill_missing_stats(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Statistics a profile written before they existed lacks (``onorm``) become NaN arrays."""
    L, E = len(meta["layers"]), int(meta["num_experts"])
    if meta.get("keep_sequences", True):
        if "seq_id" in arrays and "onorm" not in arrays:
            arrays["onorm"] = np.full((len(arrays["seq_id"]), L, E), np.nan)
        return
    for i in range(len(meta["domains"])):
        if f"total_tokens.{i}" in arrays and f"total_onorm.{i}" not in arrays:
            arrays[f"total_onorm.{i}"] = np.full((L, E), np.nan)


# ----- computing ---------------------------------------------------------------------------------
def batch_statistics(
    calls: dict[int, Any], layers: Sequence[int], num_experts: int, mask: torch.Tensor,
    norms: dict[int, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Per-sequence routing sums for one batch.

    ``calls[layer]`` is a :class:`~expertscope.models.hooks.RouterCall` over the batch's ``B*T`` tokens
    (batch-major); ``mask`` ``(B, T)`` marks real tokens; ``norms[layer]`` ``(B*T, k)`` (optional) the norms
    ``‖f_i(x)‖₂`` of the selected experts' outputs. Returns each stat as ``(B, L, E)``: selections (int64)
    and float64 sums of ``h_bern(p̃)``, ``-p̃ ln p̃``, the gate weight and ``w·‖f_i(x)‖₂`` (NaN without
    ``norms``), padding excluded.
    """
    B, T = mask.shape
    m = mask.reshape(-1, 1, 1).to(torch.float64)
    per_layer = []
    for layer in layers:
        call = calls[layer]
        idx = call.indices
        p = topk_renormalised(call.logits, idx).double()
        w = call.weights.double()
        onorm = w * norms[layer].double() if norms and layer in norms else torch.zeros_like(w)
        # (N, k, 5): selection, h_bern(p~), -p~ ln p~, gate weight, w·‖f‖ — scattered to (N, E, 5) in one op.
        values = torch.stack([torch.ones_like(p), bernoulli_entropy(p), eq1_entropy(p), w, onorm], -1)
        dense = torch.zeros(idx.shape[0], num_experts, 5, dtype=torch.float64, device=idx.device)
        dense.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, 5), values)
        per_layer.append((dense * m).reshape(B, T, num_experts, 5).sum(dim=1))
    stacked = torch.stack(per_layer, dim=1).cpu().numpy()  # (B, L, E, 5)
    if not norms:
        stacked[..., 4] = np.nan
    out = {name: np.ascontiguousarray(stacked[..., i]) for i, name in enumerate(STAT_NAMES)}
    out["sel"] = np.rint(out["sel"]).astype(np.int64)
    return out


@dataclass
class BatchResult:
    """Routing statistics of one batch: ``n_tokens`` ``(B,)``, ``stats[name]`` ``(B, L, E)``."""

    domain: str
    ids: list[int]
    n_tokens: np.ndarray
    stats: dict[str, np.ndarray]
    n_truncated: int
    #: per sequence: its real tokens' selections ``(T_i, L, k)`` (top-1 first) and token-id hash
    routes: list[tuple[np.ndarray, int]] | None = None
    #: per phase (``"prompt"``, ``"generated"``; with ``generate``): the same three over that phase's tokens
    phases: dict[str, tuple[np.ndarray, dict[str, np.ndarray], list[tuple[np.ndarray, int]]]] = field(
        default_factory=dict)


#: One profiling work item: ``(domain, sequence ids, their texts)``.
ProfileItem = tuple[str, list[int], list[str]]


class BatchProfiler:
    """The profiling worker: routing statistics of one batch of texts (a :data:`ProfileItem`).

    Executors build one per worker (``functools.partial(BatchProfiler, max_length=...)`` is the factory) and
    call it on the batches :func:`~expertscope.routing.plan_batches` formed, so every per-sequence row is
    the same wherever it runs.
    """

    def __init__(self, model: MoEModel, max_length: int | None, importance: bool = False, generate: int = 0) -> None:
        ensure_pad(model.tokenizer)
        self.model = model
        self.max_length = max_length
        self.importance = importance
        self.generate = generate

    def __call__(self, item: ProfileItem) -> BatchResult:
        from .token_selections import batch_routes

        domain, ids, texts = item
        model = self.model
        routed = route_batch(model, texts, self.max_length, domain=domain, ids=ids, expert_norms=self.importance,
                             generate=self.generate)
        stats = batch_statistics(routed.calls, model.layers, model.num_experts, routed.mask, routed.norms)
        routes = batch_routes(routed, model.layers)
        phases = {}
        for name, m in routed.phase_masks().items():
            keep = m.cpu().numpy()[routed.mask.cpu().numpy()]  # over the real tokens, row by row
            starts = np.cumsum([0, *[len(r) for r, _ in routes]])
            parts = [(r[keep[a:b]], -1) for (r, _), a, b in zip(routes, starts[:-1], starts[1:], strict=True)]
            phases[name] = (m.sum(1).cpu().numpy(), batch_statistics(routed.calls, model.layers, model.num_experts,
                                                                     m, routed.norms), parts)
        return BatchResult(domain, list(ids), routed.mask.sum(1).cpu().numpy(), stats, int(routed.truncated.sum()),
                           routes, phases)


def profile(
    model: MoEModel,
    domains: DomainInput,
    config: ProfileConfig | None = None,
    *,
    resume_from: RoutingProfile | None = None,
    on_batch: Callable[[RoutingProfile, int], None] | None = None,
    progress: ProgressCallback | None = None,
    executor: Executor | None = None,
    **overrides: Any,
) -> RoutingProfile:
    """Stream each domain's texts through ``model`` and collect a :class:`RoutingProfile`.

    Settings come from ``config`` (a :class:`~expertscope.config.ProfileConfig`) and/or keyword overrides of
    its fields (``batch_size=16``); a keyword contradicting an explicit ``config`` raises ConfigError.
    Texts are batched (longest first when ``sort_by_length``), right-padded and truncated to
    ``max_length`` (or the model's context, whichever is smaller); truncations are counted per domain.
    ``resume_from`` skips sequences already in that profile and continues it; ``on_batch(profile, n)``
    runs after every batch (checkpointing); ``progress("profiling", done, total)`` after every batch too.
    ``executor`` (see :mod:`expertscope.execution`) runs the batches elsewhere, e.g. on Ray actors; results
    are identical to the in-process run.
    """
    from ..validation import check_type

    check_type(model, MoEModel, "model", "an MoEModel (es.load_model(...))")
    cfg = resolve_config(ProfileConfig, config, overrides)
    texts_by_domain = domain_texts(domains, cfg.limit)
    max_len = effective_max_length(model, cfg.max_length)
    layers = model.layers
    prof = resume_from or RoutingProfile(
        layers=layers, num_experts=model.num_experts, top_k=model.top_k, keep_sequences=cfg.keep_sequences,
        model_info=model.describe(), config={**cfg.to_dict(), "max_length_used": max_len,
                                             "path_length": resolve_path_length(cfg.path_length, len(layers))},
    )
    if resume_from is not None and (resume_from.layers != layers or resume_from.num_experts != model.num_experts):
        raise ConfigError("the profile to resume was made with another model: use a new --out")
    plan = plan_batches(texts_by_domain, cfg.batch_size, cfg.sort_by_length, prof.has)
    runner = executor if executor is not None else LocalExecutor()
    items: list[ProfileItem] = [(name, ids, [texts_by_domain[name][i] for i in ids]) for name, ids in plan]
    if progress is not None:
        progress("profiling", 0, len(items))
    worker = partial(BatchProfiler, max_length=max_len, importance=cfg.importance, generate=cfg.generate)
    for step, res in enumerate(runner.run_items(model, items, worker)):
        prof.add(res.domain, res.ids, res.n_tokens, res.stats, res.routes)
        for name, (n_tok, stats, routes) in res.phases.items():
            if name not in prof.phases:
                prof.phases[name] = RoutingProfile(layers=layers, num_experts=model.num_experts, top_k=model.top_k,
                                                   keep_sequences=cfg.keep_sequences, model_info=prof.model_info,
                                                   config={**prof.config, "keep_routes": False, "phase": name})
            prof.phases[name].add(res.domain, res.ids, n_tok, stats, routes)
        if res.n_truncated:
            prof.truncated[res.domain] = prof.truncated.get(res.domain, 0) + res.n_truncated
        if on_batch is not None:
            on_batch(prof, step)
        if progress is not None:
            progress("profiling", step + 1, len(items))
    return prof


def checkpointer(directory: str | Path, every_s: float = 30.0) -> Callable[[RoutingProfile, int], None]:
    """An ``on_batch`` callback saving the profile into ``directory`` at most every ``every_s`` seconds."""
    import time

    last = [time.perf_counter()]

    def save(prof: RoutingProfile, step: int) -> None:
        if time.perf_counter() - last[0] > every_s:
            prof.save(directory)
            last[0] = time.perf_counter()

    return save

