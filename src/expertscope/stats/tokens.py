"""Which tokens trigger which experts (docs/methods.md §6, paper §3.3): relative-position bins and token–expert lift.

One routing pass, :func:`record_tokens`, keeps a compact :class:`TokenRecord` of every real token: its
domain, sequence, position ``t``, sequence length ``T``, token id and the experts it selected at each MoE
layer. Both statistics are pure functions of that record (:func:`position_bins`,
:func:`associations_from_record`), so they can be checked by hand on small records and computed twice
without a second forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError
from ..routing import DomainInput, domain_texts, routing_pass

#: Five equal relative-position bins; the last is closed (docs/methods.md §6).
N_BINS = 5
BIN_LABELS = ("[0.0, 0.2)", "[0.2, 0.4)", "[0.4, 0.6)", "[0.6, 0.8)", "[0.8, 1.0]")


@dataclass
class TokenRecord:
    """Every real token of a routing pass, one row per token (``N`` tokens, ``L`` MoE layers).

    ``domain`` ``(N,)`` int32 index into ``domains``; ``seq`` ``(N,)`` the sequence's index within its domain;
    ``position`` ``(N,)`` the 0-based position ``t`` among the sequence's real tokens; ``length`` ``(N,)`` the
    sequence's number of real tokens ``T`` (special tokens the tokenizer adds included, padding excluded);
    ``token_id`` ``(N,)``; ``selected`` ``(N, L, k)`` int32 the experts selected at each layer of ``layers``
    (padded with -1 where a layer selects fewer than ``k``). ``token_strings`` maps each token id present
    to its decoded text.
    """

    domains: list[str]
    layers: list[int]
    domain: np.ndarray
    seq: np.ndarray
    position: np.ndarray
    length: np.ndarray
    token_id: np.ndarray
    selected: np.ndarray
    token_strings: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.domain)
        for name in ("seq", "position", "length", "token_id"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"TokenRecord.{name} has {len(getattr(self, name))} rows, domain has {n}: "
                                  "pass arrays of one length")
        if self.selected.ndim != 3 or self.selected.shape[:2] != (n, len(self.layers)):
            raise ConfigError(f"TokenRecord.selected must be (N={n}, L={len(self.layers)}, k), got "
                              f"{self.selected.shape}: pass one row of selections per token and layer")
        if n and ((self.position < 0).any() or (self.position >= self.length).any()):
            raise ConfigError("TokenRecord positions must satisfy 0 <= t < T: pass 0-based positions")

    @property
    def num_tokens(self) -> int:
        return len(self.domain)

    def triggers(self, drivers: dict[str, dict[int, set[int]]]) -> np.ndarray:
        """``(N, L)`` bool: token ``n``'s selected set at layer ``l`` holds a driver of its domain at ``l``.

        ``drivers[domain][layer]`` is that domain's set of driver experts at that layer (missing: none).
        """
        hit = np.zeros((self.num_tokens, len(self.layers)), dtype=bool)
        for d, name in enumerate(self.domains):
            rows = self.domain == d
            if not rows.any():
                continue
            for j, layer in enumerate(self.layers):
                drv = np.fromiter(drivers.get(name, {}).get(layer, ()), dtype=np.int64)
                if drv.size:
                    hit[rows, j] = np.isin(self.selected[rows, j], drv).any(axis=1)
        return hit


def position_bin(position: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Bin index ``0..4`` of relative position ``r = t / T``: ``floor(5 t / T)`` in exact integer arithmetic.

    With ``t`` 0-based and ``T`` real tokens, ``t <= T - 1`` so ``r <= (T-1)/T < 1``: ``r = 1.0`` cannot
    occur, and the closed upper end of the last bin ``[0.8, 1.0]`` (docs/methods.md §6) never changes a bin. Integer
    division avoids float rounding at the bin edges (e.g. ``t/T = 3/5`` lands in bin 3, exactly).
    """
    position = np.asarray(position, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)
    return np.minimum((N_BINS * position) // np.maximum(length, 1), N_BINS - 1)


# ----- recording -----------------------------------------------------------------------------------------
def record_tokens(
    model: Any,
    domains: DomainInput,
    batch_size: int = 8,
    max_length: int | None = 512,
    limit: int | None = None,
) -> TokenRecord:
    """One routing pass over each domain's texts, keeping every real token's selections at every MoE layer.

    Texts are tokenised like :func:`~expertscope.stats.profile.profile` (special tokens added, right-padded,
    truncated to ``max_length`` or the model's context). Memory: ``N * L * k`` int32 for ``N`` tokens.
    """
    from ..models.model import MoEModel
    from ..validation import check_type

    check_type(model, MoEModel, "model", "an MoEModel (es.load_model(...))")
    tok = model.tokenizer
    texts_by_domain = domain_texts(domains, limit)
    d_index = {name: j for j, name in enumerate(texts_by_domain)}
    layers = list(model.layers)
    k = max(s.top_k for s in model.sites)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in ("domain", "seq", "position", "length", "token_id",
                                                          "selected")}
    for routed in routing_pass(model, texts_by_domain, batch_size, max_length):
        mask = routed.mask.cpu()
        B, T = mask.shape
        real = mask.reshape(-1)
        lengths = mask.sum(1)
        sel = np.full((int(real.sum()), len(layers), k), -1, dtype=np.int32)
        for j, layer in enumerate(layers):
            call = routed.calls[layer]
            idx = call.indices.reshape(B * T, -1)[real.to(call.indices.device)]
            sel[:, j, : idx.shape[1]] = idx.cpu().numpy()
        seq_of = torch.arange(B).unsqueeze(1).expand(B, T).reshape(-1)[real]
        seq_ids = torch.as_tensor(routed.ids, dtype=torch.int64)
        parts["domain"].append(np.full(len(sel), d_index[routed.domain], dtype=np.int32))
        parts["seq"].append(seq_ids[seq_of].numpy().astype(np.int64))
        parts["position"].append(torch.arange(T).repeat(B)[real].numpy().astype(np.int32))
        parts["length"].append(lengths[seq_of].numpy().astype(np.int32))
        parts["token_id"].append(routed.input_ids.cpu().reshape(-1)[real].numpy().astype(np.int64))
        parts["selected"].append(sel)
    arrays = {n: np.concatenate(v) if v else np.zeros(0, np.int64) for n, v in parts.items()}
    if not parts["selected"]:
        arrays["selected"] = np.zeros((0, len(layers), k), np.int32)
    ids = np.unique(arrays["token_id"])
    strings = {int(i): tok.decode([int(i)]) for i in ids}
    return TokenRecord(domains=list(texts_by_domain), layers=layers, token_strings=strings, **arrays)


