"""Calibration of the domain-expert rule: planted experts (power) and random half-splits (false flags).

Used by ``tests/unit/stats/test_calibration.py`` and ``benchmarks/calibrate_rules.py``; the numbers are in
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

from ..models.model import MoEModel
from ..stats.profile import RoutingProfile


def planted_model(
    num_experts: int, top_k: int, planted: Sequence[int], layer: int = 1, strength: float = 2.0,
    num_layers: int = 3, hidden: int = 32, seed: int = 0,
) -> MoEModel:
    """A tiny Mixtral whose ``planted`` experts at ``layer`` are raised by ``strength`` on domain A's tokens
    (lowercase letters) and lowered as much on B's (uppercase); see the module docstring."""
    from . import tiny_model, tiny_tokenizer

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
    from ..stats.domain_experts import domain_experts

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
    from ..stats.profile import profile

    moe = planted_model(num_experts, top_k, planted, layer=layer, strength=strength, seed=seed)
    return profile(moe, planted_texts(n_per_domain, seed=seed), batch_size=32)


def planted_result(prof: RoutingProfile, planted: Sequence[int], layer: int = 1, **rule: Any) -> dict[str, Any]:
    """Run the domain-expert rule (defaults, or ``rule`` overrides) on a :func:`planted_profile`: which planted
    experts were found, their activation rates in A and B, lifts, q-values, and the other flags."""
    from ..stats.domain_experts import domain_experts

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


#: The planted-routes case (docs/methods.md, "Preferred, not displaced"): 64 experts, 4 layers, top-6, two
#: domains, five planted (domain, layer, expert) cells.
PLANTED_ROUTES = {"a": [(1, 5), (1, 17), (2, 40)], "b": [(2, 8), (3, 33)]}


