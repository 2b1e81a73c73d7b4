"""Domain experts: activation rate, routing entropy, CWAS, specificity, activation lift, and the selection
rules (definitions and defaults in ``docs/methods.md``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..config import DomainExpertConfig, resolve_config
from ..errors import ConfigError
from ..io import read_table, write_table
from .profile import RoutingProfile
from .rules import bh_qvalues, bh_text, bootstrap_weights, passes, percentile_bounds, rule_text, z_rule_text

TABLE_VERSION = 2


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
    """A, H and CWAS from sums over leading axes ``(..., L, E)``; ``n`` broadcasts against them. A quotient is 0
    where its denominator is, and H is 0 where the entropy sums are NaN (recorded routes carry none)."""
    shape = np.broadcast_shapes(np.shape(n), np.shape(sel))
    A = np.divide(sel, n, out=np.zeros(shape), where=n > 0)
    den = sel if conditional else n
    H = np.divide(hsum, den, out=np.zeros(shape), where=den > 0)
    np.nan_to_num(H, copy=False)
    return A, H, (1.0 - H) * A


def _specificity(S: np.ndarray, axis: int = -3, out: np.ndarray | None = None) -> np.ndarray:
    """``S(D_j) - mean_{k≠j} S(D_k)`` along ``axis`` (domains), shape preserved; into ``out`` if given (``S``
    itself may be it)."""
    D = S.shape[axis]
    others = S.sum(axis=axis, keepdims=True) - S
    others /= D - 1
    return np.subtract(S, others, out=others if out is None else out)


def activation_lift(A: np.ndarray) -> np.ndarray:
    """``A(D_j) / mean_{k≠j} A(D_k)`` along axis -3 (domains): inf when the others never select, NaN for 0/0."""
    D = A.shape[-3]
    others = (A.sum(axis=-3, keepdims=True) - A) / (D - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(others > 0, A / np.where(others > 0, others, 1.0), np.where(A > 0, np.inf, np.nan))


def _preference(A: np.ndarray, lift: np.ndarray, uniform: float, min_lift: float) -> tuple[np.ndarray, np.ndarray]:
    """Which cells are *preferred* in their domain rather than displaced from the others, and each (domain,
    layer)'s median lift (broadcast to ``(D, L, E)``).

    A lift ``A(D)/mean A(others)`` can come from D using the expert or from the other domains' own experts
    taking its slots there; the second lifts every expert of the layer alike. Preferred: D uses it at least
    ``min_lift`` × the uniform rate ``k/E``, or its lift is at least ``min_lift`` × the median lift of the
    layer's experts in D (it stands out from the layer's common shift).
    """
    finite = np.where(np.isnan(lift), np.nan, lift)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer of NaN lifts (one domain) has no median
        med = np.nanmedian(finite, axis=2, keepdims=True)
    med = np.broadcast_to(med, lift.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        stands_out = np.where(med > 0, lift >= min_lift * med, lift > 0)
    return med, (min_lift * uniform <= A) | stands_out


def group_statistics(
    tok: np.ndarray, sel: np.ndarray, h: np.ndarray, labels: np.ndarray, D: int, conditional: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Specificity of CWAS and of the activation rate for labelings of the sequences.

    ``tok`` ``(N,)`` real tokens per sequence, ``sel``/``h`` ``(N, C)`` per-sequence sums (C = L·E cells),
    ``labels`` ``(B, N)`` B labelings with values in ``[0, D)``. Returns ``spec`` and ``act`` ``(B, D, C)``:
    ``S(D_j) - mean_{k≠j} S(D_k)`` with ``S = (1 - H)·A``, and ``A(D_j) - mean_{k≠j} A(D_k)``.
    """
    B, N = labels.shape
    C = sel.shape[1]
    X = np.concatenate([tok[:, None], sel, h], axis=1)
    # Every sequence is in exactly one group, so the last group's sums are the totals minus the others':
    # one matmul row per labeling fewer (half the work at two domains).
    top = (_onehot(labels, D - 1).reshape(B * (D - 1), N) @ X).reshape(B, D - 1, -1)
    G = np.concatenate([top, (X.sum(0) - top.sum(1))[:, None]], axis=1)
    A, _, S = _rates(G[..., :1], G[..., 1:1 + C], G[..., 1 + C:], conditional)
    return _specificity(S, axis=1, out=S), _specificity(A, axis=1, out=A)


