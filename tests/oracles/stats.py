"""Independent references shared by test modules (textbook loops, not expertscope's vectorised code)."""

from __future__ import annotations

from collections.abc import Sequence


def bh_reference(p: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg q-values by the textbook loop: sort ascending, ``q_(i) = min_{j>=i} p_(j)·m/j``."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    q = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return q
