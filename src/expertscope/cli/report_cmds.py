"""``expertscope report``: rebuild a run's self-contained ``report.html`` from its saved tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, handle_errors, out_console


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
    app.command("compare")(compare_cmd)


@handle_errors
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `expertscope run` (manifest.json and "
                                                 "domain_experts.parquet at least).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the HTML "
                                                                 "(default: RUN_DIR/report.html).")] = None,
) -> None:
    """Rebuild RUN_DIR/report.html and RUN_DIR/figures/ (PNG + SVG) from the tables saved in RUN_DIR; with -o FILE,
    only FILE and its own assets named after it.

    The report is one HTML file with every figure inlined: it opens offline and fetches nothing.

    Examples:

      expertscope report runs/study

      expertscope report runs/study -o /tmp/study-report.html
    """
    from rich.markup import escape

    from ..report.html import report

    problems: dict[str, str] = {}
    path = report(run_dir, out=out, problems=problems, lock=True)  # with -o: OUT and its own assets only
    for name, reason in problems.items():
        console.print(f"[yellow]warning:[/] could not read {escape(name)} ({escape(reason)}); left out of the report",
                      highlight=False, soft_wrap=True)
    out_console.print(f"wrote {path}")


@handle_errors
def compare_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more directories written by `expertscope run`, "
                                                       "one per model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the comparison HTML.")] = Path(
        "runs/compare.html"),
) -> None:
    """Compare runs of several models side by side, where the paper compares its models: Figures 1–3, the
    routing mutual information per layer, and the steering Tables 1–2.

    Examples:

      expertscope run --model demo -o runs/demo && expertscope run --model demo-deepseek -o runs/demo-deepseek

      expertscope compare runs/demo runs/demo-deepseek -o runs/compare.html
    """
    from ..report.compare import compare
    from ..rundir import check_out_file

    check_out_file(out)  # before any run is read or any figure written
    path = compare(run_dirs, out)
    out_console.print(f"wrote {path}")
