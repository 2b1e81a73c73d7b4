"""The one routing pass: tokenise texts, batch them, run the model under :class:`RouterHooks`, yield the routing.

Every analysis that reads router decisions over texts (profiles, the causal rate, token records, router
inputs for the expert map) goes through :func:`route_batch` / :func:`routing_pass`, so texts are tokenised,
truncated and padded in one way everywhere:

- special tokens added, truncated to :func:`effective_max_length` (the requested length capped at the
  model's context), right-padded with :func:`pad_ids` using :func:`ensure_pad`'s token;
- the caller's tokenizer is never modified (no ``padding_side``, no ``pad_token`` assignment): padding is
  done here on token-id lists, so the tokenizer's own padding settings do not matter.

It also holds the shared helpers that turn the accepted domain inputs into texts (:func:`as_domain_list`,
:func:`domain_texts`, :func:`flatten_texts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from .data.types import Domain, Example, as_domains
from .errors import ConfigError, DataError, InputTypeError
from .models.hooks import RouterCall, RouterHooks

if TYPE_CHECKING:
    from .models.model import MoEModel

#: What analyses accept as their texts: one Domain, a list of Domains, ``{name: texts}`` or a list of texts.
DomainInput: TypeAlias = Domain | Sequence[Domain] | Mapping[str, Sequence[str]] | Sequence[str]

#: A planned batch: ``(domain name, sequence ids within that domain)``.
PlannedBatch: TypeAlias = tuple[str, list[int]]


# ----- tokenising ----------------------------------------------------------------------------------------
def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``(batch, longest)`` int64, padded on the right (or left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[row, sl] = 1
    return ids, mask


@torch.inference_mode()
def greedy_generate(
    model: Any,
    seqs: list[list[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    device: torch.device,
    stop: Callable[[int, int | None], Any] | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, EOS excluded) of left-padded prompts, at most ``max_new_tokens``.

    ``stop(width, eos_id)``, if given, makes a ``transformers`` stopping criterion (e.g. :class:`_AnswerStop`)
    whose ``generated[row]`` says where each row it stopped ends. Stopping a row does not change the other
    rows' computation (the batch keeps its shape), so their tokens equal those of a run without it.
    """
    ids, mask = pad_ids(seqs, pad_id, left=True)
    criteria = stop(ids.shape[1], eos_id) if stop is not None else None
    kwargs: dict[str, Any] = {}
    if criteria is not None:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([criteria])
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        temperature=None,
        top_p=None,
        top_k=None,
        **kwargs,
    )
    gen = out[:, ids.shape[1] :].tolist()
    result = []
    for i, row in enumerate(gen):
        if criteria is not None and i in criteria.generated:
            row = row[: criteria.generated[i]]
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result


def ensure_pad(tokenizer: Any) -> int:
    """The token id to pad with: the tokenizer's pad token, else its eos token (the tokenizer is not changed).

    Raises :class:`ConfigError` when the tokenizer has neither.
    """
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer: load it with expertscope.load_model or pass one")
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    return int(tokenizer.eos_token_id)


def effective_max_length(model: MoEModel, max_length: int | None) -> int | None:
    """``max_length`` capped at the model's context length (None when neither is known)."""
    ctx = model.context_length
    known = [x for x in (max_length, ctx) if x]
    return min(known) if known else None


