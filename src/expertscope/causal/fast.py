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

``Δ`` is computed one of two ways. Where the block's output is ``Σ_j w_j(z) f_j(x)`` plus terms the routing does
not touch (shared experts), it is ``Σ_j (w_j(z + m·e_i) − w_j(z)) f_j(x)``: every expert's output ``f_j`` once per
token (the adapter's :meth:`~expertscope.models.adapters.base.RouterAdapter.all_expert_outputs`) and the routing
weights before and after from the adapter's own ``site_route``, instead of the block rerun once per (expert,
token) with the top-k experts and the shared ones each time (measured on 28 x 64 top-6 with two shared experts,
hidden 64: ``fast`` 1.92x faster, its local part 2.84x; on 32 x 8 top-2 1.06x and 1.18x:
``benchmarks/bench_fast_local.py``). That identity is checked per layer and batch against the block itself on
:data:`CHECK_ROWS` rows; where it does not hold (a family whose block computes otherwise), the block is rerun, and
``fast_stats`` counts the (layer, batch) pairs each way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import CausalConfig
from ..errors import ConfigError, ModelError
from ..models.adapters.base import RouterSite
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
    #: (layer, batch) local changes from the routing weights and each expert's output, and by rerunning the block
    decomposed: int = 0
    rerun: int = 0
    notes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backward_products": self.backward_products, "local_tokens": self.local_rows,
                "min_covered_mass": round(self.min_mass, 6), "fast_forward_s": round(self.forward_s, 4),
                "fast_backward_s": round(self.backward_s, 4), "fast_local_s": round(self.local_s, 4),
                "local_decomposed": self.decomposed, "local_rerun": self.rerun}


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


#: How the local change is computed: "auto" (decomposed where it checks out against the block, else the block
#: rerun) or "rerun" (always the block; the reference the tests compare against).
LOCAL = "auto"
#: Rows of a layer's batch the decomposition is checked on against the block, and the check's tolerance: the
#: error's norm at most this share of the rerun change's, plus a few rounding units of the block's output.
CHECK_ROWS = 16
CHECK_RTOL = 1e-2


