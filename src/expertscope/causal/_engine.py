"""Building blocks of the causal-effect engine: batches, the clean run with its cached layer inputs, the
restart at a decoder layer, the LM head at the prediction position only, KL in float64, and the skip rule.

Shapes: ``B`` inputs of a batch, ``T`` padded length, ``H`` hidden size, ``V`` vocabulary, ``E`` experts,
``R`` rows of a perturbed run (one row = one input with one expert perturbed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.adapters.base import RouterSite
from ..models.hooks import RouterHooks
from ..models.model import MoEModel
from ..routing import pad_ids

_INT_RE = re.compile(r"^\d+$")

#: Families whose weights over the selected set do not depend on unselected logits (renormalised softmax
#: top-k, or top-k then softmax): an expert that stays outside every top-k changes nothing.
_RENORMALISING = {"mixtral", "gpt-oss", "granitemoe"}


@dataclass
class Batch:
    """One batch of inputs, right-padded.

    ``index`` ``(B,)`` global input indices; ``input_ids``/``attention_mask`` ``(B, T)``; ``pos`` ``(B,)`` the
    prediction position (last real token); ``pmask`` ``(B, T)`` float, 1 at the perturbed positions.
    """

    index: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pos: torch.Tensor
    pmask: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.index)


def make_batch(
    index: Sequence[int], token_ids: Sequence[Sequence[int]], pad_id: int, positions: str, device: torch.device
) -> Batch:
    """Right-pad the token id lists of one batch; ``positions`` ``"all"`` (real tokens) or ``"last"``."""
    B, T = len(token_ids), max(len(t) for t in token_ids)
    ids, mask = pad_ids(token_ids, pad_id)
    pos = mask.sum(1) - 1
    if positions == "last":
        pmask = torch.zeros((B, T))
        pmask[torch.arange(B), pos] = 1.0
    else:
        pmask = mask.float()
    return Batch(list(index), ids.to(device), mask.to(device), pos.to(device), pmask.to(device))


# ----- the model's decoder stack -------------------------------------------------------------------
@dataclass
class Stack:
    """Where to restart: the decoder-layer list, the final norm and the LM head (with its post-scaling)."""

    layers: nn.ModuleList
    base: nn.Module
    norm: nn.Module
    head: nn.Module
    logits_scaling: float = 1.0

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM-head logits from post-norm hidden states ``(R, H)`` → ``(R, V)``."""
        out = self.head(h)
        return out / self.logits_scaling if self.logits_scaling != 1.0 else out

    @property
    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(W_eff (V, H), bias)`` when the head is one linear map (used by the Fisher hidden route)."""
        if type(self.head) is not nn.Linear:
            return None
        w = self.head.weight / self.logits_scaling
        b = None if self.head.bias is None else self.head.bias / self.logits_scaling
        return w, b


def find_stack(moe: MoEModel) -> Stack | None:
    """The decoder stack holding the routers, or None when the model is not laid out as expected."""
    model = moe.model
    modules = dict(model.named_modules())
    parts = moe.sites[0].path.split(".")
    k = next((i for i, p in enumerate(parts) if _INT_RE.match(p)), None)
    if k is None or k == 0:
        return None
    container = modules.get(".".join(parts[:k]))
    base = modules.get(".".join(parts[: k - 1])) if k > 1 else model
    if not isinstance(container, nn.ModuleList) or base is None:
        return None
    norm = next((getattr(base, n) for n in ("norm", "final_layernorm", "ln_f")
                 if isinstance(getattr(base, n, None), nn.Module)), None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if norm is None or head is None:
        return None
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return None  # a non-linear head: the generic full-forward path handles it
    scaling = float(getattr(config, "logits_scaling", 1.0) or 1.0)
    return Stack(layers=container, base=base, norm=norm, head=head, logits_scaling=scaling)


def _select_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Index the batch dimension of captured layer kwargs (masks, position ids/embeddings) by ``rows``.

    Only tensors with at least 2 dims whose first dim is the batch are indexed; broadcast tensors (first dim
    1 with B > 1) and 1-D tensors (e.g. cache positions) are passed as they are.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            return value.index_select(0, rows)
        return value
    if isinstance(value, tuple | list):
        return type(value)(_select_rows(v, rows, batch) for v in value)
    return value


@dataclass
class CleanRun:
    """The clean run of a batch.

    ``logits`` ``(B, V)`` at the prediction positions; ``inputs[i]`` the ``(args, kwargs)`` decoder layer ``i``
    received (cached for restarts); ``router_logits[layer]`` ``(B*T, E)`` fp32, batch-major.
    """

    logits: torch.Tensor
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    router_logits: dict[int, torch.Tensor] = field(default_factory=dict)


def clean_run(
    moe: MoEModel, stack: Stack | None, batch: Batch, capture_from: int | None, record: Sequence[int]
) -> CleanRun:
    """Run the batch once, caching every decoder layer's inputs from ``capture_from`` on."""
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []
    if stack is not None and capture_from is not None:
        for i in range(capture_from, len(stack.layers)):
            def pre(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                inputs[i] = (args, dict(kwargs))

            handles.append(stack.layers[i].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with RouterHooks(moe, record=list(record)) as hooks, torch.no_grad():
            if stack is not None:
                out = stack.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                h = out[0] if isinstance(out, tuple) else out.last_hidden_state
                logits = stack.logits(h[torch.arange(batch.size, device=h.device), batch.pos])
            else:
                logits = full_logits(moe, batch.input_ids, batch.attention_mask, batch.pos)
    finally:
        for hd in handles:
            hd.remove()
    router = {layer: hooks.calls[layer][0].logits for layer in record}
    return CleanRun(logits=logits, inputs=inputs, router_logits=router)


def full_logits(
    moe: MoEModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """The model's own logits at ``pos`` ``(R,)`` from a full forward (generic path) → ``(R, V)``."""
    keep, where = torch.unique(pos, return_inverse=True)
    out = moe.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
    return out.logits[torch.arange(len(pos), device=pos.device), where]


def restart(
    stack: Stack, clean: CleanRun, batch: Batch, layer: int, rows: torch.Tensor
) -> torch.Tensor:
    """Re-run decoder layers ``layer..`` on the cached input of ``layer`` for batch rows ``rows`` ``(R,)``;
    only the prediction position of each row reaches the final norm and the LM head → logits ``(R, V)``.

    Any router transform must be installed by the caller (``RouterHooks``) around this call.
    """
    B = batch.size
    args, _ = clean.inputs[layer]
    h = args[0] if args else clean.inputs[layer][1]["hidden_states"]
    h = h.index_select(0, rows)
    for i in range(layer, len(stack.layers)):
        a, kw = clean.inputs[i]
        kw = {k: _select_rows(v, rows, B) for k, v in kw.items() if k != "hidden_states"}
        out = stack.layers[i](h, *[_select_rows(v, rows, B) for v in a[1:]], **kw)
        h = out[0] if isinstance(out, tuple) else out
    last = h[torch.arange(len(rows), device=h.device), batch.pos.index_select(0, rows)]
    return stack.logits(stack.norm(last))


def perturb_transform(
    batch: Batch, rows: torch.Tensor, experts: torch.Tensor, magnitude: float
) -> Callable[[RouterSite, torch.Tensor], torch.Tensor]:
    """A router transform adding ``magnitude`` to expert ``experts[r]``'s logit in row ``r`` at the
    perturbed positions of input ``rows[r]``; the router sees logits ``(R*T, E)``."""
    pm = batch.pmask.index_select(0, rows)  # (R, T)

    def transform(site: RouterSite, logits: torch.Tensor) -> torch.Tensor:
        R, T = pm.shape
        delta = torch.zeros((R, T, site.num_experts), dtype=logits.dtype, device=logits.device)
        delta.scatter_(2, experts.view(R, 1, 1).expand(R, T, 1), (magnitude * pm).to(logits.dtype).unsqueeze(-1))
        return logits + delta.view(logits.shape)

    return transform


# ----- KL and the skip rule ------------------------------------------------------------------------
def log_probs(logits: torch.Tensor, label_ids: torch.Tensor | None) -> torch.Tensor:
    """float64 log-probabilities ``(R, V)`` (or over the label tokens ``(R, K)``, renormalised)."""
    x = logits.double()
    if label_ids is not None:
        x = x.index_select(1, label_ids)
    return torch.log_softmax(x, dim=-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(P‖Q)`` per row in float64; ``logp``, ``logq`` ``(R, V)``."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def can_skip(site: RouterSite) -> bool:
    """Whether the skip rule is provably safe for this router family (renormalising top-k only)."""
    if site.family in _RENORMALISING:
        return True
    return site.family == "qwen-moe" and bool(site.info.get("norm_topk_prob", False))


def skip_mask(
    router_logits: torch.Tensor, batch: Batch, site: RouterSite, experts: Sequence[int], magnitude: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(B, len(experts))`` bool: the perturbation provably changes nothing for that input.

    For a renormalising top-k router, adding ``m`` to expert ``e`` changes neither the selection nor the
    weights over the selected set if at every perturbed token ``max(z_e, z_e + m)`` lies strictly below the
    k-th largest logit of the other experts. A margin of a few units of the router dtype's rounding keeps
    the rule safe against rounding ties in the model's own softmax/top-k.
    """
    B, T = batch.input_ids.shape
    E, k = site.num_experts, site.top_k
    z = router_logits.float().view(B, T, E)
    top = torch.topk(z, min(k + 1, E), dim=-1).values  # (B, T, k+1)
    kth, next_ = top[..., k - 1 : k], top[..., min(k, E - 1) : min(k, E - 1) + 1]
    ex = torch.as_tensor(list(experts), device=z.device)
    ze = z.index_select(2, ex)  # (B, T, n)
    # The k-th largest of the *other* experts: the (k+1)-th overall if e is (or ties into) the top-k.
    kth_other = torch.where(ze >= kth, next_.expand_as(ze), kth.expand_as(ze)) if k < E else \
        torch.full_like(ze, float("-inf"))
    high = torch.maximum(ze, ze + magnitude)
    eps = torch.finfo(dtype).eps
    margin = 16 * eps * (1.0 + ze.abs() + abs(magnitude) + kth_other.abs())
    safe = (high < kth_other - margin) | (batch.pmask[..., None] == 0)
    return safe.all(dim=1)
