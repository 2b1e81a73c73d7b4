"""Controls for interventions (docs/methods.md) and routing changes counted per real token.

* :func:`random_controls`: random control sets of the targets' layers: for each draw, one non-target routed
  expert per target, drawn uniformly in the target's layer (so a draw has the targets' layer counts), seeded;
  draws are distinct sets where the layer sizes allow.
* :func:`matched_controls`: "equally busy" control sets: each target's partner is drawn from the non-target
  experts of its layer nearest to it in activation rate in the domain (the ``pool`` share of them, at least
  3; log scale), so a control set is about as busy as the targets and "beyond controls" does not merely
  measure activation frequency.
* :func:`busiest_control`: the most active non-target routed experts of the targets' layers in a domain
  (activation rate from the profile's domain-expert table), the same number per layer.
* :func:`record_routing` / :func:`routing_changes`: each item's own tokens (its prompt, and for generation
  tasks the unsteered model's continuation) run once, right-padded, and only real tokens are read, so the
  counts do not depend on batch size or padding. A selection is *changed* when the expert set a token
  selects at a layer differs from the unsteered run (every MoE layer: the direct effect at the steered
  layers and its consequences downstream).

Shared experts are never candidates: they are not routed (the router's experts are ``0..E-1``; tables
number shared experts ``E, E+1, ...``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..models.model import MoEModel
from ..routing import pad_ids

Target = tuple[int, int]


def control_seed(seed: int, *names: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and stable hashes of ``names`` (Python's ``hash`` is salted per run)."""
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def _by_layer(targets: Sequence[Target]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, expert in targets:
        out.setdefault(int(layer), []).append(int(expert))
    return out


def random_controls(targets: Sequence[Target], num_experts: Mapping[int, int], n_draws: int,
                    rng: np.random.Generator) -> tuple[list[tuple[Target, ...]], str]:
    """``n_draws`` random control sets for ``targets`` (uniform in their layers), and a reason when there are none.

    Each set holds, for every target ``(l, i)``, one routed expert of layer ``l`` that is not a target
    (distinct within the set). Sets are distinct from each other while unused sets remain (then repeat).
    """
    layers = _by_layer(targets)
    for layer, experts in layers.items():
        pool = num_experts[layer] - len(set(experts))
        if pool < len(experts):
            return [], (f"layer {layer} has {pool} non-target experts for {len(experts)} targets: no matched "
                        "control")
    def one() -> list[Target]:
        pick: list[Target] = []
        for layer in sorted(layers):
            pool_l = [e for e in range(num_experts[layer]) if e not in set(layers[layer])]
            pick += [(layer, int(e)) for e in rng.choice(pool_l, size=len(layers[layer]), replace=False)]
        return pick

    draws = _distinct_draws(n_draws, one)
    distinct = len(draws)
    while len(draws) < n_draws:  # fewer distinct sets exist than draws: repeat (same numbers, stated)
        draws.append(draws[len(draws) % max(distinct, 1)])
    return draws, ""


def _distinct_draws(n_draws: int, one: Callable[[], list[Target]]) -> list[tuple[Target, ...]]:
    """Up to ``n_draws`` distinct sets from ``one()`` (each sorted), giving up after 50 tries per draw."""
    draws: list[tuple[Target, ...]] = []
    seen: set[tuple[Target, ...]] = set()
    for _ in range(50 * max(n_draws, 1)):
        if len(draws) == n_draws:
            break
        drawn = tuple(sorted(one()))
        if drawn not in seen:
            seen.add(drawn)
            draws.append(drawn)
    return draws


def matched_controls(targets: Sequence[Target], activation: Mapping[Target, float], num_experts: Mapping[int, int],
                     n_draws: int, rng: np.random.Generator, pool: float = 0.25
                     ) -> tuple[list[tuple[Target, ...]], str]:
    """``n_draws`` distinct control sets matched to ``targets`` in activation rate, and a reason when fewer.

    For each target ``(l, i)`` (busiest first), its partner is drawn uniformly from the ``max(3, ⌈pool·P⌉)``
    non-target routed experts of layer ``l`` (``P`` of them) whose rate in ``activation`` is nearest to the
    target's on a log scale (``log(a + 1e-4)``; experts tied with the last of them are in too), skipping
    experts already in the set. Only distinct sets are
    kept: when fewer exist than ``n_draws`` the list is shorter and the reason says so (a repeated set would
    understate the spread between sets).
    """
    layers = _by_layer(targets)
    pools: dict[Target, list[int]] = {}
    for layer, experts in layers.items():
        others = [e for e in range(num_experts[layer]) if e not in set(experts)]
        if len(others) < len(experts):
            return [], (f"layer {layer} has {len(others)} non-target experts for {len(experts)} targets: no "
                        "matched control")
        if any((layer, e) not in activation for e in (*experts, *others)):
            return [], f"no activation rates for layer {layer}: no matched control"
        width = min(len(others), max(3, math.ceil(pool * len(others))))
        for e in experts:
            key = math.log(activation[(layer, e)] + 1e-4)
            dist = {c: abs(math.log(activation[(layer, c)] + 1e-4) - key) for c in others}
            edge = sorted(dist.values())[width - 1]
            pools[(layer, e)] = sorted(c for c in others if dist[c] <= edge + 1e-12)  # ties at the edge all in
    order = sorted(pools, key=lambda t: (t[0], -activation[t], t[1]))

    def one() -> list[Target]:
        pick: list[Target] = []
        for layer, e in order:
            free = [c for c in pools[(layer, e)] if (layer, c) not in pick]
            if not free:  # the pool is used up by earlier targets of the layer: widen to the layer's rest
                free = [c for c in range(num_experts[layer]) if c not in set(layers[layer]) and (layer, c) not in pick]
            pick.append((layer, int(rng.choice(free))))
        return pick

    draws = _distinct_draws(n_draws, one)
    reason = "" if len(draws) == n_draws else (f"only {len(draws)} distinct equally busy control sets exist for "
                                               f"{n_draws} draws")
    return draws, reason


def set_activation(experts: Sequence[Target], activation: Mapping[Target, float]) -> float:
    """Mean activation rate of ``experts`` (NaN when any rate is unknown or the set is empty)."""
    rates = [activation.get((int(layer), int(e)), float("nan")) for layer, e in experts]
    return float(np.mean(rates)) if rates else float("nan")


def busiest_control(targets: Sequence[Target], activation: Mapping[Target, float], num_experts: Mapping[int, int]
                    ) -> tuple[tuple[Target, ...], str]:
    """The most active non-target routed experts of each target layer (as many as it has targets; ties to
    the lower index), from ``activation`` ``{(layer, expert): rate}``; a reason when there is none."""
    out: list[Target] = []
    for layer, experts in sorted(_by_layer(targets).items()):
        cands = [e for e in range(num_experts[layer]) if e not in set(experts) and (layer, e) in activation]
        if len(cands) < len(experts):
            return (), f"no activation rates for enough non-target experts of layer {layer}"
        cands.sort(key=lambda e: (-activation[(layer, e)], e))
        out += [(layer, e) for e in cands[:len(experts)]]
    return tuple(sorted(out)), ""


def activation_rates(table: Any, domain: str) -> dict[Target, float]:
    """``{(layer, expert): activation rate}`` of ``domain``'s routed experts from a domain-expert table
    (shared-expert rows left out); empty when the table has no ``activation_rate``."""
    df = getattr(table, "df", table)
    if df is None or not hasattr(df, "columns") or "activation_rate" not in df.columns:
        return {}
    rows = df[df["domain"].astype(str) == domain]
    if "shared" in rows.columns:
        rows = rows[~rows["shared"].fillna(False).astype(bool)]
    return {(int(r.layer), int(r.expert)): float(r.activation_rate) for r in rows.itertuples()
            if r.activation_rate == r.activation_rate}


# ----- routing changes per real token ---------------------------------------------------------------------
@dataclass
class RoutingRecord:
    """Each item's selections at every MoE layer over its real tokens, and negative-logit counts.

    ``selections[layer][i]``: ``(T_i, k)`` sorted expert indices of item ``i``; ``negative[layer]``:
    ``(E,)`` how many of the items' real tokens gave each expert a negative logit; ``n_tokens``: real
    tokens over all items.
    """

    selections: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    negative: dict[int, np.ndarray] = field(default_factory=dict)
    n_tokens: int = 0

    def negative_share(self, targets: Sequence[Target]) -> float:
        """Share of the targets' (token, logit) values that are negative (NaN with no targets or tokens)."""
        if not targets or not self.n_tokens:
            return float("nan")
        return float(sum(self.negative[layer][e] for layer, e in targets) / (len(targets) * self.n_tokens))


def record_routing(model: MoEModel, seqs: Sequence[Sequence[int]], batch_size: int = 16, steering: Any = None
                   ) -> RoutingRecord:
    """Run each sequence once (right-padded batches, ``use_cache=False``) and keep what every MoE layer
    selected at its real tokens. ``steering``: a context manager active during the runs (or None)."""
    import contextlib

    from ..models.hooks import RouterHooks

    rec = RoutingRecord(selections={layer: [] for layer in model.layers},
                        negative={layer: np.zeros(model.site(layer).num_experts, np.int64) for layer in model.layers})
    tok = model.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else (
        tok.eos_token_id if tok is not None and tok.eos_token_id is not None else 0)
    hf = model.model
    ctx = steering if steering is not None else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            batch = [list(s) for s in seqs[start:start + batch_size]]
            ids, mask = pad_ids(batch, int(pad))
            B, T = ids.shape
            with RouterHooks(model, record=True) as h:
                hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
            real = mask.bool()
            rec.n_tokens += int(real.sum())
            for layer, calls in h.calls.items():
                call = calls[0]
                idx = call.indices.reshape(B, T, -1).sort(-1).values.cpu()
                neg = (call.logits.reshape(B, T, -1) < 0).cpu()
                rec.negative[layer] += neg[real].sum(0).numpy().astype(np.int64)
                for b, s in enumerate(batch):
                    rec.selections[layer].append(idx[b, :len(s)].to(torch.int32))
    return rec


def routing_changes(reference: RoutingRecord, steered: RoutingRecord) -> tuple[int, int]:
    """``(changed, routed)``: (real token, MoE layer) selections whose expert set differs between the two
    records, and all of them."""
    changed = routed = 0
    for layer, items in reference.selections.items():
        for a, b in zip(items, steered.selections[layer], strict=True):
            changed += int((a != b).any(-1).sum())
            routed += int(a.shape[0])
    return changed, routed


__all__ = ["RoutingRecord", "activation_rates", "busiest_control", "control_seed", "matched_controls",
           "random_controls", "record_routing", "routing_changes", "set_activation"]
