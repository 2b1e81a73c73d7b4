"""Routing-capture overhead: `es.profile` versus plain forward passes over the same batches.

Run: `python benchmarks/bench_capture.py [--layers 4 --hidden 256 --experts 8 --texts 96 --seq 128]`.
Prints both times measured in this one run and their ratio (target: overhead <= 15%).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import expertscope as es
from expertscope.routing import tokenize_batch
from expertscope.testing import tiny_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--texts", type=int, default=96)
    ap.add_argument("--seq", type=int, default=128, help="characters per text (the tokenizer is character-level)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                        num_local_experts=args.experts, num_experts_per_tok=args.top_k, pad_token_id=0,
                        max_position_embeddings=4096)
    model = MixtralForCausalLM(cfg).eval()
    moe = es.MoEModel.from_model(model, tokenizer=tiny_tokenizer())
    g = torch.Generator().manual_seed(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz 0123456789.,"
    texts = ["".join(alphabet[int(i)] for i in torch.randint(len(alphabet), (args.seq - int(j),), generator=g))
             for j in torch.randint(0, args.seq // 2, (args.texts,), generator=g)]
    domains = {"a": texts[: args.texts // 2], "b": texts[args.texts // 2:]}
    # The same batches profile() forms: per domain, longest first.
    batches = []
    for ts in domains.values():
        order = sorted(range(len(ts)), key=lambda i, ts=ts: (-len(ts[i]), i))
        for j in range(0, len(order), args.batch_size):
            enc, _ = tokenize_batch(moe.tokenizer, [ts[i] for i in order[j:j + args.batch_size]], 512)
            batches.append(enc)

    def plain() -> None:
        with torch.no_grad():
            for enc in batches:
                model(**enc, use_cache=False)

    def profiled() -> None:
        es.profile(moe, domains, batch_size=args.batch_size, max_length=512)

    plain()
    profiled()  # warm-up both
    t_plain, t_prof = [], []
    for _ in range(args.repeats):  # interleaved, best of N, to damp machine noise
        t = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        profiled()
        t_prof.append(time.perf_counter() - t)
    bp, bq = min(t_plain), min(t_prof)
    tokens = sum(int(e["attention_mask"].sum()) for e in batches)
    print(f"model: Mixtral-shaped, {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.top_k}")
    print(f"data: {args.texts} texts, {tokens} tokens, batch size {args.batch_size}, {args.threads} threads")
    print(f"plain forward passes : {bp:8.3f} s  ({tokens / bp:,.0f} tok/s)")
    print(f"es.profile (capture) : {bq:8.3f} s  ({tokens / bq:,.0f} tok/s)")
    print(f"capture overhead     : {100 * (bq / bp - 1):+7.1f} %  (target <= 15%)")


if __name__ == "__main__":
    main()
