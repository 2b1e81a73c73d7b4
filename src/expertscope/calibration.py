"""Calibration of the domain-expert rule: planted experts (power) and random half-splits (false flags).

Used by ``tests/test_calibration.py`` and ``benchmarks/calibrate_rules.py``; the numbers are in
``docs/methods.md``.

The planted models are real (tiny, random) Mixtral models, routed by the model's own top-k, not synthetic
statistics. Attention and expert outputs are zeroed, so every layer's router sees the token embedding
(after the layer's RMS norm). Domain A is written in lowercase letters, domain B in uppercase; a lowercase
letter and its uppercase twin have the same embedding except dimension 0 (+1 for A, -1 for B, so their
RMS norms match). Every router row ignores dimension 0, except the planted experts' rows at the planted
layer, which read it with weight ``strength``: those experts' logits rise by about ``strength`` on A's
tokens and fall by as much on B's. Everything else routes the twins identically, so the only difference
between the domains is the plant and what it displaces (an expert pushed out of the top-k by a planted
one is used less in A and relatively more in B: a real, smaller difference, reported as "other flags").
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .models.model import MoEModel
from .stats.profile import RoutingProfile


def planted_model(
    num_experts: int, top_k: int, planted: Sequence[int], layer: int = 1, strength: float = 2.0,
    num_layers: int = 3, hidden: int = 32, seed: int = 0,
) -> MoEModel:
    """A tiny Mixtral whose ``planted`` experts at ``layer`` are raised by ``strength`` on domain A's tokens
    (lowercase letters) and lowered as much on B's (uppercase); see the module docstring."""
    from .testing import tiny_model, tiny_tokenizer

    model = tiny_model("mixtral", seed=seed, num_local_experts=num_experts, num_experts_per_tok=top_k,
                       num_hidden_layers=num_layers, hidden_size=hidden)
    tok = tiny_tokenizer()
    vocab = tok.get_vocab()
    gen = torch.Generator().manual_seed(seed + 1)
    inner: Any = model.model  # the decoder stack (typed loosely by transformers)
    with torch.no_grad():
        for lyr in inner.layers:
            lyr.self_attn.o_proj.weight.zero_()
            lyr.mlp.experts.down_proj.zero_()
            router = lyr.mlp.gate.weight
            # Unit-scale logits: rows ~ N(0, 1/hidden) on a normalised input give logits ~ N(0, 1).
            router.copy_(torch.randn(router.shape, generator=gen) / hidden**0.5)
            router[:, 0] = 0.0
        emb = inner.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=gen))
        emb[:, 0] = 0.0
        for lo, up in zip(string.ascii_lowercase, string.ascii_uppercase, strict=True):
            emb[vocab[up]] = emb[vocab[lo]]
            emb[vocab[lo], 0], emb[vocab[up], 0] = 1.0, -1.0
        gate = inner.layers[layer].mlp.gate.weight
        for e in planted:
            gate[e, 0] = strength
    return MoEModel.from_model(model, tokenizer=tok)


def planted_texts(n_per_domain: int = 60, seed: int = 0, min_len: int = 8, max_len: int = 24) -> dict[str, list[str]]:
    """``{"A": lowercase strings, "B": uppercase strings}``, independent random letters of random lengths."""
    g = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))

    def one() -> str:
        return "".join(g.choice(letters, int(g.integers(min_len, max_len + 1))))

    return {"A": [one() for _ in range(n_per_domain)], "B": [one().upper() for _ in range(n_per_domain)]}


def null_texts(n: int = 120, seed: int = 0) -> list[str]:
    """Mixed texts (lowercase, uppercase, digits, punctuation, spaces) of random lengths, for null splits."""
    g = np.random.default_rng(seed)
    pools = [string.ascii_lowercase, string.ascii_uppercase, string.digits + " +-=*", string.ascii_letters + " .,"]
    out = []
    for _ in range(n):
        pool = np.array(list(pools[int(g.integers(len(pools)))]))
        out.append("".join(g.choice(pool, int(g.integers(6, 30)))))
    return out


