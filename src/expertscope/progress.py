"""Progress reporting without a user interface: analyses call a callback, front ends draw it.

The library never draws progress bars itself (and never imports the CLI); the CLI passes a callback that
draws rich bars, a notebook could pass one that updates a widget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

#: ``progress(task, done, total)``: ``done`` of ``total`` units of ``task`` (e.g. ``"profiling"``) are finished.
#: Called once with ``done == 0`` when the total is known, then after every unit.
ProgressCallback: TypeAlias = Callable[[str, int, int], None]

__all__ = ["ProgressCallback"]