# ----- positions -----------------------------------------------------------------------------------------
def _driver_sets(drivers: Any) -> dict[str, dict[int, set[int]]]:
    """``{domain: {layer: {expert}}}`` from a driver table (``domain, layer, expert, is_driver``)."""
    df = getattr(drivers, "df", drivers)
    out: dict[str, dict[int, set[int]]] = {}
    if df is None or len(df) == 0:
        return out
    if isinstance(df, dict):  # already {domain: {layer: experts}}
        return {d: {int(l_): {int(e) for e in es} for l_, es in v.items()} for d, v in df.items()}
    missing = {"domain", "layer", "expert"} - set(df.columns)
    if missing:
        raise ConfigError(f"the driver table lacks columns {sorted(missing)}: pass a table made by expertscope")
    rows = df[df["is_driver"].astype(bool)] if "is_driver" in df.columns else df
    for r in rows.itertuples():
        out.setdefault(str(r.domain), {}).setdefault(int(r.layer), set()).add(int(r.expert))
    return out


def position_bins(record: TokenRecord, drivers: Any) -> pd.DataFrame:
    """Driver-triggering tokens by relative position, beside all tokens (docs/methods.md §6; paper Fig. 4).

    A token triggers at layer ``l`` when its selected set at ``l`` holds a driver expert of its domain at
    ``l``; for ``layer == "all"`` it triggers when it does so at any layer (the paper's "tokens that activate
    at least one driver expert"). Positions ``r = t / T`` go to the bins of :func:`position_bin`.

    Returns one row per (domain, layer, bin), ``layer`` a string (``"0"``, ``"1"``, …, ``"all"``), with
    ``bin`` (label), ``bin_index``, ``n_trigger`` (triggering tokens in the bin), ``trigger_share``
    (``n_trigger / triggering tokens of the domain and layer``; NaN when none trigger), ``n_tokens`` (all
    tokens in the bin), ``token_share`` (the baseline, ``n_tokens / tokens of the domain``),
    ``trigger_rate`` (``n_trigger / n_tokens``), ``ratio`` (``trigger_share / token_share``) and the totals
    ``n_trigger_total``, ``n_tokens_total``.
    """
    dsets = _driver_sets(drivers)
    hit = record.triggers(dsets)  # (N, L)
    bins = position_bin(record.position, record.length)
    rows: list[dict[str, Any]] = []
    columns: list[tuple[str, np.ndarray]] = [(str(layer), hit[:, j]) for j, layer in enumerate(record.layers)]
    columns.append(("all", np.asarray(hit.any(axis=1)) if hit.shape[1] else np.zeros(record.num_tokens, bool)))
    for d, name in enumerate(record.domains):
        in_dom = record.domain == d
        base = np.bincount(bins[in_dom], minlength=N_BINS)
        n_dom = int(in_dom.sum())
        for layer, trig in columns:
            t_counts = np.bincount(bins[in_dom & trig], minlength=N_BINS)
            n_trig = int(t_counts.sum())
            for b in range(N_BINS):
                t_share = t_counts[b] / n_trig if n_trig else float("nan")
                b_share = base[b] / n_dom if n_dom else float("nan")
                rows.append({
                    "domain": name, "layer": layer, "bin": BIN_LABELS[b], "bin_index": b,
                    "n_trigger": int(t_counts[b]), "trigger_share": float(t_share),
                    "n_tokens": int(base[b]), "token_share": float(b_share),
                    "trigger_rate": float(t_counts[b] / base[b]) if base[b] else float("nan"),
                    "ratio": float(t_share / b_share) if n_trig and b_share else float("nan"),
                    "n_trigger_total": n_trig, "n_tokens_total": n_dom,
                })
    return pd.DataFrame(rows, columns=["domain", "layer", "bin", "bin_index", "n_trigger", "trigger_share",
                                       "n_tokens", "token_share", "trigger_rate", "ratio", "n_trigger_total",
                                       "n_tokens_total"])


