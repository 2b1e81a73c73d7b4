"""Evaluation speed: the reference code path (``tests/oracles/evaluation.py``) against ``evaluate``, in one run.

Run: ``python benchmarks/bench_eval.py [--items 100] [--repeats 3] [--batch-size 16] [--steer] [--model demo]``.

On a bundled demo model (``--model demo`` or ``demo-deepseek``), the synthetic test split of each
domain (``--items`` examples) is scored by both code paths, alternately (the first path alternates
between repeats, so drift in the machine's load hits both), ``--repeats`` times. Printed per task: min
and median seconds of each path, their ratio, and
whether predictions, correctness and accuracy are identical (scores agree to float reduction order).
``--steer`` evaluates under a steering of 12 experts (the steering study's situation: hooks on every
forward) instead of the plain model.

The last line is the projected speed-up of the steering stage: each of its conditions evaluates every
domain's task once, so the stage's evaluation time scales with the sum over tasks (the router-LoRA training
of that stage is not evaluation and is not counted). Timings on a shared CPU are noisy: compare the ratio
within one run, not seconds across runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracles

import argparse
import contextlib
import statistics
import time
from typing import Any


def _identical(a: Any, b: Any) -> bool:
    keys = ("prediction", "correct")
    return (a.accuracy, a.weighted_f1, a.n) == (b.accuracy, b.weighted_f1, b.n) and all(
        all(x[k] == y[k] for k in keys) for x, y in zip(a.predictions, b.predictions, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100, help="examples per task (synthetic test split)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path per task")
    ap.add_argument("--batch-size", type=int, default=16, help="as in the steering study")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--model", default="demo", help="demo, demo-deepseek or a model directory")
    ap.add_argument("--steer", action="store_true", help="evaluate under a 12-expert steering (scale 0.6)")
    args = ap.parse_args()

    import torch

    import expertscope as es
    from expertscope.data import synthetic
    from expertscope.interventions.steering import SteeringSpec, steer
    from oracles.evaluation import evaluate_reference

    torch.set_num_threads(args.threads)
    model = es.load_model(args.model)
    spec = SteeringSpec(targets=tuple((layer, e) for layer in model.layers for e in range(3)), scale=0.6)
    paths = {"reference": evaluate_reference, "evaluate": es.evaluate}
    total = {"reference": 0.0, "evaluate": 0.0}
    print(f"{args.model}, {args.items} test items per task, batch {args.batch_size}, {args.threads} thread(s), "
          f"{'steered (12 experts x0.6)' if args.steer else 'unsteered'}, {args.repeats} paired repeats")
    print(f"{'task':<16} {'reference min/med s':>20} {'evaluate min/med s':>20} {'ratio (med)':>12} "
          f"{'ratio (min)':>12}  identical")
    for name in synthetic.DOMAINS:
        dom = synthetic.generate(name, args.items, seed=0, split="test")
        times: dict[str, list[float]] = {k: [] for k in paths}
        same = True
        for r in range(args.repeats):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            results = {}
            for key in order:
                with steer(model, spec=spec) if args.steer else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    results[key] = paths[key](model, dom.task, dom, batch_size=args.batch_size)
                    times[key].append(time.perf_counter() - t0)
            same &= _identical(results["reference"], results["evaluate"])
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        for k in paths:
            total[k] += med[k]
        print(f"{dom.task:<16} {low['reference']:>9.2f} / {med['reference']:<8.2f} {low['evaluate']:>9.2f} / "
              f"{med['evaluate']:<8.2f} {med['reference'] / med['evaluate']:>11.2f}x "
              f"{low['reference'] / low['evaluate']:>11.2f}x  {same}")
    print(f"projected steering-stage evaluation speed-up (sum of medians): "
          f"{total['reference']:.2f} s -> {total['evaluate']:.2f} s = {total['reference'] / total['evaluate']:.2f}x")


if __name__ == "__main__":
    main()
