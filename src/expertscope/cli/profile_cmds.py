"""``expertscope profile`` and ``expertscope domains``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ._common import console, handle_errors, out_console, progress_bars
from .options import (
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
    batch_size: BatchOpt = 8,
    max_length: Annotated[int, typer.Option(help="Truncate longer texts (counted in the manifest).")] = 512,
    limit: LimitOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    keep_sequences: Annotated[bool, typer.Option(help="Keep per-sequence statistics for CIs and p-values.")] = True,
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
    from ..data.sources import load_domains
    from ..io import make_manifest, prepare_out_dir, write_json
    from ..models.loading import load_model
    from ..stats.profile import RoutingProfile, checkpointer, profile

    if not domain:
        from ..errors import DataError

        raise DataError("no --domain given: pass at least two, e.g. --domain math=math.jsonl --domain sa=sa.jsonl")
    out = prepare_out_dir(out, "profile", resume=resume, force=force)
    t0 = time.perf_counter()
    doms = load_domains(domain, limit=limit, seed=seed, fields=field_map(text_field, label_field, answer_field))
    moe = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle)
    config = {"model": model, "domains": domain, "batch_size": batch_size, "max_length": max_length,
              "limit": limit, "dtype": dtype, "device": device, "seed": seed, "keep_sequences": keep_sequences,
              "executor": executor, "workers": workers, "gpus_per_worker": gpus_per_worker}
    write_json(out / "manifest.json", make_manifest("profile", config, status="running", model=moe.describe()))
    previous = RoutingProfile.load(out) if resume and (out / "profile.safetensors").exists() else None

    from ..execution import ModelSpec, make_executor

    spec = ModelSpec(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    # typer passes a plain str; make_executor refuses any other name with a one-line error
    runner = make_executor(executor, spec, workers=workers, gpus_per_worker=gpus_per_worker)  # type: ignore[arg-type]
    with progress_bars() as bar:
        prof = profile(moe, doms, batch_size=batch_size, max_length=max_length, keep_sequences=keep_sequences,
                       resume_from=previous, on_batch=checkpointer(out), progress=bar, executor=runner)
    prof.save(out)
    n, _ = prof.totals()
    write_json(out / "manifest.json", make_manifest(
        "profile", config, status="complete", model=moe.describe(),
        tokens={d: int(x) for d, x in zip(prof.domains, n, strict=True)}, truncated=prof.truncated,
        timings={"total_s": round(time.perf_counter() - t0, 3)},
    ))
    console.print(f"profiled {sum(int(x) for x in n)} tokens over {len(prof.domains)} domains → {out}")
    if prof.truncated:
        console.print(f"[yellow]truncated to {max_length} tokens:[/] {prof.truncated}")


@handle_errors
def domains_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `expertscope profile`.")],
    rule: Annotated[str, typer.Option(help="z (specificity z-score) or fdr (permutation q-value).")] = "z",
    z: Annotated[float, typer.Option(help="Standard deviations above the layer mean.")] = 2.0,
    entropy: Annotated[str, typer.Option(help="bernoulli (default) or eq1 (the paper's literal Eq. 1).")] = "bernoulli",
    conditional: Annotated[bool, typer.Option(help="Average H over the tokens that select the expert.")] = False,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for CIs (0: none).")] = 1000,
    n_perm: Annotated[int, typer.Option(help="Permutations for p-values (0: none).")] = 1000,
    alpha: Annotated[float, typer.Option(help="FDR level for rule=fdr.")] = 0.05,
    seed: SeedOpt = 0,
    top: Annotated[int, typer.Option(help="Rows to print per domain.")] = 10,
) -> None:
    """Find the domain experts in a saved profile; print the top ones and write domain_experts.parquet/.csv.

    Examples:

      expertscope domains runs/p

      expertscope domains runs/p --rule fdr --alpha 0.1 --entropy eq1
    """
    from ..config import DomainExpertConfig
    from ..stats.domain_experts import domain_experts
    from ..stats.profile import RoutingProfile

    # typer passes str; the config validates its Literal options on creation
    cfg = DomainExpertConfig(rule=rule, z=z, entropy=entropy, conditional=conditional,  # type: ignore[arg-type]
                             n_boot=n_boot, n_perm=n_perm, alpha=alpha, seed=seed)
    prof = RoutingProfile.load(run_dir)
    table = domain_experts(prof, cfg)
    table.save(run_dir / "domain_experts.parquet")
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        from ..io import write_json

        m = json.loads(manifest.read_text())
        m.setdefault("analyses", {})["domain_experts"] = table.settings
        write_json(manifest, m)
    print_domain_experts(table, top)
    out_console.print(f"wrote {run_dir / 'domain_experts.parquet'} (rule: {table.settings['rule_text']})")


def print_domain_experts(table: DomainExpertTable, top: int = 10) -> None:
    """A rich table of the top domain experts per domain."""
    for dom in table.settings["domains"]:
        rows = table.experts(dom).head(top)
        t = Table(title=f"domain experts of {dom!r} ({len(table.experts(dom))} found)", title_justify="left")
        for col in ("layer", "expert", "A", "H", "CWAS", "specificity", "A 95% CI", "q"):
            t.add_column(col, justify="right")
        for r in rows.itertuples():
            ci = "–" if r.A_lo != r.A_lo else f"[{r.A_lo:.3f}, {r.A_hi:.3f}]"
            q = "–" if r.q_value != r.q_value else f"{r.q_value:.3g}"
            t.add_row(str(r.layer), str(r.expert), f"{r.activation_rate:.3f}", f"{r.entropy:.3f}",
                      f"{r.cwas:.3f}", f"{r.specificity:+.3f}", ci, q)
        out_console.print(t)