def relabel(profile: RoutingProfile, labels: Sequence[str] | np.ndarray) -> RoutingProfile:
    """A profile of the same per-sequence statistics with each sequence (in canonical order) moved to the
    domain ``labels[i]``: the way to build null splits without running the model again."""
    rows = profile._compact()
    labels = np.asarray(labels, dtype=object)
    if len(labels) != len(rows["seq_id"]):
        raise ValueError(f"{len(labels)} labels for {len(rows['seq_id'])} sequences")
    out = RoutingProfile(layers=list(profile.layers), num_experts=profile.num_experts, top_k=profile.top_k)
    for name in dict.fromkeys(labels.tolist()):
        idx = np.flatnonzero(labels == name)
        out.add(str(name), list(range(len(idx))), rows["seq_tokens"][idx],
                {k: rows[k][idx] for k in ("sel", "h_bern", "h_eq1", "gate")})
    return out


@dataclass
class SplitResult:
    """Flags on null splits: per split, the number of flagged cells (domain experts)."""

    flags: list[int]

    @property
    def n_splits(self) -> int:
        return len(self.flags)

    @property
    def false_flag_rate(self) -> float:
        """Share of splits with at least one flagged expert."""
        return float(np.mean([f > 0 for f in self.flags])) if self.flags else float("nan")


def null_splits(profile: RoutingProfile, n_splits: int = 20, seed: int = 0, **rule: Any) -> SplitResult:
    """Random half-splits of the profile's sequences (two pseudo-domains of the same texts); the domain-expert
    rule (defaults, or ``rule`` overrides) on each; returns how many experts it flagged per split."""
    from .stats.domain_experts import domain_experts

    n = len(profile.seq_id)
    g = np.random.default_rng(seed)
    flags = []
    for s in range(n_splits):
        lab = np.where(g.permutation(n) < n // 2, "half1", "half2")
        table = domain_experts(relabel(profile, lab), **{"n_boot": 0, "seed": seed + s, **rule})
        flags.append(int(table.df["is_domain_expert"].sum()))
    return SplitResult(flags)


def planted_profile(
    num_experts: int, top_k: int, planted: Sequence[int], layer: int = 1, strength: float = 2.0,
    n_per_domain: int = 60, seed: int = 0,
) -> RoutingProfile:
    """The routing profile of domains A and B (``n_per_domain`` texts each) on a :func:`planted_model`."""
    from .stats.profile import profile

    moe = planted_model(num_experts, top_k, planted, layer=layer, strength=strength, seed=seed)
    return profile(moe, planted_texts(n_per_domain, seed=seed), batch_size=32)


def planted_result(prof: RoutingProfile, planted: Sequence[int], layer: int = 1, **rule: Any) -> dict[str, Any]:
    """Run the domain-expert rule (defaults, or ``rule`` overrides) on a :func:`planted_profile`: which planted
    experts were found, their activation rates in A and B, lifts, q-values, and the other flags."""
    from .stats.domain_experts import domain_experts

    table = domain_experts(prof, **{"n_boot": 200, **rule})
    df = table.df
    a = df[(df.domain == "A") & (df.layer == layer)].set_index("expert")
    b = df[(df.domain == "B") & (df.layer == layer)].set_index("expert")
    flagged = df[df.is_domain_expert]
    found = [e for e in planted if bool(a.loc[e, "is_domain_expert"])]
    others = flagged[~((flagged.domain == "A") & (flagged.layer == layer) & flagged.expert.isin(list(planted)))]
    return {
        "planted": list(planted), "found": found, "all_found": len(found) == len(planted),
        "A_rate_in_A": [float(a.loc[e, "activation_rate"]) for e in planted],
        "A_rate_in_B": [float(b.loc[e, "activation_rate"]) for e in planted],
        "lift": [float(a.loc[e, "lift"]) for e in planted],
        "q": [float(a.loc[e, "q_value"]) for e in planted],
        "other_flags": len(others),
        "other_flags_B_same_layer": int(((others.domain == "B") & (others.layer == layer)).sum()),
        "table": table,
    }
