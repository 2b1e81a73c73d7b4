"""Building blocks of the causal-effect engine: batches, the clean run with its cached layer inputs, the
restart at a decoder layer, the LM head at the decision positions only, KL in float64, and the skip rule.

Shapes: ``B`` inputs of a batch, ``T`` padded length, ``H`` hidden size, ``V`` vocabulary, ``E`` experts,
``R`` rows of a perturbed run (one row = one input with one expert perturbed).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
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
class Picks:
    """The decision positions of some rows of a perturbed run, flattened.

    ``row`` ``(P,)`` the row (0..R-1) each position belongs to; ``pos`` ``(P,)`` its token position;
    ``clean`` ``(P,)`` its index into the clean run's decision logits; ``weight`` ``(P,)`` float64, one over
    its input's number of decision positions (so a weighted sum per row is that row's mean).
    """

    row: torch.Tensor
    pos: torch.Tensor
    clean: torch.Tensor
    weight: torch.Tensor

    def row_mean(self, values: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Per-row mean ``(R,)`` of per-position ``values`` ``(P,)``."""
        out = torch.zeros(n_rows, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.row, values * self.weight.to(values.dtype))


@dataclass
class Batch:
    """One batch of inputs, right-padded.

    ``index`` ``(B,)`` global input indices; ``input_ids``/``attention_mask`` ``(B, T)``; ``decisions[b]``
    the decision positions of input ``b`` (ascending); ``pmask`` ``(B, T)`` float, 1 at the perturbed
    positions; ``all`` the :class:`Picks` of every input, in input order (the clean run's logit rows).
    """

    index: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    decisions: list[list[int]]
    pmask: torch.Tensor
    all: Picks = field(init=False)

    def __post_init__(self) -> None:
        starts = [0]
        for d in self.decisions:
            starts.append(starts[-1] + len(d))
        self._starts = starts
        self.all = self.picks(list(range(self.size)))

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def n_decisions(self) -> int:
        return self._starts[-1]

    def picks(self, rows: Sequence[int]) -> Picks:
        """The decision positions of the inputs ``rows`` (row ``r`` of a run is input ``rows[r]``)."""
        r: list[int] = []
        t: list[int] = []
        c: list[int] = []
        w: list[float] = []
        for j, b in enumerate(rows):
            d = self.decisions[b]
            r += [j] * len(d)
            t += d
            c += range(self._starts[b], self._starts[b + 1])
            w += [1.0 / len(d)] * len(d)
        dev = self.device
        return Picks(torch.tensor(r, dtype=torch.long, device=dev), torch.tensor(t, dtype=torch.long, device=dev),
                     torch.tensor(c, dtype=torch.long, device=dev), torch.tensor(w, dtype=torch.float64, device=dev))


