"""Domain experts (SPEC §2): activation rate, routing entropy, CWAS, specificity, and the selection rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import DomainExpertConfig
from ..errors import ConfigError
from ..io import read_table, write_table
from .profile import RoutingProfile

TABLE_VERSION = 1


@dataclass
class DomainExpertTable:
    """One row per (domain, layer, expert); ``settings`` holds the rule, thresholds and config used."""

    df: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def experts(self, domain: str | None = None) -> pd.DataFrame:
        """Rows flagged as domain experts (of ``domain`` if given), most specific first."""
        rows = self.df[self.df["is_domain_expert"]]
        if domain is not None:
            rows = rows[rows["domain"] == domain]
        return rows.sort_values("specificity", ascending=False)

    def targets(self, domain: str) -> list[tuple[int, int]]:
        """``(layer, expert)`` pairs of ``domain``'s experts, for steering."""
        return [(int(r.layer), int(r.expert)) for r in self.experts(domain).itertuples()]

    def save(self, path: str | Path) -> None:
        write_table(path, self.df, meta={"table": "domain_experts", "version": TABLE_VERSION, **self.settings})

    @classmethod
    def load(cls, path: str | Path) -> DomainExpertTable:
        df, meta = read_table(path)
        return cls(df, meta)


def _rates(
    n: np.ndarray, sel: np.ndarray, hsum: np.ndarray, conditional: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A, H and CWAS from sums over leading axes ``(..., L, E)``; ``n`` broadcasts against them."""
    with np.errstate(invalid="ignore", divide="ignore"):
        A = sel / n
        H = np.where(sel > 0, hsum / sel, 0.0) if conditional else hsum / n
    A = np.nan_to_num(A)
    H = np.nan_to_num(H)
    return A, H, (1.0 - H) * A


def _specificity(S: np.ndarray) -> np.ndarray:
    """``S(D_j) - mean_{k≠j} S(D_k)`` along axis -3 (domains), shape preserved."""
    D = S.shape[-3]
    return S - (S.sum(axis=-3, keepdims=True) - S) / (D - 1)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of a flat array; NaNs stay NaN."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def domain_experts(
    profile: RoutingProfile,
    config: DomainExpertConfig | None = None,
    drivers: pd.DataFrame | None = None,
    **overrides: Any,
) -> DomainExpertTable:
    """Score every (domain, layer, expert) and flag domain and general experts (SPEC §2).

    ``config`` (or keyword overrides of :class:`DomainExpertConfig`) chooses the rule (``"z"``: specificity
    ≥ mean + z·sd of the layer's experts, ddof=0; ``"fdr"``: BH q-value ≤ alpha), the entropy form and
    whether H is conditional on selection. Both rules also need ``A`` above uniform (``k/E``). ``drivers``
    (rows with ``domain, layer, expert, is_driver``) removes driver experts from the general set.
    """
    from ..validation import check_type

    check_type(profile, RoutingProfile, "profile", "a RoutingProfile (es.profile(...) or RoutingProfile.load(dir))")
    cfg = (config or DomainExpertConfig()).replace(**overrides) if overrides else (config or DomainExpertConfig())
    D = len(profile.domains)
    if D < 2:
        raise ConfigError(f"domain experts need at least 2 domains, the profile has {D}: add --domain sources")
    n, tot = profile.totals()
    if (n == 0).any():
        empty = profile.domains[int(np.argmin(n))]
        raise ConfigError(f"domain {empty!r} has no tokens in the profile: check its texts")
    hname = "h_bern" if cfg.entropy == "bernoulli" else "h_eq1"
    L, E = len(profile.layers), profile.num_experts
    A, H, S = _rates(n[:, None, None], tot["sel"], tot[hname], cfg.conditional)
    spec = _specificity(S)
    mu = spec.mean(axis=2, keepdims=True)
    sd = spec.std(axis=2, keepdims=True)
    threshold = np.broadcast_to(mu + cfg.z * sd, spec.shape)
    uniform = profile.top_k / E
    above_uniform = uniform < A
    gate_mean = np.where(tot["sel"] > 0, tot["gate"] / np.maximum(tot["sel"], 1), 0.0)

    ci = {k: np.full((D, L, E), np.nan) for k in ("A_lo", "A_hi", "H_lo", "H_hi", "S_lo", "S_hi")}
    pvals = np.full((D, L, E), np.nan)
    rng = np.random.default_rng(cfg.seed)
    n_seq = profile.num_sequences
    resamplable = profile.keep_sequences and min(n_seq.values(), default=0) > 1
    if resamplable:
        seq = {
            "tok": profile.seq_tokens.astype(np.float64),
            "sel": profile.seq_stats("sel").reshape(-1, L * E).astype(np.float64),
            "h": profile.seq_stats(hname).reshape(-1, L * E),
        }
        dom = profile.seq_domain
        if cfg.n_boot > 0:
            lo_q, hi_q = 100 * (1 - cfg.ci) / 2, 100 * (1 + cfg.ci) / 2
            for d in range(D):
                idx = np.flatnonzero(dom == d)
                W = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=cfg.n_boot).astype(np.float64)
                nb = W @ seq["tok"][idx]
                Ab, Hb, Sb = _rates(nb[:, None], W @ seq["sel"][idx], W @ seq["h"][idx], cfg.conditional)
                for name, arr in (("A", Ab), ("H", Hb), ("S", Sb)):
                    lo, hi = np.percentile(arr, [lo_q, hi_q], axis=0)
                    ci[f"{name}_lo"][d], ci[f"{name}_hi"][d] = lo.reshape(L, E), hi.reshape(L, E)
        if cfg.n_perm > 0:
            exceed = np.zeros((D, L * E))
            onehot = np.zeros((D, len(dom)))
            for _ in range(cfg.n_perm):
                onehot[:] = 0
                onehot[rng.permutation(dom), np.arange(len(dom))] = 1.0
                _, _, Sp = _rates((onehot @ seq["tok"])[:, None], onehot @ seq["sel"], onehot @ seq["h"],
                                  cfg.conditional)
                exceed += _specificity(Sp.reshape(D, L, E)).reshape(D, -1) >= spec.reshape(D, -1) - 1e-12
            pvals = ((1 + exceed) / (1 + cfg.n_perm)).reshape(D, L, E)
    elif cfg.rule == "fdr":
        raise ConfigError("rule='fdr' needs per-sequence statistics from more than one sequence per domain: "
                          "profile with keep_sequences=True and more texts, or use rule='z'")
    qvals = bh_qvalues(pvals.ravel()).reshape(D, L, E)

    selected = (spec >= threshold) & (sd > 0) if cfg.rule == "z" else qvals <= cfg.alpha
    is_dom = selected & above_uniform
    is_driver = np.zeros((D, L, E), bool)
    if drivers is not None and len(drivers):
        d_index = {d: i for i, d in enumerate(profile.domains)}
        l_index = {layer: i for i, layer in enumerate(profile.layers)}
        for r in drivers[drivers["is_driver"]].itertuples():
            if r.domain in d_index and r.layer in l_index:
                is_driver[d_index[r.domain], l_index[r.layer], r.expert] = True
    # General: an expert (l, e) activated above uniform somewhere, neither domain nor driver anywhere.
    general = above_uniform.any(0) & ~is_dom.any(0) & ~is_driver.any(0)

    dd, ll, ee = np.meshgrid(np.arange(D), np.arange(L), np.arange(E), indexing="ij")
    df = pd.DataFrame({
        "domain": np.asarray(profile.domains, dtype=object)[dd.ravel()],
        "layer": np.asarray(profile.layers)[ll.ravel()],
        "expert": ee.ravel(),
        "n_tokens": n[dd.ravel()],
        "n_sequences": [n_seq.get(profile.domains[d], 0) for d in dd.ravel()],
        "activation_rate": A.ravel(),
        "entropy": H.ravel(),
        "cwas": S.ravel(),
        "specificity": spec.ravel(),
        "spec_threshold": threshold.ravel(),
        "uniform_rate": uniform,
        "gate_mean": gate_mean.ravel(),
        **{k: v.ravel() for k, v in ci.items()},
        "p_value": pvals.ravel(),
        "q_value": qvals.ravel(),
        "is_domain_expert": is_dom.ravel(),
        "is_driver": is_driver.ravel(),
        "is_general": np.broadcast_to(general, (D, L, E)).ravel(),
    })
    settings = {
        "config": cfg.to_dict(),
        "rule_text": (f"specificity >= mean + {cfg.z} sd (ddof=0) of the layer's experts, and A > k/E"
                      if cfg.rule == "z" else f"BH q-value <= {cfg.alpha}, and A > k/E"),
        "uniform_rate": uniform,
        "domains": profile.domains,
        "layers": profile.layers,
        "resampled": bool(resamplable),
        "truncated": profile.truncated,
    }
    return DomainExpertTable(df, settings)
