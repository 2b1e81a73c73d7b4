"""``method="fisher"``: the second-order estimate of CE for every (layer, expert) at once.

With ``b_{l,i}`` a scalar added to logit ``i`` of layer ``l`` at the perturbed positions,
``KL(P‖Q_b) ≈ ½ m² F_{l,i}`` with ``F = E_{y~P}[(∂ log p(y)/∂b_{l,i})²]``. One forward pass adds a zero
tensor ``delta_l`` ``(B, E)`` (per input, so the inputs of a batch keep separate gradients) to every MoE
layer's logits; the gradients then come from a few batched backward passes:

* ``tokens`` route: one vector-Jacobian product per output token ``y`` of the top set covering
  ``fisher_mass`` of P (or per label token with ``target="labels"``);
* ``hidden`` route (linear LM heads, when the hidden size is smaller than that top set): one product per
  coordinate of the final hidden state ``h``; then ``∂z/∂b = W ∂h/∂b`` gives the expectation over the
  *full* vocabulary exactly.

Top-k selection is piecewise constant, so gradients flow only through the gate weights of the selected
experts; membership changes are invisible to this estimate. Its agreement with ``exact`` is measured:
on the demo (12 inputs per domain, decision positions) the median per-(domain, layer) Spearman is 0.58
(``fast``: 0.87), and an input with several decision positions needs one set of products per position
(49 s against 0.8 s for ``fast``). Kept for comparison; ``fast`` is the estimate to use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import CausalConfig
from ..errors import ConfigError
from ..models.adapters.base import RouterSite
from ..models.hooks import RouterHooks
from ..models.model import MoEModel
from ._engine import Batch, Stack, decision_logits, output_distribution

_VJP_CHUNK = 32  # vector-Jacobian products per batched backward pass (bounds memory)


@dataclass
class FisherStats:
    """Counters accumulated over batches: backward products, routes used, covered mass."""

    backward_products: int = 0
    routes: dict[str, int] = field(default_factory=dict)
    min_mass: float = 1.0
    forward_s: float = 0.0
    backward_s: float = 0.0

    def to_dict(self) -> dict:
        return {"backward_products": self.backward_products, "routes": dict(self.routes),
                "min_covered_mass": self.min_mass, "fisher_forward_s": round(self.forward_s, 4),
                "fisher_backward_s": round(self.backward_s, 4)}


def _delta_transform(delta: torch.Tensor, pmask: torch.Tensor) -> Callable[[RouterSite, torch.Tensor], torch.Tensor]:
    def transform(site: RouterSite, logits: torch.Tensor) -> torch.Tensor:
        add = pmask[..., None] * delta[:, None, :]  # (B, T, E)
        return logits + add.to(logits.dtype).reshape(logits.shape)

    return transform


def _vjps(
    out: torch.Tensor, inputs: list[torch.Tensor], n: int, one_hot: Callable[[int, int], torch.Tensor]
) -> list[list[torch.Tensor]]:
    """Gradients of ``n`` scalar projections of ``out``, in chunks: list (per chunk) of per-input ``(c, ...)``.

    ``one_hot(start, stop)`` builds the stacked grad_outputs ``(c, *out.shape)``. Uses batched backward
    passes (``is_grads_batched``) and falls back to a loop where an op has no batching rule.
    """
    res = []
    for s in range(0, n, _VJP_CHUNK):
        go = one_hot(s, min(n, s + _VJP_CHUNK))
        try:
            g = torch.autograd.grad(out, inputs, grad_outputs=go, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
        except RuntimeError:
            per = [torch.autograd.grad(out, inputs, grad_outputs=go[j], retain_graph=True, allow_unused=True)
                   for j in range(go.shape[0])]
            g = tuple(torch.stack([p[i] if p[i] is not None else torch.zeros_like(inputs[i]) for p in per])
                      for i in range(len(inputs)))
        res.append([x if x is not None else torch.zeros((go.shape[0], *inp.shape), dtype=inp.dtype,
                                                          device=inp.device) for x, inp in zip(g, inputs, strict=True)])
    return res


def fisher_batch(
    moe: MoEModel,
    stack: Stack | None,
    batch: Batch,
    experts: Mapping[int, Sequence[int]],
    magnitude: float,
    label_ids: torch.Tensor | None,
    mass: float,
    max_outputs: int,
    stats: FisherStats,
    route: str = "auto",
) -> np.ndarray:
    """Fisher CE estimates ``(B, L, E_max)`` float64 for one batch (NaN where not asked), averaged over
    each input's decision positions (one set of backward products per decision-position slot)."""
    import time

    layers = list(experts)
    B = batch.size
    E_max = max(moe.site(layer).num_experts for layer in layers)
    dev = batch.device
    picks = batch.all
    deltas = [torch.zeros(B, moe.site(layer).num_experts, device=dev, requires_grad=True) for layer in layers]
    transforms = {layer: _delta_transform(d, batch.pmask) for layer, d in zip(layers, deltas, strict=True)}
    t0 = time.perf_counter()
    with torch.enable_grad(), RouterHooks(moe, transforms=transforms):
        logits, h = decision_logits(moe, stack, batch)  # (P, V), (P, H) post-norm or None
    stats.forward_s += time.perf_counter() - t0
    t1 = time.perf_counter()
    logp, p = output_distribution(logits, label_ids)  # (P, V'): differentiable fp32, detached fp64
    P, V = p.shape
    if label_ids is not None:
        K, w, idx = V, p, torch.arange(V, device=dev).expand(P, V)
        route = "labels"  # the label tokens themselves: few, exact
    else:
        ps, order = torch.sort(p, dim=-1, descending=True)
        need = (torch.searchsorted(ps.cumsum(-1), torch.full((P, 1), mass, dtype=ps.dtype, device=dev)) + 1)
        need = need.clamp(max=V).squeeze(1)
        K = int(min(int(need.max()), max_outputs, V))
        idx = order[:, :K]
        w = ps[:, :K] * (torch.arange(K, device=dev)[None, :] < need[:, None])
        lin = stack.linear_head if stack is not None else None
        can_hidden = lin is not None and h is not None
        if route == "hidden" and not can_hidden:
            raise ConfigError("fisher_route='hidden' needs a plain linear LM head: use fisher_route='auto'")
        if route == "auto":
            route = "hidden" if (can_hidden and h is not None and h.shape[1] < K) else "tokens"
    F = torch.zeros(B, len(layers), E_max, dtype=torch.float64, device=dev)
    # Decision positions of one input share its delta: take them slot by slot (the s-th of every input).
    slots: dict[int, list[int]] = {}
    for b in range(B):
        for s_, j in enumerate(range(batch._starts[b], batch._starts[b + 1])):
            slots.setdefault(s_, []).append(j)
    for sel_pos in slots.values():
        sp = torch.tensor(sel_pos, device=dev)
        rows_b = picks.row.index_select(0, sp)  # (S,) input of each position
        wt = picks.weight.index_select(0, sp)  # (S,) 1 / n decision positions
        if route == "hidden":
            assert h is not None and stack is not None
            W = stack.linear_head[0].detach().double()  # type: ignore[index]  # (V, H)
            hs_ = h.index_select(0, sp)
            Hd = hs_.shape[1]

            def hot_h(s: int, t: int, hs_: torch.Tensor = hs_) -> torch.Tensor:
                go = torch.zeros(t - s, *hs_.shape, dtype=hs_.dtype, device=dev)
                go[torch.arange(t - s), :, torch.arange(s, t)] = 1.0
                return go

            chunks = _vjps(hs_, deltas, Hd, hot_h)
            pp = p.index_select(0, sp)  # (S, V)
            # G[l] (H, B, E_l): ∂h/∂b; J = W G per input (V, E); F = Σ_y p_y (J_y - p·J)² over the full vocab.
            for li in range(len(layers)):
                G = torch.cat([c[li] for c in chunks]).double().index_select(1, rows_b)  # (H, S, E)
                J = torch.einsum("vh,hse->sve", W, G)
                u = torch.einsum("sv,sve->se", pp, J)
                f = torch.einsum("sv,sve->se", pp, (J - u[:, None, :]) ** 2)
                F[:, li, : G.shape[2]].index_add_(0, rows_b, f * wt[:, None])
            stats.backward_products += Hd
        else:
            sel = logp.index_select(0, sp).gather(1, idx.index_select(0, sp))  # (S, K)

            def hot_y(s: int, t: int, sel: torch.Tensor = sel) -> torch.Tensor:
                go = torch.zeros(t - s, *sel.shape, dtype=sel.dtype, device=dev)
                go[torch.arange(t - s), :, torch.arange(s, t)] = 1.0
                return go

            chunks = _vjps(sel, deltas, K, hot_y)
            ws = w.index_select(0, sp)
            j0 = 0
            for c in chunks:
                n = c[0].shape[0]
                wj = ws[:, j0 : j0 + n].T.double()  # (n, S)
                for li in range(len(layers)):
                    g = c[li].double().index_select(1, rows_b)  # (n, S, E)
                    f = (wj[..., None] * g**2).sum(0)  # (S, E)
                    F[:, li, : g.shape[2]].index_add_(0, rows_b, f * wt[:, None])
                j0 += n
            stats.backward_products += K
    if route != "hidden" and label_ids is None:
        stats.min_mass = min(stats.min_mass, float(w.sum(-1).min()))
    stats.backward_s += time.perf_counter() - t1
    stats.routes[route] = stats.routes.get(route, 0) + 1
    out = (0.5 * magnitude**2 * F).detach().cpu().numpy()
    for li, layer in enumerate(layers):
        keep = np.zeros(E_max, bool)
        keep[list(experts[layer])] = True
        out[:, li, ~keep] = np.nan
    return out


class FisherEstimator:
    """The :class:`~._engine.Estimator` of ``method="fisher"``."""

    name = "fisher"

    def __init__(self, moe: MoEModel, stack: Stack | None, cfg: CausalConfig, label_ids: torch.Tensor | None,
                 stats: FisherStats | None = None) -> None:
        self.moe, self.stack, self.cfg, self.label_ids = moe, stack, cfg, label_ids
        self.stats = stats if stats is not None else FisherStats()

    def estimate(self, batch: Batch, experts: Mapping[int, Sequence[int]]) -> np.ndarray:
        cfg = self.cfg
        return fisher_batch(self.moe, self.stack, batch, experts, cfg.magnitude, self.label_ids, cfg.fisher_mass,
                            cfg.fisher_max_outputs, self.stats, cfg.fisher_route)
