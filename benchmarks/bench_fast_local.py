"""``fast``'s local change two ways: decomposed (routing weights × every expert's output) against the block rerun.

For each shape (Mixtral-8x7B's 32 x 8 top-2; DeepSeek-MoE-16B's 28 x 64 top-6 with 2 shared experts and a dense
first layer; hidden 64 unless given), one random model and one input set drawn from the seed, ``fast`` runs with
its local change decomposed (``expertscope.causal.fast.LOCAL = "auto"``, the default) and with the block rerun
per (expert, token) (``"rerun"``, the reference), alternated ``--repeats`` times in one process. Printed per
shape: each way's total and local seconds (min over repeats), their ratio, the layers each way took, and the
largest relative difference of the CE values (the two are the same quantity: fp32 rounding apart).

    OMP_NUM_THREADS=1 python benchmarks/bench_fast_local.py                     # both shapes, 8 inputs a domain
    python benchmarks/bench_fast_local.py --shapes deepseek-moe-16b --inputs 4 --repeats 3

Measured (the defaults: seed 3, 8 inputs x 3 domains of <= 64 tokens, hidden 64, 1 thread, quiet machine):

=================  ============  =======  =====  ==========  ===========  =====  =============
shape              decomposed s  rerun s  ratio  local dec.  local rerun  ratio  max rel diff
=================  ============  =======  =====  ==========  ===========  =====  =============
mixtral-8x7b       3.43          3.65     1.06   0.97        1.14         1.18   2.9e-08
deepseek-moe-16b   6.83          13.12    1.92   3.36        9.55         2.84   2.1e-07
=================  ============  =======  =====  ==========  ===========  =====  =============

(The rerun runs each (expert, token) row through the block's top-k and shared experts: 8 expert outputs a row on
the DeepSeek shape, 2 on Mixtral's; the decomposition runs every expert once a token: 64 and 8.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import expertscope.causal as C
import expertscope.causal.fast as F
from bench_causal import PRESETS, deep_model
from expertscope.data import synthetic
from expertscope.models.model import MoEModel
from expertscope.testing import tiny_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "deepseek-moe-16b"], choices=list(PRESETS))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=8, help="inputs per domain (three domains)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"fast's local change: {args.inputs} inputs x 3 domains of <= {args.tokens} tokens, hidden {args.hidden}, "
          f"min over {args.repeats} alternated repeats, one thread")
    print(f"{'shape':<18}{'decomposed s':>14}{'rerun s':>10}{'ratio':>7}{'local dec.':>12}{'local rerun':>13}"
          f"{'ratio':>7}{'layers dec./rerun':>19}{'max rel diff':>14}")
    for shape in args.shapes:
        fam, L, E, k, shared, dense = PRESETS[shape]
        torch.manual_seed(args.seed)
        moe = MoEModel.from_model(deep_model(fam, L, E, k, shared, dense, args.hidden, args.tokens),
                                  tokenizer=tiny_tokenizer())
        doms = [synthetic.generate(d, args.inputs, seed=100 + args.seed, split="test")
                for d in ("emotion", "knowledge", "math")]
        common = dict(max_length=args.tokens, batch_size=args.batch_size, noise_inputs=0, method="fast")
        C.causal_effects(moe, {"warm": ["warm up the allocator"]}, **common)
        total: dict[str, list[float]] = {"auto": [], "rerun": []}
        local: dict[str, list[float]] = {"auto": [], "rerun": []}
        ce: dict[str, np.ndarray] = {}
        layers: dict[str, int] = {}
        try:
            for _ in range(args.repeats):
                for mode in ("rerun", "auto"):
                    F.LOCAL = mode
                    t = time.perf_counter()
                    eff = C.causal_effects(moe, doms, **common)
                    total[mode].append(time.perf_counter() - t)
                    st = eff.settings["fast_stats"]
                    local[mode].append(st["fast_local_s"])
                    layers[mode] = st["local_decomposed"] if mode == "auto" else st["local_rerun"]
                    ce[mode] = eff.ce
        finally:
            F.LOCAL = "auto"
        ok = np.isfinite(ce["rerun"])
        diff = float(np.abs(ce["auto"][ok] - ce["rerun"][ok]).max() / np.abs(ce["rerun"][ok]).max())
        ta, tr, la, lr = min(total["auto"]), min(total["rerun"]), min(local["auto"]), min(local["rerun"])
        print(f"{shape:<18}{ta:>14.2f}{tr:>10.2f}{tr / ta:>7.2f}{la:>12.2f}{lr:>13.2f}{lr / la:>7.2f}"
              f"{layers['auto']:>10}/{layers['rerun']:<8}{diff:>14.1e}", flush=True)


if __name__ == "__main__":
    main()