def planted_routes(tokens_per_domain: int = 1750, num_experts: int = 64, num_layers: int = 4, top_k: int = 6,
                   planted: dict[str, list[tuple[int, int]]] | None = None, strength: float = 2.5,
                   popularity: float = 0.5, seq_len: int = 50, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Routes as a serving engine records them (``[tokens, layers, k]`` int arrays, one per sequence) for
    domains with planted experts.

    Each layer's experts have a fixed popularity (logits ``~ N(0, popularity²)``, shared by the domains); each
    token draws its top-k without replacement from the softmax of popularity + Gumbel noise; a planted
    expert's logit rises by ``strength`` on its domain's tokens. A planted expert takes slots from the
    others, so an expert naturally above the uniform rate ``k/E`` is used less in the planted domain and
    looks "specific" to the other one (displaced, not preferred).
    """
    planted = PLANTED_ROUTES if planted is None else planted
    g = np.random.default_rng(seed)
    base = g.normal(0.0, popularity, size=(num_layers, num_experts))
    out: dict[str, list[np.ndarray]] = {}
    for dom, cells in planted.items():
        logits = np.broadcast_to(base, (seq_len, num_layers, num_experts)).copy()
        for layer, e in cells:
            logits[:, layer, e] += strength
        seqs = []
        for _ in range(max(1, tokens_per_domain // seq_len)):
            noisy = logits + g.gumbel(size=logits.shape)
            seqs.append(np.argsort(-noisy, axis=-1)[..., :top_k].astype(np.int64))
        out[dom] = seqs
    return out


# ----- the positive control of the intervention verdicts ---------------------------------------------------
#: The carrier model's domains, and the experts of its one MoE layer that carry each (docs/methods.md).
CARRIERS = {"alpha": (0, 1), "beta": (2, 3), "gamma": (4, 5)}
#: Experts no domain's cue reaches first: every token's next choice once its carriers are masked.
IDLE_EXPERTS = (6, 7)


def carrier_model(n_cues: int = 12, carried: float = 1.0, seed: int = 0) -> MoEModel:
    """A one-layer Mixtral (8 experts, top-2) built by hand in which a known expert set carries each domain.

    Each domain has ``n_cues`` cue words; the tokenizer reads a prompt's last line with its ``\\nEmotion:`` as
    one token, so the last position's embedding names the cue (one-hot embeddings, attention off). The router
    sends a domain's cue tokens to its two carrier experts (:data:`CARRIERS`, logit 8) and every other token
    to the idle experts (logit 4 for cue tokens, so they are each cue's next choice). A carrier expert maps
    each cue of its domain to its label's direction, which the LM head reads: with the carriers selected the
    model answers from the cue; with them masked, the cue goes to the idle experts, which output nothing, and
    the labels tie. ``carried``: the share of each domain's cues its carriers know (the rest are known by the
    idle experts too, so masking the carriers does not hurt them). The weights depend on nothing random;
    ``seed`` only picks which cues are carried.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    from ..data.prompts import LABELS, verbalise

    specials = ["<pad>", "<s>", "</s>", "<unk>", "Dialogue:\n"]
    cues = {d: [f"{d[0]}{j}" for j in range(n_cues)] for d in CARRIERS}
    words = specials + [f"{c}\nEmotion:" for cs in cues.values() for c in cs] + [verbalise(x) for x in LABELS]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("Dialogue:\n|[^\n]+\nEmotion:| [a-z]+"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    H = len(words)
    inter = n_cues * len(CARRIERS)
    cfg = MixtralConfig(vocab_size=H, hidden_size=H, intermediate_size=inter, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=8, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False, router_jitter_noise=0.0)
    model = MixtralForCausalLM(cfg).eval()
    rng = np.random.default_rng(seed)
    layer: Any = model.model.layers[0]
    experts = layer.mlp.experts
    if not hasattr(experts, "gate_up_proj"):
        raise NotImplementedError("carrier_model needs transformers' fused Mixtral experts (gate_up_proj)")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(H))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        gate = layer.mlp.gate.weight  # (E, H); inputs are √H·one-hot after the RMS norm
        scale = 1.0 / H**0.5
        for w in specials:
            gate[list(IDLE_EXPERTS), vocab[w]] = 4.0 * scale
        slot = 0
        for d, carriers in CARRIERS.items():
            known = set(rng.permutation(n_cues)[: round(carried * n_cues)].tolist())
            for j, cue in enumerate(cues[d]):
                t = vocab[f"{cue}\nEmotion:"]
                gate[list(carriers), t] = 8.0 * scale
                gate[list(IDLE_EXPERTS), t] = 4.0 * scale
                label = vocab[verbalise(LABELS[(3 * j + len(d)) % len(LABELS)])]
                holders = list(carriers) + ([] if j in known else list(IDLE_EXPERTS))
                for e in holders:  # intermediate unit `slot` fires on this cue only and writes its label
                    experts.gate_up_proj[e, slot, t] = 4.0 * scale
                    experts.gate_up_proj[e, inter + slot, t] = scale
                    experts.down_proj[e, label, slot] = 8.0
                slot += 1
        for x in LABELS:
            model.lm_head.weight[vocab[verbalise(x)], vocab[verbalise(x)]] = 4.0
    return MoEModel.from_model(model, tokenizer=tokenizer)


def carrier_domains(n_items: int = 60, n_cues: int = 12, noise: float = 0.15, seed: int = 0) -> list[Any]:
    """The carrier model's three classification domains, ``n_items`` each: a random cue per item, labelled
    with the cue's label, except a ``noise`` share relabelled at random (so accuracy is about ``1 − noise``)."""
    from ..data.prompts import LABELS
    from ..data.types import Domain, Example

    rng = np.random.default_rng(seed)
    out = []
    for d in CARRIERS:
        items = []
        for i in range(n_items):
            j = int(rng.integers(n_cues))
            label = LABELS[(3 * j + len(d)) % len(LABELS)]
            if rng.random() < noise:
                label = LABELS[int(rng.integers(len(LABELS)))]
            items.append(Example(f"{d[0]}{j}", label=label, id=f"{d}-{i}"))
        out.append(Domain(d, items, task="classification", labels=tuple(LABELS)))
    return out
