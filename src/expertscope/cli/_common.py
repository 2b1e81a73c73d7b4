"""Shared CLI plumbing: the error boundary, the console and progress bars."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import ExpertscopeError
from ..progress import ProgressCallback

console = Console(stderr=True)
out_console = Console()

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit with ``code``."""
    from rich.markup import escape

    # Escaped: "[layer, expert]" in a message is text, not rich markup.
    one_line = " ".join(message.split())  # an error is always one line, whatever the message held
    console.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn :class:`ExpertscopeError` (and missing files) into one line on stderr and exit code 2."""

    import inspect

    # Only commands that have --resume may advise it.
    resumable = "resume" in inspect.signature(fn).parameters
    interrupted = ("interrupted: rerun with --resume to continue where it stopped" if resumable
                   else "interrupted: nothing was kept; run the command again")  # open_run_dir removed it

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ExpertscopeError as e:
            fail(str(e), e.exit_code)
        except FileNotFoundError as e:
            fail(f"file not found: {e.filename or e}: check the path")
        except OSError as e:  # disk full, read-only disk, permissions: one line, never a traceback
            where = f" {e.filename}" if e.filename else ""
            fail(f"cannot access{where} ({e.strerror or e}): check the path, free disk space or choose another --out")
        except KeyboardInterrupt:
            fail(interrupted, 130)

    return cast(F, wrapper)


def progress() -> Progress:
    """A rich progress bar with counts, elapsed time and an estimate of the time left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@contextlib.contextmanager
def progress_bars() -> Iterator[ProgressCallback]:
    """A :data:`~expertscope.progress.ProgressCallback` drawing one rich bar per task until the block ends."""
    with progress() as p:
        tasks: dict[str, TaskID] = {}

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = p.add_task(task, total=total)
            p.update(tasks[task], completed=done, total=total)

        yield update