def _onehot(labels: np.ndarray, D: int) -> np.ndarray:
    """``(B, N)`` integer labels → ``(B, D, N)`` float indicators of the labels ``0 … D-1``."""
    return (labels[:, None, :] == np.arange(D)[None, :, None]).astype(np.float64)


def parse_n_perm(text: str | int) -> int | Literal["auto"]:
    """``"auto"`` or a whole number >= 0 (what a command line passes as ``--n-perm``)."""
    if isinstance(text, int) or str(text).strip().isdigit():
        return int(text)
    if str(text).strip().lower() == "auto":
        return "auto"
    raise ConfigError(f"--n-perm {text!r} is not valid: pass 'auto' or a whole number, e.g. --n-perm 20000")


def auto_n_perm(m: int, alpha: float) -> int:
    """Permutations for m tests at FDR ``alpha``: ``ceil(20·m/alpha)``, so that the smallest attainable p,
    ``1/(n+1)``, lies 20× below the first BH threshold ``alpha/m``."""
    return int(np.ceil(20 * m / alpha))


def permutation_pvalues(
    tok: np.ndarray, sel: np.ndarray, h: np.ndarray, labels: np.ndarray, D: int, conditional: bool,
    n_perm: int, rng: np.random.Generator, test: str = "permutation", stop: int = 50,
    batch_cells: int = 65_536,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-sided p-values of specificity (CWAS) and of activation specificity under label shuffling.

    Domain labels ``labels`` ``(N,)`` are permuted across the N sequences (group sizes kept). Returns
    ``p_spec``, ``p_act`` ``(D, C)`` and ``n_done`` ``(C,)`` (permutations used per cell column).

    ``test="permutation"``: Monte Carlo ``p = (1 + #{perm ≥ observed}) / (1 + n)``, in rounds of doubling
    size; a column stops once each of its D cells has ``stop`` exceedances (its p is settled and far from
    significant), so the full ``n_perm`` is spent only on candidate cells (sequential Monte Carlo, Besag &
    Clifford 1991). ``test="normal"``: the observed statistic against a normal fitted to the mean and sd
    of ``n_perm`` permuted statistics of the same cell, ``p = 1 - Φ((obs - mean)/sd)``.
    """
    from scipy.stats import norm

    N, C = sel.shape
    obs_s, obs_a = group_statistics(tok, sel, h, labels[None], D, conditional)
    obs_s, obs_a = obs_s[0], obs_a[0]
    tol_s = 1e-12 * np.maximum(1.0, np.abs(obs_s))
    tol_a = 1e-12 * np.maximum(1.0, np.abs(obs_a))
    ex_s, ex_a = np.zeros((D, C)), np.zeros((D, C))
    sum_s, sq_s, sum_a, sq_a = (np.zeros((D, C)) for _ in range(4))
    n_done = np.zeros(C, np.int64)
    active = np.arange(C)
    done, round_size = 0, min(n_perm, 1000)
    while done < n_perm and active.size:
        todo = min(round_size, n_perm - done)
        # Small batches: group sums of ~64k cells stay in cache and their buffers are reused; batches of
        # millions of cells ran 2× slower per permutation (fresh pages each time). The RNG stream does not
        # depend on the batch size.
        bsz = max(1, min(todo, batch_cells // max(1, D * max(N, active.size))))
        tk, sl, hh = tok, sel[:, active], h[:, active]
        for s in range(0, todo, bsz):
            b = min(bsz, todo - s)
            perm = rng.permuted(np.broadcast_to(labels, (b, N)), axis=1)
            ps, pa = group_statistics(tk, sl, hh, perm, D, conditional)
            if test == "normal":
                sum_s[:, active] += ps.sum(0)
                sq_s[:, active] += (ps**2).sum(0)
                sum_a[:, active] += pa.sum(0)
                sq_a[:, active] += (pa**2).sum(0)
            ex_s[:, active] += (ps >= (obs_s - tol_s)[:, active]).sum(0)
            ex_a[:, active] += (pa >= (obs_a - tol_a)[:, active]).sum(0)
        n_done[active] += todo
        done += todo
        round_size *= 2
        if test == "permutation":
            active = active[(ex_s[:, active] < stop).any(axis=0)]
    if test == "normal":
        n = float(n_done.max())

        def fit(obs: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
            mu = s1 / n
            sd = np.sqrt(np.maximum(s2 / n - mu**2, 0.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                zz = (obs - mu) / sd
            # A constant null (an expert nobody selects): p = 1 unless the observation exceeds it.
            return np.where(sd > 1e-15, norm.sf(zz), np.where(obs > mu + 1e-12, 0.0, 1.0))

        return fit(obs_s, sum_s, sq_s), fit(obs_a, sum_a, sq_a), n_done
    return (1 + ex_s) / (1 + n_done), (1 + ex_a) / (1 + n_done), n_done


def domain_experts(
    profile: RoutingProfile,
    config: DomainExpertConfig | None = None,
    drivers: pd.DataFrame | None = None,
    **overrides: Any,
) -> DomainExpertTable:
    """Score every (domain, layer, expert) and flag domain and general experts.

    Per (domain D, layer l, expert i): activation rate ``A``, entropy ``H``, ``CWAS = (1-H)·A``, the
    specificity ``CWAS(D) - mean CWAS(other domains)`` and the activation lift ``A(D) / mean A(others)``,
    each ``A``/``H``/``CWAS``/lift with a bootstrap CI over sequences.

    ``rule="fdr"`` (default): a domain expert passes all three (columns ``pass_test``, ``pass_uniform``,
    ``pass_lift``): BH ``q_value <= alpha`` over all D·L·E cells on the specificity test (``test``:
    permutation of domain labels across sequences, or its normal approximation), ``A > k/E`` (the lower
    bound of A's bootstrap interval, when there is one), and ``lift >= min_lift``; and it is *preferred*
    (``pass_preferred``): ``A >= min_lift·k/E``, or a lift at least ``min_lift`` × the median lift of the
    layer's experts (``layer_median_lift``). One that passes the three but is not preferred is labelled
    ``is_displaced``: its lift comes from the other domains' experts taking its slots, not from use in D.
    ``activation_q`` is the same test on ``A`` itself, so an expert whose equal gate
    weights make its CWAS 0 by definition (``p̃ = ½`` gives ``h = 1``) still shows as domain-specific.
    ``rule="z"``: specificity >= mean + z·sd (ddof=0) of the layer's experts, and ``A > k/E``. Its cap:
    among E values the largest z is sqrt(E-1) and at most E/(1+z²) experts can reach z, so with E = 8 and
    z = 2 at most one expert per (domain, layer) can pass, and none when two are equally specific.

    ``config`` (or keyword overrides of :class:`DomainExpertConfig`; both at once must agree) sets the
    rule; ``test="auto"`` runs the permutation test when it is affordable and its normal approximation
    otherwise (``settings["test"]`` says which). ``drivers`` (rows with ``domain, layer, expert,
    is_driver``) removes drivers from the general set. A profile of one domain gives A/H/CWAS/gate only
    (specificity and lift need two domains), with a note in ``settings["note"]``.
    """
    from ..validation import check_type

    check_type(profile, RoutingProfile, "profile", "a RoutingProfile (es.profile(...) or RoutingProfile.load(dir))")
    cfg = resolve_config(DomainExpertConfig, config, overrides)
    D = len(profile.domains)
    if D < 1:
        raise ConfigError("the profile holds no domains: profile at least one --domain")
    n, tot = profile.totals()
    if (n == 0).any():
        empty = profile.domains[int(np.argmin(n))]
        raise ConfigError(f"domain {empty!r} has no tokens in the profile: check its texts")
    hname = "h_bern" if cfg.entropy == "bernoulli" else "h_eq1"
    L, E = len(profile.layers), profile.num_experts
    comparable = D >= 2
    A, H, S = _rates(n[:, None, None], tot["sel"], tot[hname], cfg.conditional)
    nan = np.full((D, L, E), np.nan)
    stats = {"A": A, "H": H, "S": S, "spec": _specificity(S) if comparable else nan.copy(),
             "lift": activation_lift(A) if comparable else nan.copy(),
             "gate_mean": np.where(tot["sel"] > 0, tot["gate"] / np.maximum(tot["sel"], 1), 0.0)}
    m = D * L * E
    test, n_perm = _choose_test(cfg, m, D, L, E, profile.num_sequences)
    rng = np.random.default_rng(cfg.seed)
    resamplable = profile.keep_sequences and min(profile.num_sequences.values(), default=0) > 1
    if cfg.rule == "fdr" and comparable:
        if not resamplable:
            raise ConfigError("rule='fdr' needs per-sequence statistics from more than one sequence per domain: "
                              "profile with keep_sequences=True and more texts, or use rule='z'")
        if test == "permutation" and n_perm + 1 < m / cfg.alpha:
            raise ConfigError(f"n_perm={n_perm} is too few for {m} tests: the smallest p-value 1/(n_perm+1) can "
                              f"never pass BH at alpha={cfg.alpha}; use n_perm='auto' ({auto_n_perm(m, cfg.alpha)})")
    ci = {f"{k}_{e}": nan.copy() for k in ("A", "H", "S", "lift") for e in ("lo", "hi")}
    tests = {"p": nan.copy(), "act_p": nan.copy(), "n_done": np.zeros((L, E), np.int64)}
    if resamplable:
        per_seq = (profile.seq_tokens.astype(np.float64),
                   profile.seq_stats("sel").reshape(-1, L * E).astype(np.float64),
                   profile.seq_stats(hname).reshape(-1, L * E), profile.seq_domain.astype(np.int64))
        if cfg.n_boot > 0:  # drawn first: the permutations follow on the same generator
            ci.update(_bootstrap_intervals(per_seq, D, L, E, cfg, rng, comparable))
        if n_perm > 0 and comparable:
            ps, pa, nd = permutation_pvalues(*per_seq[:3], per_seq[3], D, cfg.conditional, n_perm, rng, test,
                                             cfg.perm_stop)
            tests = {"p": ps.reshape(D, L, E), "act_p": pa.reshape(D, L, E), "n_done": nd.reshape(L, E)}
    flags = _criteria(stats, ci, tests, profile.top_k / E, cfg, comparable, resamplable)
    flags["is_driver"] = _driver_flags(profile, drivers, (D, L, E))
    # General: an expert (l, e) activated above uniform somewhere, neither domain nor driver anywhere.
    flags["is_general"] = np.broadcast_to(
        (profile.top_k / E < A).any(0) & ~flags["is_domain_expert"].any(0) & ~flags["is_driver"].any(0), (D, L, E))
    df = _frame(profile, n, stats, ci, tests, flags, profile.top_k / E)
    settings = {
        "config": cfg.to_dict(),
        "rule_text": _rule_text(cfg, E, m, test, n_perm),
        "test": test if (cfg.rule == "fdr" or n_perm > 0) and comparable else None,
        "n_perm": n_perm,
        "n_tests": m,
        "uniform_rate": profile.top_k / E,
        "domains": profile.domains,
        "layers": profile.layers,
        "resampled": bool(resamplable),
        "truncated": profile.truncated,
    }
    if not comparable:
        settings["note"] = ("one domain only: specificity, lift and domain experts need at least 2 domains; "
                            "the table holds A, H, CWAS and gate weights")
    not_applicable = profile.model_info.get("not_applicable")
    if not_applicable:  # recorded routes: no logits, so H is unknown and the test runs on A (CWAS taken as A)
        df.loc[:, [c for c in df.columns if c.split("_")[0] in ("entropy", "cwas", "H", "S", "gate")]] = np.nan
        settings["not_applicable"] = not_applicable
        settings["rule_text"] = (f"{settings['rule_text']} (routes only: the specificity is that of the activation "
                                 "rate A)")
    return DomainExpertTable(df, settings)


def _choose_test(cfg: DomainExpertConfig, m: int, D: int, L: int, E: int, n_seq: dict[str, int]
                 ) -> tuple[str, int]:
    """``(test, n_perm)``: ``test="auto"`` runs the permutation test when its worst-case work (every column
    running all permutations: group sums of 2·L·E + 1 columns per labeling) fits ``perm_budget``, else its
    normal approximation; ``n_perm="auto"`` is ``20·m/alpha`` for the permutation test, 1000 for the normal."""
    test = cfg.test
    if test == "auto":
        n_full = auto_n_perm(m, cfg.alpha) if cfg.n_perm == "auto" else int(cfg.n_perm)
        work = float(n_full) * D * sum(n_seq.values()) * (2 * L * E + 1)
        test = "permutation" if work <= cfg.perm_budget else "normal"
    n_perm = (auto_n_perm(m, cfg.alpha) if test == "permutation" else 1000) if cfg.n_perm == "auto" \
        else int(cfg.n_perm)
    return test, n_perm


def _bootstrap_intervals(per_seq: tuple[np.ndarray, ...], D: int, L: int, E: int, cfg: DomainExpertConfig,
                         rng: np.random.Generator, comparable: bool) -> dict[str, np.ndarray]:
    """Percentile intervals of A, H, CWAS and the lift, ``(D, L, E)`` each (``<name>_lo``/``_hi``), from
    ``n_boot`` stratified resamples: each domain's sequences with replacement, as multinomial weights.
    ``per_seq``: tokens ``(N,)``, selections and entropy sums ``(N, L·E)``, domain index ``(N,)``."""
    tok, sel, hs, dom = per_seq
    lo_q, hi_q = percentile_bounds(cfg.ci)
    boot = {k: np.empty((cfg.n_boot, D, L * E)) for k in ("A", "H", "S")}
    for d in range(D):
        idx = np.flatnonzero(dom == d)
        W = bootstrap_weights(len(idx), cfg.n_boot, rng)
        boot["A"][:, d], boot["H"][:, d], boot["S"][:, d] = _rates(
            (W @ tok[idx])[:, None], W @ sel[idx], W @ hs[idx], cfg.conditional)
    if comparable:
        boot["lift"] = activation_lift(boot["A"][:, :, None, :])[:, :, 0]
    out = {}
    for name, arr in boot.items():
        if name == "lift":  # inf (others never select) sorts above every finite lift
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = np.nanpercentile(np.where(np.isnan(arr), -np.inf, arr), [lo_q, hi_q], axis=0)
            lo, hi = np.where(np.isneginf(lo), np.nan, lo), np.where(np.isneginf(hi), np.nan, hi)
        else:
            lo, hi = np.percentile(arr, [lo_q, hi_q], axis=0)
        out[f"{name}_lo"], out[f"{name}_hi"] = lo.reshape(D, L, E), hi.reshape(D, L, E)
    return out


def _criteria(stats: dict[str, np.ndarray], ci: dict[str, np.ndarray], tests: dict[str, np.ndarray], uniform: float,
              cfg: DomainExpertConfig, comparable: bool, resamplable: bool) -> dict[str, np.ndarray]:
    """The rule's pass flags and q-values, ``(D, L, E)`` each: significance, above uniform, lift, preferred;
    the domain experts, and the displaced (the first three without the fourth)."""
    spec, lift, A = stats["spec"], stats["lift"], stats["A"]
    mu, sd = spec.mean(axis=2, keepdims=True), spec.std(axis=2, keepdims=True)
    threshold = np.broadcast_to(mu + cfg.z * sd, spec.shape)
    q, act_q = bh_qvalues(tests["p"]), bh_qvalues(tests["act_p"])
    pass_test = (spec >= threshold) & (sd > 0) if cfg.rule == "z" else q <= cfg.alpha
    pass_lift = lift >= cfg.min_lift
    above_uniform = uniform < A
    if cfg.rule == "fdr" and cfg.n_boot > 0 and resamplable:  # above uniform with 95% confidence
        above_uniform = ci["A_lo"] > uniform
    criteria = {"test": pass_test, "uniform": above_uniform}
    if cfg.rule == "fdr":
        criteria["lift"] = pass_lift
    candidate = passes(criteria) & comparable
    layer_lift, preferred = _preference(A, lift, uniform, cfg.min_lift)
    displaced = candidate & ~preferred if cfg.rule == "fdr" else np.zeros_like(candidate)
    return {"threshold": threshold, "q": q, "act_q": act_q, "pass_test": pass_test & comparable,
            "pass_uniform": above_uniform, "pass_lift": pass_lift, "pass_preferred": preferred & comparable,
            "layer_lift": layer_lift, "is_domain_expert": candidate & ~displaced, "is_displaced": displaced}


def _driver_flags(profile: RoutingProfile, drivers: pd.DataFrame | None, shape: tuple[int, int, int]) -> np.ndarray:
    """``(D, L, E)``: True where ``drivers`` (rows with ``domain, layer, expert, is_driver``) flags a driver."""
    out = np.zeros(shape, bool)
    if drivers is not None and len(drivers):
        d_index = {d: i for i, d in enumerate(profile.domains)}
        l_index = {layer: i for i, layer in enumerate(profile.layers)}
        for r in drivers[drivers["is_driver"]].itertuples():
            if r.domain in d_index and r.layer in l_index:
                out[d_index[r.domain], l_index[r.layer], r.expert] = True
    return out


def _frame(profile: RoutingProfile, n: np.ndarray, stats: dict[str, np.ndarray], ci: dict[str, np.ndarray],
           tests: dict[str, np.ndarray], flags: dict[str, np.ndarray], uniform: float) -> pd.DataFrame:
    """One row per (domain, layer, expert), in that order."""
    D, L, E = stats["A"].shape
    n_seq = profile.num_sequences
    dd, ll, ee = np.meshgrid(np.arange(D), np.arange(L), np.arange(E), indexing="ij")
    return pd.DataFrame({
        "domain": np.asarray(profile.domains, dtype=object)[dd.ravel()],
        "layer": np.asarray(profile.layers)[ll.ravel()],
        "expert": ee.ravel(),
        "n_tokens": n[dd.ravel()],
        "n_sequences": [n_seq.get(profile.domains[d], 0) for d in dd.ravel()],
        "activation_rate": stats["A"].ravel(),
        "entropy": stats["H"].ravel(),
        "cwas": stats["S"].ravel(),
        "specificity": stats["spec"].ravel(),
        "spec_threshold": flags["threshold"].ravel(),
        "lift": stats["lift"].ravel(),
        "layer_median_lift": flags["layer_lift"].ravel(),
        "uniform_rate": uniform,
        "gate_mean": stats["gate_mean"].ravel(),
        **{k: v.ravel() for k, v in ci.items()},
        "p_value": tests["p"].ravel(),
        "q_value": flags["q"].ravel(),
        "activation_p": tests["act_p"].ravel(),
        "activation_q": flags["act_q"].ravel(),
        "n_perm_used": np.broadcast_to(tests["n_done"], (D, L, E)).ravel(),
        **{k: np.asarray(flags[k]).ravel() for k in ("pass_test", "pass_uniform", "pass_lift", "pass_preferred",
                                                     "is_domain_expert", "is_displaced", "is_driver", "is_general")},
    })


def _rule_text(cfg: DomainExpertConfig, E: int, m: int, test: str, n_perm: int) -> str:
    """The rule in words, as the table's settings and the report state it."""
    if cfg.rule == "z":
        return rule_text(z_rule_text("specificity", E, cfg.z), "A > k/E")
    test_text = (f"one-sided permutation test of specificity (domain labels shuffled across sequences; up to "
                 f"{n_perm} permutations, sequential stop at {cfg.perm_stop} exceedances)"
                 if test == "permutation" else
                 f"normal approximation of the permutation null of specificity ({n_perm} permutations)")
    return rule_text(bh_text(cfg.alpha, m, f"a {test_text}"),
                     "A > k/E (the 95% interval's lower bound)" if cfg.n_boot > 0 else "A > k/E",
                     f"lift A(D)/mean A(others) >= {cfg.min_lift}",
                     f"preferred, not displaced: A >= {cfg.min_lift}·k/E or lift >= {cfg.min_lift} × the "
                     "layer's median lift (else labelled displaced)")
