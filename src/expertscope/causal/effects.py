"""Causal effects of experts on the next-token prediction (SPEC §3): ``causal_effects`` and its result.

``CE_{l,i}(X) = KL(P(X) ‖ Q_{l,i}(X))`` where ``Q`` is the prediction after adding ``magnitude`` to expert
``i``'s router logit at layer ``l`` (every real token, or only the prediction position). Three methods:
``exact`` (the definition, computed efficiently, see :mod:`.exact`), ``fisher`` (a second-order estimate
from a few backward passes, see :mod:`.fisher`) and ``hybrid`` (fisher ranks, the top experts of each
layer are recomputed exactly). Long runs checkpoint after every batch and resume to the same result.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import torch

from ..config import CausalConfig
from ..data.types import Domain
from ..errors import ConfigError, DataError, OutputError
from ..io import atomic_write, read_table, write_table
from ..models.model import MoEModel
from ..progress import ProgressCallback
from ..routing import DomainInput, as_domain_list, effective_max_length
from ._engine import Stack, find_stack, make_batch
from .exact import ExactStats, check_restart, exact_batch
from .fisher import FisherStats, fisher_batch

TABLE_VERSION = 1
CHECKPOINT_VERSION = 1

@dataclass
class CausalEffects:
    """CE per (input, layer, expert) with the settings and timings that produced it.

    ``ce`` ``(N, L, E)`` float64 (NaN for experts not asked for); ``domain`` ``(N,)`` each input's domain;
    ``text_index`` ``(N,)`` its index within that domain; ``layers`` the MoE layers of axis 1;
    ``exact`` ``(L, E)`` bool, the entries computed by the exact engine (all for ``method="exact"``).
    """

    ce: np.ndarray
    domain: np.ndarray
    text_index: np.ndarray
    layers: list[int]
    exact: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        """Domain names in first-seen order."""
        return list(dict.fromkeys(self.domain.tolist()))

    @property
    def num_experts(self) -> int:
        return int(self.ce.shape[2])

    def mean_by_domain(self) -> pd.DataFrame:
        """One row per (domain, layer, expert): ``ce_mean``, ``ce_sd`` (ddof=0) and ``n_inputs``."""
        rows = []
        L, E = len(self.layers), self.num_experts
        ll, ee = np.meshgrid(np.arange(L), np.arange(E), indexing="ij")
        for d in self.domains:
            x = self.ce[self.domain == d]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: experts not asked for
                mean, sd = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
            rows.append(pd.DataFrame({
                "domain": d, "layer": np.asarray(self.layers)[ll.ravel()], "expert": ee.ravel(),
                "ce_mean": mean.ravel(), "ce_sd": sd.ravel(), "n_inputs": len(x),
                "exact": self.exact.ravel(),
            }))
        return pd.concat(rows, ignore_index=True)

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per (input, layer, expert) with ``input, domain, text_index, layer, expert, ce``."""
        N, L, E = self.ce.shape
        nn_, ll, ee = np.meshgrid(np.arange(N), np.arange(L), np.arange(E), indexing="ij")
        return pd.DataFrame({
            "input": nn_.ravel(), "domain": self.domain[nn_.ravel()], "text_index": self.text_index[nn_.ravel()],
            "layer": np.asarray(self.layers)[ll.ravel()], "expert": ee.ravel(), "ce": self.ce.ravel(),
            "exact": np.broadcast_to(self.exact, (N, L, E)).ravel(),
        })

    def save(self, directory: str | Path) -> Path:
        """Write ``ce.parquet`` (long form; settings in the Parquet metadata) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"table": "causal_effects", "version": TABLE_VERSION, "layers": self.layers,
                "num_experts": self.num_experts, **self.settings}
        write_table(directory / "ce.parquet", self.to_frame(), meta=meta, csv=False)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CausalEffects:
        """Read a result written by :meth:`save` (bit-identical CE values)."""
        path = Path(directory) / "ce.parquet"
        if not path.exists():
            raise OutputError(f"no causal effects in {directory}: run `expertscope drivers --out {directory}` first")
        df, meta = read_table(path)
        if meta.get("table") != "causal_effects" or meta.get("version", 0) > TABLE_VERSION:
            raise OutputError(f"{path} is not a causal-effects table this expertscope can read: upgrade expertscope")
        layers, E = list(meta.pop("layers")), int(meta.pop("num_experts"))
        meta.pop("table"), meta.pop("version")
        N = int(df["input"].max()) + 1 if len(df) else 0
        L = len(layers)
        df = df.sort_values(["input", "layer", "expert"], kind="stable")
        lpos = {layer: i for i, layer in enumerate(layers)}
        ce = np.full((N, L, E), np.nan)
        ce[df["input"].to_numpy(), df["layer"].map(lpos).to_numpy(), df["expert"].to_numpy()] = df["ce"].to_numpy()
        first = df.drop_duplicates("input").sort_values("input")
        exact = np.zeros((L, E), bool)
        one = df[df["input"] == 0]
        exact[one["layer"].map(lpos).to_numpy(), one["expert"].to_numpy()] = one["exact"].to_numpy()
        return cls(ce=ce, domain=first["domain"].to_numpy(dtype=object), text_index=first["text_index"].to_numpy(),
                   layers=layers, exact=exact, settings=meta)


# ----- inputs --------------------------------------------------------------------------------------
def _label_ids(moe: MoEModel, doms: list[Domain], labels: Sequence[str | int] | None) -> list[int]:
    """Token ids of the answer tokens for ``target="labels"``: given, or from the domains' task."""
    tok = moe.tokenizer
    if labels is None:
        from ..data.prompts import LETTER_VERBALISATIONS, LETTERS, verbalise

        tasks = {d.task for d in doms}
        if tasks == {"multiple_choice"}:
            labels = [LETTER_VERBALISATIONS[x] for x in LETTERS]
        elif tasks == {"classification"}:
            labels = [verbalise(x) for x in sorted({str(e.label) for d in doms for e in d if e.label is not None})]
        else:
            raise ConfigError("target='labels' needs the answer tokens: pass labels=[...] (--label), or use "
                              "domains of one classification or multiple-choice task")
    ids = []
    for x in labels:
        if isinstance(x, int):
            ids.append(int(x))
        else:
            enc = list(tok(x, add_special_tokens=False)["input_ids"])
            if not enc:
                raise ConfigError(f"label {x!r} encodes to no token: pass another label or its token id")
            ids.append(int(enc[0]))
    if len(set(ids)) != len(ids) or len(ids) < 2:
        raise ConfigError(f"the label tokens {ids} are not at least 2 distinct tokens: pass labels whose first "
                          "tokens differ, or their token ids")
    return ids


