"""``method="exact"``: the definition of CE (SPEC §3), computed efficiently.

Per batch: one clean run caches every decoder layer's inputs; for each MoE layer ``l`` the (input, expert)
pairs that are not provably zero are packed into rows of a few perturbed runs that restart at decoder
layer ``l``; only the prediction position of each row reaches the final norm and the LM head. Where the
restart cannot reproduce the model (checked once per call), full forward passes are used instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.hooks import RouterHooks
from ..models.model import MoEModel
from ._engine import (
    Batch,
    CleanRun,
    Stack,
    can_skip,
    clean_run,
    full_logits,
    kl,
    log_probs,
    perturb_transform,
    restart,
    skip_mask,
)


@dataclass
class ExactStats:
    """Counters and timings accumulated over batches."""

    skipped: int = 0
    computed: int = 0
    runs: int = 0
    clean_s: float = 0.0
    perturbed_s: float = 0.0
    engine: str = "restart"
    note: str = ""
    per_layer_skipped: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "skipped": self.skipped, "computed": self.computed, "perturbed_runs": self.runs,
            "clean_s": round(self.clean_s, 4), "perturbed_s": round(self.perturbed_s, 4),
            "engine": self.engine, "engine_note": self.note,
            "skipped_per_layer": {str(k): v for k, v in self.per_layer_skipped.items()},
        }


def check_restart(moe: MoEModel, stack: Stack, batch: Batch, layers: Sequence[int]) -> str:
    """Check that restarting at each of ``layers`` reproduces the model's own logits; "" if it does.

    The rows are taken in reverse order so that a wrong batch mapping of the cached kwargs shows up.
    """
    with torch.no_grad():
        ref = full_logits(moe, batch.input_ids, batch.attention_mask, batch.all).float()
        clean = clean_run(moe, stack, batch, min(layers), [])
        scale = float(ref.abs().max()) + 1.0
        tol = (1e-4 if ref.dtype == torch.float32 and moe.dtype == torch.float32 else 3e-2) * scale
        err = float((clean.logits.float() - ref).abs().max())
        if not err <= tol:
            return f"the final norm + LM head do not reproduce the model's logits (max error {err:.3g})"
        order = list(range(batch.size - 1, -1, -1))
        rows = torch.tensor(order, device=batch.device)
        picks = batch.picks(order)
        for layer in layers:
            got = restart(stack, clean, batch, layer, rows, picks).float()
            err = float((got - ref.index_select(0, picks.clean)).abs().max())
            if not err <= tol:
                return f"restarting at decoder layer {layer} does not reproduce the model (max error {err:.3g})"
    return ""


def exact_batch(
    moe: MoEModel,
    stack: Stack | None,
    batch: Batch,
    experts: Mapping[int, Sequence[int]],
    magnitude: float,
    label_ids: torch.Tensor | None,
    chunk_tokens: int,
    skip: bool,
    stats: ExactStats,
    clean: CleanRun | None = None,
) -> np.ndarray:
    """CE ``(B, L, E_max)`` float64 for one batch; layers in ``experts``' order, NaN where not asked.

    Each value is the KL at the input's decision positions, averaged. ``experts[layer]`` lists the experts
    to perturb at that MoE layer. ``stack=None`` uses full forward passes. ``chunk_tokens`` bounds the
    tokens of one perturbed run (rows × padded length), so memory stays bounded whatever the batch.
    """
    layers = list(experts)
    B = batch.size
    E_max = max(moe.site(layer).num_experts for layer in layers)
    dev = batch.device
    out = torch.full((B, len(layers), E_max), float("nan"), dtype=torch.float64, device=dev)
    skippable = [layer for layer in layers if skip and can_skip(moe.site(layer))]
    t0 = time.perf_counter()
    if clean is None:
        clean = clean_run(moe, stack, batch, min(layers) if stack is not None else None, skippable)
    logp = log_probs(clean.logits, label_ids)  # (P, V)
    stats.clean_s += time.perf_counter() - t0
    T = batch.input_ids.shape[1]
    max_rows = max(1, chunk_tokens // T)
    t1 = time.perf_counter()
    # Which (input, expert) pairs provably change nothing: every layer's rule at once, one device sync.
    masks = [skip_mask(clean.router_logits[layer], batch, moe.site(layer), list(experts[layer]), magnitude,
                       moe.dtype) for layer in skippable]
    flat = torch.cat([m.flatten() for m in masks]).cpu().numpy() if masks else np.zeros(0, bool)
    skipped: dict[int, np.ndarray] = {}
    o = 0
    for layer in skippable:
        n = B * len(experts[layer])
        skipped[layer] = flat[o : o + n].reshape(B, len(experts[layer]))
        o += n
    for li, layer in enumerate(layers):
        ex = list(experts[layer])
        sk = skipped.get(layer, np.zeros((B, len(ex)), bool))
        n_sk = int(sk.sum())
        stats.skipped += n_sk
        stats.per_layer_skipped[layer] = stats.per_layer_skipped.get(layer, 0) + n_sk
        if n_sk:
            b_sk, j_sk = np.nonzero(sk)
            out[torch.as_tensor(b_sk, device=dev), li, torch.as_tensor(np.asarray(ex)[j_sk], device=dev)] = 0.0
        # Rows: (input b, expert e) pairs, expert-major so one run perturbs few distinct experts.
        pairs = [(b, e) for j, e in enumerate(ex) for b in range(B) if not sk[b, j]]
        for s in range(0, len(pairs), max_rows):
            chunk = pairs[s : s + max_rows]
            bs = [b for b, _ in chunk]
            rows = torch.tensor(bs, device=dev)
            exps = torch.tensor([e for _, e in chunk], device=dev)
            picks = batch.picks(bs)
            tf = perturb_transform(batch, rows, exps, magnitude)
            with RouterHooks(moe, transforms={layer: tf}), torch.no_grad():
                if stack is not None:
                    q = restart(stack, clean, batch, layer, rows, picks)
                else:
                    q = full_logits(moe, batch.input_ids.index_select(0, rows),
                                    batch.attention_mask.index_select(0, rows), picks)
            per_pos = kl(logp.index_select(0, picks.clean), log_probs(q, label_ids))
            out[rows, li, exps] = picks.row_mean(per_pos, len(chunk))
            stats.runs += 1
            stats.computed += len(chunk)
    stats.perturbed_s += time.perf_counter() - t1
    return out.cpu().numpy()
