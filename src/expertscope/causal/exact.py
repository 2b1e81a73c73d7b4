"""``method="exact"``: the definition of CE, computed efficiently.

Per batch: one clean run caches every decoder layer's inputs; for each MoE layer ``l`` the (input, expert)
pairs that are not provably zero are packed into rows of a few perturbed runs that restart at decoder
layer ``l``; only the prediction position of each row reaches the final norm and the LM head. Where the
restart cannot reproduce the model (checked once per model, dtype and device, on two short rows), full
forward passes are used instead; where a suffix restart cannot (no key/value store the engine can hand
the layers), every row is recomputed from its first perturbed position.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..config import CausalConfig
from ..models.hooks import RouterHooks
from ..models.model import MoEModel
from ._engine import (
    Batch,
    CleanRun,
    Stack,
    can_skip,
    clean_run,
    first_change,
    first_perturbed,
    full_logits,
    kl,
    log_probs,
    make_batch,
    perturb_transform,
    restart,
)

#: How restarts ran the last decoder layer's MoE block (see :attr:`ExactStats.tail`).
TailMode = Literal["decisions", "absent", "failed", "off"]

#: Bytes of clean runs a :class:`CleanCache` keeps between calls on the same batches (``hybrid``'s rounds): at
#: hidden 64 every batch fits; at full width a batch of 8 × 128 tokens caches a few hundred MB.
CLEAN_CACHE_BYTES = 1 << 30


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
    token_rows: int = 0  # positions x decoder layers recomputed by perturbed runs (restart engine)
    clean_rows: int = 0  # inputs run clean (once per batch; hybrid's rounds reuse a kept clean run)
    prefix: bool = False
    prefix_note: str = ""
    #: How restarts ran the last decoder layer's MoE block: at the decision positions only ("decisions"), or at
    #: every position because the model has none we know ("absent"), the shortcut failed its check ("failed",
    #: why in ``tail_note``) or no restarts ran ("off").
    tail: TailMode = "off"
    tail_note: str = ""

    def to_dict(self) -> dict:
        return {
            "skipped": self.skipped, "computed": self.computed, "perturbed_runs": self.runs,
            "clean_s": round(self.clean_s, 4), "perturbed_s": round(self.perturbed_s, 4),
            "engine": self.engine, "engine_note": self.note, "recomputed_token_layers": self.token_rows,
            "clean_rows": self.clean_rows,
            "prefix_reuse": self.prefix, "prefix_note": self.prefix_note, "last_layer_block": self.tail,
            "last_layer_note": self.tail_note,
            "skipped_per_layer": {str(k): v for k, v in self.per_layer_skipped.items()},
        }


def _nbytes(obj: object, seen: set[int]) -> int:
    """Bytes of the tensors in ``obj`` (nested tuples, lists and dicts), each storage counted once."""
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x, seen) for x in obj.values())
    return 0


def clean_bytes(run: CleanRun) -> int:
    """Bytes a kept clean run holds: its logits, cached layer inputs, router logits and keys/values."""
    return _nbytes((run.logits, run.inputs, run.router_logits, run.kv), set())


@dataclass
class CleanCache:
    """Clean runs kept between :func:`exact_batch` calls on the same batches (``hybrid``'s rounds ask cells of
    the same batches again): each run caches the inputs of every decoder layer from ``min(layers)`` and the
    router logits of every skippable layer of ``layers``, so it serves a call on any of them. Runs are kept
    while their bytes fit ``budget``; a batch whose run was not kept is run again when asked (the same batch,
    so the same values)."""

    layers: list[int]
    budget: int | None = None  # None: CLEAN_CACHE_BYTES
    runs: dict[object, CleanRun] = field(default_factory=dict)
    used: int = 0

    @property
    def limit(self) -> int:
        """The bytes it keeps at most: ``budget``, else :data:`CLEAN_CACHE_BYTES` (read when asked)."""
        return CLEAN_CACHE_BYTES if self.budget is None else self.budget

    def keep(self, key: object, run: CleanRun) -> None:
        n = clean_bytes(run)
        if self.used + n <= self.limit:
            self.runs[key] = run
            self.used += n


def clean_for(moe: MoEModel, stack: Stack | None, batch: Batch, layers: Sequence[int], skip: bool, prefix: bool
              ) -> CleanRun:
    """The clean run that restarts at any of ``layers`` read: every decoder layer's inputs from ``min(layers)``
    on, the router logits of each skippable one of them (with ``skip``) and, with ``prefix``, the keys and values
    (nothing cached with ``stack=None``: full forward passes)."""
    record = [layer for layer in layers if skip and can_skip(moe.site(layer))]
    return clean_run(moe, stack, batch, min(layers) if stack is not None else None, record, keep_kv=prefix)


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


def check_prefix(moe: MoEModel, stack: Stack, batch: Batch, layers: Sequence[int]) -> str:
    """Check that a suffix restart (clean keys/values before each row's first decision position) reproduces
    the model's own logits at every one of ``layers``; "" if it does, else why not."""
    if stack.cache_kw is None:
        return "the decoder layers take no key/value store (neither `cache` nor `past_key_values`)"
    with torch.no_grad():
        ref = full_logits(moe, batch.input_ids, batch.attention_mask, batch.all).float()
        try:
            clean = clean_run(moe, stack, batch, min(layers), [], keep_kv=True)
        except Exception as exc:  # a layer that does not accept our key/value store
            return f"the clean run cannot keep keys and values ({type(exc).__name__}: {exc})"
        if not clean.kv:
            return (f"the attention layers do not hand their keys and values to the store passed as "
                    f"`{stack.cache_kw}`")
        scale = float(ref.abs().max()) + 1.0
        tol = (1e-4 if ref.dtype == torch.float32 and moe.dtype == torch.float32 else 3e-2) * scale
        order = list(range(batch.size - 1, -1, -1))
        rows = torch.tensor(order, device=batch.device)
        picks = batch.picks(order)
        start = min(batch.decisions[b][0] for b in order)
        for layer in layers:
            try:
                got = restart(stack, clean, batch, layer, rows, picks, start).float()
            except Exception as exc:
                return f"a suffix restart at decoder layer {layer} fails ({type(exc).__name__}: {exc})"
            err = float((got - ref.index_select(0, picks.clean)).abs().max())
            if not err <= tol:
                return f"a suffix restart at decoder layer {layer} does not reproduce the model (max error {err:.3g})"
    return ""


# ----- verification, once per model ---------------------------------------------------------------
@dataclass
class Verification:
    """What the engine may do on one model: ``restart`` "" (verified) or why restarts are not used;
    ``tail`` "" (the last layer's MoE block at the decision positions only: verified, or the model has no such
    block) or why that block runs at every position; ``prefix`` "" (verified), why suffix restarts are not
    used, or None (not checked yet)."""

    restart: str
    tail: str = ""
    prefix: str | None = None


#: Verifications per model module, keyed by (router family, dtype, device): a model is checked once, not on
#: every call (a check costs a few full forwards and a restart at every layer).
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str, str], Verification]] = \
    weakref.WeakKeyDictionary()


