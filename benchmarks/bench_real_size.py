"""Full-width MoE models on CPU (issue 38, item 1): what capture, causal effects and steering cost at a real
hidden size, and what ``expertscope plan`` predicts for the same work.

Models are built from the published configs of real checkpoints with random weights, written once to
``--dir`` (safetensors + the bundled tokenizer) so that ``es.load_model(path)`` is the real path:

- ``granite-1b``: IBM Granite-3.0-1B-A400M (24 layers, 32 experts, top-8, hidden 1024; 1.33 B parameters);
- ``granite-3b``: IBM Granite-3.0-3B-A800M (32 layers, 40 experts, top-8, hidden 1536; 3.3 B parameters);
- ``olmoe-1b-7b-4l``: AllenAI OLMoE-1B-7B-0924 (``OlmoeForCausalLM``: 64 experts, top-8, hidden 2048) with **4 of
  its 16 layers**: the full model is 6.9 B parameters, 28 GB in float32, more than the 24 GiB this was written on;
  4 layers are 1.9 B parameters (7.5 GB). Every number measured is the 4-layer model's (so is the plan compared
  with it); the causal methods' times per input are also extrapolated to the 16 layers (:func:`to_full_depth`).

Each measurement runs in a fresh process (its peak resident memory is its own, VmHWM): plain forwards,
``profile`` (capture overhead against the plain forwards, tokens per second), ``fast`` and ``exact`` causal
effects on 128-token inputs (``exact`` on a subset of layers, extrapolated to all by its cost per layer, said
so), and a steered evaluation. Beside each, the estimate of :func:`expertscope.plan` for the same work
(from ``config.json`` and the one timed forward of ``--calibrate``), and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_real_size.py --models granite-1b granite-3b --dir /tmp/real
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple


class Entry(NamedTuple):
    """A model of the benchmark: ``transformers``' ``{arch}Config`` / ``{arch}ForCausalLM`` built from ``config``;
    ``full_layers`` is the published depth when ``config`` builds fewer layers (None: all of them)."""

    arch: str
    config: dict[str, Any]
    full_layers: int | None = None


_GRANITE = dict(num_attention_heads=16, num_key_value_heads=8, intermediate_size=512, num_experts_per_tok=8,
                vocab_size=49155, max_position_embeddings=4096, embedding_multiplier=12.0, logits_scaling=6.0,
                residual_multiplier=0.22, attention_multiplier=0.015625, tie_word_embeddings=True,
                rms_norm_eps=1e-6, rope_theta=10000.0)
#: allenai/OLMoE-1B-7B-0924's config.json
_OLMOE = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
              num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
              max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, clip_qkv=None,
              norm_topk_prob=False, tie_word_embeddings=False, output_router_logits=False)

CONFIGS: dict[str, Entry] = {
    "granite-1b": Entry("GraniteMoe", {**_GRANITE, "hidden_size": 1024, "num_hidden_layers": 24,
                                       "num_local_experts": 32}),
    "granite-3b": Entry("GraniteMoe", {**_GRANITE, "hidden_size": 1536, "num_hidden_layers": 32,
                                       "num_attention_heads": 24, "num_local_experts": 40}),
    "olmoe-1b-7b-4l": Entry("Olmoe", {**_OLMOE, "num_hidden_layers": 4}, full_layers=_OLMOE["num_hidden_layers"]),
}


#: The steered evaluation's batch (items per forward; each is a row per label of several tokens).
STEER_BATCH = 16


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_model(name: str, root: Path) -> Path:
    """The model directory (written once): random weights in float32 safetensors and the bundled tokenizer."""
    out = root / name
    if (out / "config.json").exists():
        return out
    import torch
    import transformers as tf

    from expertscope.testing import tiny_tokenizer

    torch.manual_seed(0)
    entry = CONFIGS[name]
    cfg = getattr(tf, f"{entry.arch}Config")(**entry.config, torch_dtype="float32")
    model = getattr(tf, f"{entry.arch}ForCausalLM")(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out)
    return out


def to_full_depth(cfg: dict[str, Any], full: int, rows: dict[str, Any], tokens: int) -> dict[str, float]:
    """Seconds per text / input of a model built with ``L = cfg["num_hidden_layers"]`` of its ``full`` layers,
    extrapolated to all of them (estimates, not measurements):

    - forward: its decoder layers' part scales with the layers, the LM head's does not; split by multiply-adds
      per token (``c_layer`` = attention projections + scores over ``tokens`` + router + top-k experts,
      ``c_head`` = vocabulary × hidden): ``t_full = t · (full·c_layer + c_head) / (L·c_layer + c_head)``;
    - ``fast``: ``× full / L`` (its forward, backward products and per-layer block reruns are per layer; the
      LM head runs at the decision position only);
    - ``exact``: a restart at layer ``l`` recomputes layers ``l..L-1`` for each of the ``E`` experts, so its cost
      is ``∝ Σ_l E·(L − l) = E·L(L + 1)/2``: ``× full(full + 1) / (L(L + 1))`` (its one clean forward is
      scaled with it: under 1 % of the work);
    - ``hybrid``: a lower bound only, ``fast``'s time (it runs ``fast`` on every layer, then exact cells). Its
      exact part does not carry over from a layer subset of a shallow model: the last layer of the subset is
      computed exactly in full to calibrate (half the cells of a 2-layer subset, one layer in ``full`` of the
      whole model), and which other cells are exact depends on the drivers found.
    """
    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = H // cfg["num_attention_heads"]
    E = cfg.get("num_experts") or cfg.get("num_local_experts")
    c_layer = (2 * H * H + 2 * H * kv * head_dim + 2 * tokens * H + H * E
               + cfg["num_experts_per_tok"] * 3 * H * cfg["intermediate_size"])
    c_head = cfg["vocab_size"] * H
    linear, square = full / L, full * (full + 1) / (L * (L + 1))
    out: dict[str, float] = {"layers": L, "full_layers": full, "forward_factor":
                             (full * c_layer + c_head) / (L * c_layer + c_head), "fast_factor": linear,
                             "exact_factor": square}
    if "forward" in rows:
        out["forward"] = rows["forward"]["seconds"] / rows["forward"]["texts"] * out["forward_factor"]
    fast = rows.get("fast", {}).get("per_input")
    if fast is not None:
        out["fast"] = fast * linear
    if "exact" in rows:
        out["exact"] = rows["exact"]["per_input_all_layers"] * square
    if "hybrid" in rows and fast is not None:
        out["hybrid_at_least"] = fast * linear
    out["exact_bound_fe"] = 1 + E * full * (full + 1) / 2 / full
    return out


def report_full_depth(entry: Entry, rows: dict[str, Any], tokens: int) -> dict[str, float]:
    """:func:`to_full_depth` of the measured ``rows``, printed."""
    full = to_full_depth(entry.config, entry.full_layers or entry.config["num_hidden_layers"], rows, tokens)
    L, F = full["layers"], full["full_layers"]
    print(f"  extrapolated to all {F} layers (not measured; to_full_depth: forward x {full['forward_factor']:.2f} by "
          f"multiply-adds of layers and LM head, fast x {F}/{L}, exact x {F}({F}+1)/({L}({L}+1)) = "
          f"{full['exact_factor']:.1f}; hybrid at least fast's):")
    fwd = full.get("forward", float("nan"))
    if "forward" in full:
        print(f"    forward: {fwd:.1f} s per text")
    for job in ("fast", "exact"):
        if job in full:
            print(f"    {job}: {full[job]:,.0f} s per input ({full[job] / fwd:.0f} forward-equivalents"
                  + (f"; analytic bound {full['exact_bound_fe']:.0f}" if job == "exact" else "") + ")")
    if "hybrid_at_least" in full:
        print(f"    hybrid: at least {full['hybrid_at_least']:,.0f} s per input (fast's); its exact part is not "
              "extrapolated from a layer subset (to_full_depth)")
    return full


def texts(n: int, tokens: int) -> list[str]:
    from expertscope.data import synthetic

    base = [e.text + " " + (e.solution or "") for d in ("emotion", "knowledge", "math")
            for e in synthetic.generate(d, n, seed=0, split="test").examples]
    return [(t * (2 + tokens // max(1, len(t))))[: 6 * tokens] for t in base[:n]]


def child(job: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    import expertscope as es

    t0 = time.perf_counter()
    moe = es.load_model(path, dtype="float32")
    out: dict[str, Any] = {"job": job, "load_s": time.perf_counter() - t0}
    docs = texts(args.texts, args.tokens)
    if job == "forward":  # the texts as one batch, as profiling batches them
        from expertscope.routing import tokenize_batch

        enc, _ = tokenize_batch(moe.tokenizer, docs, args.tokens)
        with torch.no_grad():
            moe.model(**{k: v[:1] for k, v in enc.items()}, use_cache=False)  # warm-up
            t = time.perf_counter()
            moe.model(**enc, use_cache=False)
            out.update(seconds=time.perf_counter() - t, texts=len(docs), tokens=int(enc["attention_mask"].sum()))
    elif job == "profile":
        t = time.perf_counter()
        prof = es.profile(moe, {"a": docs}, max_length=args.tokens, batch_size=len(docs))
        out.update(seconds=time.perf_counter() - t, texts=len(docs), tokens=int(prof.totals()[0].sum()))
    elif job in ("fast", "exact", "hybrid"):
        layers = moe.layers
        subset = None if job == "fast" else [layers[0], layers[len(layers) // 2]]
        t = time.perf_counter()
        ce = es.causal_effects(moe, {"a": docs[: args.inputs]}, method=job, max_length=args.tokens,
                               batch_size=args.inputs,
                               only_layers=tuple(subset) if subset else None, decision="last", noise_inputs=0)
        out.update(seconds=time.perf_counter() - t, inputs=args.inputs, layers=subset or layers,
                   all_layers=layers, n_dec=len(moe.model.model.layers))
        if job == "hybrid":
            out["exact_share"] = ce.settings["hybrid"]["exact_share"]
    elif job == "steer":
        from expertscope.data import synthetic

        dom = synthetic.generate("emotion", args.inputs, seed=0, split="test")
        spec = es.SteeringSpec(targets=((moe.layers[-1], 0), (moe.layers[-1], 1)), scale=0.5)
        t = time.perf_counter()
        with es.steer(moe, spec=spec):
            es.evaluate(moe, dom.task, dom, batch_size=STEER_BATCH)
        from expertscope.data.prompts import prompt

        n_tok = [len(moe.tokenizer(prompt(dom.task, e))["input_ids"]) for e in dom.examples]
        out.update(seconds=time.perf_counter() - t, items=args.inputs, tokens=sum(n_tok) / len(n_tok))
    out["peak_mb"] = peak_mb()
    return out


def steer_fe(rows: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    """What evaluation scores per item of the steered evaluation's domain (``scoring_cost``: tokens, padding
    included, and the largest forward), into its row: the plan's count for it."""
    if "steer" not in rows:
        return
    from transformers import AutoTokenizer

    from expertscope.data import synthetic
    from expertscope.evaluation import scoring_cost

    tok = AutoTokenizer.from_pretrained(path)
    dom = synthetic.generate("emotion", args.inputs, seed=0, split="test")
    cost = scoring_cost(dom.task, dom, tok, batch_size=STEER_BATCH)
    rows["steer"]["scored"] = cost.per_item()
    rows["steer"]["largest"] = list(cost.largest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["granite-1b", "granite-3b"], choices=list(CONFIGS))
    ap.add_argument("--dir", default="/tmp/expertscope-real-size")
    ap.add_argument("--texts", type=int, default=6)
    ap.add_argument("--inputs", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--jobs", nargs="+", default=["forward", "profile", "fast", "exact", "hybrid", "steer"])
    ap.add_argument("--plan-only", action="store_true", help="recompute the plan against the measured rows saved")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return
    import expertscope as es

    root = Path(args.dir)
    if args.plan_only:  # the plan against the measured rows of an earlier run (bench_real_size.json)
        saved = json.loads((root / "bench_real_size.json").read_text())
        for name in args.models:
            rows = saved[name]["measured"]
            fwd = rows["forward"]
            steer_fe(rows, root / name, args)
            plan = es.plan(es.StudyConfig(model=str(root / name)), calibrate=True, tokens=args.tokens)
            print(f"== {name}: " + "; ".join(plan.notes))
            print(plan.compare(rows, per_forward=fwd["seconds"] / fwd["texts"]))
            saved[name]["plan"] = plan.to_dict()
            if CONFIGS[name].full_layers:
                saved[name]["full_depth"] = report_full_depth(CONFIGS[name], rows, args.tokens)
        (root / "bench_real_size.json").write_text(json.dumps(saved, indent=1, default=str))
        return
    results: dict[str, Any] = {}
    for name in args.models:
        path = write_model(name, root)
        weights_gb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
        entry = CONFIGS[name]
        n_layers = entry.config["num_hidden_layers"]
        part = (f"; {n_layers} of the published {entry.full_layers} layers: every measurement and the plan below "
                f"are for this {n_layers}-layer model" if entry.full_layers else "")
        print(f"\n== {name}: {path} ({weights_gb:.2f} GB of float32 weights){part}, one torch thread", flush=True)
        rows = {}
        for job in args.jobs:
            res = subprocess.run([sys.executable, __file__, "--child", job, str(path), "--texts", str(args.texts),
                                  "--inputs", str(args.inputs), "--tokens", str(args.tokens)],
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                print(f"  {job}: failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            rows[job] = json.loads(res.stdout.strip().splitlines()[-1])
            r = rows[job]
            print(f"  {job}: {r['seconds']:.1f} s, peak {r['peak_mb']:,.0f} MB (load {r['load_s']:.1f} s)", flush=True)
        fwd = rows.get("forward")
        per_fwd = fwd["seconds"] / fwd["texts"] if fwd else float("nan")  # one text's share of a batched forward
        if fwd and "profile" in rows:
            p = rows["profile"]
            print(f"  capture: profile {p['tokens'] / p['seconds']:.0f} tokens/s against plain forwards "
                  f"{fwd['tokens'] / fwd['seconds']:.0f} tokens/s: overhead {p['seconds'] / fwd['seconds']:.2f}x")
        for job in ("fast", "exact", "hybrid"):
            if job in rows:
                r = rows[job]
                per_input = r["per_input"] = r["seconds"] / r["inputs"]
                if job != "fast":  # a layer subset: extrapolate by each layer's share of the recomputation
                    n_dec = r["n_dec"]
                    share = sum(n_dec - la for la in r["layers"]) / sum(n_dec - la for la in r["all_layers"])
                    r["per_input_all_layers"] = per_input / share
                    print(f"  {job}: {per_input:.1f} s per input on layers {r['layers']}; all {n_dec} layers "
                          f"extrapolated {r['per_input_all_layers']:.0f} s ({r['per_input_all_layers'] / per_fwd:.0f} "
                          "forward-equivalents)")
                else:
                    print(f"  fast: {per_input:.1f} s per input ({per_input / per_fwd:.1f} forward-equivalents)")
        steer_fe(rows, path, args)
        plan = es.plan(es.StudyConfig(model=str(path)), calibrate=True, tokens=args.tokens)
        results[name] = {"weights_gb": weights_gb, "measured": rows, "plan": plan.to_dict()}
        if entry.full_layers:
            print(f"  plan against the {n_layers}-layer model:")
        print(plan.compare(rows, per_forward=per_fwd))
        if entry.full_layers:
            results[name]["full_depth"] = report_full_depth(entry, rows, args.tokens)
    (root / "bench_real_size.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