def position_profile(
    model: Any,
    domains: DomainInput,
    drivers: Any,
    batch_size: int = 8,
    max_length: int | None = 512,
    limit: int | None = None,
    record: TokenRecord | None = None,
) -> pd.DataFrame:
    """:func:`position_bins` of a fresh :func:`record_tokens` pass (or of ``record``, if given).

    ``drivers``: a driver table (``DriverTable`` or DataFrame with ``domain, layer, expert, is_driver``).
    """
    _check_table(drivers, "drivers", "is_driver")
    rec = record if record is not None else record_tokens(model, domains, batch_size, max_length, limit)
    return position_bins(rec, drivers)


def _check_table(table: Any, name: str, flag: str) -> None:
    """``table`` is a results table (an object with ``.df``, or a DataFrame) with a ``flag`` column."""
    from ..validation import check_type

    df = getattr(table, "df", table)
    check_type(df, pd.DataFrame, name, f"a table with a {flag!r} column (es.driver_experts(...) or a DataFrame)")
    missing = sorted({"domain", "layer", "expert"} - set(df.columns))
    if missing:
        from ..errors import DataError

        raise DataError(f"{name} has no {missing[0]!r} column: pass a driver or domain-expert table")


# ----- associations --------------------------------------------------------------------------------------
def flagged_experts(domain_table: Any = None, driver_table: Any = None) -> pd.DataFrame:
    """The flagged experts of each domain: ``domain, layer, expert, kind`` (``"domain"`` or ``"driver"``).

    ``domain_table``: rows with ``is_domain_expert``; ``driver_table``: rows with ``is_driver``. An expert
    flagged both ways appears once per kind.
    """
    parts = []
    for table, flag, kind in ((domain_table, "is_domain_expert", "domain"), (driver_table, "is_driver", "driver")):
        df = getattr(table, "df", table)
        if df is None or len(df) == 0 or flag not in df.columns:
            continue
        rows = df[df[flag].astype(bool)][["domain", "layer", "expert"]].copy()
        rows["kind"] = kind
        parts.append(rows)
    if not parts:
        return pd.DataFrame(columns=["domain", "layer", "expert", "kind"])
    return pd.concat(parts, ignore_index=True).astype({"layer": int, "expert": int})


