"""The steering stage of ``expertscope run``, timed whole: as it runs by default (every arm evaluated in this
process), with its steered arms spread over worker processes (``--executor process``), and with the
evaluation code path of the time issue #21 was filed (``tests/oracles/evaluation.py``) in this process; the
tables of every variant must be identical.

Run: ``python benchmarks/bench_steering.py [--run runs/study] [--workers 2] [--limit 60] [--no-reference]``.

``--run`` is a finished ``expertscope run`` directory: its domain-expert and driver tables give the targets
(made first, into a temporary directory, when it is missing). Each variant runs only the ``steering`` stage
(``run_study(..., stages=["steering"], inputs_dir=RUN)``) into its own temporary directory, with one torch
thread per process, and reports the stage's own seconds from the manifest and the wall time of the call
(model loading included). Run it on a quiet machine: ratios of seconds measured in one run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracles

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def reference_evaluation() -> Iterator[None]:
    """Every ``expertscope.evaluation.evaluate`` call (the study imports it at call time) goes through the earlier
    code path."""
    import expertscope.evaluation as ev
    from oracles.evaluation import evaluate_reference

    saved = ev.evaluate
    ev.evaluate = evaluate_reference  # type: ignore[assignment]
    try:
        yield
    finally:
        ev.evaluate = saved  # type: ignore[assignment]


def stage(run: Path, out: Path, limit: int, executor: str, workers: int) -> tuple[float, float]:
    """``(stage seconds from the manifest, wall seconds of the call)``."""
    from expertscope import StudyConfig, run_study
    from expertscope.config import InterventionConfig

    cfg = StudyConfig(threads=1, executor=executor, workers=workers,  # type: ignore[arg-type]
                      intervention=InterventionConfig(limit=limit))
    t = time.perf_counter()
    manifest = run_study(cfg, out, stages=["steering"], inputs_dir=run)
    wall = time.perf_counter() - t
    return float(manifest["stages"]["steering"]["seconds"]), wall


def tables(out: Path) -> dict[str, Any]:
    import pandas as pd

    from expertscope.interventions.steering_study import InterventionResult

    return {name: pd.read_parquet(out / name) for name in InterventionResult.FILES.values() if (out / name).exists()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/study"), help="a finished `expertscope run` directory")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the process executor")
    ap.add_argument("--limit", type=int, default=60, help="test items per domain (InterventionConfig.limit)")
    ap.add_argument("--no-reference", action="store_true", help="skip the earlier evaluation path")
    args = ap.parse_args()

    import pandas as pd
    import torch

    from expertscope import StudyConfig, run_study

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-steering-"))
    run = args.run
    if not (run / "drivers.parquet").exists():
        run = tmp / "targets"
        print(f"{args.run} has no finished run: finding the targets first in {run}", flush=True)
        run_study(StudyConfig(threads=1), run, stages=["profile", "domain_experts", "drivers"])
    variants: list[tuple[str, str, int, bool]] = [("in process (default)", "local", 1, False),
                                                  (f"{args.workers} worker processes", "process", args.workers, False)]
    if not args.no_reference:
        variants.append(("in process, issue-time evaluation", "local", 1, True))
    print(f"steering stage on {run} (limit {args.limit} items per domain), one torch thread per process")
    results: dict[str, tuple[float, float]] = {}
    frames: dict[str, dict[str, Any]] = {}
    for label, executor, workers, ref in variants:
        out = tmp / label.replace(" ", "_").replace(",", "")
        with reference_evaluation() if ref else contextlib.nullcontext():
            results[label] = stage(run, out, args.limit, executor, workers)
        frames[label] = tables(out)
        print(f"  {label:<36} stage {results[label][0]:7.1f} s   call {results[label][1]:7.1f} s", flush=True)
    first = variants[0][0]
    same = True
    for label in frames:
        for name, df in frames[first].items():
            try:
                pd.testing.assert_frame_equal(df, frames[label][name])
            except AssertionError as e:
                same = False
                print(f"  {label}: {name} differs from {first}: {str(e).splitlines()[0]}")
    print(f"tables identical across variants: {same}")
    base = results[first][0]
    for label, (sec, _) in results.items():
        if label != first:
            print(f"  {first} / {label}: {base / sec:.2f}x")
    if not args.no_reference:
        ref = results[variants[-1][0]][0]
        print(f"  issue-time evaluation in process / {variants[1][0]}: {ref / results[variants[1][0]][0]:.2f}x "
              "(target >= 2x)")


if __name__ == "__main__":
    main()
