"""Causal sweeps as independent work items, for executors that spread them over many workers.

One work item is one (input, MoE layer): a clean run of that input and the perturbed runs of every expert
of the layer, batched. Results are keyed by item and appended to a checkpoint as they arrive, so an
interrupted or failed cluster run resumes without recomputing finished items, and the assembled CE equals
the single-process sweep over the same items bit for bit (the same worker code on the same inputs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import RowCheckpoint
from ..config import CausalConfig, resolve_config
from ..errors import ConfigError, DataError
from ..execution import Executor, LocalExecutor
from ..models.model import MoEModel
from ..routing import DomainInput, as_domain_list, effective_max_length
from ._engine import find_stack, make_batch
from .decision import prepare_inputs
from .effects import CausalEffects
from .exact import ExactEstimator

#: One sweep work item: ``(MoE layer, input)``; the input is its token ids (measured at the last token) or
#: ``{"ids": [...], "decisions": [...]}`` (measured at those decision positions, averaged).
CausalItem = tuple[int, Sequence[int] | Mapping[str, Any]]


class CausalItemWorker:
    """The sweep worker: CE ``(E,)`` of every expert of one layer on one input (a :data:`CausalItem`).

    Executors build one per worker (``functools.partial(CausalItemWorker, settings=...)`` is the factory),
    so the model is loaded once per worker.
    """

    def __init__(self, model: MoEModel, settings: CausalConfig) -> None:
        self.model = model
        self.settings = settings
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.estimator = ExactEstimator(model, find_stack(model), settings, None)

    def __call__(self, work: CausalItem) -> np.ndarray:
        with torch.no_grad():
            return self._compute(*work)

    def _compute(self, layer: int, item: Sequence[int] | Mapping[str, Any]) -> np.ndarray:
        s = self.settings
        if isinstance(item, Mapping):
            ids, dec = [int(x) for x in item["ids"]], [[int(x) for x in item["decisions"]]]
        else:
            ids, dec = [int(x) for x in item], None
        batch = make_batch([0], [ids], self.pad_id, s.positions, self.model.device, dec)
        E = self.model.site(layer).num_experts
        return self.estimator.estimate(batch, {layer: list(range(E))})[0, 0, :E]


def _fingerprint(texts: list[str], settings: CausalConfig, model_info: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps([texts, settings.to_dict(), model_info], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def causal_sweep(
    model: MoEModel,
    domain_or_texts: DomainInput,
    config: CausalConfig | None = None,
    *,
    executor: Executor | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    **overrides: Any,
) -> CausalEffects:
    """Exact CE for every (input, layer, expert), computed as (input, layer) items by ``executor``.

    Settings: ``config`` (a :class:`~expertscope.config.CausalConfig`) and/or its fields as keywords, as in
    :func:`~expertscope.causal.causal_effects` (``magnitude``, ``positions``, ``decision``, ``max_length``,
    ``limit``, ``skip``, ``chunk_tokens``, ``prefix_reuse``); the sweep computes ``method="exact"`` over the
    whole vocabulary (``target="vocab"``), one input per item (``batch_size`` does not apply).

    ``executor`` is an :class:`~expertscope.execution.Executor` (None: in process). With
    ``checkpoint`` (a file), finished items survive a failure; ``resume=True`` computes only the rest.
    """
    settings = resolve_config(CausalConfig, config, overrides)
    if settings.method != "exact" or settings.target != "vocab":
        raise ConfigError(f"causal_sweep computes method='exact', target='vocab' only (got method="
                          f"{settings.method!r}, target={settings.target!r}): use causal_effects for the others")
    limit, decision = settings.limit, settings.decision
    doms = as_domain_list(domain_or_texts)
    for d in doms:
        if not d.head(limit).examples:
            raise DataError(f"domain {d.name!r} has no texts: check its source and field names")
    max_len = effective_max_length(model, settings.max_length)
    prep, dom_of, tix = prepare_inputs(model.tokenizer, doms, limit, decision, max_len)
    texts = [json.dumps([t, d]) for t, d in zip(prep.token_ids, prep.decisions, strict=True)]
    items = [{"ids": t, "decisions": d} for t, d in zip(prep.token_ids, prep.decisions, strict=True)]
    layers = model.layers
    E_max = model.num_experts
    ck = RowCheckpoint(checkpoint, _fingerprint(texts, settings, model.describe()), resume) if checkpoint else None
    done: dict[tuple[int, int], np.ndarray] = {(int(i), int(layer)): v for (i, layer), v in ck.done.items()} \
        if ck else {}
    todo = [(i, layer) for i in range(len(texts)) for layer in layers if (i, layer) not in done]
    work: list[CausalItem] = [(layer, items[i]) for i, layer in todo]
    runner = executor if executor is not None else LocalExecutor()
    computed = 0
    try:
        results = runner.run_items(model, work, partial(CausalItemWorker, settings=settings))
        for (i, layer), ce in zip(todo, results, strict=True):
            done[(i, layer)] = ce
            computed += 1
            if ck is not None:
                ck.add((i, layer), ce)
    finally:
        if ck is not None:
            ck.close()
    out = np.full((len(texts), len(layers), E_max), np.nan)
    for (i, layer), ce in done.items():
        out[i, layers.index(layer), : len(ce)] = ce
    result_settings = {**settings.to_dict(), "work_items": "input x layer",
                       "executor": getattr(runner, "name", "local"), "computed_items": computed,
                       "resumed_items": len(done) - computed, "n_inputs": len(texts), "domains": [d.name for d in doms],
                       "max_length_used": max_len, "model": model.describe()}
    return CausalEffects(ce=out, domain=np.asarray(dom_of, dtype=object), text_index=np.asarray(tix, np.int64),
                         layers=list(layers), exact=np.ones((len(layers), E_max), bool), settings=result_settings)
