"""``method="fast"``: an estimate of CE that sees top-k membership changes, from one forward and one batched
backward pass per batch.

For perturbation ``(l, i)`` let ``Δ_{l,i}`` ``(T, H)`` be the *exact* change of MoE layer ``l``'s output
when ``magnitude`` is added to expert ``i``'s router logit at the perturbed positions: the model's own MoE
block is run on its clean input with and without the perturbation, so selection changes (an expert entering
or leaving the top-k), renormalisation and shared experts are all included. The rest of the network is
linearised: with ``g_y = ∂ log p(y) / ∂ o_l`` (the gradient of the log-probability of output token ``y``
at a decision position with respect to layer ``l``'s MoE output ``o_l``, all tokens),

    ``KL(P ‖ Q_{l,i}) ≈ ½ Σ_y p(y) (g_y · Δ_{l,i})²``

(the Fisher quadratic form) over the most probable ``fast_outputs`` tokens ``y``. The gradients of every
layer come from the same backward products: ``fast_probes`` random-sign combinations of all (position,
token) pairs (an unbiased estimate), or one product per pair (exact) when that is as cheap or
``fast_probes=0``. The local part (``Δ``) is exact; the propagation is first-order, so agreement with
``exact`` is measured, never assumed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import CausalConfig
from ..errors import ConfigError
from ..models.hooks import RouterHooks
from ..models.model import MoEModel
from ._engine import Batch, Stack, can_skip, decision_logits, output_distribution, unchanged_tokens

_CHUNK = 16  # backward products per batched backward pass (bounds memory)


@dataclass
class FastStats:
    """Counters accumulated over batches."""

    backward_products: int = 0
    local_rows: int = 0
    min_mass: float = 1.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    local_s: float = 0.0
    notes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backward_products": self.backward_products, "local_tokens": self.local_rows,
                "min_covered_mass": round(self.min_mass, 6), "fast_forward_s": round(self.forward_s, 4),
                "fast_backward_s": round(self.backward_s, 4), "fast_local_s": round(self.local_s, 4)}


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def fast_batch(
    moe: MoEModel,
    stack: Stack | None,
    batch: Batch,
    experts: Mapping[int, Sequence[int]],
    magnitude: float,
    label_ids: torch.Tensor | None,
    n_outputs: int,
    chunk_tokens: int,
    stats: FastStats,
    probes: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """Fast CE estimates ``(B, L, E_max)`` float64 for one batch (NaN where not asked), averaged over each
    input's decision positions: exactly when ``probes`` is 0 or at least (positions per input × outputs),
    else from ``probes`` random-sign probes, seeded by ``seed`` and the batch."""
    layers = list(experts)
    B, T = batch.input_ids.shape
    E_max = max(moe.site(layer).num_experts for layer in layers)
    dev = batch.device
    picks = batch.all
    blocks: dict[int, nn.Module] = {}
    for layer in layers:
        blk = moe.site(layer).block
        if blk is None:
            raise ConfigError(f"layer {layer}'s router has no MoE block to rerun: use method='exact'")
        blocks[layer] = blk
    # ----- one forward pass with a zero added to every MoE output (its gradient is ∂/∂o_l)
    inputs: dict[int, torch.Tensor] = {}
    zeros: dict[int, torch.Tensor] = {}
    handles = []
    for layer, blk in blocks.items():
        def pre(_m: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            inputs[layer] = x.detach()

        def post(_m: nn.Module, args: tuple, kwargs: dict, out: Any, layer: int = layer) -> Any:
            h = _hidden(out)
            z = torch.zeros_like(h, requires_grad=True)
            zeros[layer] = z
            h2 = h + z
            return (h2, *out[1:]) if isinstance(out, tuple) else h2

        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(blk.register_forward_hook(post, with_kwargs=True))
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():
            logits, _ = decision_logits(moe, stack, batch)
    finally:
        for hd in handles:
            hd.remove()
    stats.forward_s += time.perf_counter() - t0
    # ----- the exact local change of each MoE output: delta[l] (E_l, B, T, H). The block acts token by token,
    # so only (expert, token) pairs whose output can change are run (for renormalising routers: tokens where
    # the expert is selected or can enter the top-k; otherwise every perturbed token), as flat rows.
    t2 = time.perf_counter()
    deltas: list[torch.Tensor] = []
    with torch.no_grad():
        for layer in layers:
            blk, xin, ex, site = blocks[layer], inputs[layer], list(experts[layer]), moe.site(layer)
            with RouterHooks(moe, record=[layer]) as rec:
                base = _hidden(blk(xin)).reshape(B, T, -1)
            if can_skip(site):
                live = ~unchanged_tokens(rec.calls[layer][0].logits, batch, site, ex, magnitude, moe.dtype)
            else:
                live = (batch.pmask > 0)[..., None].expand(B, T, len(ex))
            jj, bb, tt = torch.nonzero(live.permute(2, 0, 1), as_tuple=True)  # (N,) each
            d = torch.zeros(len(ex), B, T, base.shape[-1], dtype=base.dtype, device=dev)
            ex_t = torch.tensor(ex, device=dev)
            for s in range(0, len(jj), chunk_tokens):  # the memory budget: tokens of one MoE call
                j_, b_, t_ = jj[s : s + chunk_tokens], bb[s : s + chunk_tokens], tt[s : s + chunk_tokens]
                cols = ex_t.index_select(0, j_)

                def tf(_site: Any, z: torch.Tensor, cols: torch.Tensor = cols) -> torch.Tensor:
                    return z.index_put((torch.arange(len(cols), device=z.device), cols),
                                       torch.full_like(cols, 0, dtype=z.dtype) + magnitude, accumulate=True)

                with RouterHooks(moe, transforms={layer: tf}):
                    pert = _hidden(blk(xin[b_, t_][None])).reshape(len(j_), -1)
                d[j_, b_, t_] = pert - base[b_, t_]
                stats.local_rows += len(j_)
            deltas.append(d)
    stats.local_s += time.perf_counter() - t2
    # ----- gradients of log p(y) for the most probable outputs, every layer at once, contracted with delta
    t1 = time.perf_counter()
    logp, p = output_distribution(logits, label_ids)  # (P, V') each
    V = p.shape[1]
    K = min(n_outputs, V)
    w, idx = torch.topk(p, K, dim=-1)  # (P, K)
    stats.min_mass = min(stats.min_mass, float(w.sum(-1).min()))
    zs = [zeros[layer] for layer in layers]
    out = torch.full((B, len(layers), E_max), float("nan"), dtype=torch.float64, device=dev)
    F = [torch.zeros(B, len(experts[layer]), dtype=torch.float64, device=dev) for layer in layers]
    # Every (decision position, output token) pair of an input needs its own squared projection. Exact: one
    # backward product per (position slot, output token). Cheaper: ``probes`` random-sign probes, each one
    # product over all pairs at once, E[(Σ ε_j a_j)²] = Σ a_j² (unbiased, relative sd about √(2/probes)).
    starts = batch._starts
    n_pos = [starts[b + 1] - starts[b] for b in range(B)]
    sqrt_w = (w * picks.weight[:, None]).sqrt().to(logp.dtype)  # (P, K)
    n_exact = max(n_pos) * K
    if probes == 0 or n_exact <= probes:
        slot = torch.tensor([s_ for b in range(B) for s_ in range(n_pos[b])], device=dev)
        one = (slot[None, :] == torch.arange(max(n_pos), device=dev)[:, None]).to(logp.dtype)  # (S, P)
        coef = one[:, None, :, None] * torch.eye(K, dtype=logp.dtype, device=dev)[None, :, None, :]  # (S,K,P,K)
        coef = (coef * sqrt_w[None, None]).reshape(-1, *sqrt_w.shape)
    else:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + sum(batch.index))
        signs = (torch.randint(0, 2, (probes, *sqrt_w.shape), generator=gen) * 2 - 1).to(logp.dtype).to(dev)
        coef = signs * sqrt_w[None] / float(np.sqrt(probes))  # the mean over probes
    sel = logp.gather(1, idx)  # (P, K)
    for c0 in range(0, coef.shape[0], _CHUNK):
        go = coef[c0 : c0 + _CHUNK]
        g = torch.autograd.grad(sel, zs, grad_outputs=go, is_grads_batched=True, retain_graph=True,
                                allow_unused=True)
        stats.backward_products += go.shape[0]
        with torch.no_grad():
            for li in range(len(layers)):
                if g[li] is None:
                    continue
                proj = torch.einsum("jbth,ebth->jbe", g[li].double(), deltas[li].double())  # (J, B, E)
                F[li] += (proj**2).sum(0)
    for li, layer in enumerate(layers):
        out[:, li, torch.tensor(list(experts[layer]), device=dev)] = 0.5 * F[li]
    stats.backward_s += time.perf_counter() - t1
    return out.cpu().numpy()


class FastEstimator:
    """The :class:`~._engine.Estimator` of ``method="fast"``."""

    name = "fast"

    def __init__(self, moe: MoEModel, stack: Stack | None, cfg: CausalConfig, label_ids: torch.Tensor | None,
                 stats: FastStats | None = None) -> None:
        self.moe, self.stack, self.cfg, self.label_ids = moe, stack, cfg, label_ids
        self.stats = stats if stats is not None else FastStats()

    def estimate(self, batch: Batch, experts: Mapping[int, Sequence[int]]) -> np.ndarray:
        cfg = self.cfg
        return fast_batch(self.moe, self.stack, batch, experts, cfg.magnitude, self.label_ids, cfg.fast_outputs,
                          cfg.chunk_tokens, self.stats, cfg.fast_probes)
