"""``expertscope run``: the whole study in one command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, handle_errors, progress_bars
from .options import (
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
    limit: StudyLimitOpt = 300,
    causal_limit: CausalLimitOpt = 120,
    causal_method: Annotated[str, typer.Option(help="exact, fisher or hybrid.")] = "exact",
    eval_limit: EvalLimitOpt = 300,
    train_limit: TrainLimitOpt = 300,
    steer_mode: Annotated[str, typer.Option(help="scale (the paper's) or bias.")] = "scale",
    n_boot: NBootOpt = 1000,
    n_perm: Annotated[int, typer.Option(help="Permutations for domain-expert p-values.")] = 1000,
    batch_size: BatchOpt = 16,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    z: Annotated[float, typer.Option(help="Standard deviations for the domain/driver rules.")] = 2.0,
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
    from ..study import STAGES, StudyConfig, run_study

    # typer passes str; the config validates its Literal options on creation
    cfg = StudyConfig(model=model, domains=tuple(domain or ()), limit=limit, causal_limit=causal_limit,
                      causal_method=causal_method, eval_limit=eval_limit, train_limit=train_limit,  # type: ignore[arg-type]
                      steer_mode=steer_mode, batch_size=batch_size, dtype=dtype, device=device, seed=seed, z=z,  # type: ignore[arg-type]
                      n_boot=n_boot, n_perm=n_perm, trust_remote_code=trust_remote_code)
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
