"""Prompt against generated tokens: does a domain route the same way while reading and while writing?

From a profile with phases (``profile(..., generate=N)``, or routes an engine labelled), per (domain, layer):

- ``usage_overlap`` = ``Σ_i min(A_prompt(i), A_generated(i)) / k``: the share of expert selections the two phases
  have in common (1 = the same experts at the same rates; ``A`` the activation rate, ``k`` experts per token),
  with a bootstrap 95% interval over sequences when the profile kept them;
- ``overlap_if_same``: the floor of the same overlap between two samples of the phases' sizes drawn from the
  pooled usage (selections drawn independently, an approximation): its ``5/L``-th percentile, so that a domain
  whose phases route alike has at most about a 5% chance of any of its ``L`` layers falling below it
  (Bonferroni over layers). ``differs``: the observed overlap is below the floor — the phases route
  differently at that layer, beyond sampling noise;
- the domain experts found in each phase alone (the same rule as the study's), how many the phases share and
  their Jaccard (NaN when neither phase has one; domain experts need two domains).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..config import DomainExpertConfig
from ..errors import ConfigError, DataError
from .profile import RoutingProfile

COLUMNS = ["domain", "layer", "n_prompt", "n_generated", "usage_overlap", "overlap_lo", "overlap_hi",
           "overlap_if_same", "differs", "prompt_experts", "generated_experts", "shared_experts", "jaccard"]


def _overlap(sel_a: np.ndarray, n_a: np.ndarray, sel_b: np.ndarray, n_b: np.ndarray, k: int) -> np.ndarray:
    """``(..., L)`` overlap of the rates ``sel / n`` over experts (last axis), divided by ``k``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        a = sel_a / n_a[..., None, None]
        b = sel_b / n_b[..., None, None]
    return np.minimum(a, b).sum(-1) / k


def _sets(profile: RoutingProfile, config: DomainExpertConfig | None) -> tuple[dict[tuple[str, int], set[int]] | None,
                                                                              str | None]:
    from .domain_experts import domain_experts

    if len(profile.domains) < 2:
        return None, "domain experts need two domains"
    try:
        table = domain_experts(profile, config)
    except (ConfigError, DataError) as exc:
        return None, str(exc)
    df = table.df[table.df.is_domain_expert]
    out: dict[tuple[str, int], set[int]] = {}
    for r in df.itertuples():
        out.setdefault((str(r.domain), int(r.layer)), set()).add(int(r.expert))
    return out, None