def probe_batch(moe: MoEModel, stack: Stack | None) -> Batch:
    """Two short rows (12 and 7 tokens) for the checks: padding, row mapping in reverse order, two decision
    positions in one row and a suffix start inside the shorter row."""
    vocab = int(getattr(getattr(moe.model, "config", None), "vocab_size", 0) or 0)
    weight = getattr(stack.head, "weight", None) if stack is not None else None
    if isinstance(weight, torch.Tensor):
        vocab = int(weight.shape[0])
    vocab = max(vocab, 2)
    tok = moe.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pad is None:
        pad = getattr(tok, "eos_token_id", None) if tok is not None else None
    rows = [[(7 * i + 3) % vocab for i in range(12)], [(5 * i + 11) % vocab for i in range(7)]]
    return make_batch([0, 1], rows, int(pad or 0), "last", moe.device, [[8, 11], [6]])


def verify(moe: MoEModel, stack: Stack, prefix: bool) -> Verification:
    """The cached :class:`Verification` of ``moe`` (checked now on :func:`probe_batch` if not yet; the suffix
    restart only when ``prefix`` is asked for). Warns once per model when a check fails."""
    key = (moe.sites[0].family, str(moe.dtype), str(moe.device))
    per = _VERIFIED.setdefault(moe.model, {})
    v = per.get(key)
    batch = None
    if v is None:
        batch = probe_batch(moe, stack)
        v = Verification(check_restart(moe, stack, batch, moe.layers))
        if v.restart and stack.tail is not None:  # try again with the last layer's block at every position
            v = Verification(check_restart(moe, replace(stack, tail=None), batch, moe.layers), tail=v.restart)
        per[key] = v
        if v.restart:
            warnings.warn(f"exact causal effects fall back to full forward passes: {v.restart}", stacklevel=4)
    if prefix and not v.restart and v.prefix is None:
        v.prefix = check_prefix(moe, _verified(stack, v), batch or probe_batch(moe, stack), moe.layers)
        if v.prefix:
            warnings.warn(f"exact causal effects recompute rows from their first perturbed position (no prefix "
                          f"reuse): {v.prefix}", stacklevel=4)
    return v


def _verified(stack: Stack, v: Verification) -> Stack:
    """``stack`` as the verification allows it to run (its last layer's block at every position if that
    shortcut failed)."""
    return replace(stack, tail=None) if v.tail and stack.tail is not None else stack


