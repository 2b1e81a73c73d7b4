"""``expertscope drivers``: causal effects, driver experts and the causal rate (docs/methods.md §3)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import console, handle_errors, out_console, progress_bars
from .options import (
    CAUSAL,
    AnswerFieldOpt,
    DeviceOpt,
    DomainOpt,
    DtypeOpt,
    ForceOpt,
    LabelFieldOpt,
    LimitOpt,
    ModelOpt,
    PickleOpt,
    ResumeOpt,
    SeedOpt,
    TextFieldOpt,
    TrustOpt,
    field_map,
)


def register(app: typer.Typer) -> None:
    """Add the ``drivers`` command to ``app``."""
    app.command("drivers")(handle_errors(drivers_cmd))


def _int_list(value: str | None, what: str) -> list[int] | None:
    from ..errors import ConfigError

    if value is None or value == "":
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--{what} {value!r} is not a comma-separated list of integers: e.g. --{what} 0,2,5"
        ) from None


def drivers_cmd(
    model: ModelOpt = "demo",
    domain: DomainOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (one run per directory).")] = Path(
        "runs/drivers"),
    method: Annotated[str, typer.Option(help="exact (the definition), fast (exact local change propagated by a "
                                              "Fisher sketch), hybrid (fast ranks, top experts exact) or fisher.")] = (
        CAUSAL.method),
    decision: Annotated[str, typer.Option(help="task (where each input's task is decided: label, answer letter, "
                                                "every teacher-forced math-answer token) or last (last token).")] = (
        CAUSAL.decision),
    chunk_tokens: Annotated[int, typer.Option(help="Memory budget: tokens recomputed in one perturbed run.")] = (
        CAUSAL.chunk_tokens),
    prefix_reuse: Annotated[bool, typer.Option(help="Reuse the clean run's keys/values before the first changed "
                                                    "position (exact; values unchanged).")] = CAUSAL.prefix_reuse,
    magnitude: Annotated[float, typer.Option(help="Added to the expert's router logit (non-zero).")] = (
        CAUSAL.magnitude),
    positions: Annotated[str, typer.Option(help="all (every token) or last (the prediction position).")] = (
        CAUSAL.positions),
    target: Annotated[str, typer.Option(help="vocab (full-vocabulary KL) or labels (over --label tokens).")] = (
        CAUSAL.target),
    label: Annotated[list[str] | None, typer.Option(help="Answer token text for --target labels (repeat).")] = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated MoE layers (default: all).")] = None,
    experts: Annotated[str | None, typer.Option(help="Comma-separated experts (default: all).")] = None,
    rule: Annotated[str, typer.Option(help="fdr (default: paired test vs the layer median, BH q <= 0.05, CE >= 2x "
                                      "the layer median and >= 1e-3 nats), z or top.")] = "fdr",
    z: Annotated[float, typer.Option(help="rule z: CE at least z sd above the layer mean (capped: with E experts "
                                          "at most E/(1+z^2) can pass).")] = 2.0,
    hybrid_top: Annotated[int, typer.Option(help="hybrid: experts per layer recomputed exactly.")] = (
        CAUSAL.hybrid_top),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Inputs per clean run.")] = CAUSAL.batch_size,
    max_length: Annotated[int, typer.Option(help="Truncate longer texts (counted in the manifest).")] = (
        CAUSAL.max_length or 512),
    limit: LimitOpt = CAUSAL.limit,
    top: Annotated[int, typer.Option(help="Drivers to print per layer.")] = 3,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    text_field: TextFieldOpt = "text",
    label_field: LabelFieldOpt = None,
    answer_field: AnswerFieldOpt = None,
) -> None:
    """Causal effect of every (layer, expert) on the next-token prediction; driver experts; causal rate.

    Writes ce.parquet (CE per input, layer, expert), drivers.parquet/.csv, causal_rate.parquet/.csv and
    manifest.json into --out; checkpoints after every batch (continue with --resume).

    Examples:

      expertscope drivers --model demo --domain math=synthetic:math --domain sa=synthetic:emotion -o runs/d

      expertscope drivers -m ./my-moe --domain qa=qa.jsonl --method hybrid --positions last -o runs/d2
    """
    import torch

    from ..config import CausalConfig, DriverConfig
    from ..data.checks import check_domain_specs
    from ..data.sources import load_domains
    from ..errors import DataError
    from ..io import write_table
    from ..models.loading import load_model, resolve_source
    from ..rundir import check_out_dir, open_run_dir, run_fingerprint
    from ..validation import check_device, check_finite, check_positive

    # Every check before anything is created or loaded, so bad input fails fast and leaves nothing behind.
    if not domain:
        raise DataError("no --domain given: pass at least one, e.g. --domain math=math.jsonl")
    check_finite(magnitude, "--magnitude")
    check_finite(z, "--z")
    DriverConfig(rule=rule, z=z)  # type: ignore[arg-type]  # validate before loading anything
    check_positive(batch_size, "--batch-size")
    check_positive(max_length, "--max-length")
    check_positive(limit, "--limit", allow_none=True)
    check_positive(hybrid_top, "--hybrid-top")
    check_positive(top, "--top", allow_zero=True)
    cfg = CausalConfig(method=method, magnitude=magnitude, positions=positions, target=target,  # type: ignore[arg-type]
                       batch_size=batch_size, max_length=max_length, limit=limit, hybrid_top=hybrid_top,
                       decision=decision, chunk_tokens=chunk_tokens, prefix_reuse=prefix_reuse)  # type: ignore[arg-type]
    layer_list, expert_list = _int_list(layers, "layers"), _int_list(experts, "experts")
    check_device(device)
    check_domain_specs(domain)
    resolve_source(model)
    check_out_dir(out)
    fields = field_map(text_field, label_field, answer_field)
    config: dict[str, Any] = {"model": model, "domains": domain, "fields": fields, **cfg.to_dict(), "labels": label,
                              "layers": layer_list, "experts": expert_list, "rule": rule, "z": z, "dtype": dtype,
                              "device": device, "seed": seed}
    fingerprint = run_fingerprint(model, domain, config, fields=fields)
    with open_run_dir(out, "drivers", fingerprint, config, resume=resume, force=force) as rd:
        t0 = time.perf_counter()
        doms = load_domains(domain, limit=limit, seed=seed, fields=fields)
        torch.manual_seed(seed)
        moe = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         allow_pickle=allow_pickle)
        rd.write_manifest("running", model=moe.describe())

        import expertscope.causal as C

        with progress_bars() as bar:
            effects = C.causal_effects(moe, doms, config=cfg, layers=layer_list, experts=expert_list, labels=label,
                                       checkpoint=out / "checkpoint.npz", resume=bool(rd.previous), progress=bar)
        effects.save(out)
        table = C.driver_experts(effects, rule=rule, z=z, seed=seed)
        table.save(out / "drivers.parquet")
        rate = C.causal_rate(moe, doms, table, batch_size=batch_size, max_length=max_length, limit=limit)
        write_table(out / "causal_rate.parquet", rate, meta={"table": "causal_rate", "version": 1,
                                                             "driver_rule": table.settings["rule_text"]})
        (out / "checkpoint.npz").unlink(missing_ok=True)
        rd.write_manifest(
            "complete", model=moe.describe(), settings=effects.settings,
            thresholds={"rule": table.settings["rule_text"]},
            timings={**effects.settings["timings"], "command_total_s": round(time.perf_counter() - t0, 3)},
        )
    print_drivers(table, rate, top=top)
    for r in table.summary():
        console.print(r["text"])
    console.print(f"causal effects ({cfg.method}) of {effects.ce.shape[0]} inputs → {out}")


def print_drivers(table: Any, rate: Any, top: int = 3) -> None:
    """The top drivers of each (domain, layer) with the layer's threshold and causal rate."""
    from rich.table import Table

    t = Table(title=f"Driver experts ({table.settings['rule_text']})")
    for col in ("domain", "layer", "top experts (CE)", "threshold", "drivers", "causal rate"):
        t.add_column(col, justify="left" if col in ("domain", "top experts (CE)", "drivers") else "right")
    df = table.df
    rates = {(r.domain, int(r.layer)): r.causal_rate for r in rate.itertuples()}
    for (d, layer), g in df.groupby(["domain", "layer"], sort=False):
        g = g.sort_values("ce_mean", ascending=False)
        best = ", ".join(f"{int(r.expert)} ({r.ce_mean:.3g})" for r in g.head(top).itertuples())
        drv = ",".join(str(int(e)) for e in g[g["is_driver"]]["expert"]) or "-"
        cr = rates.get((d, int(layer)))
        t.add_row(str(d), str(layer), best, f"{g['threshold'].iloc[0]:.3g}", drv,
                  "-" if cr is None else f"{cr:.3f}")
    out_console.print(t)