def phase_comparison(profile: RoutingProfile, config: DomainExpertConfig | None = None, *, n_boot: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """One row per (domain, layer) comparing the prompt and generated tokens of ``profile`` (columns:
    :data:`COLUMNS`; the module docstring defines them). ``config`` is the domain-expert rule applied to each
    phase (default: the study's default). ``attrs["note"]`` says what could not be compared."""
    from ..validation import check_positive, check_type

    check_type(profile, RoutingProfile, "profile", "a RoutingProfile with phases (es.profile(..., generate=N))")
    check_positive(n_boot, "n_boot", allow_zero=True)
    if not {"prompt", "generated"} <= set(profile.phases):
        raise ConfigError("this profile does not hold both phases: profile with --generate N (or routes that label "
                          "prompt and generated tokens)")
    P, G = profile.phases["prompt"], profile.phases["generated"]
    k, L = profile.top_k, len(profile.layers)
    rng = np.random.default_rng(seed)
    notes = []
    sets = {}
    for name, part in (("prompt", P), ("generated", G)):
        sets[name], why = _sets(part, config)
        if why:
            notes.append(f"domain experts per phase not compared ({why})")
    rows: list[dict[str, Any]] = []
    nP, tP = P.totals()
    nG, tG = G.totals()
    for domain in profile.domains:
        if domain not in P.domains or domain not in G.domains:
            notes.append(f"{domain}: only one phase has tokens")
            continue
        i, j = P.domains.index(domain), G.domains.index(domain)
        a, b = tP["sel"][i].astype(float), tG["sel"][j].astype(float)
        obs = _overlap(a[None], np.array([nP[i]], float), b[None], np.array([nG[j]], float), k)[0]
        lo = hi = np.full(L, np.nan)
        if n_boot and P.keep_sequences and G.keep_sequences:
            lo, hi = _bootstrap(P, G, domain, k, n_boot, rng)
        pooled = (a + b) / max((nP[i] + nG[j]) * k, 1)
        same = _same_distribution(pooled, int(nP[i]), int(nG[j]), k, rng, 5.0 / L)
        for li, layer in enumerate(profile.layers):
            row: dict[str, Any] = {"domain": domain, "layer": int(layer), "n_prompt": int(nP[i]),
                                   "n_generated": int(nG[j]), "usage_overlap": float(obs[li]),
                                   "overlap_lo": float(lo[li]), "overlap_hi": float(hi[li]),
                                   "overlap_if_same": float(same[li]), "differs": bool(obs[li] < same[li])}
            if sets["prompt"] is not None and sets["generated"] is not None:
                sp = sets["prompt"].get((domain, int(layer)), set())
                sg = sets["generated"].get((domain, int(layer)), set())
                union = sp | sg
                row.update(prompt_experts=len(sp), generated_experts=len(sg), shared_experts=len(sp & sg),
                           jaccard=len(sp & sg) / len(union) if union else np.nan)
            rows.append(row)
    out = pd.DataFrame(rows, columns=COLUMNS)
    out.attrs["note"] = "; ".join(dict.fromkeys(notes))
    return out


def _bootstrap(P: RoutingProfile, G: RoutingProfile, domain: str, k: int, n_boot: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile interval of the overlap, resampling the domain's sequences (the same ones in both phases)."""
    def rows(p: RoutingProfile) -> tuple[dict[int, int], np.ndarray, np.ndarray]:
        m = p.seq_domain == p.domains.index(domain)
        ids = p.seq_id[m]
        return {int(x): n for n, x in enumerate(ids)}, p.seq_tokens[m], p.seq_stats("sel")[m]

    ip, np_, sp = rows(P)
    ig, ng, sg = rows(G)
    ids = sorted(set(ip) | set(ig))
    L, E = sp.shape[1], sp.shape[2]
    # per sequence, both phases (zeros where a sequence has no token of a phase)
    A = np.zeros((len(ids), L, E))
    B = np.zeros((len(ids), L, E))
    na = np.zeros(len(ids))
    nb = np.zeros(len(ids))
    for n, x in enumerate(ids):
        if x in ip:
            A[n], na[n] = sp[ip[x]], np_[ip[x]]
        if x in ig:
            B[n], nb[n] = sg[ig[x]], ng[ig[x]]
    draws = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    vals = np.stack([_overlap(A[d].sum(0)[None], np.array([na[d].sum()]), B[d].sum(0)[None],
                              np.array([nb[d].sum()]), k)[0] for d in draws])
    return np.nanpercentile(vals, 2.5, axis=0), np.nanpercentile(vals, 97.5, axis=0)


def _same_distribution(shares: np.ndarray, n_a: int, n_b: int, k: int, rng: np.random.Generator,
                       percentile: float) -> np.ndarray:
    """``(L,)`` the ``percentile``-th percentile of the overlap of two samples of ``n_a`` and ``n_b`` tokens (``k``
    selections each) drawn from the same selection shares ``(L, E)`` (enough draws for 20 beyond it)."""
    L = shares.shape[0]
    draws = int(min(20_000, max(200, np.ceil(2000 / percentile))))
    out = np.empty(L)
    for la in range(L):
        p = shares[la] / shares[la].sum() if shares[la].sum() else np.full(len(shares[la]), 1 / len(shares[la]))
        a = rng.multinomial(n_a * k, p, size=draws) / max(n_a, 1)
        b = rng.multinomial(n_b * k, p, size=draws) / max(n_b, 1)
        out[la] = np.percentile(np.minimum(a, b).sum(-1) / k, percentile)
    return out


def phase_sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per domain: how much its prompt and generated tokens' routing overlap, and whether their
    domain experts agree."""
    out = []
    for domain, g in table.groupby("domain", sort=False):
        differ = g[g.differs]
        text = (f"{domain}: prompt ({int(g.n_prompt.iloc[0])} tokens) and generated ({int(g.n_generated.iloc[0])} "
                f"tokens) routing share {g.usage_overlap.mean():.0%} of expert selections on average over layers; ")
        text += (f"{len(differ)} of {len(g)} layers differ beyond sampling noise (layers "
                 f"{', '.join(str(x) for x in differ.layer)})" if len(differ) else
                 "no layer differs beyond sampling noise")
        if g.jaccard.notna().any() or (g.prompt_experts.fillna(0) + g.generated_experts.fillna(0)).sum():
            p, q, s = int(g.prompt_experts.sum()), int(g.generated_experts.sum()), int(g.shared_experts.sum())
            text += f"; domain experts: {p} in the prompt, {q} in the generated tokens, {s} in both"
        out.append(text + ".")
    return out


def save_phase_comparison(profile: RoutingProfile, out_dir: Any, config: DomainExpertConfig | None = None,
                          seed: int = 0) -> dict[str, Any] | None:
    """Write ``phase_comparison.parquet`` into ``out_dir`` when ``profile`` holds both phases; returns the
    manifest's summary (the sentences, and what could not be compared), or None without phases."""
    from pathlib import Path

    from ..io import write_table

    if not {"prompt", "generated"} <= set(profile.phases):
        return None
    table = phase_comparison(profile, config, seed=seed)
    write_table(Path(out_dir) / "phase_comparison.parquet", table,
                meta={"table": "phase_comparison", "note": table.attrs.get("note", "")})
    return {"sentences": phase_sentences(table), "note": table.attrs.get("note", "")}


__all__ = ["COLUMNS", "phase_comparison", "phase_sentences", "save_phase_comparison"]
