"""Progress reporting without a user interface: analyses call a callback, front ends draw it.

The library never draws progress bars itself (and never imports the CLI); the CLI passes a callback that
draws rich bars, a notebook could pass one that updates a widget.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeAlias

#: ``progress(task, done, total)``: ``done`` of ``total`` units of ``task`` (e.g. ``"profiling"``) are finished.
#: Called once with ``done == 0`` when the total is known, then after every unit.
ProgressCallback: TypeAlias = Callable[[str, int, int], None]



@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Raise the logger ``name`` to ERROR for the block: a third-party library's chatter (retries, notes on
    how it was called) that says nothing about the user's run stays off the console."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


__all__ = ["ProgressCallback", "quiet_logger"]