def forget_verification(model: nn.Module) -> None:
    """Drop the cached verification of ``model`` (after changing it in place: new hooks, patched layers)."""
    _VERIFIED.pop(model, None)


def resolve_engine(moe: MoEModel, stack: Stack | None, prefix: bool, stats: ExactStats) -> Stack | None:
    """The stack to restart on (None: full forward passes), from the model's cached verification; records the
    engine, prefix reuse and why not in ``stats``."""
    if stack is None:
        if stats.engine == "restart":
            stats.engine, stats.note = "full-forward", "decoder stack not found"
        stats.prefix, stats.prefix_note = False, "no decoder stack"
        stats.tail, stats.tail_note = "off", ""
        return None
    v = verify(moe, stack, prefix)
    if v.restart:
        stats.engine, stats.note = "full-forward", v.restart
        stats.prefix, stats.prefix_note = False, "the restart path is not used"
        stats.tail, stats.tail_note = "off", ""
        return None
    stats.engine, stats.note = "restart", "verified"
    stats.prefix = bool(prefix and not v.prefix)
    stats.prefix_note = "off (prefix_reuse=False)" if not prefix else (v.prefix or "verified")
    stack = _verified(stack, v)
    stats.tail = "decisions" if stack.tail is not None else "failed" if v.tail else "absent"
    stats.tail_note = v.tail
    return stack


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
    prefix: bool = False,
    asked: np.ndarray | None = None,
    cache: CleanCache | None = None,
    key: object = None,
) -> np.ndarray:
    """CE ``(B, L, E_max)`` float64 for one batch; layers in ``experts``' order, NaN where not asked.

    Each value is the KL at the input's decision positions, averaged. ``experts[layer]`` lists the experts
    to perturb at that MoE layer. ``stack=None`` uses full forward passes. ``chunk_tokens`` bounds the
    tokens of one perturbed run (rows × padded length), so memory stays bounded whatever the batch.
    ``prefix``: recompute each row only from the first position whose layer output can change (the first
    perturbed position; for renormalising routers the first token where the expert is selected or can
    enter the top-k), attending to the clean run's cached keys and values before it. ``asked`` ``(B, L, E_max)``
    bool: the (input, layer, expert) cells to compute (default: all in ``experts``); the others stay NaN.
    ``cache``: the clean run of batch ``key`` is taken from it, or run for all of ``cache.layers`` and offered
    to it.
    """
    layers = list(experts)
    B = batch.size
    E_max = max(moe.site(layer).num_experts for layer in layers)
    dev = batch.device
    out = torch.full((B, len(layers), E_max), float("nan"), dtype=torch.float64, device=dev)
    skippable = [layer for layer in layers if skip and can_skip(moe.site(layer))]
    prefix = prefix and stack is not None
    t0 = time.perf_counter()
    if clean is None and cache is not None:
        clean = cache.runs.get(key)
    if clean is None:
        clean = clean_for(moe, stack, batch, layers if cache is None else cache.layers, skip, prefix)
        stats.clean_rows += B
        if cache is not None:
            cache.keep(key, clean)
    logp = log_probs(clean.logits, label_ids)  # (P, V)
    stats.clean_s += time.perf_counter() - t0
    T = batch.input_ids.shape[1]
    t1 = time.perf_counter()
    # Per (input, expert) the first position whose layer output can change (T: provably none, KL exactly 0),
    # for every layer at once: one device sync.
    first_dec = torch.tensor([d[0] for d in batch.decisions], device=dev)
    base = first_perturbed(batch)
    starts = []
    for layer in layers:
        if layer in skippable:
            starts.append(first_change(clean.router_logits[layer], batch, moe.site(layer), list(experts[layer]),
                                       magnitude, moe.dtype))
        else:
            starts.append(base[:, None].expand(B, len(experts[layer])))
    flat = torch.cat([x.flatten() for x in starts]).cpu().numpy()
    fd = first_dec.cpu().numpy()
    lens = [d[-1] + 1 for d in batch.decisions]  # positions after the last decision position cannot matter
    o = 0
    for li, layer in enumerate(layers):
        ex = list(experts[layer])
        st = flat[o : o + B * len(ex)].reshape(B, len(ex))
        o += B * len(ex)
        want = np.ones((B, len(ex)), bool) if asked is None else np.asarray(asked)[:, li][:, ex]
        sk = (st >= T) & want
        n_sk = int(sk.sum())
        stats.skipped += n_sk
        stats.per_layer_skipped[layer] = stats.per_layer_skipped.get(layer, 0) + n_sk
        if n_sk:
            b_sk, j_sk = np.nonzero(sk)
            out[torch.as_tensor(b_sk, device=dev), li, torch.as_tensor(np.asarray(ex)[j_sk], device=dev)] = 0.0
        # The last decoder layer's block runs at the decision positions only (``stack.tail``): there a change
        # before the first decision position reaches nothing that is read, so its rows restart at that position.
        tail = stack is not None and stack.runs_tail(layer)
        # Rows: (input b, expert e) pairs, ordered by restart position so a run restarts late for all its rows.
        pairs = sorted(((int(fd[b] if tail else min(st[b, j], fd[b])) if prefix else 0, e, b)
                        for j, e in enumerate(ex) for b in range(B) if want[b, j] and not sk[b, j]))
        for chunk in _runs(pairs, lens if prefix else [T] * B, chunk_tokens):
            start = chunk[0][0]
            end = max(lens[b] for _, _, b in chunk) if prefix else T
            bs = [b for _, _, b in chunk]
            rows = torch.tensor(bs, device=dev)
            exps = torch.tensor([e for _, e, _ in chunk], device=dev)
            picks = batch.picks(bs)
            tf = perturb_transform(batch, rows, exps, magnitude, start, end, picks if tail else None)
            with RouterHooks(moe, transforms={layer: tf}), torch.no_grad():
                if stack is not None:
                    q = restart(stack, clean, batch, layer, rows, picks, start, end)
                else:
                    q = full_logits(moe, batch.input_ids.index_select(0, rows),
                                    batch.attention_mask.index_select(0, rows), picks)
            per_pos = kl(logp.index_select(0, picks.clean), log_probs(q, label_ids))
            out[rows, li, exps] = picks.row_mean(per_pos, len(chunk))
            stats.runs += 1
            stats.computed += len(chunk)
            stats.token_rows += len(chunk) * (end - start) * (len(stack.layers) - layer if stack is not None else 1)
    stats.perturbed_s += time.perf_counter() - t1
    return out.cpu().numpy()


