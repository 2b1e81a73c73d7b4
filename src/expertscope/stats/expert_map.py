"""Expert representations in 2-D (docs/methods.md §6, paper App. B / Fig. 5): t-SNE of each expert's router row, mean
output or flattened weights, with KMeans clusters and driver experts marked.

Mean outputs run each expert's own MLP on a sample of real router inputs (the hidden states the router
sees, caught by a forward pre-hook), so every expert is measured on the same inputs whether or not the
model would have routed them there. Fused expert modules (``gate_up_proj (E, 2I, H)``, ``down_proj
(E, H, I)``) are computed like transformers' eager path (``integrations/moe.py``): ``act(gate) * up`` with
the module's own ``_apply_gate`` when it has one (GPT-OSS clamps and interleaves), transposed layouts and
biases included; ``nn.ModuleList`` experts are called directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..routing import DomainInput, as_domain_list, routing_pass

Representation = Literal["router", "output", "weights"]
REPRESENTATIONS = ("router", "output", "weights")


# ----- representations -----------------------------------------------------------------------------------
def router_vectors(model: Any) -> dict[int, np.ndarray]:
    """``{layer: (E, H)}``: each MoE layer's router weight rows (one per routed expert), float64."""
    out = {}
    for site in model.sites:
        w = getattr(site.module, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ModelError(f"router {site.path} has no weight matrix: use representation='output'")
        out[site.layer] = w.detach().float().cpu().numpy().astype(np.float64)[: site.num_experts]
    return out


def _fused_params(experts: nn.Module) -> list[tuple[str, torch.Tensor]]:
    names = ("gate_up_proj", "gate_up_proj_bias", "up_proj", "up_proj_bias", "down_proj", "down_proj_bias")
    return [(n, p) for n in names if isinstance(p := getattr(experts, n, None), torch.Tensor)]


def weight_vectors(model: Any) -> dict[int, np.ndarray]:
    """``{layer: (E, P)}``: each routed expert's parameters flattened (fused 3-D tensors sliced per expert),
    float32 → float64."""
    out = {}
    for site in model.sites:
        experts = getattr(site.block, "experts", None) if site.block is not None else None
        if experts is None:
            raise ModelError(f"no experts module found beside router {site.path}: use representation='router'")
        if isinstance(experts, nn.ModuleList):
            rows = [torch.cat([p.detach().float().reshape(-1) for p in e.parameters()]) for e in experts]
        else:
            params = _fused_params(experts)
            if not params:
                raise ModelError(f"{type(experts).__name__} stores no gate_up_proj/down_proj: use "
                                 "representation='router'")
            rows = [torch.cat([p[i].detach().float().reshape(-1) for _, p in params])
                    for i in range(site.num_experts)]
        out[site.layer] = torch.stack(rows).cpu().numpy().astype(np.float64)
    return out


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x @ w.T`` for ``w (out, in)``, or ``x @ w`` for a transposed ``w (in, out)``; plus ``bias``."""
    y = x @ w if transposed else torch.nn.functional.linear(x, w)
    return y + bias if bias is not None else y


def expert_forward(experts: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``i``'s MLP output on ``x (N, H)`` → ``(N, H)``, without the gate weight.

    ``ModuleList``: ``experts[i](x)``. Fused modules follow transformers' eager path: ``gate_up =
    x W_gu[i]^T (+ b)``, then ``experts._apply_gate(gate_up)`` if defined, else ``act_fn(gate) * up`` with
    ``gate, up = gate_up.chunk(2)``; modules without a gate (only ``up_proj``) use ``act_fn(up)``; finally
    ``down_proj``. ``is_transposed`` (GPT-OSS: ``(E, H, 2I)``) switches to ``x @ W``.
    """
    if isinstance(experts, nn.ModuleList):
        return experts[i](x)
    transposed = bool(getattr(experts, "is_transposed", False))
    gu = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, torch.Tensor):
        raise ModelError(f"{type(experts).__name__} has no fused down_proj: this experts module is not supported")
    x = x.to(down.dtype)
    if isinstance(gu, torch.Tensor):
        h = _linear(x, gu[i], _bias(experts, "gate_up_proj_bias", i), transposed)
        apply_gate = getattr(experts, "_apply_gate", None)
        if callable(apply_gate):
            h = apply_gate(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = _act_fn(experts)(gate) * up
    else:
        up_w = getattr(experts, "up_proj", None)
        if not isinstance(up_w, torch.Tensor):
            raise ModelError(f"{type(experts).__name__} has neither gate_up_proj nor up_proj: not supported")
        h = _act_fn(experts)(_linear(x, up_w[i], _bias(experts, "up_proj_bias", i), transposed))
    return _linear(h, down[i], _bias(experts, "down_proj_bias", i), transposed)


def _act_fn(experts: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The experts' activation (a module or a function the model set; nn.Module types it Tensor | Module)."""
    return cast(Callable[[torch.Tensor], torch.Tensor], experts.act_fn)


def _bias(experts: nn.Module, name: str, i: int) -> torch.Tensor | None:
    b = getattr(experts, name, None)
    return b[i] if isinstance(b, torch.Tensor) else None


def router_inputs(
    model: Any,
    domains: DomainInput,
    n_tokens: int = 1024,
    batch_size: int = 8,
    max_length: int | None = 512,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """``{layer: (n, H)}``: hidden states each router received for real (non-padding) tokens.

    A forward pre-hook on every router catches its input; texts are taken round-robin across domains until
    ``n_tokens`` real tokens are collected, then (if more were caught) a seeded sample of ``n_tokens`` rows,
    the same rows at every layer.
    """
    doms = as_domain_list(domains)
    # Interleave domains so a small n_tokens still covers every domain.
    queues = [list(d.texts) for d in doms]
    texts = [q[j] for j in range(max((len(q) for q in queues), default=0)) for q in queues if j < len(q)]
    if not texts:
        raise ConfigError("no texts to compute expert outputs on: pass domains with texts")
    caught: dict[int, list[torch.Tensor]] = {s.layer: [] for s in model.sites}
    batch: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            h = args[0]
            batch[layer] = h.reshape(-1, h.shape[-1]).detach()
        return hook

    handles = [s.module.register_forward_pre_hook(make_hook(s.layer)) for s in model.sites]
    total = 0
    try:
        for routed in routing_pass(model, {"texts": texts}, batch_size, max_length, record=False):
            real = routed.real()
            for layer, h in batch.items():
                if h.shape[0] == real.numel():  # routers that see only real tokens need no mask
                    h = h[real.to(h.device)]
                caught[layer].append(h.float().cpu())
            batch.clear()
            total += int(real.sum())
            if total >= n_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
    out = {layer: torch.cat(v) for layer, v in caught.items() if v}
    n = min(v.shape[0] for v in out.values())
    keep = np.sort(np.random.default_rng(seed).choice(n, size=min(n, n_tokens), replace=False))
    return {layer: v[:n][torch.as_tensor(keep)] for layer, v in out.items()}


def output_vectors(
    model: Any, inputs: dict[int, torch.Tensor], batch_rows: int = 4096
) -> dict[int, np.ndarray]:
    """``{layer: (E, H)}``: each routed expert's mean output over that layer's router ``inputs (n, H)``."""
    out = {}
    for site in model.sites:
        experts = getattr(site.block, "experts", None) if site.block is not None else None
        if experts is None:
            raise ModelError(f"no experts module found beside router {site.path}: use representation='router'")
        x_all = inputs[site.layer]
        device = next((p.device for p in experts.parameters() if p.device.type != "meta"), torch.device("cpu"))
        means = []
        with torch.no_grad():
            for i in range(site.num_experts):
                acc = torch.zeros(x_all.shape[1], dtype=torch.float64)
                for s in range(0, x_all.shape[0], batch_rows):
                    acc += expert_forward(experts, i, x_all[s:s + batch_rows].to(device)).double().sum(0).cpu()
                means.append(acc / max(x_all.shape[0], 1))
        out[site.layer] = torch.stack(means).numpy()
    return out


# ----- embedding -----------------------------------------------------------------------------------------
def valid_perplexity(n: int, perplexity: float | None = None) -> float:
    """A t-SNE perplexity scikit-learn accepts for ``n`` points (it needs ``perplexity < n``).

    Default ``min(30, (n - 1) / 3)`` (the usual rule of thumb of about three neighbours per perplexity unit),
    at least 1; a requested value is capped at ``n - 1`` (minus a margin) for small expert counts.
    """
    if n < 2:
        return 1.0
    p = min(30.0, max(1.0, (n - 1) / 3.0)) if perplexity is None else float(perplexity)
    if p <= 0:
        raise ConfigError(f"perplexity must be positive, got {perplexity}: pass e.g. --perplexity 5")
    return float(min(p, max(0.5, n - 1.5)))


def embed(
    features: np.ndarray, k: int = 5, seed: int = 0, perplexity: float | None = None, pca_dims: int = 50
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """2-D t-SNE coordinates ``(n, 2)`` and KMeans labels ``(n,)`` of ``features (n, d)``.

    Features are centred and PCA-reduced to at most ``pca_dims`` components first (the usual t-SNE
    preprocessing; also how flattened weights are reduced). With fewer than 4 points t-SNE is meaningless,
    so the first two PCA components are returned instead. KMeans uses ``min(k, distinct points)`` clusters
    on the reduced features (not on the 2-D map, whose distances t-SNE does not preserve).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    info: dict[str, Any] = {"n_points": n, "input_dims": int(x.shape[1]) if x.ndim == 2 else 0}
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0, np.int64), info
    x = x - x.mean(axis=0, keepdims=True)
    n_comp = int(min(pca_dims, n, x.shape[1]))
    reduced = PCA(n_components=n_comp, random_state=seed).fit_transform(x) if n_comp >= 1 and n > 1 else x
    info["pca_dims"] = int(reduced.shape[1])
    if n < 4:
        xy = np.zeros((n, 2))
        xy[:, : min(2, reduced.shape[1])] = reduced[:, :2]
        info.update(method="pca", perplexity=None)
    else:
        p = valid_perplexity(n, perplexity)
        tsne = TSNE(n_components=2, perplexity=p, random_state=seed, init="pca" if n > 4 else "random",
                    learning_rate="auto", max_iter=1000)
        xy = tsne.fit_transform(reduced)
        info.update(method="tsne", perplexity=p, kl_divergence=float(tsne.kl_divergence_))
    distinct = len(np.unique(np.round(reduced, 12), axis=0))
    n_clusters = int(max(1, min(k, distinct)))
    labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(reduced) if n > 1 \
        else np.zeros(n, np.int64)
    info["k"] = n_clusters
    return xy, labels.astype(np.int64), info


def expert_map(
    model: Any,
    profile: Any = None,
    representation: Representation = "router",
    k: int = 5,
    seed: int = 0,
    perplexity: float | None = None,
    drivers: Any = None,
    domains: DomainInput | None = None,
    scope: Literal["all", "layer"] = "all",
    n_tokens: int = 1024,
    batch_size: int = 8,
    max_length: int | None = 512,
) -> pd.DataFrame:
    """2-D map of the routed experts: ``layer, expert, x, y, cluster`` (+ ``is_driver``, ``activation_rate``).

    ``representation``: ``"router"`` (router weight rows, ``(E, H)`` per layer), ``"output"`` (mean expert
    output on ``n_tokens`` router inputs from ``domains``, ``(E, H)``), ``"weights"`` (flattened expert
    parameters, PCA-reduced). ``scope="all"`` embeds every (layer, expert) together (as the paper's Fig. 5),
    ``"layer"`` embeds each layer separately (coordinates then compare only within a layer). ``drivers``
    (rows ``domain, layer, expert, is_driver``) adds ``is_driver`` (a driver of any domain) and
    ``driver_domains``; ``profile`` (a :class:`RoutingProfile`) adds ``activation_rate`` over all its tokens.
    t-SNE/KMeans settings actually used (perplexity capped for few experts) are in ``df.attrs``.
    """
    if representation not in REPRESENTATIONS:
        raise ConfigError(f"representation={representation!r} is not valid: use one of {REPRESENTATIONS}")
    if profile is not None:
        from ..validation import check_type
        from .profile import RoutingProfile

        check_type(profile, RoutingProfile, "profile", "a RoutingProfile (es.profile(...) or RoutingProfile.load)")
    if scope not in ("all", "layer"):
        raise ConfigError(f"scope={scope!r} is not valid: use 'all' or 'layer'")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}: pass e.g. k=5")
    if representation == "router":
        vecs = router_vectors(model)
    elif representation == "weights":
        vecs = weight_vectors(model)
    else:
        if domains is None:
            raise ConfigError("representation='output' needs texts to run the experts on: pass domains=...")
        vecs = output_vectors(model, router_inputs(model, domains, n_tokens, batch_size, max_length, seed))
    layers = sorted(vecs)
    groups = [layers] if scope == "all" else [[layer] for layer in layers]
    if scope == "all" and len({vecs[layer].shape[1] for layer in layers}) > 1:
        groups = [[layer] for layer in layers]  # layers of different widths cannot share one space
    frames, infos = [], []
    for group in groups:
        feats = np.concatenate([vecs[layer] for layer in group])
        xy, labels, info = embed(feats, k=k, seed=seed, perplexity=perplexity)
        infos.append({"layers": group, **info})
        frames.append(pd.DataFrame({
            "layer": np.concatenate([[layer] * len(vecs[layer]) for layer in group]).astype(int),
            "expert": np.concatenate([np.arange(len(vecs[layer])) for layer in group]).astype(int),
            "x": xy[:, 0], "y": xy[:, 1], "cluster": labels,
        }))
    df = pd.concat(frames, ignore_index=True)
    df["representation"] = representation
    if drivers is not None:
        ddf = getattr(drivers, "df", drivers)
        flagged = ddf[ddf["is_driver"].astype(bool)] if ddf is not None and len(ddf) else None
        by_key: dict[tuple[int, int], list[str]] = {}
        if flagged is not None:
            for r in flagged.itertuples():
                by_key.setdefault((int(r.layer), int(r.expert)), []).append(str(r.domain))
        keys = list(zip(df["layer"], df["expert"], strict=True))
        df["is_driver"] = [key in by_key for key in keys]
        df["driver_domains"] = [",".join(sorted(by_key.get(key, []))) for key in keys]
    if profile is not None:
        n, tot = profile.totals()
        rate = tot["sel"].sum(axis=0) / max(int(n.sum()), 1)  # (L, E)
        lpos = {layer: j for j, layer in enumerate(profile.layers)}
        df["activation_rate"] = [float(rate[lpos[la], e]) if la in lpos and e < rate.shape[1] else np.nan
                                 for la, e in zip(df["layer"], df["expert"], strict=True)]
    df.attrs = {"representation": representation, "scope": scope, "seed": seed, "k": k, "embeddings": infos}
    return df


__all__ = ["expert_forward", "expert_map", "output_vectors", "router_inputs", "router_vectors", "valid_perplexity",
           "weight_vectors"]
