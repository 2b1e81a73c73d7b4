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


class ProgressLines:
    """Progress for a log file or CI (no terminal): a line when a task starts, a line per task at most every
    ``every`` seconds with done/total, elapsed time and an estimate of the time left, and a line when it ends.
    ``clock`` and ``write`` are parameters so that tests drive them."""

    def __init__(self, write: Callable[[str], None], every: float = 30.0,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.write, self.every, self.clock = write, every, clock or time.monotonic
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.done: dict[str, int] = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        now = self.clock()
        if task in self.started and done < self.done.get(task, 0):  # the same task run again: a new start
            del self.started[task]
        self.done[task] = done
        if task not in self.started:
            self.started[task] = self.last[task] = now
            self.write(f"{task}: 0/{total}")
            if done == 0:
                return
        if done >= total and total > 0:
            if self.last.get(task) != float("inf"):
                self.write(f"{task}: {done}/{total} done in {_duration(now - self.started[task])}")
                self.last[task] = float("inf")
            return
        if now - self.last[task] >= self.every:
            self.last[task] = now
            elapsed = now - self.started[task]
            eta = f", about {_duration(elapsed * (total - done) / done)} left" if done else ""
            self.write(f"{task}: {done}/{total} after {_duration(elapsed)}{eta}")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


@contextlib.contextmanager
def progress_bars() -> Iterator[ProgressCallback]:
    """A :data:`~expertscope.progress.ProgressCallback`: one rich bar per task in a terminal; without one (a
    log file, CI), :class:`ProgressLines` on stderr, so that a long stage is never silent."""
    if not console.is_terminal:
        yield ProgressLines(lambda line: console.print(line, highlight=False, soft_wrap=True))
        return
    with progress() as p:
        tasks: dict[str, TaskID] = {}

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = p.add_task(task, total=total)
            p.update(tasks[task], completed=done, total=total)

        yield update