class ExactEstimator:
    """The :class:`~._engine.Estimator` of ``method="exact"``: the engine is resolved (restart, prefix reuse or
    full forwards) from the model's cached verification at the first batch."""

    name = "exact"

    def __init__(self, moe: MoEModel, stack: Stack | None, cfg: CausalConfig, label_ids: torch.Tensor | None,
                 stats: ExactStats | None = None) -> None:
        self.moe, self.stack, self.cfg, self.label_ids = moe, stack, cfg, label_ids
        self.stats = stats if stats is not None else ExactStats()
        self._engine: tuple[Stack | None] | None = None

    def clean_bytes_per_token(self, batch: Batch, layers: Sequence[int]) -> float:
        """Bytes per (padded) token of the clean run :func:`exact_batch` would keep of ``batch`` for ``layers``
        (run once here, not counted); 0 without a decoder stack to restart on."""
        stack = self._stack()
        if stack is None:
            return 0.0
        run = clean_for(self.moe, stack, batch, layers, self.cfg.skip, self.stats.prefix)
        return clean_bytes(run) / batch.input_ids.numel()

    def _stack(self) -> Stack | None:
        """The stack restarts run on (None: full forward passes), resolved at the first call."""
        if self._engine is None:
            self._engine = (resolve_engine(self.moe, self.stack, self.cfg.prefix_reuse, self.stats),)
        return self._engine[0]

    def estimate(self, batch: Batch, experts: Mapping[int, Sequence[int]], asked: np.ndarray | None = None,
                 cache: CleanCache | None = None, key: object = None) -> np.ndarray:
        """CE ``(B, L, E_max)``; ``asked`` ``(B, L, E_max)`` bool limits it to those cells (others NaN); the clean
        run of batch ``key`` from ``cache`` (:class:`CleanCache`) when given."""
        cfg = self.cfg
        return exact_batch(self.moe, self._stack(), batch, experts, cfg.magnitude, self.label_ids,
                           cfg.chunk_tokens, cfg.skip, self.stats, prefix=self.stats.prefix, asked=asked,
                           cache=cache, key=key)


def _runs(pairs: list[tuple[int, int, int]], lens: list[int], chunk_tokens: int, waste: float = 0.25
          ) -> list[list[tuple[int, int, int]]]:
    """Split ``(start, expert, input)`` rows, sorted by start, into perturbed runs. A run recomputes all its
    rows from its first row's start to its longest row's end (``lens[input]``); it holds at most
    ``chunk_tokens`` recomputed positions (the memory budget, at least one row), and closes before a row that
    would make it waste more than ``waste`` × the positions its rows need."""
    runs: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    need, end = 0, 0
    for row in pairs:
        r_need, r_end = lens[row[2]] - row[0], lens[row[2]]
        if cur:
            width = max(end, r_end) - cur[0][0]
            total = (len(cur) + 1) * width
            if total > chunk_tokens or total - (need + r_need) > waste * (need + r_need):
                runs.append(cur)
                cur, need, end = [], 0, 0
        cur.append(row)
        need += r_need
        end = max(end, r_end)
    if cur:
        runs.append(cur)
    return runs