def make_batch(
    index: Sequence[int], token_ids: Sequence[Sequence[int]], pad_id: int, positions: str, device: torch.device,
    decisions: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Right-pad the token id lists of one batch.

    ``decisions[b]``: input ``b``'s decision positions (default: its last real token). ``positions``
    ``"all"`` perturbs every real token, ``"last"`` the first decision position and every later real token.
    """
    ids, mask = pad_ids(token_ids, pad_id)
    dec = [[len(t) - 1] for t in token_ids] if decisions is None else [sorted(int(x) for x in d) for d in decisions]
    if any(not d or d[0] < 0 or d[-1] >= len(t) for d, t in zip(dec, token_ids, strict=True)):
        raise ValueError("every input needs at least one decision position inside its tokens")
    if positions == "last":
        first = torch.tensor([d[0] for d in dec])
        pmask = (torch.arange(ids.shape[1])[None, :] >= first[:, None]).float() * mask.float()
    else:
        pmask = mask.float()
    return Batch(list(index), ids.to(device), mask.to(device), dec, pmask.to(device))


class Estimator(Protocol):
    """One way of computing CE for a batch (``exact``, ``fast``, ``fisher``), built from ``(moe, stack,
    config, label_ids)``; ``stats`` holds its counters (``to_dict()`` for the result's settings)."""

    name: str
    stats: Any

    def estimate(self, batch: Batch, experts: Mapping[int, Sequence[int]]) -> np.ndarray:
        """CE ``(B, L, E_max)`` float64 for ``batch``, layers in ``experts``' order, NaN where not asked."""
        ...


# ----- the model's decoder stack -------------------------------------------------------------------
@dataclass
class Stack:
    """Where to restart: the decoder-layer list, the final norm and the LM head (with its post-scaling)."""

    layers: nn.ModuleList
    base: nn.Module
    norm: nn.Module
    head: nn.Module
    logits_scaling: float = 1.0
    cache_kw: str | None = None
    #: The MoE block of the last decoder layer (None: that layer has no router we know of). Nothing after it
    #: mixes positions, so in a restart it runs at the decision positions only (:func:`tail_only_at`).
    tail: nn.Module | None = None

    def runs_tail(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` is the last one and its MoE block runs at the decision positions only."""
        return self.tail is not None and layer == len(self.layers) - 1

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
    last = len(container) - 1
    block = next((s.block for s in moe.sites if s.layer == last and s.block is not None), None)
    if block is not None and not any(m is block for m in container[last].modules()):
        block = None
    return Stack(layers=container, base=base, norm=norm, head=head, logits_scaling=scaling,
                 cache_kw=cache_keyword(container[0]), tail=block)


#: The names under which decoder layers take their key/value store: ``cache`` (transformers >= 5.24, where
#: ``past_key_values`` is deprecated and ignored when ``cache`` is also passed) and ``past_key_values``.
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(layer: nn.Module, passed: Mapping[str, Any] | None = None) -> str | None:
    """The keyword under which ``layer`` takes its key/value store, read from its ``forward`` signature (not
    from the transformers version); else the one the model passed it (``passed``: a call's kwargs); None
    when it takes neither (then no prefix reuse)."""
    try:
        params = inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    for name in CACHE_KEYWORDS:
        if passed is not None and name in passed:
            return name
    return None


def _with_store(kwargs: dict[str, Any], name: str, store: Any) -> dict[str, Any]:
    """``kwargs`` with ``store`` under ``name`` and no other cache keyword (two would make the layer warn)."""
    out = {k: v for k, v in kwargs.items() if k not in CACHE_KEYWORDS}
    out[name] = store
    return out


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

    ``logits`` ``(P, V)`` at the decision positions of every input (``batch.all``); ``inputs[i]`` the
    ``(args, kwargs)`` decoder layer ``i`` received (cached for restarts); ``router_logits[layer]``
    ``(B*T, E)`` fp32, batch-major.
    """

    logits: torch.Tensor
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    router_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class _KVRecorder:
    """Passed as the key/value store (``cache`` or ``past_key_values``) to the clean run's decoder layers: keeps
    each attention's keys and values ``(B, heads, T, d)`` (after rotary embedding), hands them back unchanged."""

    def __init__(self, store: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.store = store

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.store[layer_idx] = (key, value)
        return key, value


class _PrefixKV:
    """The key/value store of a suffix restart: the clean keys/values of positions ``< start`` of the
    restarted rows, joined in front of the suffix's own."""

    def __init__(self, clean: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, start: int) -> None:
        self.clean, self.rows, self.start = clean, rows, start

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        k0, v0 = self.clean[layer_idx]
        k0 = k0.index_select(0, self.rows)[:, :, : self.start]
        v0 = v0.index_select(0, self.rows)[:, :, : self.start]
        return torch.cat([k0, key], dim=2), torch.cat([v0, value], dim=2)


def clean_run(
    moe: MoEModel, stack: Stack | None, batch: Batch, capture_from: int | None, record: Sequence[int],
    keep_kv: bool = False,
) -> CleanRun:
    """Run the batch once, caching every decoder layer's inputs from ``capture_from`` on (and, with
    ``keep_kv``, each attention's keys and values, for restarts that recompute only a suffix)."""
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    if stack is not None and capture_from is not None:
        for i in range(capture_from, len(stack.layers)):
            def pre(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> tuple[tuple, dict] | None:
                inputs[i] = (args, dict(kwargs))
                if keep_kv and stack is not None and stack.cache_kw is not None:
                    return args, _with_store(kwargs, stack.cache_kw, _KVRecorder(kv))
                return None

            handles.append(stack.layers[i].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with RouterHooks(moe, record=list(record)) as hooks, torch.no_grad():
            logits, _ = decision_logits(moe, stack, batch)
    finally:
        for hd in handles:
            hd.remove()
    router = {layer: hooks.calls[layer][0].logits for layer in record}
    return CleanRun(logits=logits, inputs=inputs, router_logits=router, kv=kv)


def decision_logits(moe: MoEModel, stack: Stack | None, batch: Batch, picks: Picks | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's logits at the decision positions ``picks`` (default: every input's, ``batch.all``) →
    ``(P, V)``, and the final (post-norm) hidden states there ``(P, H)`` when the decoder stack is known
    (None on the generic full-forward path). Grad mode and router hooks are the caller's: the clean run,
    ``fast`` and ``fisher`` all read their decision logits here."""
    picks = batch.all if picks is None else picks
    if stack is None:
        return full_logits(moe, batch.input_ids, batch.attention_mask, picks), None
    out = stack.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hs = out[0] if isinstance(out, tuple) else out.last_hidden_state
    h = hs[picks.row, picks.pos]
    return stack.logits(h), h


def full_logits(moe: MoEModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, picks: Picks) -> torch.Tensor:
    """The model's own logits at ``picks`` (rows of ``input_ids``) from a full forward (generic path) → ``(P, V)``."""
    keep, where = torch.unique(picks.pos, return_inverse=True)
    out = moe.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
    return out.logits[picks.row, where]


@contextmanager
def tail_only_at(block: nn.Module, row: torch.Tensor, pos: torch.Tensor) -> Iterator[None]:
    """While active, ``block`` (a per-token MoE block) runs on the tokens ``(row[p], pos[p])`` only, as one
    sequence ``(1, P, H)``; its output is scattered back into zeros of the input's shape ``(R, T, H)``
    (a tuple output keeps its other members). Exact for the positions ``pos`` when nothing after the block
    mixes positions; its router sees logits ``(P, E)`` in ``(row, pos)`` order."""
    shape: list[torch.Size] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            x = args[0]
            shape.append(x.shape)
            return (x[row, pos].unsqueeze(0), *args[1:]), kwargs
        x = kwargs["hidden_states"]
        shape.append(x.shape)
        return args, {**kwargs, "hidden_states": x[row, pos].unsqueeze(0)}

    def post(_m: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        full = first.new_zeros(shape.pop())
        full[row, pos] = first.reshape(-1, first.shape[-1])
        return (full, *output[1:]) if isinstance(output, tuple) else full

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True),
               block.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def restart(
    stack: Stack, clean: CleanRun, batch: Batch, layer: int, rows: torch.Tensor, picks: Picks, start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """Re-run decoder layers ``layer..`` on the cached input of ``layer`` for batch rows ``rows`` ``(R,)``;
    only the decision positions ``picks`` (of these rows) reach the final norm and the LM head → ``(P, V)``.
    The last layer's MoE block (``stack.tail``) runs at the decision positions only; every other position of
    that layer's output is left unfinished, and nothing reads it.

    ``start > 0`` recomputes positions ``start..`` only (causal attention: earlier positions cannot change),
    attending to the clean run's keys and values of the earlier ones (``clean_run(keep_kv=True)``); every
    decision position must be ``>= start``; ``end`` (default: the padded length) stops before trailing
    padding (every decision position ``< end``). Any router transform must be installed by the caller
    (``RouterHooks``) around this call, and sees the suffix positions only.
    """
    B = batch.size
    T = batch.input_ids.shape[1]
    args, _ = clean.inputs[layer]
    h = args[0] if args else clean.inputs[layer][1]["hidden_states"]
    h = h.index_select(0, rows)
    end = T if end is None else end
    if start or end < T:
        h = h[:, start:end]
    for i in range(layer, len(stack.layers)):
        a, kw = clean.inputs[i]
        kw = {k: _select_rows(v, rows, B) for k, v in kw.items() if k != "hidden_states"}
        if start or end < T:
            kw = _suffix_kwargs(kw, T, start, end, h.device)
        if start:
            if stack.cache_kw is None:
                raise ValueError("the decoder layers take no key/value store (neither cache nor past_key_values)")
            kw = _with_store(kw, stack.cache_kw, _PrefixKV(clean.kv, rows, start))
        tail = tail_only_at(stack.tail, picks.row, picks.pos - start) \
            if stack.tail is not None and stack.runs_tail(i) else nullcontext()
        with tail:
            out = stack.layers[i](h, *[_select_rows(v, rows, B) for v in a[1:]], **kw)
        h = out[0] if isinstance(out, tuple) else out
    return stack.logits(stack.norm(h[picks.row, picks.pos - start]))


def _suffix_kwargs(kw: dict[str, Any], T: int, start: int, end: int, device: torch.device) -> dict[str, Any]:
    """Layer kwargs for queries at positions ``start..end-1`` against keys ``0..end-1``: the 4-D mask's block,
    position ids/embeddings and cache positions of the suffix."""

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if v.dim() >= 2 and v.shape[1] == T:
                return v[:, start:end]
            if v.dim() == 1 and v.shape[0] == T:
                return v[start:end]
            return v
        if isinstance(v, tuple | list):
            return type(v)(cut(x) for x in v)
        return v

    out = {k: cut(v) for k, v in kw.items() if k != "attention_mask"}
    mask = kw.get("attention_mask")
    if mask is None:  # no padding in the batch: the model relied on a plain causal mask
        q = torch.arange(start, end, device=device)[:, None]
        mask = (torch.arange(end, device=device)[None, :] <= q)[None, None]
    elif mask.dim() == 4:
        mask = mask[:, :, start:end, :end]
    else:
        raise ValueError(f"an attention mask of shape {tuple(mask.shape)} cannot be cut to a suffix")
    out["attention_mask"] = mask
    return out


def perturb_transform(
    batch: Batch, rows: torch.Tensor, experts: torch.Tensor, magnitude: float, start: int = 0,
    end: int | None = None, picks: Picks | None = None,
) -> Callable[[RouterSite, torch.Tensor], torch.Tensor]:
    """A router transform adding ``magnitude`` to expert ``experts[r]``'s logit in row ``r`` at the
    perturbed positions of input ``rows[r]``; the router sees logits ``(R*(end-start), E)``, or with
    ``picks`` (the last layer's block under :func:`tail_only_at`) those of the decision positions ``(P, E)``."""
    if picks is None:
        pm = batch.pmask.index_select(0, rows)[:, start:end]  # (R, end - start)
        scale = pm.reshape(-1)
        which = experts.repeat_interleave(pm.shape[1])
    else:
        scale = batch.pmask[rows.index_select(0, picks.row), picks.pos]  # (P,)
        which = experts.index_select(0, picks.row)

    def transform(site: RouterSite, logits: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros((scale.shape[0], site.num_experts), dtype=logits.dtype, device=logits.device)
        delta.scatter_(1, which.view(-1, 1), (magnitude * scale).to(logits.dtype).unsqueeze(-1))
        return logits + delta.view(logits.shape)

    return transform


# ----- KL and the skip rule ------------------------------------------------------------------------
def log_probs(logits: torch.Tensor, label_ids: torch.Tensor | None, dtype: torch.dtype = torch.float64
              ) -> torch.Tensor:
    """Log-probabilities ``(R, V)`` in ``dtype`` (or over the label tokens ``(R, K)``, renormalised)."""
    x = logits.to(dtype)
    if label_ids is not None:
        x = x.index_select(1, label_ids)
    return torch.log_softmax(x, dim=-1)


def output_distribution(logits: torch.Tensor, label_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prelude of the gradient estimators (``fast``, ``fisher``): differentiable fp32 log-probabilities
    ``(P, V')`` and detached fp64 probabilities ``(P, V')``, over the vocabulary or the label tokens."""
    return log_probs(logits, label_ids, torch.float32), log_probs(logits.detach(), label_ids).exp()


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(P‖Q)`` per row in float64, clamped at 0 (rounding); ``logp``, ``logq`` ``(R, V)``."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1).clamp_min(0.0)


def can_skip(site: RouterSite) -> bool:
    """Whether the skip rule is provably safe for this router family (renormalising top-k only)."""
    if site.family in _RENORMALISING:
        return True
    return site.family == "qwen-moe" and bool(site.info.get("norm_topk_prob", False))


def skip_mask(
    router_logits: torch.Tensor, batch: Batch, site: RouterSite, experts: Sequence[int], magnitude: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(B, len(experts))`` bool: the perturbation provably changes nothing for that input (see
    :func:`first_change`)."""
    return first_change(router_logits, batch, site, experts, magnitude, dtype) == batch.input_ids.shape[1]


def unchanged_tokens(
    router_logits: torch.Tensor, batch: Batch, site: RouterSite, experts: Sequence[int], magnitude: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(B, T, len(experts))`` bool: the layer output at that token provably does not change.

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
    safe = (high < kth_other - margin) | (batch.pmask[..., None] == 0)  # (B, T, n)
    return safe


def first_change(
    router_logits: torch.Tensor, batch: Batch, site: RouterSite, experts: Sequence[int], magnitude: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(B, len(experts))`` long: the first position whose layer output the perturbation can change (``T``:
    none, the perturbation provably changes nothing for that input); see :func:`unchanged_tokens`."""
    safe = unchanged_tokens(router_logits, batch, site, experts, magnitude, dtype)
    T = safe.shape[1]
    pos = torch.arange(T, device=safe.device)[None, :, None].expand_as(safe)
    return torch.where(safe, torch.full_like(pos, T), pos).amin(dim=1)


def first_perturbed(batch: Batch) -> torch.Tensor:
    """``(B,)`` long: each input's first perturbed position (its layer outputs before it cannot change)."""
    T = batch.pmask.shape[1]
    pos = torch.arange(T, device=batch.pmask.device)[None, :].expand_as(batch.pmask)
    return torch.where(batch.pmask > 0, pos, torch.full_like(pos, T)).amin(dim=1)
