"""Corpus-scale recorded routes (issue 35, item 5): ``profile --routes --stream`` over files of growing size.

Writes a ``.npy`` of synthetic routes ``[tokens, layers, k]`` (int16, as vLLM returns them) per size, then
profiles each in a fresh process (``profile_routes(..., stream=True)``: selection counts, co-activation, transitions
and paths, the same work as ``expertscope profile --routes FILE --stream``) and prints, per size, the file's size,
seconds, tokens per second and the process's peak resident memory. Peak memory flat in the file size is the
target. The routes are token-driven, as real routing is: 4,096 token types (Zipf-distributed), each with its own
top-k per layer, and one slot in five swapped for the type's alternate expert.

    python benchmarks/bench_routes_stream.py                       # 1M, 3M and 10M tokens, 48 layers, k 8, E 64
    python benchmarks/bench_routes_stream.py --sizes 200000 --keep # a quick look; keep the files in /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_routes(path: Path, tokens: int, layers: int, k: int, experts: int, seed: int = 0,
                 chunk: int = 1 << 20) -> None:
    """A ``.npy`` of ``tokens`` synthetic routes, written in chunks (never whole in memory)."""
    g = np.random.default_rng(seed)
    V = 4096
    table = np.argsort(g.random((V, layers, experts)), axis=2)[:, :, : k + 1]  # k experts + an alternate
    zipf = 1.0 / np.arange(1, V + 1)
    zipf /= zipf.sum()
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(tokens, layers, k))
    for a in range(0, tokens, chunk):
        n = min(chunk, tokens - a)
        types = g.choice(V, size=n, p=zipf)
        rows = table[types]  # (n, L, k + 1)
        swap = g.random((n, layers)) < 0.2
        rows[:, :, k - 1] = np.where(swap, rows[:, :, k], rows[:, :, k - 1])
        out[a:a + n] = rows[:, :, :k]
    out.flush()
    del out


def profile_one(path: str, experts: int) -> None:
    """Child process: stream-profile ``path`` and print one JSON line of figures."""
    import torch

    torch.set_num_threads(1)
    from expertscope.integrations.engine_routes import profile_routes

    t = time.perf_counter()
    prof = profile_routes({"a": path}, num_experts=experts, stream=True)
    seconds = time.perf_counter() - t
    n, _ = prof.totals()
    paths = len(prof.coactivation.paths["a"][1]) if prof.coactivation is not None else 0
    print(json.dumps({"tokens": int(n[0]), "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "distinct_paths": paths}))


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (new with exec; getrusage's maxrss keeps the parent's peak at
    fork on Linux), else maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        profile_one(args.child, args.experts)
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="routes-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"synthetic routes: {args.layers} layers x k {args.k}, {args.experts} experts; int16 .npy; one torch thread")
    print(f"{'tokens':>12} {'file GB':>8} {'seconds':>9} {'tokens/s':>10} {'peak RSS MB':>12} {'distinct paths':>15}")
    rows = []
    for size in args.sizes:
        path = root / f"routes_{size}.npy"
        if not path.exists():
            write_routes(path, size, args.layers, args.k, args.experts)
        res = subprocess.run([sys.executable, __file__, "--child", str(path), "--experts", str(args.experts)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode:
            sys.exit(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "the child process failed")
        fig = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(fig)
        print(f"{fig['tokens']:>12,} {path.stat().st_size / 1e9:>8.2f} {fig['seconds']:>9.1f} "
              f"{fig['tokens'] / fig['seconds']:>10,.0f} {fig['peak_rss_mb']:>12,.0f} {fig['distinct_paths']:>15,}")
        if not args.keep:
            path.unlink()
    if len(rows) > 1:
        print(f"peak memory, largest over smallest file: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x "
              f"for {rows[-1]['tokens'] / rows[0]['tokens']:.0f}x the tokens")


if __name__ == "__main__":
    main()
