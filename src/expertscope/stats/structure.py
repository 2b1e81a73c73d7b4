"""Entry points for co-activation and paths (docs/methods.md §9): from a model, a profile or stored routes, and the
study's tables. The counts themselves live in :mod:`expertscope.stats.coactivation`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .coactivation import CoactivationStats


def coactivation(
    model_or_profile: Any,
    domains: Any = None,
    *,
    path_length: int | None = None,
    batch_size: int = 8,
    max_length: int | None = 512,
) -> CoactivationStats:
    """Co-activation, transitions, paths and routing consistency (:class:`CoactivationStats`; its
    ``to_frame()`` is the table domain, layer, expert_a, expert_b, count, p_b_given_a, lift).

    ``model_or_profile``: an :class:`~expertscope.models.model.MoEModel` (then ``domains`` are routed in one
    pass), a :class:`~expertscope.stats.profile.RoutingProfile` holding per-token routes (a hook profile, or
    one from :func:`expertscope.profile_routes`), or a :class:`~expertscope.stats.token_selections.SequenceRoutes`.
    """
    from ..models.model import MoEModel
    from ..validation import check_positive
    from .coactivation import resolve_path_length
    from .profile import RoutingProfile
    from .token_selections import SequenceRoutes, record_routes

    check_positive(path_length, "path_length", allow_none=True)
    check_positive(batch_size, "batch_size")
    check_positive(max_length, "max_length", allow_none=True)
    if isinstance(model_or_profile, MoEModel):
        if domains is None:
            raise ConfigError("coactivation(model, domains): pass the domains to route")
        resolve_path_length(path_length, len(model_or_profile.layers))  # before routing anything
        routes = record_routes(model_or_profile, domains, batch_size=batch_size, max_length=max_length)
    elif isinstance(model_or_profile, RoutingProfile):
        if model_or_profile.routes is None:
            raise DataError("this profile kept no per-token routes: profile with keep_routes=True")
        routes = model_or_profile.routes
    elif isinstance(model_or_profile, SequenceRoutes):
        routes = model_or_profile
    else:
        raise ConfigError(f"coactivation takes an MoEModel, a RoutingProfile or SequenceRoutes, not "
                          f"{type(model_or_profile).__name__}")
    return routes.coactivation(path_length=resolve_path_length(path_length, len(routes.layers)))






def save_coactivation_tables(profile: Any, out: str | Path, top_paths: int = 10) -> dict[str, Any]:
    """Write the co-activation tables of a profile into ``out``: ``coactivation.parquet``,
    ``transitions.parquet``, ``paths.parquet`` (``top_paths`` per domain and start layer),
    ``routing_consistency.parquet`` and ``importance.parquet`` (A beside ``w·‖f‖``); returns a summary."""
    from ..io import write_table

    co = profile.coactivation
    if co is None:
        co = coactivation(profile, path_length=profile.config.get("path_length"))
    out = Path(out)
    meta = {"top_k": co.top_k, "num_experts": co.num_experts, "path_length": co.window}
    write_table(out / "coactivation.parquet", co.to_frame(), meta={"table": "coactivation", **meta})
    write_table(out / "transitions.parquet", co.transitions_frame(), meta={"table": "transitions", **meta})
    paths = co.paths_frame(top=top_paths)
    write_table(out / "paths.parquet", paths, meta={"table": "paths", **meta})
    cons = co.consistency_frame()
    write_table(out / "routing_consistency.parquet", cons, meta={"table": "routing_consistency", **meta})
    frame = profile.to_frame(shared=False)
    imp = frame[["domain", "layer", "expert", "activation_rate", "gate_mean", "importance"]]
    write_table(out / "importance.parquet", imp, meta={"table": "importance",
                                                       "not_applicable": profile.model_info.get("not_applicable")})
    top = paths[paths["rank"] == 1]
    return {"tokens": {d: int(n) for d, n in co.n_tokens.items()},
            "consistency_bits": {f"{r.domain}/{r.layer}>{r.next_layer}": round(float(r.mi_bits), 4)
                                 for r in cons.itertuples()},
            "top_paths": {f"{r.domain}/{r.layers}": f"{r.path} ({r.share:.1%})" for r in top.itertuples()}}


__all__ = ["coactivation", "save_coactivation_tables"]