def associations_from_record(
    record: TokenRecord, experts: pd.DataFrame, min_count: int = 5, top: int = 10
) -> pd.DataFrame:
    """Top tokens by lift for each flagged expert (paper Table 3), keyed by token id.

    Within a domain's tokens, for expert ``i`` at layer ``l`` and token id ``w``: ``count`` = occurrences of
    ``w``; ``n_selected`` = those selecting ``i`` at ``l``; ``p_expert_given_token = n_selected / count``;
    ``p_expert`` = fraction of all the domain's tokens selecting ``i`` at ``l``;
    ``lift = p_expert_given_token / p_expert``. Tokens with ``count < min_count`` or ``n_selected == 0`` are
    left out; the ``top`` largest lifts are kept (ties: larger count, then smaller token id). Ids that decode
    alike ("the" and " the") stay separate rows: the model sees different tokens.

    ``experts``: rows ``domain, layer, expert`` and optionally ``kind`` (see :func:`flagged_experts`).
    Returns ``domain, kind, layer, expert, rank, token_id, token`` (the decoded text of the id, as the
    tokenizer gives it), ``count, n_selected, p_expert_given_token, p_expert, lift``.
    """
    cols = ["domain", "kind", "layer", "expert", "rank", "token_id", "token", "count", "n_selected",
            "p_expert_given_token", "p_expert", "lift"]
    if min_count < 1 or top < 1:
        raise ConfigError(f"min_count ({min_count}) and top ({top}) must be at least 1: pass positive values")
    if experts is None or len(experts) == 0 or record.num_tokens == 0:
        return pd.DataFrame(columns=cols)
    # Dense index of the token ids present, once for the record.
    uniq_ids, group = np.unique(np.asarray(record.token_id, dtype=np.int64), return_inverse=True)
    group = group.ravel()
    layer_pos = {layer: j for j, layer in enumerate(record.layers)}
    rows: list[dict[str, Any]] = []
    exp = experts.copy()
    if "kind" not in exp.columns:
        exp["kind"] = "expert"
    for r in exp.drop_duplicates(["domain", "kind", "layer", "expert"]).itertuples():
        if r.domain not in record.domains or int(r.layer) not in layer_pos:
            continue
        in_dom = record.domain == record.domains.index(r.domain)
        n_dom = int(in_dom.sum())
        if n_dom == 0:
            continue
        sel = (record.selected[in_dom, layer_pos[int(r.layer)]] == int(r.expert)).any(axis=1)
        p_expert = sel.sum() / n_dom
        g = group[in_dom]
        count = np.bincount(g, minlength=len(uniq_ids))
        n_sel = np.bincount(g[sel], minlength=len(uniq_ids))
        ok = np.flatnonzero((count >= min_count) & (n_sel > 0))
        if not len(ok) or p_expert == 0:
            continue
        p_given = n_sel[ok] / count[ok]
        lift = p_given / p_expert
        order = sorted(range(len(ok)), key=lambda j: (-lift[j], -count[ok[j]], int(uniq_ids[ok[j]])))[:top]
        for rank, j in enumerate(order, start=1):
            gi = int(ok[j])
            tid = int(uniq_ids[gi])
            rows.append({
                "domain": r.domain, "kind": r.kind, "layer": int(r.layer), "expert": int(r.expert), "rank": rank,
                "token_id": tid, "token": record.token_strings.get(tid, ""),
                "count": int(count[gi]), "n_selected": int(n_sel[gi]),
                "p_expert_given_token": float(p_given[j]), "p_expert": float(p_expert), "lift": float(lift[j]),
            })
    return pd.DataFrame(rows, columns=cols)


def token_associations(
    model: Any,
    domains: DomainInput,
    experts: pd.DataFrame,
    min_count: int = 5,
    top: int = 10,
    batch_size: int = 8,
    max_length: int | None = 512,
    limit: int | None = None,
    record: TokenRecord | None = None,
) -> pd.DataFrame:
    """:func:`associations_from_record` of a fresh :func:`record_tokens` pass (or of ``record``)."""
    _check_table(experts, "experts", "kind")
    rec = record if record is not None else record_tokens(model, domains, batch_size, max_length, limit)
    return associations_from_record(rec, experts, min_count=min_count, top=top)


__all__ = [
    "BIN_LABELS",
    "TokenRecord",
    "associations_from_record",
    "flagged_experts",
    "position_bin",
    "position_bins",
    "position_profile",
    "record_tokens",
    "token_associations",
]