def _fingerprint(texts: list[str], domains: list[str], settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for d, t in zip(domains, texts, strict=True):
        h.update(d.encode() + b"\0" + t.encode() + b"\1")
    return h.hexdigest()


# ----- checkpoints ---------------------------------------------------------------------------------
def _save_checkpoint(path: Path, fingerprint: str, phases: dict[str, dict[int, np.ndarray]],
                     stats: dict[str, Any], extra: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, rows in phases.items():
        idx = np.array(sorted(rows), dtype=np.int64)
        arrays[f"{name}_index"] = idx
        arrays[f"{name}_ce"] = np.stack([rows[i] for i in idx]) if len(idx) else np.zeros((0,))
    meta = {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "stats": stats, **extra}
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **cast(dict[str, Any], arrays))  # numpy's stub reserves the keyword allow_pickle: bool
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())


def _load_checkpoint(path: Path, fingerprint: str) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, Any]]:
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if meta.get("version") != CHECKPOINT_VERSION or meta.get("fingerprint") != fingerprint:
            raise ConfigError(f"the checkpoint {path} was made with other inputs or settings: rerun without "
                              "--resume (or with the original settings), or choose a new --out")
        phases: dict[str, dict[int, np.ndarray]] = {}
        for key in z.files:
            if key.endswith("_index"):
                name = key[: -len("_index")]
                ce = z[f"{name}_ce"]
                phases[name] = {int(i): ce[j] for j, i in enumerate(z[key])}
    return phases, meta


