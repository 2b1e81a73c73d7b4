"""``expertscope lm-eval``: lm-evaluation-harness with expertscope's router steering attached."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, handle_errors, out_console
from .options import DeviceOpt, DtypeOpt, ModelOpt, OutOpt, TrustOpt


def register(app: typer.Typer) -> None:
    app.command("lm-eval")(lm_eval_cmd)


@handle_errors
def lm_eval_cmd(
    model: ModelOpt = "demo",
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval tasks; expertscope_emotion, "
                                            "expertscope_knowledge and expertscope_math run offline.")] = (
        "expertscope_emotion,expertscope_knowledge,expertscope_math"),
    steer: Annotated[Path | None, typer.Option(help="A steering JSON (SteeringSpec.save) to apply.")] = None,
    include_path: Annotated[Path | None, typer.Option(help="Extra lm-eval task YAML directory.")] = None,
    limit: Annotated[int | None, typer.Option(help="Examples per task.")] = None,
    n: Annotated[int, typer.Option(help="Examples generated per synthetic task.")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 8,
    out: OutOpt = Path("runs/lm-eval"),
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace earlier lm-eval results in --out.")] = False,
) -> None:
    """Evaluate MODEL with lm-evaluation-harness, optionally with experts steered.

    Examples:

      expertscope lm-eval --model demo

      expertscope lm-eval --model demo --steer runs/study/steer_math_driver_up.json --tasks expertscope_math
    """
    from ..integrations.lm_eval import SYNTHETIC_TASKS, lm_eval_steered, task_manager, write_synthetic_tasks
    from ..interventions.steering import SteeringSpec
    from ..models.loading import load_model, resolve_source
    from ..rundir import check_out_dir, open_run_dir, run_fingerprint
    from ..validation import check_device, check_positive

    # Every check before the output directory is touched or the model loads.
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    check_positive(limit, "--limit", allow_none=True)
    check_positive(n, "--n")
    check_positive(batch_size, "--batch-size")
    check_device(device)
    resolve_source(model)
    check_out_dir(out)
    spec = SteeringSpec.load(steer) if steer else None
    synthetic = [d for d, t in SYNTHETIC_TASKS.items() if t in names]
    others = [t for t in names if t not in SYNTHETIC_TASKS.values()]
    if synthetic and include_path:
        console.print("[yellow]--include-path ignored: the synthetic tasks use their own directory[/]")
    if others or not names:
        task_manager(others or names, None if synthetic else include_path)  # unknown names fail here, fast
    settings = {"model": model, "tasks": names, "steer": spec.to_json() if spec else None, "limit": limit, "n": n,
                "batch_size": batch_size, "dtype": dtype, "device": device}
    with open_run_dir(out, "lm-eval", run_fingerprint(model, (), settings), settings, force=force,
                      resumable=False) as rd:
        task_dir = include_path
        if synthetic:
            task_dir = out / "tasks"
            write_synthetic_tasks(task_dir, synthetic, n=n)
        manager = task_manager(names, task_dir)
        moe = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        result = lm_eval_steered(moe, names, steering=spec, include_path=task_dir, limit=limit,
                                 batch_size=batch_size, manager=manager)
        scores = {t: {k: v for k, v in r.items() if isinstance(v, int | float)} for t, r in result["results"].items()}
        from ..io import write_json

        write_json(out / "lm_eval_results.json", rd.write_manifest("complete", results=scores))
    table = Table(title="lm-eval" + (f" (steered: {len(spec.targets)} experts ×{spec.scale} {spec.mode})" if spec
                                     else ""))
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for t, r in scores.items():
        for k, v in r.items():
            if k != "sample_len":
                table.add_row(t, k, f"{v:.4f}")
    out_console.print(table)