class _RouterInput:
    """Context manager: keeps the input of ``site``'s router module ``(N, H)`` from the calls made while active
    (the last one); the hook is removed on exit."""

    def __init__(self, site: RouterSite) -> None:
        self.site: RouterSite = site
        self.value: torch.Tensor | None = None
        self._handle: Any = None

    def _keep(self, _m: nn.Module, args: tuple) -> None:
        if args:
            self.value = args[0].detach()

    def __enter__(self) -> _RouterInput:
        self._handle = self.site.module.register_forward_pre_hook(self._keep)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def decomposed_delta(site: RouterSite, hidden: torch.Tensor, logits: torch.Tensor, pmask: torch.Tensor,
                     experts: Sequence[int], magnitude: float, chunk_tokens: int) -> torch.Tensor:
    """``Σ_j (w_j(z + m·e_i) − w_j(z)) f_j(x)`` ``(len(experts), N, H)`` fp32 for each asked expert ``i``: the
    change of a block whose output is its routed experts' outputs weighted by the routing (plus terms the routing
    does not touch). ``hidden`` ``(N, H)`` the router's input, ``logits`` ``(N, E)`` its logits, ``pmask`` ``(N,)``
    the perturbed tokens; the weights are the adapter's ``site_route`` on logits in the router's dtype (where the
    block adds ``m``), the outputs ``f_j`` its ``all_expert_outputs``. Tokens are taken in chunks whose every
    expert's outputs hold ``chunk_tokens`` rows (the block rerun's budget)."""
    adapter, E = site.adapter, site.num_experts
    N = hidden.shape[0]
    dt = getattr(site.module, "weight", logits).dtype
    z = logits.to(dt)
    ex = torch.as_tensor(list(experts), device=z.device)
    on = (pmask.reshape(-1) > 0).to(dt)[:, None]  # (N, 1): the perturbed tokens
    out = torch.zeros(len(ex), N, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    step = max(1, chunk_tokens // max(E, 1))
    for s0 in range(0, N, step):
        sl = slice(s0, min(N, s0 + step))
        zc = z[sl]
        f = adapter.all_expert_outputs(site, hidden[sl])  # (n, E, H)
        f = f.float()
        n = zc.shape[0]
        idx0, wt0 = adapter.site_route(site, zc)
        w0 = _dense(idx0, wt0, E)  # (n, E)
        # the asked experts' perturbed logits, a slice of them at once (at most chunk_tokens rows in all), the +m in
        # the router's dtype as the block adds it; the change of the weights times every expert's output
        step_j = max(1, chunk_tokens // n)
        for j0 in range(0, len(ex), step_j):
            js = ex[j0 : j0 + step_j]
            zj = zc.unsqueeze(0).repeat(len(js), 1, 1)
            zj[torch.arange(len(js), device=z.device), :, js] += on[sl, 0] * magnitude
            idx, wt = adapter.site_route(site, zj.reshape(-1, E))
            dw = _dense(idx, wt, E).reshape(len(js), n, E) - w0  # (J, n, E)
            out[j0 : j0 + len(js), sl] = torch.bmm(dw.transpose(0, 1), f).transpose(0, 1)  # (J, n, H)
    return out


def _dense(idx: torch.Tensor, w: torch.Tensor, E: int) -> torch.Tensor:
    """``(N, E)`` fp32 routing weights from a selection ``idx`` and its weights ``w`` ``(N, k)`` (zero elsewhere)."""
    return torch.zeros(idx.shape[0], E, dtype=torch.float32, device=w.device).scatter_add_(1, idx, w.float())


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
            with RouterHooks(moe, record=[layer]) as rec, _RouterInput(site) as rin:
                base = _hidden(blk(xin)).reshape(B, T, -1)
            zl = rec.calls[layer][0].logits  # (B·T, E) the router's logits
            if can_skip(site):
                live = ~unchanged_tokens(zl, batch, site, ex, magnitude, moe.dtype)
            else:
                live = (batch.pmask > 0)[..., None].expand(B, T, len(ex))
            jj, bb, tt = torch.nonzero(live.permute(2, 0, 1), as_tuple=True)  # (N,) each
            stats.local_rows += len(jj)
            ex_t = torch.tensor(ex, device=dev)

            def rerun(j_: torch.Tensor, b_: torch.Tensor, t_: torch.Tensor, layer: int = layer,
                      blk: nn.Module = blk, xin: torch.Tensor = xin, base: torch.Tensor = base,
                      ex_t: torch.Tensor = ex_t) -> torch.Tensor:
                """The block's own change at rows (asked expert j_, input b_, token t_): ``(rows, H)``."""
                out = []
                for s in range(0, len(j_), chunk_tokens):  # the memory budget: tokens of one MoE call
                    cols = ex_t.index_select(0, j_[s : s + chunk_tokens])
                    b1, t1 = b_[s : s + chunk_tokens], t_[s : s + chunk_tokens]

                    def tf(_site: Any, z: torch.Tensor, cols: torch.Tensor = cols) -> torch.Tensor:
                        return z.index_put((torch.arange(len(cols), device=z.device), cols),
                                           torch.full_like(cols, 0, dtype=z.dtype) + magnitude, accumulate=True)

                    with RouterHooks(moe, transforms={layer: tf}):
                        out.append(_hidden(blk(xin[b1, t1][None])).reshape(len(cols), -1) - base[b1, t1])
                return torch.cat(out) if out else base.new_zeros(0, base.shape[-1])

            d = _decomposed(site, rin.value, zl, batch, ex, magnitude, chunk_tokens, live, (jj, bb, tt), rerun,
                            base) if LOCAL == "auto" and len(jj) else None
            if d is None:
                stats.rerun += 1
                d = torch.zeros(len(ex), B, T, base.shape[-1], dtype=base.dtype, device=dev)
                if len(jj):
                    d[jj, bb, tt] = rerun(jj, bb, tt).to(d.dtype)
            else:
                stats.decomposed += 1
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


def _decomposed(site: RouterSite, hidden: torch.Tensor | None, logits: torch.Tensor, batch: Batch, ex: list[int],
                magnitude: float, chunk_tokens: int, live: torch.Tensor,
                rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                rerun: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                base: torch.Tensor) -> torch.Tensor | None:
    """The layer's local changes ``(len(ex), B, T, H)`` by :func:`decomposed_delta` (zero where ``live`` says the
    output cannot change), or None where that is not available or disagrees with the block's own ``rerun`` on
    :data:`CHECK_ROWS` rows spread over the live ones (the error's norm above :data:`CHECK_RTOL` of the change's
    plus 8 rounding units of the block's output)."""
    B, T, H = base.shape
    if hidden is None or hidden.reshape(-1, hidden.shape[-1]).shape[0] != B * T or logits.shape[0] != B * T:
        return None
    try:
        flat = decomposed_delta(site, hidden.reshape(B * T, -1), logits, batch.pmask, ex, magnitude, chunk_tokens)
    except ModelError:  # the adapter cannot give each expert's output for this block
        return None
    d = flat.reshape(len(ex), B, T, -1)
    if d.shape[-1] != H:
        return None
    d = d * live.permute(2, 0, 1)[..., None]
    jj, bb, tt = rows
    pick = torch.linspace(0, len(jj) - 1, min(CHECK_ROWS, len(jj))).round().long().unique()
    ref = rerun(jj[pick], bb[pick], tt[pick]).float()
    err = float((d[jj[pick], bb[pick], tt[pick]] - ref).norm())
    eps = torch.finfo(base.dtype).eps if base.dtype.is_floating_point else 0.0
    if err > CHECK_RTOL * float(ref.norm()) + 8 * eps * float(base[bb[pick], tt[pick]].float().norm()) + 1e-30:
        return None
    return d.to(base.dtype)


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
