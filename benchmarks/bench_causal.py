"""Causal effects: the naive loop versus ``exact``, ``fisher`` and ``hybrid``, measured in one run.

Run: ``python benchmarks/bench_causal.py [--model demo|random|DIR] [--texts 12] [--threads 1]``.

The naive loop is the definition: one full forward pass per (input, layer, expert), the perturbation added
by a separate TorchFunctionMode on the router's logits projection. Prints the times, the speed-ups, the
largest |exact - naive| difference, and the Spearman rank agreement of fisher and hybrid with exact per
(domain, layer) on domain-mean CE. Targets: exact >= 5x faster than naive on CPU, fisher >= 50x faster
with median per-layer Spearman >= 0.8. Without ``--model`` it uses the bundled demo when present, else a
small random Mixtral-shaped model (hidden 128, 4 layers, 8 experts top-2, vocab 2000).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import expertscope.causal as C
from expertscope.models.model import MoEModel


class _AddToColumn(TorchFunctionMode):
    """Adds ``m`` to column ``e`` of the output of ``F.linear`` calls made with ``weight`` (the router)."""

    def __init__(self, weight: torch.Tensor, e: int, m: float) -> None:
        super().__init__()
        self.weight, self.e, self.m = weight, e, m

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            out = out.clone()
            out.view(-1, out.shape[-1])[:, self.e] += self.m
        return out


def naive(moe: MoEModel, texts: list[str], m: float, max_len: int = 512) -> np.ndarray:
    """CE ``(N, L, E)`` by one full forward pass per (input, layer, expert), inputs unpadded."""
    L, E = len(moe.sites), moe.num_experts
    out = np.zeros((len(texts), L, E))
    with torch.no_grad():
        for n, t in enumerate(texts):
            ids = moe.tokenizer(t, return_tensors="pt")["input_ids"][:, :max_len]
            logp = moe.model(input_ids=ids).logits[0, -1].double().log_softmax(-1)
            for li, s in enumerate(moe.sites):
                for e in range(s.num_experts):
                    with _AddToColumn(s.module.weight, e, m):
                        logq = moe.model(input_ids=ids).logits[0, -1].double().log_softmax(-1)
                    out[n, li, e] = float((logp.exp() * (logp - logq)).sum())
    return out


def _random_model() -> MoEModel:
    from transformers import MixtralConfig, MixtralForCausalLM

    from expertscope.testing import tiny_tokenizer

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=1024,
                        initializer_range=0.1, tie_word_embeddings=False)
    return MoEModel.from_model(MixtralForCausalLM(cfg).eval(), tokenizer=tiny_tokenizer(), source="random-mixtral")


def _texts(n: int, seed: int) -> dict[str, list[str]]:
    from expertscope.data import synthetic

    per = max(1, n // 3)
    return {d: synthetic.generate(d, per, seed=seed, split="test").texts for d in ("emotion", "knowledge", "math")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="'demo', 'random' or a model directory (default: demo if present)")
    ap.add_argument("--texts", type=int, default=12, help="inputs in total (split over three synthetic domains)")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--magnitude", type=float, default=1.0)
    ap.add_argument("--hybrid-top", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=512, help="truncate inputs (both methods alike)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from expertscope.demo import demo_model_path

    choice = args.model or ("demo" if (Path(demo_model_path()) / "config.json").exists() else "random")
    if choice == "random":
        moe = _random_model()
    else:
        from expertscope.models.loading import load_model

        moe = load_model(choice, dtype="float32")
    domains = _texts(args.texts, args.seed)
    flat = [t for ts in domains.values() for t in ts]
    n_tok = [min(args.max_tokens, len(moe.tokenizer(t)["input_ids"])) for t in flat]
    print(f"model: {choice} ({moe.describe()['architecture']}, MoE layers {moe.layers}, {moe.num_experts} experts, "
          f"top-{moe.top_k}); {len(flat)} inputs, {min(n_tok)}-{max(n_tok)} tokens; torch threads {args.threads}")
    common = dict(magnitude=args.magnitude, batch_size=args.batch_size, max_length=args.max_tokens)

    C.causal_effects(moe, {"warm": flat[:2]}, **common)  # warm-up (lazy init, allocator)
    t = time.perf_counter()
    ref = naive(moe, flat, args.magnitude, args.max_tokens)
    t_naive = time.perf_counter() - t
    t = time.perf_counter()
    ex = C.causal_effects(moe, domains, method="exact", **common)
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    fi = C.causal_effects(moe, domains, method="fisher", **common)
    t_fisher = time.perf_counter() - t
    t = time.perf_counter()
    hy = C.causal_effects(moe, domains, method="hybrid", hybrid_top=args.hybrid_top, **common)
    t_hybrid = time.perf_counter() - t

    diff = float(np.abs(ex.ce - ref).max())
    rf, rh = C.spearman_by_layer(fi, ex), C.spearman_by_layer(hy, ex)
    st = ex.settings["exact_stats"]
    print(f"\nexact engine: {st['engine']} ({st['engine_note']}); skipped {st['skipped']} of "
          f"{st['skipped'] + st['computed']} (input, layer, expert) perturbations as provably zero; "
          f"max |exact - naive| = {diff:.2e}")
    print(f"fisher: {fi.settings['fisher_stats']}")
    print(f"\n{'method':<8} {'time s':>9} {'speed-up vs naive':>18}")
    for name, tt in (("naive", t_naive), ("exact", t_exact), ("fisher", t_fisher), ("hybrid", t_hybrid)):
        print(f"{name:<8} {tt:>9.3f} {t_naive / tt:>17.1f}x")
    print("\nSpearman with exact (domain-mean CE over experts), per layer:")
    m = rf.merge(rh, on=["domain", "layer"], suffixes=("_fisher", "_hybrid"))
    print(m[["domain", "layer", "spearman_fisher", "spearman_hybrid"]].to_string(index=False, float_format="%.3f"))
    med_f, med_h = float(np.nanmedian(rf["spearman"])), float(np.nanmedian(rh["spearman"]))
    print(f"median: fisher {med_f:.3f}, hybrid {med_h:.3f}")
    print("\ntargets: exact >= 5x: {}; fisher >= 50x: {}; fisher median Spearman >= 0.8: {}".format(
        "met" if t_naive / t_exact >= 5 else "NOT met", "met" if t_naive / t_fisher >= 50 else "NOT met",
        "met" if med_f >= 0.8 else "NOT met"))


if __name__ == "__main__":
    main()
