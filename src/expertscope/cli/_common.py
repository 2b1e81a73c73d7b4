"""Shared CLI plumbing: the error boundary, the console and progress bars."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import ExpertscopeError

console = Console(stderr=True)
out_console = Console()

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


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

    return wrapper  # type: ignore[return-value]


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


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar."""
    with progress() as p:
        task = p.add_task(description, total=total)
        for item in items:
            yield item
            p.advance(task)
