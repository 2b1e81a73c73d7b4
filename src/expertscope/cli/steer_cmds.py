"""``expertscope steer-study``: the paper's Tables 1–2 on any model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ._common import console, handle_errors, out_console
from .options import (
    INTERVENTION,
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

if TYPE_CHECKING:
    import pandas as pd


STEER_STAGES = ("profile", "domain_experts", "drivers", "steering")


def register(app: typer.Typer) -> None:
    app.command("steer-study")(steer_study_cmd)


@handle_errors
def steer_study_cmd(
    model: ModelOpt = "demo",
    domain: DomainOpt = None,
    out: OutOpt = Path("runs/steer-study"),
    scale_up: Annotated[float, typer.Option(help="Factor for the ↑ rows.")] = INTERVENTION.scale_up,
    scale_down: Annotated[float, typer.Option(help="Factor for the ↓ rows.")] = INTERVENTION.scale_down,
    mode: Annotated[str, typer.Option(help="scale (z·s, the paper's) or bias (z + ln s).")] = INTERVENTION.mode,
    limit: StudyLimitOpt = STUDY.limit,
    causal_limit: CausalLimitOpt = STUDY.causal_limit,
    eval_limit: EvalLimitOpt = STUDY.eval_limit,
    train_limit: TrainLimitOpt = STUDY.train_limit,
    n_boot: NBootOpt = STUDY.n_boot,
    batch_size: BatchOpt = STUDY.batch_size,
    dtype: DtypeOpt = STUDY.dtype,
    device: DeviceOpt = STUDY.device,
    seed: SeedOpt = STUDY.seed,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
) -> None:
    """Steer domain and driver experts up and down, LoRA-tune the last routers, and compare accuracy.

    Finds the domain and driver experts first (on the validation split), then evaluates each domain's test
    split under every condition, with paired bootstrap CIs of the change against the original model.

    Examples:

      expertscope steer-study --model demo

      expertscope steer-study --model demo --mode bias --scale-up 1.5 --scale-down 0.67 -o runs/bias
    """
    from ..interventions.study import InterventionResult
    from ..study import StudyConfig, run_study
    from ..validation import check_positive, check_positive_finite

    # Option ranges first (named as options); StudyConfig checks the same for API callers.
    for value, option in ((limit, "--limit"), (causal_limit, "--causal-limit"), (eval_limit, "--eval-limit"),
                          (train_limit, "--train-limit"), (batch_size, "--batch-size")):
        check_positive(value, option)
    check_positive(n_boot, "--n-boot", allow_zero=True)

    check_positive_finite(scale_up, "--scale-up")
    check_positive_finite(scale_down, "--scale-down")
    cfg = StudyConfig(model=model, domains=tuple(domain or ()), limit=limit, causal_limit=causal_limit,
                      eval_limit=eval_limit, train_limit=train_limit, steer_mode=mode,  # type: ignore[arg-type]
                      batch_size=batch_size, dtype=dtype, device=device, seed=seed, n_boot=n_boot,
                      scale_up=scale_up, scale_down=scale_down)
    t0 = time.perf_counter()

    def on_stage(name: str, event: str) -> None:
        if event == "start":
            console.print(f"[bold cyan]{name}[/] …  ({time.perf_counter() - t0:.0f}s elapsed)")

    run_study(cfg, out, resume=resume, force=force, on_stage=on_stage, stages=STEER_STAGES, kind="steer-study")
    print_steering(InterventionResult.load(out).table)
    console.print(f"steering study complete in {time.perf_counter() - t0:.0f}s → {out / 'steering.csv'}")


def print_steering(table: pd.DataFrame) -> None:
    """The Tables 1–2 rows per domain, with the paired-bootstrap CI of the change; a condition with nothing
    to measure shows "not applicable" and its reason; a saturated domain says so in its title."""
    for dom in table["domain"].unique():
        rows = table[table["domain"] == dom]
        first = rows.iloc[0]
        title = f"{dom} ({first['task']}, n={int(first['n'])})"
        if "saturated" in rows.columns and bool(first["saturated"]):
            title += " — saturated: the original accuracy leaves little room to improve"
        # Conditions with nothing to measure: "n/a" in the row, the reason once in the caption.
        reasons: dict[str, list[str]] = {}
        for r in rows.itertuples():
            if not getattr(r, "applicable", True):
                reasons.setdefault(str(r.reason), []).append(str(r.condition))
        caption = "; ".join(f"{', '.join(c)}: not applicable: {why}" for why, c in reasons.items()) or None
        t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
        for col in ("condition", "targets", "accuracy", "Δ acc [95% CI]", "weighted F1", "changed selections"):
            t.add_column(col, justify="right" if col != "condition" else "left")
        for r in rows.itertuples():
            if not getattr(r, "applicable", True):
                t.add_row(r.condition, "0", "n/a", "—", "—", "—")
                continue
            delta = "—" if r.condition == "original" else f"{r.delta:+.3f} [{r.delta_lo:+.3f}, {r.delta_hi:+.3f}]"
            f1 = "—" if r.weighted_f1 != r.weighted_f1 else f"{r.weighted_f1:.3f}"
            changed = "—" if r.changed_selections < 0 else str(int(r.changed_selections))
            t.add_row(r.condition, str(int(r.n_targets)), f"{r.accuracy:.3f}", delta, f1, changed)
        out_console.print(t)
