"""``expertscope profile`` and ``expertscope domains``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ._common import console, handle_errors, out_console, progress_bars
from .options import (
    PROFILE,
    AnswerFieldOpt,
    BatchOpt,
    DeviceOpt,
    DomainOpt,
    DtypeOpt,
    ExecutorOpt,
    ForceOpt,
    GpusOpt,
    LabelFieldOpt,
    LimitOpt,
    ModelOpt,
    OutOpt,
    PickleOpt,
    ResumeOpt,
    SeedOpt,
    TextFieldOpt,
    TrustOpt,
    WorkersOpt,
    field_map,
)

if TYPE_CHECKING:
    from ..stats.domain_experts import DomainExpertTable



def register(app: typer.Typer) -> None:
    app.command("profile")(profile_cmd)
    app.command("domains")(domains_cmd)


@handle_errors
def profile_cmd(
    model: ModelOpt = "demo",
    domain: DomainOpt = None,
    out: OutOpt = Path("runs/profile"),
    batch_size: BatchOpt = PROFILE.batch_size,
    max_length: Annotated[int, typer.Option(help="Truncate longer texts (counted in the manifest).")] = (
        PROFILE.max_length or 512),
    limit: LimitOpt = PROFILE.limit,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    keep_sequences: Annotated[bool, typer.Option(help="Keep per-sequence statistics for CIs and p-values.")] = (
        PROFILE.keep_sequences),
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    text_field: TextFieldOpt = "text",
    label_field: LabelFieldOpt = None,
    answer_field: AnswerFieldOpt = None,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = 2,
    gpus_per_worker: GpusOpt = 0,
) -> None:
    """Capture the routing of MODEL over each domain and save the profile.

    Examples:

      expertscope profile --model demo --domain emotion=synthetic:emotion --domain math=synthetic:math -o runs/p

      expertscope profile -m ./Qwen1.5-MoE-A2.7B --domain sa=emotion.jsonl --domain math=gsm8k.jsonl?text=question
    """
    from ..data.checks import check_domain_specs
    from ..data.sources import load_domains
    from ..errors import DataError
    from ..models.loading import load_model, resolve_source
    from ..rundir import check_out_dir, open_run_dir, run_fingerprint
    from ..stats.profile import RoutingProfile, checkpointer, profile
    from ..validation import check_choice, check_device, check_nonnegative, check_positive

    # Every check before anything is created or loaded.
    if not domain:
        raise DataError("no --domain given: pass at least two, e.g. --domain math=math.jsonl --domain sa=sa.jsonl")
    check_positive(batch_size, "--batch-size")
    check_positive(max_length, "--max-length")
    check_positive(limit, "--limit", allow_none=True)
    check_positive(workers, "--workers")
    check_nonnegative(gpus_per_worker, "--gpus-per-worker")
    check_choice(executor, "--executor", ("local", "ray"))
    check_device(device)
    check_domain_specs(domain)
    resolve_source(model)
    check_out_dir(out)
    fields = field_map(text_field, label_field, answer_field)
    config = {"model": model, "domains": domain, "batch_size": batch_size, "max_length": max_length,
              "limit": limit, "dtype": dtype, "device": device, "seed": seed, "keep_sequences": keep_sequences,
              "fields": fields, "executor": executor, "workers": workers, "gpus_per_worker": gpus_per_worker}
    # The fingerprint leaves out how the work is spread (executor, workers): results do not depend on it.
    result_settings = {k: v for k, v in config.items() if k not in ("executor", "workers", "gpus_per_worker")}
    fingerprint = run_fingerprint(model, domain, result_settings, fields=fields)
    with open_run_dir(out, "profile", fingerprint, config, resume=resume, force=force) as rd:
        t0 = time.perf_counter()
        doms = load_domains(domain, limit=limit, seed=seed, fields=fields)
        moe = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         allow_pickle=allow_pickle)
        rd.write_manifest("running", model=moe.describe())
        previous = RoutingProfile.load(out) if rd.previous and (out / "profile.safetensors").exists() else None

        from ..execution import ModelSpec, make_executor

        spec = ModelSpec(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         allow_pickle=allow_pickle)
        runner = make_executor(executor, spec, workers=workers, gpus_per_worker=gpus_per_worker)  # type: ignore[arg-type]
        with progress_bars() as bar:
            prof = profile(moe, doms, batch_size=batch_size, max_length=max_length, keep_sequences=keep_sequences,
                           resume_from=previous, on_batch=checkpointer(out), progress=bar, executor=runner)
        prof.save(out)
        from ..stats.routing_mi import save_routing_mi

        mi = save_routing_mi(prof, out)
        n, _ = prof.totals()
        rd.write_manifest(
            "complete", model=moe.describe(),
            tokens={d: int(x) for d, x in zip(prof.domains, n, strict=True)}, truncated=prof.truncated,
            timings={"total_s": round(time.perf_counter() - t0, 3)},
        )
    console.print(f"profiled {sum(int(x) for x in n)} tokens over {len(prof.domains)} domains → {out}")
    console.print("I(domain; selected expert) per layer [bits]: "
                  + ", ".join(f"{int(r.layer)}: {r.mi_bits:.3f}" for r in mi.itertuples()))
    if prof.truncated:
        cap = prof.config.get("max_length_used", max_length)
        console.print(f"[yellow]truncated to {cap} tokens:[/] {prof.truncated}")


@handle_errors
def domains_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `expertscope profile`.")],
    rule: Annotated[str, typer.Option(help="fdr (default: BH q <= alpha, A > k/E, lift >= min-lift) or z "
                                      "(specificity z-score; capped: with E experts at most E/(1+z^2) can pass, "
                                      "with E=8, z=2 one per layer).")] = "fdr",
    z: Annotated[float, typer.Option(help="rule z: standard deviations above the layer mean.")] = 2.0,
    min_lift: Annotated[float, typer.Option(help="rule fdr: least activation lift A(D)/mean A(others).")] = 1.5,
    test: Annotated[str, typer.Option(help="auto (permutation when affordable, else its normal approximation), "
                                      "permutation or normal.")] = "auto",
    entropy: Annotated[str, typer.Option(help="bernoulli (default) or eq1 (the paper's literal Eq. 1).")] = "bernoulli",
    conditional: Annotated[bool, typer.Option(help="Average H over the tokens that select the expert.")] = False,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for CIs (0: none).")] = 1000,
    n_perm: Annotated[str, typer.Option(help="Permutations for p-values: auto (20·tests/alpha), or N (0: none).")]
    = "auto",
    alpha: Annotated[float, typer.Option(help="FDR level for rule=fdr.")] = 0.05,
    seed: SeedOpt = 0,
    top: Annotated[int, typer.Option(help="Rows to print per domain.")] = 10,
) -> None:
    """Find the domain experts in a saved profile; print the top ones and write domain_experts.parquet/.csv.

    Examples:

      expertscope domains runs/p

      expertscope domains runs/p --rule z --z 2 --entropy eq1
    """
    from ..config import DomainExpertConfig
    from ..rundir import lock_dir
    from ..stats.domain_experts import domain_experts, parse_n_perm
    from ..stats.profile import RoutingProfile
    from ..validation import check_finite, check_open_unit, check_positive

    check_finite(z, "--z")
    check_open_unit(alpha, "--alpha")
    check_positive(n_boot, "--n-boot", allow_zero=True)
    check_positive(top, "--top", allow_zero=True)
    cfg = DomainExpertConfig(rule=rule, z=z, entropy=entropy, conditional=conditional,  # type: ignore[arg-type]
                             n_boot=n_boot, n_perm=parse_n_perm(n_perm), alpha=alpha, seed=seed,
                             min_lift=min_lift, test=test)  # type: ignore[arg-type]
    prof = RoutingProfile.load(run_dir)
    with lock_dir(run_dir):
        table = domain_experts(prof, cfg)
        table.save(run_dir / "domain_experts.parquet")
        manifest = run_dir / "manifest.json"
        if manifest.exists():
            from ..io import read_json, write_json

            m = read_json(manifest, "manifest")
            m.setdefault("analyses", {})["domain_experts"] = table.settings
            write_json(manifest, m)
    print_domain_experts(table, top)
    print_shared_experts(prof.model_info)
    if table.settings.get("note"):
        console.print(f"[yellow]note:[/] {table.settings['note']}")
    out_console.print(f"wrote {run_dir / 'domain_experts.parquet'} (rule: {table.settings['rule_text']})")


def print_domain_experts(table: DomainExpertTable, top: int = 10) -> None:
    """A rich table of the top domain experts per domain."""
    for dom in table.settings["domains"]:
        rows = table.experts(dom).head(top)
        t = Table(title=f"domain experts of {dom!r} ({len(table.experts(dom))} found)", title_justify="left")
        for col in ("layer", "expert", "A", "H", "CWAS", "specificity", "lift", "A 95% CI", "q"):
            t.add_column(col, justify="right")
        for r in rows.itertuples():
            ci = "–" if r.A_lo != r.A_lo else f"[{r.A_lo:.3f}, {r.A_hi:.3f}]"
            q = "–" if r.q_value != r.q_value else f"{r.q_value:.3g}"
            t.add_row(str(r.layer), str(r.expert), f"{r.activation_rate:.3f}", f"{r.entropy:.3f}",
                      f"{r.cwas:.3f}", f"{r.specificity:+.3f}", f"{getattr(r, 'lift', float('nan')):.2f}", ci, q)
        out_console.print(t)


def print_shared_experts(model_info: dict) -> None:
    """One line naming the model's always-on shared experts (never domain or driver candidates), if any."""
    from ..stats.shared import shared_counts

    counts = shared_counts(model_info)
    if counts:
        where = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(counts.items()))
        out_console.print(f"shared experts (always on, not candidates; rows marked shared in "
                          f"RoutingProfile.to_frame()): {where}")
