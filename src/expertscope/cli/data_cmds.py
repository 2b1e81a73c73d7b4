"""``expertscope data synth`` (the synthetic benchmark as JSONL) and ``expertscope demo train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, handle_errors, out_console, progress

data_app = typer.Typer(help="Data sources: the synthetic three-domain benchmark.", no_args_is_help=True)
demo_app = typer.Typer(help="The bundled demo model.", no_args_is_help=True)


@data_app.command("synth")
@handle_errors
def synth(
    out: Annotated[Path, typer.Option("--out", help="Directory for <domain>.<split>.jsonl and manifest.json.")],
    n_train: Annotated[int, typer.Option(help="Training examples per domain.")] = 2000,
    n_validation: Annotated[int, typer.Option(help="Validation examples per domain.")] = 300,
    n_test: Annotated[int, typer.Option(help="Test examples per domain.")] = 300,
    seed: Annotated[int, typer.Option(help="Sampling seed (the splits stay disjoint for every seed).")] = 0,
    domains: Annotated[str, typer.Option(help="Comma-separated subset of emotion,knowledge,math.")] = (
        "emotion,knowledge,math"
    ),
    force: Annotated[bool, typer.Option(help="Overwrite an existing synthetic-data directory.")] = False,
) -> None:
    """Write the seeded synthetic benchmark: train/validation/test JSONL per domain, plus a manifest.

    Each file works as ``--domain NAME=FILE`` or ``expertscope eval --data FILE``.

    Example: expertscope data synth --out data/synth --n-test 500
    """
    from ..pipeline.jobs import write_synthetic_benchmark

    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    files = write_synthetic_benchmark(out, [d.strip() for d in domains.split(",") if d.strip()], sizes, seed, force)
    for fname, info in files.items():
        out_console.print(f"{out / fname}  ({info['task']}, n={info['n']})", highlight=False)


@demo_app.command("train")
@handle_errors
def demo_train(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the Hugging Face model into.")],
    seed: Annotated[int, typer.Option(help="Seed for data, tokenizer, initialisation and batch order.")] = 0,
    scale: Annotated[float, typer.Option(help="Multiply every training-set size (e.g. 0.01 for a smoke run).")] = (1.0),
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    evaluate: Annotated[bool, typer.Option(help="Score the test splits when done (training_manifest.json).")] = (True),
    from_phase1: Annotated[
        Path | None,
        typer.Option(help="Skip phase 1: run phases 2 and 3 from this phase-1 model directory."),
    ] = None,
    from_phase2: Annotated[
        Path | None,
        typer.Option(help="Skip phases 1-2: run only phase 3 (emotion v2) from this phase-2 model directory."),
    ] = None,
    demo: Annotated[
        str, typer.Option("--demo", help="Which demo: 'demo' (Mixtral-style) or 'demo-deepseek' (fine-grained).")
    ] = "demo",
) -> None:
    """Train a bundled demo MoE on the synthetic benchmark, on CPU.

    Phase 1 (language, facts, arithmetic) and phase 2 (multiple choice) train a Mixtral-style model; phase 3
    learns the EmotionLines-like emotion task with replay, after cutting the experts into fine-grained ones
    plus a shared expert for demo-deepseek. The shipped models were made with
    `expertscope demo train --demo demo --out src/expertscope/demo/assets/model` (and --demo demo-deepseek).

    Example: expertscope demo train --out runs/demo --scale 0.05
    """
    from ..demo.train import check_demo_training, train_demo

    check_demo_training(out, demo, scale, threads, from_phase1, from_phase2)  # before the bar is drawn
    with progress() as p:
        task = p.add_task("training", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            p.update(task, completed=step, total=total, description=f"training (loss {loss:.3f})")

        manifest = train_demo(out, demo, seed=seed, scale=scale, threads=threads, evaluate=evaluate,
                              from_phase1=from_phase1, from_phase2=from_phase2, on_step=on_step)
    steps = manifest["phase3"]["steps"] if from_phase1 or from_phase2 else manifest["steps"]
    console.print(f"trained {steps} steps; saved to {out}", highlight=False)
    for name, acc in manifest.get("test_accuracy", {}).items():
        out_console.print(f"{name}: test accuracy {acc:.3f}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``data`` and ``demo`` command groups to ``app``."""
    app.add_typer(data_app, name="data")
    app.add_typer(demo_app, name="demo")
