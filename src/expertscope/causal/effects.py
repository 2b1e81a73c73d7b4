"""Causal effects of experts on the prediction where each task is decided: ``causal_effects`` and its result.

``CE_{l,i}(X) = KL(P(X) ‖ Q_{l,i}(X))`` at each decision position of ``X`` (see :mod:`.decision`), averaged,
where ``Q`` is the prediction after adding ``magnitude`` to expert ``i``'s router logit at layer ``l`` (every
real token, or the first decision position onward). Methods: ``exact`` (the definition, computed
efficiently, see :mod:`.exact`), ``fast`` (the exact local change of the layer's output, propagated to
first order; see :mod:`.fast`), ``fisher`` (a second-order estimate in the router logit, blind to top-k
changes; see :mod:`.fisher`) and ``hybrid`` (fast screens, what could be a driver is computed exactly;
see :mod:`.hybrid`). Long runs checkpoint after every batch and resume to the same result.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
import torch

from ..checkpoint import RowCheckpoint
from ..config import CausalConfig, resolve_config
from ..data.types import Domain
from ..errors import ConfigError, DataError, OutputError
from ..io import make_dirs, read_table, write_table
from ..models.model import MoEModel
from ..progress import ProgressCallback
from ..routing import DomainInput, as_domain_list, effective_max_length
from ._engine import Estimator, Stack, find_stack, make_batch
from .decision import Prepared, common_prefix, prepare_inputs
from .exact import CleanCache, ExactEstimator, ExactStats, TailMode
from .fast import FastEstimator, FastStats
from .fisher import FisherEstimator, FisherStats
from .hybrid import Hybrid
from .noise import numerical_floor

TABLE_VERSION = 1



@dataclass
class CausalEffects:
    """CE per (input, layer, expert) with the settings and timings that produced it.

    ``ce`` ``(N, L, E)`` float64 (NaN for experts not asked for); ``domain`` ``(N,)`` each input's domain;
    ``text_index`` ``(N,)`` its index within that domain; ``layers`` the MoE layers of axis 1;
    ``exact`` bool, the entries computed by the exact engine: ``(L, E)`` the same for every input (all for
    ``method="exact"``), or ``(N, L, E)`` per input (``hybrid`` verifies a cell for the domains it matters to).
    """

    ce: np.ndarray
    domain: np.ndarray
    text_index: np.ndarray
    layers: list[int]
    exact: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def exact_per_input(self) -> np.ndarray:
        """``(N, L, E)`` bool: the entries computed by the exact engine, per input."""
        return np.broadcast_to(self.exact, self.ce.shape) if self.exact.ndim == 2 else self.exact

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
        exact = self.exact_per_input()
        for d in self.domains:
            x = self.ce[self.domain == d]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: experts not asked for
                mean, sd = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
            rows.append(pd.DataFrame({
                "domain": d, "layer": np.asarray(self.layers)[ll.ravel()], "expert": ee.ravel(),
                "ce_mean": mean.ravel(), "ce_sd": sd.ravel(), "n_inputs": len(x),
                "exact": exact[self.domain == d].all(axis=0).ravel(),
            }))
        return pd.concat(rows, ignore_index=True)

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per (input, layer, expert) with ``input, domain, text_index, layer, expert, ce``."""
        N, L, E = self.ce.shape
        nn_, ll, ee = np.meshgrid(np.arange(N), np.arange(L), np.arange(E), indexing="ij")
        return pd.DataFrame({
            "input": nn_.ravel(), "domain": self.domain[nn_.ravel()], "text_index": self.text_index[nn_.ravel()],
            "layer": np.asarray(self.layers)[ll.ravel()], "expert": ee.ravel(), "ce": self.ce.ravel(),
            "exact": self.exact_per_input().ravel(),
        })

    def save(self, directory: str | Path) -> Path:
        """Write ``ce.parquet`` (long form; settings in the Parquet metadata) into ``directory``."""
        directory = make_dirs(directory)
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
        exact = np.zeros((N, L, E), bool)
        exact[df["input"].to_numpy(), df["layer"].map(lpos).to_numpy(), df["expert"].to_numpy()] = \
            df["exact"].to_numpy()
        if N and (exact == exact[:1]).all():  # the same for every input: one (L, E) mask
            exact = exact[0].copy()
        return cls(ce=ce, domain=first["domain"].to_numpy(dtype=object), text_index=first["text_index"].to_numpy(),
                   layers=layers, exact=exact, settings=meta)


