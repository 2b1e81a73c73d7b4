"""Profiling throughput: the local executor beside Ray executors of 1 and 2 actors, on CPU.

Run: `python benchmarks/bench_ray.py [--model demo] [--texts 240]`. Prints tokens/s of each, measured in
this one run, and the ratios to the local executor. On a 2-core machine, Ray cannot beat the local run
(the driver, the object store and the actors share the same two cores and each actor is pinned to one
thread); the point of the executor is to scale across GPUs and nodes with results identical to local.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import expertscope as es
from expertscope.execution import ModelSpec, RayExecutor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--texts", type=int, default=240, help="texts per synthetic domain x 3 domains")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    import ray

    from expertscope.data.sources import load_domains

    model = es.load_model(args.model, dtype="float32")
    source = str(model.model.name_or_path) if args.model == "demo" else args.model
    doms = load_domains([f"{d}=synthetic:{d}@validation" for d in ("emotion", "knowledge", "math")],
                        limit=args.texts // 3)
    torch.set_num_threads(1)  # actors run one thread each; the local run gets the same for a fair ratio
    t = time.perf_counter()
    local = es.profile(model, doms, batch_size=args.batch_size)
    t_local = time.perf_counter() - t
    tokens = int(local.totals()[0].sum())
    rows = [("local (1 thread)", t_local)]
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
        try:
            for n in (1, 2):
                with RayExecutor(ModelSpec(source, dtype="float32", threads=1), workers=n,
                                 cpus_per_worker=0.75) as ex:
                    # the first job starts the actors (and loads a model in each); the second finds them ready
                    for job in ("first job", "second job"):
                        t = time.perf_counter()
                        prof = es.profile(model, doms, batch_size=args.batch_size, executor=ex)
                        rows.append((f"ray, {n} actor{'s' if n > 1 else ''}, {job}", time.perf_counter() - t))
                same = all((a == b).all() for a, b in zip(local.totals()[1].values(), prof.totals()[1].values(),
                                                           strict=True))
                print(f"ray with {n} actor(s): profile identical to local: {same}")
        finally:
            ray.shutdown()
    print(f"model {args.model}, {tokens} tokens, batch size {args.batch_size}")
    print(f"{'executor':<30} {'seconds':>8} {'tokens/s':>10} {'vs local':>9}")
    for name, sec in rows:
        print(f"{name:<30} {sec:8.2f} {tokens / sec:10.0f} {t_local / sec:8.2f}x")


if __name__ == "__main__":
    main()
