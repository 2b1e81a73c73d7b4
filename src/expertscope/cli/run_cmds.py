"""``expertscope run``: the whole study in one command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, handle_errors, progress_bars
from .options import (
    STUDY,
    BatchOpt,
    CausalLimitOpt,
    DeviceOpt,
    DomainOpt,
    DtypeOpt,
    EvalLimitOpt,
    ForceOpt,
    ModelOpt,
    NBootOpt,
    OutOpt,
    ResumeOpt,
    SeedOpt,
    StudyLimitOpt,
    TrainLimitOpt,
)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)


@handle_errors
def run_cmd(
    model: ModelOpt = "demo",
    domain: DomainOpt = None,
    out: OutOpt = Path("runs/study"),
    limit: StudyLimitOpt = STUDY.limit,
    causal_limit: CausalLimitOpt = STUDY.causal_limit,
    causal_method: Annotated[str, typer.Option(help="exact, fast, hybrid or fisher.")] = STUDY.causal_method,
    eval_limit: EvalLimitOpt = STUDY.eval_limit,
    train_limit: TrainLimitOpt = STUDY.train_limit,
    steer_mode: Annotated[str, typer.Option(help="scale (the paper's) or bias.")] = STUDY.steer_mode,
    n_boot: NBootOpt = STUDY.n_boot,
    n_perm: Annotated[str, typer.Option(help="Permutations for domain-expert p-values: 'auto' (20·tests/alpha) "
                                          "or a number.")] = "auto",
    batch_size: BatchOpt = STUDY.batch_size,
    dtype: DtypeOpt = STUDY.dtype,
    device: DeviceOpt = STUDY.device,
    seed: SeedOpt = STUDY.seed,
    z: Annotated[float, typer.Option(help="z for the optional z rules (not the default rules).")] = STUDY.z,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
) -> None:
    """Run the whole study into one directory: profile → domain experts → driver experts → causal rate →
    tokens → expert map → steering study → report.html.

    With no options it uses the bundled demo model and the synthetic emotion / knowledge / math domains.

    Examples:

      expertscope run

      expertscope run --resume                      # continue an interrupted run in runs/study

      expertscope run -m ./Mixtral-8x7B --dtype bfloat16 --device cuda -d sa=sa.jsonl -d math=gsm8k.jsonl -o runs/mx
    """
    from ..stats.domain_experts import parse_n_perm
    from ..study import STAGES, StudyConfig, run_study
    from ..validation import check_finite, check_positive

    # Option ranges first (named as options); StudyConfig checks the same for API callers.
    for value, option in ((limit, "--limit"), (causal_limit, "--causal-limit"), (eval_limit, "--eval-limit"),
                          (train_limit, "--train-limit"), (batch_size, "--batch-size")):
        check_positive(value, option)
    check_positive(n_boot, "--n-boot", allow_zero=True)
    check_finite(z, "--z")

    # typer passes str; the config validates its Literal options on creation
    cfg = StudyConfig(model=model, domains=tuple(domain or ()), limit=limit, causal_limit=causal_limit,
                      causal_method=causal_method, eval_limit=eval_limit, train_limit=train_limit,  # type: ignore[arg-type]
                      steer_mode=steer_mode, batch_size=batch_size, dtype=dtype, device=device, seed=seed, z=z,  # type: ignore[arg-type]
                      n_boot=n_boot, n_perm=parse_n_perm(n_perm), trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    names = [n for n, _ in STAGES]

    def on_stage(name: str, event: str) -> None:
        i = names.index(name) + 1
        if event == "start":
            console.print(f"[bold cyan][{i}/{len(names)}][/] {name} …  ({time.perf_counter() - t0:.0f}s elapsed)")
        elif event == "skip":
            console.print(f"[dim][{i}/{len(names)}] {name}: already complete, skipped[/]")

    with progress_bars() as bar:
        manifest = run_study(cfg, out, resume=resume, force=force, on_stage=on_stage, progress=bar)
    console.print(f"[bold green]study complete[/] in {time.perf_counter() - t0:.0f}s → {out}")
    de = manifest["stages"].get("domain_experts", {}).get("domain_experts")
    if de:
        console.print(f"domain experts per domain: {de}")
    dr = manifest["stages"].get("drivers", {}).get("drivers")
    if dr:
        console.print(f"driver experts per domain: {dr}")
    if (out / "report.html").exists():
        console.print(f"open {out / 'report.html'} in a browser")