def tokenize_batch(
    tokenizer: Any, texts: Sequence[str], max_length: int | None
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Tokenise ``texts`` (special tokens added), truncate to ``max_length``, right-pad.

    Returns ``{"input_ids", "attention_mask"}`` (each ``(B, T)`` int64, on the CPU) and ``(B,)`` bool: which
    texts were cut.
    """
    pad = ensure_pad(tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    truncated = np.array([max_length is not None and max_length > 0 and len(x) > max_length for x in ids],
                         dtype=bool)
    if max_length:
        ids = [x[:max_length] for x in ids]
    input_ids, mask = pad_ids(ids, pad)
    return {"input_ids": input_ids, "attention_mask": mask}, truncated


# ----- domains to texts ----------------------------------------------------------------------------------
def as_domain_list(domains: DomainInput) -> list[Domain]:
    """The accepted domain inputs as a list of :class:`Domain`; a bare list of texts is one domain ``"texts"``.

    An empty input is a :class:`DataError`.
    """
    expected = "a Domain, a list of Domains, a list of texts, or {name: [text, ...]}"
    if isinstance(domains, str | bytes):
        raise InputTypeError(f"domains is one string, expected {expected}: wrap a single text in a list")
    if isinstance(domains, Domain):
        doms = [domains]
    elif isinstance(domains, Mapping):
        doms = as_domains(dict(domains))  # checks each value is a list of strings, never splits a string
    elif not isinstance(domains, Sequence):
        raise InputTypeError(f"domains is a {type(domains).__name__}: expected {expected}")
    else:
        items = list(domains)
        if items and all(isinstance(t, str) for t in items):
            doms = [Domain("texts", [Example(text=str(t)) for t in items])]
        else:
            bad = next((d for d in items if not isinstance(d, Domain)), None)
            if bad is not None:
                raise InputTypeError(f"domains holds a {type(bad).__name__} ({str(bad)[:30]!r}): expected {expected}")
            doms = [d for d in items if isinstance(d, Domain)]
    if not doms:
        raise DataError("no domain given: pass at least one domain (or a list of texts)")
    for d in doms:
        blank = next((i for i, ex in enumerate(d.examples) if not ex.text.strip()), None)
        if blank is not None:  # no token to route (the data loaders refuse such rows too)
            raise DataError(f"domain {d.name!r} text {blank} is empty: remove it or fill it in")
    return doms


def domain_texts(domains: DomainInput, limit: int | None = None) -> dict[str, list[str]]:
    """``{domain name: its first ``limit`` texts}``, in the given order.

    No domain, a repeated name, or a domain without texts is a :class:`DataError`.
    """
    doms = as_domain_list(domains)
    names = [d.name for d in doms]
    if len(set(names)) != len(names):
        raise DataError(f"domain names {names} repeat: give each domain its own name")
    out: dict[str, list[str]] = {}
    for d in doms:
        texts = d.head(limit).texts
        if not texts:
            raise DataError(f"domain {d.name!r} has no texts: check its source and field names")
        out[d.name] = texts
    return out


def flatten_texts(texts_by_domain: Mapping[str, Sequence[str]]) -> tuple[list[str], list[str], list[int]]:
    """All texts in domain order, with each text's domain name and its index within the domain."""
    texts: list[str] = []
    dom_of: list[str] = []
    index: list[int] = []
    for name, ts in texts_by_domain.items():
        texts += list(ts)
        dom_of += [name] * len(ts)
        index += list(range(len(ts)))
    return texts, dom_of, index


# ----- planning ------------------------------------------------------------------------------------------
def plan_batches(
    texts_by_domain: Mapping[str, Sequence[str]], batch_size: int, sort_by_length: bool = True,
    done: Callable[[str, int], bool] | None = None,
) -> list[PlannedBatch]:
    """Batches of at most ``batch_size`` sequences of one domain, as ``(domain, sequence ids)``.

    Per domain, in the given domain order: longest text first when ``sort_by_length`` (ties by id), else in
    text order; sequences for which ``done(domain, id)`` holds are skipped.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}: pass batch_size >= 1")
    plan: list[PlannedBatch] = []
    for name, texts in texts_by_domain.items():
        todo = [i for i in range(len(texts)) if done is None or not done(name, i)]
        if sort_by_length:
            keys = {i: (-len(texts[i]), i) for i in todo}
            todo.sort(key=keys.__getitem__)
        plan.extend((name, todo[j:j + batch_size]) for j in range(0, len(todo), batch_size))
    return plan


# ----- running -------------------------------------------------------------------------------------------
@dataclass
class RoutedBatch:
    """The routing of one batch of ``B`` texts padded to ``T`` tokens.

    ``input_ids`` and ``mask`` ``(B, T)`` on the model's device (``mask`` bool: real tokens); ``calls[layer]``
    the :class:`RouterCall` of each recorded MoE layer over the ``B*T`` tokens, batch-major, padding included
    (empty when nothing was recorded); ``truncated`` ``(B,)`` bool, the texts cut to the maximum length.
    """

    domain: str
    ids: list[int]
    input_ids: torch.Tensor
    mask: torch.Tensor
    calls: dict[int, RouterCall]
    truncated: np.ndarray
    #: ``norms[layer]`` ``(B*T, k)`` fp32: ``‖f_i(x_t)‖₂`` of each selected expert, same order as the call's
    #: indices (only when routed with ``expert_norms=True``).
    norms: dict[int, torch.Tensor] = field(default_factory=dict)
    #: ``(B,)`` the prompt's length per row when the batch was routed with a greedy continuation
    #: (``route_batch(generate=N)``): positions from it on are generated tokens; None otherwise.
    prompt_len: torch.Tensor | None = None

    def real(self) -> torch.Tensor:
        """``(B*T,)`` bool on the model's device: which rows of a call are real tokens."""
        return self.mask.reshape(-1)

    def phase_masks(self) -> dict[str, torch.Tensor]:
        """``{"prompt", "generated"}`` → ``(B, T)`` bool masks of real tokens in each phase (empty when the batch
        was routed without a continuation)."""
        if self.prompt_len is None:
            return {}
        pos = torch.arange(self.mask.shape[1], device=self.mask.device)[None, :]
        before = pos < self.prompt_len.to(self.mask.device)[:, None]
        return {"prompt": self.mask & before, "generated": self.mask & ~before}


class ExpertNorms:
    """Context manager: while active (inside a recording :class:`RouterHooks`), each router's input is kept
    for the length of its call, and once the router has chosen, the norms ``‖f_i(x)‖₂`` of its selected
    experts' outputs are computed through the adapter (:meth:`RouterAdapter.expert_outputs`) and stored in
    ``norms[layer]`` ``(N, k)`` fp32. Hooks are removed on exit."""

    def __init__(self, model: MoEModel, hooks: RouterHooks) -> None:
        self.model, self.hooks = model, hooks
        self.norms: dict[int, torch.Tensor] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ExpertNorms:
        for site in self.model.sites:
            if site.layer not in self.hooks.record_layers:
                continue
            self._handles.append(site.module.register_forward_pre_hook(
                lambda m, args, layer=site.layer: self._inputs.__setitem__(layer, args[0])))
            self._handles.append(site.module.register_forward_hook(
                lambda m, args, out, s=site: self._compute(s), always_call=True))
        return self

    def _compute(self, site: Any) -> None:
        hidden = self._inputs.pop(site.layer, None)
        calls = self.hooks.calls.get(site.layer)
        if hidden is None or not calls:  # the router raised: nothing to compute
            return
        idx = calls[-1].indices
        outputs = site.adapter.expert_outputs(site, hidden.reshape(idx.shape[0], -1), idx)
        self.norms[site.layer] = outputs.float().norm(dim=-1)

    def __exit__(self, *exc: Any) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._inputs.clear()


def route_batch(
    model: MoEModel, texts: Sequence[str], max_length: int | None, record: bool = True,
    domain: str = "", ids: Sequence[int] | None = None, expert_norms: bool = False, generate: int = 0,
) -> RoutedBatch:
    """One forward pass (no gradients, no KV cache) over ``texts``, recording every MoE layer's router call.

    ``max_length`` is used as given (pass :func:`effective_max_length`'s value). With ``record=False`` no
    router hook is installed (for callers that hook the model themselves). With ``expert_norms`` the norm of
    every selected expert's output is computed in the same pass (``RoutedBatch.norms``; about the cost of
    the MoE layers once more). With ``generate=N`` each text is first continued greedily by up to N tokens
    (stopping at EOS) and the pass routes text and continuation together: ``RoutedBatch.prompt_len`` says
    where each row's generated tokens start. Causal attention makes a generated token's routing in this pass
    the routing it had when it was generated.
    """
    enc, truncated = tokenize_batch(model.tokenizer, texts, max_length)
    prompt_len = None
    if generate:
        pad = ensure_pad(model.tokenizer)
        rows = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        ctx = model.context_length
        if ctx:  # room for the continuation within the model's context
            cut = [r[: max(1, ctx - generate)] for r in rows]
            truncated = truncated | np.array([len(c) < len(r) for c, r in zip(cut, rows, strict=True)])
            rows = cut
        cont = greedy_generate(model.model, rows, pad, model.tokenizer.eos_token_id, generate, model.device)
        prompt_len = torch.tensor([len(r) for r in rows], dtype=torch.long)
        input_ids, mask = pad_ids([r + c for r, c in zip(rows, cont, strict=True)], pad)
        enc = {"input_ids": input_ids, "attention_mask": mask}
    enc = {k: v.to(model.device) for k, v in enc.items()}
    calls: dict[int, RouterCall] = {}
    norms: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        if record:
            with RouterHooks(model, record=True) as hooks:
                if expert_norms:
                    with ExpertNorms(model, hooks) as en:
                        model.model(**enc, use_cache=False)
                    norms = en.norms
                else:
                    model.model(**enc, use_cache=False)
            calls = {layer: hooks.calls[layer][0] for layer in model.layers}
        else:
            model.model(**enc, use_cache=False)
    return RoutedBatch(domain, list(ids) if ids is not None else list(range(len(texts))), enc["input_ids"],
                       enc["attention_mask"].bool(), calls, truncated, norms, prompt_len)


def routing_pass(
    model: MoEModel,
    texts_by_domain: Mapping[str, Sequence[str]],
    batch_size: int = 8,
    max_length: int | None = 512,
    plan: Sequence[PlannedBatch] | None = None,
    record: bool = True,
) -> Iterator[RoutedBatch]:
    """Route every text of every domain, one :class:`RoutedBatch` per planned batch, in plan order.

    ``max_length`` is capped at the model's context (:func:`effective_max_length`). ``plan`` defaults to
    :func:`plan_batches` in text order (no sorting). Lazy: stopping early runs no further batches, and no
    hook is left installed between batches.
    """
    ensure_pad(model.tokenizer)
    max_len = effective_max_length(model, max_length)
    if plan is None:
        plan = plan_batches(texts_by_domain, batch_size, sort_by_length=False)
    for name, ids in plan:
        texts = texts_by_domain[name]
        yield route_batch(model, [texts[i] for i in ids], max_len, record=record, domain=name, ids=ids)


__all__ = [
    "DomainInput",
    "ExpertNorms",
    "PlannedBatch",
    "RoutedBatch",
    "as_domain_list",
    "domain_texts",
    "effective_max_length",
    "ensure_pad",
    "flatten_texts",
    "greedy_generate",
    "pad_ids",
    "plan_batches",
    "route_batch",
    "routing_pass",
    "tokenize_batch",
]