# ----- inputs --------------------------------------------------------------------------------------
def _label_ids(moe: MoEModel, doms: list[Domain], labels: Sequence[str | int] | None, decision: str) -> list[int]:
    """Token ids of the answer tokens for ``target="labels"``: given, or from the domains' task.

    With ``decision="task"`` a string label contributes its token at the decision index (the first token
    where the labels' encodings differ, e.g. after a shared leading-space token); else its first token.
    """
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
    encs: list[list[int] | None] = []
    for x in labels:
        if isinstance(x, int):
            encs.append(None)
            continue
        enc = [int(t) for t in tok(x, add_special_tokens=False)["input_ids"]]
        if not enc:
            raise ConfigError(f"label {x!r} encodes to no token: pass another label or its token id")
        encs.append(enc)
    strs = [e for e in encs if e is not None]
    at = common_prefix(strs) if decision == "task" and len(strs) >= 2 else 0
    ids = [int(x) if e is None else e[min(at, len(e) - 1)] for x, e in zip(labels, encs, strict=True)]
    if len(set(ids)) != len(ids) or len(ids) < 2:
        raise ConfigError(f"the label tokens {ids} are not at least 2 distinct tokens: pass labels whose first "
                          "tokens differ, or their token ids")
    return ids


def _fingerprint(token_ids: list[list[int]], decisions: list[list[int]], domains: list[str],
                 settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for d, t, p in zip(domains, token_ids, decisions, strict=True):
        h.update(d.encode() + b"\0" + json.dumps([t, p]).encode() + b"\1")
    return h.hexdigest()


# ----- the entry point -----------------------------------------------------------------------------
def causal_effects(
    model: MoEModel,
    domain_or_texts: DomainInput,
    config: CausalConfig | None = None,
    *,
    layers: Sequence[int] | None = None,
    experts: Sequence[int] | None = None,
    labels: Sequence[str | int] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    progress: ProgressCallback | None = None,
    drivers: Any = None,
    **overrides: Any,
) -> CausalEffects:
    """Causal effect of each (layer, expert) on the prediction where each input's task is decided.

    ``CE = KL(P ‖ Q)`` averaged over the input's decision positions (see :mod:`.decision`), ``Q`` after adding
    ``magnitude`` to the expert's router logit at the perturbed positions. ``domain_or_texts``: a
    :class:`Domain`, a list of them, ``{name: texts}`` or a list of texts. Settings: ``config`` (a
    :class:`CausalConfig`) and/or its fields as keywords (``method``: ``"exact"`` | ``"fisher"`` |
    ``"hybrid"``; ``positions``: ``"all"`` | ``"last"``; ``target``: ``"vocab"`` | ``"labels"``; ``decision``:
    ``"task"`` | ``"last"``; ``batch_size``, ``max_length``, ``limit``, ``chunk_tokens``, ...); a keyword that
    contradicts ``config`` raises. ``layers``/``experts`` restrict the (layer, expert) pairs computed
    (others are NaN); ``labels``: the answer tokens of ``target="labels"`` (default: from the task). Each of
    the three defaults to its config field (``only_layers``, ``only_experts``, ``label_tokens``).
    ``checkpoint``: a file path; the partial result is saved atomically after every batch and, with
    ``resume=True``, continued from (bit-identical to an uninterrupted run). ``on_batch(done, total)`` runs
    after each batch's checkpoint; ``progress(task, done, total)`` reports the same counts to a front end.
    ``drivers``: the :class:`~expertscope.config.DriverConfig` the drivers will be found with (``hybrid`` screens
    for that rule; default: its defaults).
    """
    from ..validation import check_type

    check_type(model, MoEModel, "model", "an MoEModel (es.load_model(...))")
    t_start = time.perf_counter()
    cfg = resolve_config(CausalConfig, config, overrides)
    layers = cfg.only_layers if layers is None else layers
    experts = cfg.only_experts if experts is None else experts
    labels = cfg.label_tokens if labels is None else labels
    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer: load it with expertscope.load_model or pass one")
    lays, per_layer, E_max = _targets(model, layers, experts)
    doms = as_domain_list(domain_or_texts)
    prep, dom_of, tix, max_len = _prepare(model, doms, cfg)
    label_ids = _label_ids(model, doms, labels, cfg.decision) if cfg.target == "labels" else None
    run = _Run(model, cfg, prep, lays, E_max, label_ids)
    settings_key = {
        **cfg.to_dict(), "layers": lays, "experts": None if experts is None else sorted({int(e) for e in experts}),
        "label_ids": label_ids, "model": model.describe(),
    }
    fingerprint = _fingerprint(prep.token_ids, prep.decisions, dom_of, settings_key)
    resumed = run.open_checkpoint(checkpoint, resume, fingerprint)
    phase_names = {"exact": ["exact"], "fast": ["fast"], "fisher": ["fisher"], "hybrid": ["fast", "exact"]}[cfg.method]
    run.start_progress(len(phase_names), progress, on_batch)
    hybrid: Hybrid | None = None
    try:
        if cfg.method != "hybrid":
            run.phase(cfg.method, per_layer)
        else:
            run.phase("fast", per_layer)
            hybrid = Hybrid(run.assemble("fast"), np.asarray(dom_of, dtype=object), lays, per_layer, E_max,
                            cfg.hybrid_top, drivers)
            plan = run.round_plan()
            for r, ask in enumerate(hybrid.rounds()):  # screen, probe, verify exactly (per input), screen again
                run.phase(f"exact:{r}", hybrid.which(ask), ask, plan)
                hybrid.verified(run.assemble(f"exact:{r}"), ask)
    finally:
        run.stop_progress()
        if run.checkpoint is not None:
            run.checkpoint.close()
    ce, exact_mask = _combine(run, cfg.method, lays, per_layer, hybrid, E_max)
    t_noise = time.perf_counter()
    noise = numerical_floor(model, run.stack, prep, lays, cfg, run.lab_t, cfg.noise_inputs, run.pad_id) \
        if cfg.noise_inputs else {}
    if noise:
        noise["seconds"] = round(time.perf_counter() - t_noise, 4)
    settings = {
        **cfg.to_dict(), "layers_asked": lays, "experts_asked": settings_key["experts"], "label_ids": label_ids,
        "n_inputs": len(prep.token_ids), "domains": [d.name for d in doms], "truncated": prep.truncated,
        "max_length_used": max_len, "decision_positions": _decision_note(cfg.decision),
        "decision_kinds": prep.kind_counts(), "decision_lost_to_truncation": prep.lost,
        "decision_positions_per_input": round(float(np.mean([len(d) for d in prep.decisions])), 3),
        "kl": "KL(P||Q) in float64, clamped at 0, averaged over each input's decision positions",
        "exact_stats": run.exact_stats.to_dict() if cfg.method in ("exact", "hybrid") else None,
        "fisher_stats": run.fisher_stats.to_dict() if cfg.method == "fisher" else None,
        "fast_stats": run.fast_stats.to_dict() if cfg.method in ("fast", "hybrid") else None,
        "skipped": run.exact_stats.skipped, "timings": run.timings(time.perf_counter() - t_start),
        "resumed_rows": resumed, "model": model.describe(),
        "engine_notes": run.engine_notes(), "numerical_floor": noise,
    }
    if hybrid is not None:
        settings["hybrid_exact"] = hybrid.exact_sets()
        settings["hybrid"] = {**hybrid.summary(), "round_batch_sizes": [len(b) for b in plan]}
    return CausalEffects(ce=ce, domain=np.asarray(dom_of, dtype=object), text_index=np.asarray(tix, dtype=np.int64),
                         layers=lays, exact=exact_mask, settings=settings)


def _decision_note(decision: str) -> str:
    if decision == "last":
        return "last real token of each input (the prompt, no teacher forcing)"
    return ("task: classification the label position, multiple choice the answer-letter position (first token "
            "where the options differ), math every gold-answer position (teacher-forced), plain text the last "
            "real token")


def _targets(model: MoEModel, layers: Sequence[int] | None, experts: Sequence[int] | None
             ) -> tuple[list[int], dict[int, list[int]], int]:
    """The MoE layers (sorted), the experts to perturb in each, and the largest expert count."""
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
    return lays, per_layer, max(model.site(layer).num_experts for layer in lays)


def _prepare(model: MoEModel, doms: list[Domain], cfg: CausalConfig
             ) -> tuple[Prepared, list[str], list[int], int | None]:
    """Teacher-forced token ids and decision positions of every input, checked."""
    names = [d.name for d in doms]
    if len(set(names)) != len(names):
        raise DataError(f"domain names {names} repeat: give each domain its own name")
    for d in doms:
        if not d.head(cfg.limit).examples:
            raise DataError(f"domain {d.name!r} has no texts: check its source and field names")
    tok = model.tokenizer
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    max_len = effective_max_length(model, cfg.max_length)
    prep, dom_of, tix = prepare_inputs(tok, doms, cfg.limit, cfg.decision, max_len)
    empty = next((i for i, t in enumerate(prep.token_ids) if not t), None)
    if empty is not None:
        raise DataError(f"text {tix[empty]} of domain {dom_of[empty]!r} has no tokens: drop empty texts")
    return prep, dom_of, tix, max_len


class _Run:
    """The batches of one call, their per-phase results, checkpointing and progress."""

    def __init__(self, model: MoEModel, cfg: CausalConfig, prep: Prepared, lays: list[int], E_max: int,
                 label_ids: list[int] | None) -> None:
        self.model, self.cfg, self.prep, self.lays, self.E_max = model, cfg, prep, lays, E_max
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        order = sorted(range(len(prep.token_ids)), key=lambda i: (-len(prep.token_ids[i]), i))
        self.plan = _plan(order, [len(t) for t in prep.token_ids], cfg.batch_size)
        self.lab_t = None if label_ids is None else torch.tensor(label_ids, device=model.device)
        self.stack: Stack | None = find_stack(model)
        self.exact_stats, self.fisher_stats, self.fast_stats = ExactStats(), FisherStats(), FastStats()
        if self.stack is None:
            self.exact_stats.engine, self.exact_stats.note = "full-forward", "decoder stack not found"
        lab = self.lab_t
        self.estimators: dict[str, Estimator] = {
            "exact": ExactEstimator(model, self.stack, cfg, lab, self.exact_stats),
            "fast": FastEstimator(model, self.stack, cfg, lab, self.fast_stats),
            "fisher": FisherEstimator(model, self.stack, cfg, lab, self.fisher_stats),
        }
        self.phases: dict[str, dict[int, np.ndarray]] = {}
        self.checkpoint: RowCheckpoint | None = None
        self.clean_cache = CleanCache(lays)  # hybrid's rounds: each batch's clean run, kept between them
        self.done, self.total = 0, 0
        self.progress: ProgressCallback | None = None
        self.on_batch: Callable[[int, int], None] | None = None

    def open_checkpoint(self, checkpoint: str | Path | None, resume: bool, fingerprint: str) -> int:
        """Checkpoint finished rows into ``checkpoint`` (:class:`~expertscope.checkpoint.RowCheckpoint`);
        with ``resume`` load the rows a run with the same ``fingerprint`` finished. Returns the rows resumed."""
        if checkpoint is None:
            return 0
        self.checkpoint = RowCheckpoint(checkpoint, fingerprint, resume)
        for (name, i), row in self.checkpoint.done.items():
            self.phases.setdefault(str(name), {})[int(i)] = row
        _restore_stats(self.exact_stats, self.fisher_stats, self.checkpoint.meta.get("stats", {}))
        return len(self.checkpoint.done)

    def start_progress(self, n_phases: int, progress: ProgressCallback | None,
                       on_batch: Callable[[int, int], None] | None) -> None:
        self.total = len(self.plan) * n_phases
        self.done = sum(1 for b in self.plan for ph in self.phases.values() if all(i in ph for i in b))
        self.on_batch = on_batch
        self.progress = progress
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(f"causal effects ({self.cfg.method})", self.done, self.total)

    def stop_progress(self) -> None:
        self.progress = None

    def round_plan(self) -> list[list[int]]:
        """The batches of ``hybrid``'s exact rounds: as large as a quarter of the clean cache's budget holds (at
        least ``batch_size`` inputs; a clean run's bytes per token measured on the first batch, so the plan is the
        same on every run of the call, resumed or not). A round asks a few cells of each input: a larger batch
        packs them into fuller perturbed runs (at hidden size 64 a run of few rows costs more per recomputed
        position). Without a decoder stack to restart on, the batches of the other phases."""
        est = self.estimators["exact"]
        assert isinstance(est, ExactEstimator)
        first = self.plan[0]
        batch = make_batch(first, [self.prep.token_ids[i] for i in first], self.pad_id, self.cfg.positions,
                           self.model.device, [self.prep.decisions[i] for i in first])
        per_token = est.clean_bytes_per_token(batch, self.lays)
        if not per_token:
            return self.plan
        longest = max(len(t) for t in self.prep.token_ids)
        size = max(self.cfg.batch_size, int(self.clean_cache.limit / 4 // (per_token * longest)))
        order = [i for ids in self.plan for i in ids]
        return _plan(order, [len(t) for t in self.prep.token_ids], size)

    def phase(self, name: str, which: Mapping[int, Sequence[int]], asked: np.ndarray | None = None,
              plan: list[list[int]] | None = None) -> None:
        """Compute phase ``name`` (an estimator: ``"exact"``, ``"fast"`` or ``"fisher"``) for the (layer,
        experts) in ``which``; ``asked`` ``(N, L, E_max)`` (``exact`` only): the cells each input needs (the
        others stay NaN; a batch that needs none is not run); ``plan``: its batches (default: the call's)."""
        cfg, model, prep = self.cfg, self.model, self.prep
        rows = self.phases.setdefault(name, {})
        for ids in self.plan if plan is None else plan:
            if all(i in rows for i in ids):
                continue
            # with an ask, a batch none of whose inputs needs a cell is not run; the others run whole (their
            # clean run kept for the next round: the same batch gives the same values), asking only those cells
            vals = np.full((len(ids), len(which), self.E_max), np.nan)
            if asked is None or asked[ids].any():
                batch = make_batch(ids, [prep.token_ids[i] for i in ids], self.pad_id, cfg.positions,
                                   model.device, [prep.decisions[i] for i in ids])
                est = self.estimators[name.split(":")[0]]  # "exact:1": hybrid's rounds
                if asked is None:
                    vals = est.estimate(batch, which)
                else:
                    assert isinstance(est, ExactEstimator)
                    li = [self.lays.index(layer) for layer in which]
                    vals = est.estimate(batch, which, asked[ids][:, li], self.clean_cache, ids[0])
            for j, i in enumerate(ids):
                rows[i] = _full_row(vals[j], self.lays, which, self.E_max)
            self.done += 1
            if self.checkpoint is not None:
                for i in ids:
                    self.checkpoint.add((name, i), rows[i])
                self.checkpoint.set_meta({"stats": _dump_stats(self.exact_stats, self.fisher_stats)})
            self._report()
            if self.on_batch is not None:
                self.on_batch(self.done, self.total)

    def engine_notes(self) -> list[str]:
        """One sentence per way the exact engine ran below its best (full forwards, no prefix reuse, the last
        layer's block at every position after its check failed); empty when it ran at its best (or was not
        used)."""
        ex = self.exact_stats
        if self.cfg.method not in ("exact", "hybrid"):
            return []
        if ex.engine != "restart":
            return [f"exact causal effects used full forward passes: {ex.note}"]
        notes = []
        if self.cfg.prefix_reuse and not ex.prefix and ex.prefix_note:
            notes.append(f"exact causal effects recomputed rows without prefix reuse: {ex.prefix_note}")
        if ex.tail == "failed":
            notes.append(f"exact causal effects ran the last layer's MoE block at every position, not at the "
                         f"decision positions only: {ex.tail_note}")
        return notes

    def assemble(self, name: str) -> np.ndarray:
        return _assemble(self.phases[name], len(self.prep.token_ids))

    def timings(self, total_s: float) -> dict[str, float]:
        ex, fi, fa = self.exact_stats, self.fisher_stats, self.fast_stats
        return {"clean_s": round(ex.clean_s, 4), "perturbed_s": round(ex.perturbed_s, 4),
                "fisher_s": round(fi.forward_s + fi.backward_s, 4),
                "fast_s": round(fa.forward_s + fa.backward_s + fa.local_s, 4), "total_s": round(total_s, 4)}


def _combine(run: _Run, method: str, lays: list[int], per_layer: Mapping[int, Sequence[int]],
             hybrid: Hybrid | None, E_max: int) -> tuple[np.ndarray, np.ndarray]:
    """The CE array of the method and the mask of entries computed exactly (``(L, E)``; ``hybrid`` per input)."""
    exact_mask = np.zeros((len(lays), E_max), bool)
    if method == "exact":
        for li, layer in enumerate(lays):
            exact_mask[li, list(per_layer[layer])] = True
        return run.assemble("exact"), exact_mask
    if method == "hybrid":
        assert hybrid is not None
        return hybrid.ce.copy(), hybrid.exact_per_input()
    return run.assemble(method), exact_mask


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


def _dump_stats(ex: ExactStats, fi: FisherStats) -> dict[str, Any]:
    return {"exact": {"skipped": ex.skipped, "computed": ex.computed, "runs": ex.runs, "clean_s": ex.clean_s,
                      "perturbed_s": ex.perturbed_s, "engine": ex.engine, "note": ex.note,
                      "token_rows": ex.token_rows, "clean_rows": ex.clean_rows, "prefix": ex.prefix,
                      "prefix_note": ex.prefix_note,
                      "tail": ex.tail, "tail_note": ex.tail_note,
                      "per_layer_skipped": {str(k): v for k, v in ex.per_layer_skipped.items()}},
            "fisher": {"backward_products": fi.backward_products, "routes": fi.routes, "min_mass": fi.min_mass,
                       "forward_s": fi.forward_s, "backward_s": fi.backward_s}}


def _restore_stats(ex: ExactStats, fi: FisherStats, d: dict[str, Any]) -> None:
    e, f = d.get("exact", {}), d.get("fisher", {})
    ex.skipped, ex.computed, ex.runs = int(e.get("skipped", 0)), int(e.get("computed", 0)), int(e.get("runs", 0))
    ex.clean_s, ex.perturbed_s = float(e.get("clean_s", 0.0)), float(e.get("perturbed_s", 0.0))
    ex.per_layer_skipped = {int(k): int(v) for k, v in e.get("per_layer_skipped", {}).items()}
    ex.token_rows, ex.prefix = int(e.get("token_rows", 0)), bool(e.get("prefix", False))
    ex.clean_rows = int(e.get("clean_rows", 0))
    ex.prefix_note = str(e.get("prefix_note", ""))
    tail = e.get("tail", "off")
    ex.tail = tail if tail in get_args(TailMode) else "off"
    ex.tail_note = str(e.get("tail_note", ""))
    if e.get("engine") == "full-forward":
        ex.engine, ex.note = "full-forward", str(e.get("note", ""))
    fi.backward_products, fi.routes = int(f.get("backward_products", 0)), dict(f.get("routes", {}))
    fi.min_mass = float(f.get("min_mass", 1.0))
    fi.forward_s, fi.backward_s = float(f.get("forward_s", 0.0)), float(f.get("backward_s", 0.0))

