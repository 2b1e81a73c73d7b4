"""Progress without a terminal: a bounded number of lines, with counts and an estimate of the time left."""

from __future__ import annotations

from expertscope.cli._common import ProgressLines


def test_progress_lines_are_rate_limited_and_carry_counts_and_eta() -> None:
    lines: list[str] = []
    now = [0.0]
    p = ProgressLines(lines.append, every=30, clock=lambda: now[0])
    p("steering", 0, 100)
    for done in range(1, 100):  # one item a second: a line at 30, 60 and 90 s, not 99 lines
        now[0] = float(done)
        p("steering", done, 100)
    now[0] = 100.0
    p("steering", 100, 100)
    p("steering", 100, 100)  # a repeated final update adds nothing
    assert lines == ["steering: 0/100", "steering: 30/100 after 30 s, about 70 s left",
                     "steering: 60/100 after 60 s, about 40 s left",
                     "steering: 90/100 after 1 min 30 s, about 10 s left",
                     "steering: 100/100 done in 1 min 40 s"]
    # tasks are independent; a task that starts with progress already made reports it at once when due
    other: list[str] = []
    q = ProgressLines(other.append, every=5, clock=lambda: now[0])
    q("profiling", 3, 10)
    assert other == ["profiling: 0/10"]
    now[0] += 6
    q("profiling", 4, 10)
    assert other[-1] == "profiling: 4/10 after 6 s, about 9 s left"


def test_a_task_run_again_reports_again() -> None:
    lines: list[str] = []
    now = [0.0]
    p = ProgressLines(lines.append, every=30, clock=lambda: now[0])
    p("steering", 0, 4)
    p("steering", 4, 4)
    now[0] = 10.0
    p("steering", 0, 2)  # a second study in the same run (confirmation on a second corpus)
    now[0] = 15.0
    p("steering", 2, 2)
    assert lines == ["steering: 0/4", "steering: 4/4 done in 0 s", "steering: 0/2", "steering: 2/2 done in 5 s"]