# ----- the entry point -----------------------------------------------------------------------------
def causal_effects(
    model: MoEModel,
    domain_or_texts: DomainInput,
    method: Literal["exact", "fisher", "hybrid"] = "exact",
    magnitude: float = 1.0,
    positions: Literal["all", "last"] = "all",
    target: Literal["vocab", "labels"] = "vocab",
    layers: Sequence[int] | None = None,
    experts: Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int | None = 512,
    limit: int | None = None,
    labels: Sequence[str | int] | None = None,
    config: CausalConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> CausalEffects:
    """Causal effect of each (layer, expert) on the next-token prediction of each input (SPEC §3).

    ``domain_or_texts``: a :class:`Domain`, a list of them, ``{name: texts}`` or a list of texts.
    ``method``: ``"exact"`` | ``"fisher"`` | ``"hybrid"``; ``positions``: ``"all"`` | ``"last"``;
    ``target``: ``"vocab"`` (full-vocabulary KL) | ``"labels"`` (KL over ``labels`` tokens, renormalised).
    ``layers``/``experts`` restrict the (layer, expert) pairs computed (others are NaN). ``config`` (a
    :class:`CausalConfig`) replaces the keyword settings; ``options`` are further CausalConfig fields
    (``chunk_tokens``, ``skip``, ``fisher_mass``, ``fisher_max_outputs``, ``hybrid_top``).
    ``checkpoint``: a file path; the partial result is saved atomically after every batch and, with
    ``resume=True``, continued from (bit-identical to an uninterrupted run). ``on_batch(done, total)`` runs
    after each batch's checkpoint; ``progress(task, done, total)`` reports the same counts to a front end.
    """
    t_start = time.perf_counter()
    cfg = config or CausalConfig(method=method, magnitude=magnitude, positions=positions,
                                 target=target, batch_size=batch_size, max_length=max_length, limit=limit,
                                 **options)
    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer: load it with expertscope.load_model or pass one")
    # ----- what to compute
    lays = list(model.layers) if layers is None else [int(x) for x in layers]
    bad = [x for x in lays if x not in model.layers]
    if bad or not lays:
        raise ConfigError(f"no MoE layer {bad[0] if bad else '(none given)'} in this model: choose from MoE layers "
                          f"{model.layers}")
    if len(set(lays)) != len(lays):
        raise ConfigError(f"layers {lays} repeat a layer: list each layer once")
    lays = sorted(lays)
    per_layer: dict[int, list[int]] = {}
    for layer in lays:
        E = model.site(layer).num_experts
        ex = list(range(E)) if experts is None else sorted({int(e) for e in experts})
        wrong = [e for e in ex if not 0 <= e < E]
        if wrong or not ex:
            raise ConfigError(f"expert {wrong[0] if wrong else '(none given)'} is not in layer {layer}: choose "
                              f"experts 0..{E - 1}")
        per_layer[layer] = ex
    E_max = max(model.site(layer).num_experts for layer in lays)
    # ----- inputs
    doms = as_domain_list(domain_or_texts)
    names = [d.name for d in doms]
    if len(set(names)) != len(names):
        raise DataError(f"domain names {names} repeat: give each domain its own name")
    texts, dom_of, tix = [], [], []
    for d in doms:
        ts = d.head(cfg.limit).texts
        if not ts:
            raise DataError(f"domain {d.name!r} has no texts: check its source and field names")
        texts += ts
        dom_of += [d.name] * len(ts)
        tix += list(range(len(ts)))
    label_ids = _label_ids(model, doms, labels) if cfg.target == "labels" else None
    tok = model.tokenizer
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    max_len = effective_max_length(model, cfg.max_length)
    token_ids = [list(tok(t, add_special_tokens=True)["input_ids"]) for t in texts]
    truncated = sum(1 for t in token_ids if max_len and len(t) > max_len)
    token_ids = [t[:max_len] if max_len else t for t in token_ids]
    empty = next((i for i, t in enumerate(token_ids) if not t), None)
    if empty is not None:
        raise DataError(f"text {tix[empty]} of domain {dom_of[empty]!r} has no tokens: drop empty texts")
    order = sorted(range(len(texts)), key=lambda i: (-len(token_ids[i]), i))
    plan = _plan(order, [len(t) for t in token_ids], cfg.batch_size)
    device = model.device
    lab_t = None if label_ids is None else torch.tensor(label_ids, device=device)

    # ----- engine
    stack: Stack | None = find_stack(model)
    exact_stats, fisher_stats = ExactStats(), FisherStats()
    if stack is None:
        exact_stats.engine, exact_stats.note = "full-forward", "decoder stack not found"
    settings_key = {
        **cfg.to_dict(), "layers": lays, "experts": None if experts is None else sorted({int(e) for e in experts}),
        "label_ids": label_ids, "model": model.describe(),
    }
    fingerprint = _fingerprint(texts, dom_of, settings_key)
    ck_path = Path(checkpoint) if checkpoint is not None else None
    phases: dict[str, dict[int, np.ndarray]] = {}
    resumed = 0
    if ck_path is not None and resume and ck_path.exists():
        phases, meta = _load_checkpoint(ck_path, fingerprint)
        resumed = sum(len(v) for v in phases.values())
        _restore_stats(exact_stats, fisher_stats, meta.get("stats", {}))
    phase_names = {"exact": ["exact"], "fisher": ["fisher"], "hybrid": ["fisher", "exact"]}[cfg.method]
    total = len(plan) * len(phase_names)
    done = [sum(1 for b in plan for ph in phases.values() if all(i in ph for i in b))]
    task = f"causal effects ({cfg.method})"
    if progress is not None:
        progress(task, done[0], total)
    verified = [False]

    def run_phase(name: str, which: Mapping[int, Sequence[int]]) -> None:
        rows = phases.setdefault(name, {})
        for ids in plan:
            if all(i in rows for i in ids):
                continue
            batch = make_batch(ids, [token_ids[i] for i in ids], pad_id, cfg.positions, device)
            if name == "fisher":
                vals = fisher_batch(model, stack, batch, which, cfg.magnitude, lab_t, cfg.fisher_mass,
                                    cfg.fisher_max_outputs, fisher_stats, cfg.fisher_route)
            else:
                engine = _verify_once(model, stack, batch, lays, exact_stats, verified)
                vals = exact_batch(model, engine, batch, which, cfg.magnitude, lab_t, cfg.chunk_tokens,
                                   cfg.skip, exact_stats)
            for j, i in enumerate(ids):
                rows[i] = _full_row(vals[j], lays, which, E_max)
            done[0] += 1
            if ck_path is not None:
                _save_checkpoint(ck_path, fingerprint, phases, _dump_stats(exact_stats, fisher_stats), {})
            if progress is not None:
                progress(task, done[0], total)
            if on_batch is not None:
                on_batch(done[0], total)

    if cfg.method == "exact":
        run_phase("exact", per_layer)
    elif cfg.method == "fisher":
        run_phase("fisher", per_layer)
    else:
        run_phase("fisher", per_layer)
        fisher_ce = _assemble(phases["fisher"], len(texts))
        top = _hybrid_candidates(fisher_ce, np.asarray(dom_of, dtype=object), lays, per_layer, cfg.hybrid_top)
        run_phase("exact", top)

    exact_mask = np.zeros((len(lays), E_max), bool)
    if cfg.method == "exact":
        ce = _assemble(phases["exact"], len(texts))
        for li, layer in enumerate(lays):
            exact_mask[li, per_layer[layer]] = True
    elif cfg.method == "fisher":
        ce = _assemble(phases["fisher"], len(texts))
    else:
        ce = _assemble(phases["fisher"], len(texts))
        ex_ce = _assemble(phases["exact"], len(texts))
        for li, layer in enumerate(lays):
            exact_mask[li, top[layer]] = True
        ce[:, exact_mask] = ex_ce[:, exact_mask]
    timings = {
        "clean_s": round(exact_stats.clean_s, 4), "perturbed_s": round(exact_stats.perturbed_s, 4),
        "fisher_s": round(fisher_stats.forward_s + fisher_stats.backward_s, 4),
        "total_s": round(time.perf_counter() - t_start, 4),
    }
    settings = {
        **{k: v for k, v in cfg.to_dict().items()}, "layers_asked": lays,
        "experts_asked": settings_key["experts"], "label_ids": label_ids, "n_inputs": len(texts),
        "domains": names, "truncated": truncated, "max_length_used": max_len,
        "prediction_position": "last real (non-padding) token", "kl": "KL(P||Q), float64 reduction",
        "exact_stats": exact_stats.to_dict() if cfg.method != "fisher" else None,
        "fisher_stats": fisher_stats.to_dict() if cfg.method != "exact" else None,
        "skipped": exact_stats.skipped, "timings": timings, "resumed_rows": resumed,
        "model": model.describe(),
    }
    if cfg.method == "hybrid":
        settings["hybrid_exact"] = {str(layer): list(map(int, v)) for layer, v in top.items()}
    return CausalEffects(ce=ce, domain=np.asarray(dom_of, dtype=object), text_index=np.asarray(tix, dtype=np.int64),
                         layers=lays, exact=exact_mask, settings=settings)


def _verify_once(model: MoEModel, stack: Stack | None, batch: Any, layers: list[int], stats: ExactStats,
                 verified: list[bool]) -> Stack | None:
    """Check the restart path once per call; fall back to full forward passes (with a note) if it fails."""
    if stack is None or stats.engine != "restart":
        return None
    if not verified[0]:
        problem = check_restart(model, stack, batch, layers)
        verified[0] = True
        if problem:
            stats.engine, stats.note = "full-forward", problem
            warnings.warn(f"exact causal effects fall back to full forward passes: {problem}", stacklevel=3)
            return None
        stats.note = "verified"
    return stack


def _plan(order: list[int], lengths: list[int], batch_size: int, min_fill: float = 0.75) -> list[list[int]]:
    """Batches of at most ``batch_size`` inputs in ``order`` (longest first); a batch also closes before an
    input shorter than ``min_fill`` × its longest, since every perturbed row runs at the padded length."""
    plan: list[list[int]] = []
    for i in order:
        if plan and len(plan[-1]) < batch_size and lengths[i] >= min_fill * lengths[plan[-1][0]]:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def _full_row(vals: np.ndarray, lays: list[int], which: Mapping[int, Sequence[int]], E_max: int) -> np.ndarray:
    """Place a batch row computed for the layers in ``which`` into the full ``(L, E)`` layout."""
    row = np.full((len(lays), E_max), np.nan)
    for j, layer in enumerate(which):
        row[lays.index(layer), : vals.shape[1]] = vals[j]
    return row


def _assemble(rows: dict[int, np.ndarray], n: int) -> np.ndarray:
    return np.stack([rows[i] for i in range(n)])


def _hybrid_candidates(ce: np.ndarray, dom: np.ndarray, lays: list[int], per_layer: Mapping[int, Sequence[int]],
                       n_top: int) -> dict[int, list[int]]:
    """Per layer, the ``n_top`` experts with the largest domain-mean Fisher CE (max over domains)."""
    means = np.stack([np.nanmean(ce[dom == d], axis=0) for d in dict.fromkeys(dom.tolist())])  # (D, L, E)
    score = np.nanmax(means, axis=0)
    out = {}
    for li, layer in enumerate(lays):
        ex = np.asarray(per_layer[layer])
        order = np.argsort(-score[li, ex], kind="stable")
        out[layer] = sorted(int(e) for e in ex[order[:n_top]])
    return out


def _dump_stats(ex: ExactStats, fi: FisherStats) -> dict[str, Any]:
    return {"exact": {"skipped": ex.skipped, "computed": ex.computed, "runs": ex.runs, "clean_s": ex.clean_s,
                      "perturbed_s": ex.perturbed_s, "engine": ex.engine, "note": ex.note,
                      "per_layer_skipped": {str(k): v for k, v in ex.per_layer_skipped.items()}},
            "fisher": {"backward_products": fi.backward_products, "routes": fi.routes, "min_mass": fi.min_mass,
                       "forward_s": fi.forward_s, "backward_s": fi.backward_s}}


def _restore_stats(ex: ExactStats, fi: FisherStats, d: dict[str, Any]) -> None:
    e, f = d.get("exact", {}), d.get("fisher", {})
    ex.skipped, ex.computed, ex.runs = int(e.get("skipped", 0)), int(e.get("computed", 0)), int(e.get("runs", 0))
    ex.clean_s, ex.perturbed_s = float(e.get("clean_s", 0.0)), float(e.get("perturbed_s", 0.0))
    ex.per_layer_skipped = {int(k): int(v) for k, v in e.get("per_layer_skipped", {}).items()}
    if e.get("engine") == "full-forward":
        ex.engine, ex.note = "full-forward", str(e.get("note", ""))
    fi.backward_products, fi.routes = int(f.get("backward_products", 0)), dict(f.get("routes", {}))
    fi.min_mass = float(f.get("min_mass", 1.0))
    fi.forward_s, fi.backward_s = float(f.get("forward_s", 0.0)), float(f.get("backward_s", 0.0))

