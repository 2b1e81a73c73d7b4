"""Mutual information between the domain of a token and the expert its router selects, per MoE layer.

Computed from a :class:`~expertscope.stats.profile.RoutingProfile`'s domain totals alone (no new capture).
A token selects a set of ``k`` experts in each layer; the expert is modelled as drawn uniformly from that
set, so with ``A(D, l, e)`` the fraction of domain ``D``'s tokens that select expert ``e`` in layer ``l``
(``sum_e A(D, l, e) = k``) and ``n_D`` the domain's token count (``N = sum_D n_D``):

* ``p(e | D) = A(D, l, e) / k`` and ``p(D) = n_D / N``;
* ``p(e) = sum_D p(D) p(e | D)``;
* ``I(domain; expert) = H(e) - sum_D p(D) H(e | D)`` in bits, ``0 <= I <= min(H(domain), log2 E)``;
* ``mi_normalised = I / H(domain)``: 0 when routing ignores the domain, 1 when the selected expert
  determines the domain.

Domains are weighted by their token counts, i.e. the MI is that of a token drawn uniformly from all
profiled tokens. With few tokens the plug-in estimate is biased upwards: ``mi_bias_bits`` gives the
Miller-Madow first-order bias ``(|D| - 1)(E - 1) / (2 N' ln 2)`` with ``N' = k N`` draws, as a noise floor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import DataError

if TYPE_CHECKING:
    from .profile import RoutingProfile


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits along ``axis`` (``0 log 0 = 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def mutual_information_from_counts(sel: np.ndarray, n_tokens: np.ndarray, top_k: int) -> pd.DataFrame:
    """Per-layer I(domain; selected expert) from selection counts.

    ``sel`` ``(D, L, E)``: how many of domain ``D``'s tokens selected expert ``e`` in layer ``l``;
    ``n_tokens`` ``(D,)``: each domain's token count; ``top_k``: experts selected per token.
    Returns one row per layer index ``0..L-1`` (see :func:`routing_mutual_information` for the columns).
    """
    sel = np.asarray(sel, dtype=np.float64)
    n = np.asarray(n_tokens, dtype=np.float64)
    if sel.ndim != 3 or n.shape != (sel.shape[0],):
        raise DataError(f"selection counts of shape {sel.shape} do not match token counts {n.shape}: "
                        "pass sel (D, L, E) and n_tokens (D,)")
    keep = n > 0  # a domain without tokens carries no probability mass
    sel, n = sel[keep], n[keep]
    D, L, E = sel.shape
    if D == 0:
        raise DataError("no profiled tokens: profile at least one domain before computing mutual information")
    p_d = n / n.sum()  # (D,)
    p_e_given_d = sel / (top_k * n[:, None, None])  # (D, L, E); rows sum to 1
    p_e = np.einsum("d,dle->le", p_d, p_e_given_d)  # (L, E)
    h_e = _entropy_bits(p_e)  # (L,)
    h_e_given_d = np.einsum("d,dl->l", p_d, _entropy_bits(p_e_given_d))  # (L,)
    mi = np.maximum(h_e - h_e_given_d, 0.0)  # clip float round-off below zero
    h_dom = float(_entropy_bits(p_d))
    bias = (D - 1) * (E - 1) / (2 * top_k * n.sum() * math.log(2))
    return pd.DataFrame({
        "layer_index": np.arange(L),
        "mi_bits": mi,
        "mi_normalised": mi / h_dom if h_dom > 0 else np.full(L, np.nan),
        "h_expert_bits": h_e,
        "h_expert_given_domain_bits": h_e_given_d,
        "h_domain_bits": np.full(L, h_dom),
        "mi_bias_bits": np.full(L, bias),
        "n_domains": np.full(L, D),
        "n_tokens": np.full(L, int(n.sum())),
    })


def routing_mutual_information(profile: RoutingProfile) -> pd.DataFrame:
    """Per-layer mutual information I(domain; selected expert) of ``profile``, in bits.

    Columns: ``layer`` (the model's layer number), ``layer_index``, ``mi_bits``, ``mi_normalised``
    (MI / H(domain); NaN with a single domain, where there is nothing to measure), ``h_expert_bits``
    (H(e)), ``h_expert_given_domain_bits`` (sum_D p(D) H(e|D)), ``h_domain_bits``, ``mi_bias_bits`` (the
    plug-in estimate's first-order upward bias: MI below it is indistinguishable from none), ``n_domains``
    and ``n_tokens``. See the module docstring for the model of a token's expert.
    """
    n_tokens, stats = profile.totals()
    df = mutual_information_from_counts(stats["sel"], n_tokens, profile.top_k)
    df.insert(0, "layer", [profile.layers[i] for i in df["layer_index"]])
    return df


__all__ = ["mutual_information_from_counts", "routing_mutual_information"]
