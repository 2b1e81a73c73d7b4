"""The numerical floor of causal effects: the CE that rounding alone gives in the model's dtype.

A driver's CE is a KL of about 1e-3 nats after a +1 logit perturbation. Whether that stands above the model's own
rounding has to be measured in its dtype (bfloat16 keeps 8 bits of mantissa): the exact engine computes ``Q``
in another batch composition than ``P`` (a subset of rows, restarted from a layer's cached inputs, reusing the
clean run's keys and values), and each of those changes the rounding. Per MoE layer, on a few inputs:

- ``restart``: CE after a **zero** perturbation through the same engine (the restart at that layer, prefix reuse
  and row selection as in a real perturbation; the skip rule off, so nothing is short-cut);
- ``batch``: the KL between each input's clean prediction in its batch and alone (the batch composition changed).

The floor of a layer is the largest of these over the inputs (a conservative bound: a real effect below it
cannot be told from rounding). :func:`~expertscope.causal.drivers.driver_experts` raises the driver rule's
``ce_floor`` to it wherever it is higher, and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..models.model import MoEModel
from ._engine import Stack, clean_run, kl, log_probs, make_batch
from .decision import Prepared
from .exact import ExactStats, exact_batch, resolve_engine


def numerical_floor(model: MoEModel, stack: Stack | None, prep: Prepared, layers: Sequence[int], cfg: Any,
                    label_ids: torch.Tensor | None, n_inputs: int, pad_id: int) -> dict[str, Any]:
    """The rounding floor of CE for ``model`` in its dtype, measured on the first ``n_inputs`` inputs of
    ``prep`` (one batch): ``{"dtype", "inputs", "per_layer": {layer: nats}, "restart": {layer: nats},
    "batch": nats, "max": nats}`` (see the module docstring)."""
    idx = list(range(min(n_inputs, len(prep.token_ids))))
    if not idx:
        return {}
    batch = make_batch(idx, [prep.token_ids[i] for i in idx], pad_id, cfg.positions, model.device,
                       [prep.decisions[i] for i in idx])
    stats = ExactStats()
    engine = resolve_engine(model, stack, cfg.prefix_reuse, stats)
    one = {layer: [0] for layer in layers}  # expert 0: with a zero perturbation every expert is the same
    with torch.no_grad():
        zero = exact_batch(model, engine, batch, one, 0.0, label_ids, cfg.chunk_tokens, False, stats,
                           prefix=stats.prefix)[:, :, 0]  # (B, L)
        clean = clean_run(model, engine, batch, None, [])
        logp = log_probs(clean.logits, label_ids)
        alone = []
        for j, i in enumerate(idx):  # each input alone: its rows of the batched decision positions
            single = make_batch([i], [prep.token_ids[i]], pad_id, cfg.positions, model.device, [prep.decisions[i]])
            lq = log_probs(clean_run(model, engine, single, None, []).logits, label_ids)
            rows = torch.tensor([r for r, b in enumerate(batch.all.row.tolist()) if b == j], device=model.device)
            alone.append(float(kl(logp.index_select(0, rows), lq).mean()))
    restart = {int(layer): float(np.nanmax(np.clip(zero[:, li], 0, None))) for li, layer in enumerate(layers)}
    batch_kl = float(max(alone)) if alone else 0.0
    per_layer = {layer: max(v, batch_kl) for layer, v in restart.items()}
    return {"dtype": str(model.dtype).replace("torch.", ""), "inputs": len(idx), "per_layer": per_layer,
            "restart": restart, "batch": batch_kl, "max": max(per_layer.values(), default=0.0)}


def floor_note(noise: dict[str, Any], ce_floor: float) -> str:
    """One sentence: the dtype's CE floor beside the rule's, and the layers where the rule's was raised."""
    if not noise:
        return ""
    raised = {int(layer): v for layer, v in noise["per_layer"].items() if v > ce_floor}
    text = (f"Rounding alone gives CE up to {noise['max']:.2g} nats in {noise['dtype']} (a zero perturbation through "
            f"the engine and a changed batch, {noise['inputs']} inputs); the driver floor is {ce_floor:g} nats")
    if raised:
        text += (f", raised to the rounding level at {len(raised)} layer(s) "
                 f"({', '.join(f'{la}: {v:.2g}' for la, v in sorted(raised.items())[:6])}"
                 f"{', …' if len(raised) > 6 else ''})")
    else:
        text += ", above the rounding everywhere"
    return text + "."


__all__ = ["floor_note", "numerical_floor"]
