"""What a study costs before it starts (``expertscope plan``, :func:`plan`): forward passes, forward-equivalents,
memory and time per stage, from the model's ``config.json`` and the data, before any weight is loaded.

The model is built on PyTorch's ``meta`` device (shapes, no memory) and its routers are found by the same
adapters a run uses, so layers, experts, top-k and parameter counts are the model's own. Counts follow the
stages' own work:

- a **forward-equivalent** (FE) is one clean forward of an input; time is FE × tokens × seconds per token;
- ``profile``: one forward per text (output-aware importance computes the selected experts again, one slot at a
  time: about twice their share of a forward, or as ``--calibrate`` measures it);
- ``drivers`` (``exact``): per input, one clean pass and, per MoE layer ``l`` and expert, a restart that
  recomputes layers ``l..`` (``(n_layers - l) / n_layers`` of a forward): the analytic bound of the engine (it
  does less: skipped perturbations, the last layer at the decision positions); ``fast``: ``2 + 2 × probes``;
  ``hybrid``: ``fast`` plus the share of exact's work its rounds verify (20-31 % measured; 30 % assumed);
- ``causal_rate``: one routing pass over every discovery text (at the causal stage's length); ``tokens``: 3 FE
  per discovery text; ``expert_map``: the texts that give :data:`EXPERT_MAP_TOKENS` router inputs, and every
  expert's MLP on them;
- ``steering``: every steered arm of the study (strengths × the target, its controls, references and the
  busiest control; the selectivity matrix), each scoring the domain's test items as evaluation scores them
  (:func:`~expertscope.evaluation.scoring_cost`: the same label set, batches and ``prompt + label`` rows, padding
  included; math its prompt and up to ``max_new_tokens`` decoding steps); the router LoRA: 3 FE per training item
  and epoch.

Seconds per token: ``--calibrate`` times forwards of the real model (weights loaded once, after the counts are
printed, at the study's ``threads``), a profiling batch and a routing pass, ``exact``'s restarts at the first and
the middle MoE layer (so the engine's own efficiency enters), ``fast`` on one input and ``evaluate`` on a batch of
each domain's test items (its rate per scored token, decoding included, prices steering and confirmation);
without it an assumed throughput (``tflops``; a CPU core: 0.03 TFLOP/s) on 2 × active parameters per token.
With ``executor`` ``process`` or ``ray``, the stages it runs (profiling, steering, confirmation) spread over
``workers`` (their time divided by it), and the first of them pays the workers' start once (each imports the
libraries and loads the model: timed by ``--calibrate``, else :data:`WORKER_START_S` assumed).
Memory: the weights, plus the stage's activations (formulas in :func:`_activations`), plus about 0.5 GB of
runtime. Estimates, not guarantees: ``bench_real_size.py`` checks them against measured runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import StudyConfig
from ..errors import ConfigError

#: Assumed throughput without --calibrate (TFLOP/s): one CPU core.
CPU_TFLOPS = 0.03
RUNTIME_GB = 0.5
HYBRID_SHARE = 0.3
#: Seconds to start a worker (interpreter, torch and transformers imported, a small model loaded) when not
#: calibrated; weights add their load time at :data:`LOAD_GB_PER_S`.
WORKER_START_S = 6.0
LOAD_GB_PER_S = 1.0
#: Router inputs ``expert_map`` collects (``router_inputs``' default): texts are read until it has them.
EXPERT_MAP_TOKENS = 1024
#: The stages an executor spreads over its workers.
EXECUTOR_STAGES = ("profile", "steering", "confirmation")


@dataclass
class ModelShape:
    """The model's shape from its config: decoder layers, MoE layers ``{layer: (experts, top_k)}``, hidden and
    vocabulary sizes, attention heads, parameters (total, active per token, in the routed experts) and dtype."""

    architecture: str
    n_layers: int
    moe: dict[int, tuple[int, int]]
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    params: int
    active_params: int
    expert_params: int
    dtype: str
    bytes_per_param: int

    @property
    def weights_gb(self) -> float:
        return self.params * self.bytes_per_param / 1e9

    @property
    def moe_share(self) -> float:
        """The routed experts' share of a token's compute."""
        active_experts = self.expert_params - (self.params - self.active_params)
        return active_experts / max(self.active_params, 1)


@dataclass
class StagePlan:
    """One stage: ``inputs`` processed, ``forward_passes``, ``fe`` (forward-equivalents, each of an average
    input), ``tokens`` per input, ``memory_gb`` at peak, ``seconds`` and a ``note`` on what was assumed."""

    stage: str
    inputs: int
    forward_passes: int
    fe: float
    tokens: float
    memory_gb: float
    seconds: float
    note: str = ""


@dataclass
class Plan:
    """A study's plan: the model's shape, the data, per-stage estimates and how time was calibrated."""

    model: ModelShape
    data: dict[str, dict[str, float]]
    stages: list[StagePlan]
    seconds_per_token: float
    calibrated: bool
    input_tokens: float = 128.0
    """The causal inputs' mean length the plan was made for (``tokens``, else the data's)."""
    exact_efficiency: float = 1.0
    """Measured exact restart cost over the analytic bound (1.0: the bound, not calibrated)."""
    profile_factor: float = 1.0
    """A profiling forward's time over a plain forward's (measured with ``calibrate``; else assumed)."""
    fast_fe: float | None = None
    """``fast``'s forward-equivalents per input, measured with ``calibrate`` (None: ``2 + 2 × probes``)."""
    notes: list[str] = field(default_factory=list)
    eval_seconds_per_token: float | None = None
    """Seconds per token of evaluation's forwards (its largest batch, timed with ``calibrate``: many rows run
    cheaper per token than a profiling batch on a small model); None: ``seconds_per_token``."""

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"]["weights_gb"] = self.model.weights_gb
        d["total_seconds"] = self.total_seconds
        return d

    def stage(self, name: str) -> StagePlan | None:
        return next((s for s in self.stages if s.stage == name), None)

    def compare(self, measured: Mapping[str, Mapping[str, Any]], per_forward: float | None = None) -> str:
        """Lines comparing this plan with measured jobs (``bench_real_size.py``'s rows): time and peak memory,
        and their ratio (estimate / measured)."""
        lines = []
        for job, row in measured.items():
            est = self._job(job, row)
            if est is None:
                continue
            sec, mem = est
            t = float(row.get("per_input_all_layers") or row["seconds"] / max(row.get("inputs") or row.get("texts")
                                                                                or row.get("items") or 1, 1))
            m = float(row["peak_mb"]) / 1024
            lines.append(f"  plan vs measured, {job}: {sec:.1f} s vs {t:.1f} s per item ({sec / t:.2f}x), "
                         f"memory {mem:.1f} vs {m:.1f} GB ({mem / m:.2f}x)")
        return "\n".join(lines)

    def _job(self, job: str, row: Mapping[str, Any]) -> tuple[float, float] | None:
        """Seconds per item and peak GB the plan gives for one benchmark job."""
        T = float(row.get("tokens", 0)) / max(row.get("texts", 1) or 1, 1) if job in ("forward", "profile") else \
            self.input_tokens
        mem = self.model.weights_gb + RUNTIME_GB
        if job == "forward":
            return T * self.seconds_per_token, mem + _activations(self.model, 1, T, "forward")
        if job == "profile":
            return T * self.seconds_per_token * self.profile_factor, mem + _activations(self.model, 1, T, "forward")
        if job in ("exact", "fast", "hybrid"):
            fe = _causal_fe(self.model, job, 8, self.exact_efficiency, self.fast_fe)
            return fe * T * self.seconds_per_token, mem + _activations(self.model, 1, T, job)
        if job == "steer":  # the items as evaluation scores them (row["scored"]: scoring_cost's count for them)
            rows, width = row.get("largest", (16, T))
            return float(row["scored"]) * (self.eval_seconds_per_token or self.seconds_per_token), \
                mem + _activations(self.model, int(rows), float(width), "forward")
        return None

    def table(self) -> list[dict[str, Any]]:
        return [{"stage": s.stage, "inputs": s.inputs, "forward passes": s.forward_passes,
                 "forward-equivalents": round(s.fe, 1), "memory GB": round(s.memory_gb, 2),
                 "time": duration_text(s.seconds), "note": s.note} for s in self.stages]


def count_text(n: float) -> str:
    """A parameter count in words: ``1.33 B``, ``3.8 M``, ``12.0 K``."""
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def duration_text(s: float) -> str:
    """Seconds in words: ``42 s``, ``17 min``, ``3.5 h``."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def model_shape(source: Any, dtype: str = "auto", trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model at ``source`` (a :class:`~expertscope.models.loading.ModelSource`), from its
    config alone: built on the ``meta`` device, routers found by the adapters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.loading import parse_dtype
    from ..models.model import discover_sites

    cfg = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    sites = discover_sites(model)
    if not sites:
        raise ConfigError(f"{source.name} has no MoE layer expertscope can adapt: plan needs an MoE model")
    total = sum(p.numel() for p in model.parameters())
    experts = 0
    active = 0.0
    for m in model.modules():
        ex = getattr(m, "experts", None)
        if isinstance(ex, torch.nn.Module):
            n = sum(p.numel() for p in ex.parameters())
            site = next((s for s in sites if s.block is m), None)
            E, k = (site.num_experts, site.top_k) if site is not None else (sites[0].num_experts, sites[0].top_k)
            experts += n
            active += n * k / max(E, 1)
    parsed = parse_dtype(dtype)
    want = parsed if isinstance(parsed, torch.dtype) else None
    given = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    dt = want or (given if isinstance(given, torch.dtype) else getattr(torch, str(given), None) if given else None) \
        or torch.float32
    text_cfg = getattr(cfg, "text_config", cfg)
    hidden = int(getattr(text_cfg, "hidden_size", 0))
    heads = int(getattr(text_cfg, "num_attention_heads", 1))
    return ModelShape(
        architecture=type(model).__name__, n_layers=int(getattr(text_cfg, "num_hidden_layers", len(sites))),
        moe={s.layer: (s.num_experts, s.top_k) for s in sites}, hidden=hidden,
        vocab=int(getattr(text_cfg, "vocab_size", 0)), heads=heads,
        kv_heads=int(getattr(text_cfg, "num_key_value_heads", None) or heads), params=int(total),
        active_params=int(total - experts + active), expert_params=int(experts),
        dtype=str(dt).replace("torch.", ""), bytes_per_param=torch.tensor([], dtype=dt).element_size())


def _activations(m: ModelShape, batch: int, tokens: float, kind: str, chunk_tokens: int = 8192,
                 inputs: int = 0) -> float:
    """Peak GB above the weights: a forward keeps one layer's activations at a time (about 16 hidden-size vectors
    per token, the attention scores and the float32 logits); ``exact`` adds the clean run's cached layer inputs and
    keys/values for every layer and one perturbed run of ``chunk_tokens``; ``fast`` keeps every layer's
    activations for its backward passes (about 34 hidden-size vectors per token and layer); ``hybrid`` adds to
    ``fast``'s the clean runs its rounds keep, one per batch of its ``inputs``, up to the cache's budget
    (:data:`~expertscope.causal.exact.CLEAN_CACHE_BYTES`)."""
    b = m.bytes_per_param
    bt = batch * tokens
    fwd = (bt * 16 * m.hidden * b + batch * m.heads * tokens ** 2 * b + bt * m.vocab * 4) / 1e9
    if kind in ("forward", "profile"):
        return fwd
    head_dim = m.hidden // max(m.heads, 1)
    cache = m.n_layers * bt * (m.hidden + 2 * m.kv_heads * head_dim) * b / 1e9
    if kind == "exact":
        return fwd + cache + min(chunk_tokens, bt) * 16 * m.hidden * b / 1e9
    if kind in ("fast", "hybrid"):
        grad = m.n_layers * bt * 34 * m.hidden * b / 1e9
        if kind == "fast":
            return fwd + grad
        from ..causal.exact import CLEAN_CACHE_BYTES

        kept = max(cache, min(CLEAN_CACHE_BYTES / 1e9, cache * math.ceil(inputs / max(batch, 1))))
        return fwd + grad + kept
    return fwd


def _experts_over_k(m: ModelShape) -> float:
    """Experts over top-k, averaged over the MoE layers: every expert on a token costs this many of its routed
    share of a forward."""
    return sum(E / max(k, 1) for E, k in m.moe.values()) / max(len(m.moe), 1)


def _causal_fe(m: ModelShape, method: str, probes: int, efficiency: float, fast_fe: float | None = None) -> float:
    """Forward-equivalents per input of ``method`` (module docstring)."""
    exact = 1 + efficiency * sum(E * (m.n_layers - layer) / m.n_layers for layer, (E, _) in m.moe.items())
    fast = fast_fe if fast_fe is not None else 2 + 2 * probes
    return {"exact": exact, "fast": fast, "hybrid": fast + HYBRID_SHARE * exact}.get(method, exact)


def _tokens(domains: Sequence[Any], tokenizer: Any, cap: int | None, prompts: bool = False) -> tuple[int, float]:
    """Inputs and their mean token count (capped), over ``domains``; with ``prompts`` the evaluation prompt each
    item is scored with (its task's), not its text."""
    from ..data import prompts as P
    from ..data.types import TASKS

    texts = [P.prompt(d.task, e) if prompts and d.task in TASKS else e.text
             for d in domains for e in d.examples]
    if not texts:
        return 0, 0.0
    if tokenizer is not None:
        lens = [len(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    else:
        lens = [max(1, len(t) // 4) for t in texts]
    lens = [min(n, cap) if cap else n for n in lens]
    return len(texts), sum(lens) / len(lens)


def _scored(domains: Sequence[Any], tokenizer: Any, batch_size: int, new_tokens: int, tokens: int | None = None,
            data_tokens: float = 0.0) -> tuple[float, tuple[int, float]]:
    """Tokens evaluation runs per item (padding included; averaged over ``domains``' items) and its largest
    forward ``(rows, length)``: :func:`~expertscope.evaluation.scoring_cost` on each domain (about 4 characters
    a token without a tokenizer). Planned at another input length ``tokens`` than the data's mean prompt
    ``data_tokens``, both scale with it."""
    from ..evaluation import scoring_cost

    tok = tokenizer if tokenizer is not None else _CharTokenizer()
    total, items, largest = 0.0, 0, (1, 1.0)
    for d in domains:
        if not d.examples:
            continue
        c = scoring_cost(d.task, d, tok, batch_size, max_new_tokens=new_tokens)
        total += c.token_forwards
        items += c.items
        largest = max(largest, (c.largest[0], float(c.largest[1])), key=lambda x: x[0] * x[1])
    scale = tokens / data_tokens if tokens and data_tokens else 1.0
    return (total / items * scale if items else 0.0), (largest[0], largest[1] * scale)


class _CharTokenizer:
    """A stand-in tokenizer for counting: about 4 characters a token (no tokenizer files to read)."""

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        def ids(t: str) -> list[int]:
            return [0] * max(1, len(t) // 4)

        return {"input_ids": [ids(t) for t in text] if isinstance(text, list) else ids(text)}


def _arms(cfg: StudyConfig, n_domains: int) -> int:
    """Steered arms the intervention stage evaluates per domain (both kinds), selectivity included."""
    from ..interventions.steering_study import strengths

    c = cfg.intervention
    per = len(strengths(c)) * (1 + c.n_controls + c.n_reference + int(c.busiest))
    sel = (1 + c.selectivity_controls) * n_domains if c.selectivity else 0
    return 2 * (per + sel) + 1  # two kinds; the unsteered baseline


def plan(config: StudyConfig | None = None, *, calibrate: bool = False, tflops: float | None = None,
         tokens: int | None = None, stages: Sequence[str] | None = None) -> Plan:
    """The cost of ``run_study(config)`` (or of ``stages``), before any weight is loaded (module docstring).

    ``calibrate``: time the real model once (loads its weights after the shapes are read); ``tflops``: the
    device's sustained throughput when not calibrating (default: one CPU core); ``tokens``: the input length to
    plan for instead of the data's (e.g. 128 for the benchmarks)."""
    from ..interventions.steering_study import strengths
    from ..models.loading import ModelSource
    from ..validation import check_positive
    from .prepare import prepare
    from .registry import PIPELINE

    cfg = config if config is not None else StudyConfig()
    if tflops is not None and (isinstance(tflops, bool) or not isinstance(tflops, int | float)
                               or not 0 < tflops < float("inf")):
        raise ConfigError(f"tflops={tflops!r} must be a positive number: the device's sustained TFLOP/s, e.g. 0.03 for "
                          "one CPU core, 300 for a recent GPU")
    check_positive(tokens, "tokens", allow_none=True)
    chosen = [s.name for s in PIPELINE.chosen(stages)]
    source = ModelSource.resolve(cfg.model)
    shape = model_shape(source, cfg.dtype, cfg.trust_remote_code)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # no tokenizer files here: about 4 characters per token
        tok = None
    inputs = prepare(cfg, chosen) if not PIPELINE.data_free(chosen) else None
    disc = inputs.domains if inputs is not None else []
    test = (inputs.test or []) if inputs is not None else []
    train = (inputs.train or []) if inputs is not None else []
    n_prof, t_prof = _tokens(disc, tok, cfg.profile.max_length)
    causal_doms = [d.head(cfg.causal.limit) for d in disc]
    n_ce, t_ce = _tokens(causal_doms, tok, cfg.causal.max_length)
    n_test, t_test = _tokens(test, tok, None, prompts=True)
    n_train, _ = _tokens(train, tok, None)
    t_data = t_test
    if tokens:
        t_prof = t_ce = t_test = float(tokens)
    data: dict[str, dict[str, float]] = {d.name: {"discovery": float(len(d.examples))} for d in disc}
    notes = []
    efficiency = 1.0
    fast_fe = None
    # importance computes the selected experts' outputs again, one slot at a time: about twice their share
    factor = 1 + (2 * shape.moe_share if cfg.profile.importance else 0.0)
    ci = cfg.intervention
    scored, peak = _scored(test, tok, ci.batch_size, ci.max_new_tokens, tokens, t_data)
    eval_spt = None
    start_s = WORKER_START_S + shape.weights_gb / LOAD_GB_PER_S
    routing = 1.0
    if calibrate:
        cal = _calibrate(cfg, shape, int(tokens or t_ce or 128), test if n_test else None)
        spt, efficiency, fast_fe, eval_spt = cal.seconds_per_token, cal.exact_efficiency, cal.fast_fe, cal.eval_spt
        start_s = cal.worker_start_s if cal.worker_start_s is not None else start_s
        factor = cal.profile_factor if cfg.profile.importance else cal.routing_factor
        routing = cal.routing_factor
        notes.append(f"calibrated: {spt * 1e3:.3f} ms per token in one forward; profiling {factor:.2f}x a forward, "
                     f"a routing pass {routing:.2f}x; exact at {efficiency:.2f} of its analytic bound; fast "
                     f"{fast_fe:.1f} forward-equivalents"
                     + (f"; evaluation {eval_spt * 1e3:.3f} ms per scored token (a batch of each domain's test "
                        "items, evaluated)" if eval_spt else ""))
    else:
        spt = 2 * shape.active_params / ((tflops or CPU_TFLOPS) * 1e12)
        notes.append(f"not calibrated: 2 x {count_text(shape.active_params)} active parameters per token at "
                     f"{tflops or CPU_TFLOPS} TFLOP/s (pass --calibrate to time the model)")
    base = shape.weights_gb + RUNTIME_GB
    out: list[StagePlan] = []
    workers = cfg.workers if cfg.executor != "local" else 1
    started = False

    def add(stage: str, n: int, passes: int, fe: float, t: float, kind: str, batch: int, note: str = "",
            peak: tuple[int, float] | None = None, per_token: float | None = None) -> None:
        nonlocal started
        if stage in chosen:  # peak: (rows, length) of the stage's largest forward, when not batch x t
            rows, width = peak if peak is not None else (batch, t)
            seconds = fe * t * (per_token or spt)
            if workers > 1 and stage in EXECUTOR_STAGES:
                seconds /= workers
                note = (note + "; " if note else "") + f"over {workers} {cfg.executor} workers"
            if cfg.executor != "local" and stage in EXECUTOR_STAGES and not started:
                started = True
                seconds += start_s
                note += f" (their start: {start_s:.0f} s)"
            out.append(StagePlan(stage, n, passes, fe, t, base + _activations(shape, rows, width, kind, inputs=n),
                                 seconds, note))

    c = cfg.causal
    add("profile", n_prof, n_prof, n_prof * factor, t_prof, "forward", cfg.profile.batch_size,
        f"importance on: {factor:.2f} forwards per text" if cfg.profile.importance else "")
    fe_in = _causal_fe(shape, c.method, c.fast_probes, efficiency, fast_fe)
    add("drivers", n_ce, int(n_ce * fe_in), n_ce * fe_in, t_ce, c.method, c.batch_size,
        f"{c.method}: {fe_in:.0f} FE per input" + ("" if calibrate or c.method == "fast" else
                                                   " (the engine's analytic bound; it does less)"))
    n_rate, t_rate = _tokens(disc, tok, c.max_length)  # every discovery text, at the causal stage's length
    if tokens:
        t_rate = float(tokens)
    add("causal_rate", n_rate, n_rate, float(n_rate), t_rate, "forward", c.batch_size,
        "one routing pass over every discovery text", per_token=spt * routing)
    add("tokens", n_prof, 3 * n_prof, 3.0 * n_prof, t_prof, "forward", cfg.profile.batch_size)
    # texts until EXPERT_MAP_TOKENS router inputs (whole batches), then every expert's MLP on those inputs
    bs = cfg.profile.batch_size
    texts_needed = math.ceil(EXPERT_MAP_TOKENS / t_prof) if t_prof else 0
    n_map = min(n_prof, bs * math.ceil(texts_needed / bs))
    experts_fe = EXPERT_MAP_TOKENS * shape.moe_share * _experts_over_k(shape) / max(t_prof, 1.0)
    add("expert_map", n_prof, n_map, n_map + experts_fe, t_prof, "forward", bs,
        f"{n_map} texts give its {EXPERT_MAP_TOKENS} router inputs; every expert's MLP on them")
    arms = _arms(cfg, max(len(disc), 1))
    n_eval = arms * n_test
    lora = 3 * n_train * ci.finetune_epochs
    t_eval = t_test or 64.0
    add("steering", n_test, int(n_eval), n_eval * scored / t_eval + lora, t_eval, "forward", ci.batch_size,
        f"{arms} steered arms x {n_test} test items ({scored:.0f} tokens scored per item, padding included); "
        f"router LoRA {lora:.0f} FE", peak=peak, per_token=eval_spt)
    second = (inputs.second or []) if inputs is not None else []
    n_second, t_second = _tokens(second, tok, None, prompts=True)
    if n_second:  # the registered sets at the registered strengths, with their matched controls
        arms2 = 2 * len(strengths(ci)) * (1 + ci.n_controls) + 1
        scored2, peak2 = _scored(second, tok, ci.batch_size, ci.max_new_tokens, tokens, t_second)
        t2 = float(tokens or t_second)
        add("confirmation", n_second, arms2 * n_second, arms2 * n_second * scored2 / t2, t2, "forward",
            ci.batch_size, f"{arms2} arms x {n_second} items of the second corpora", peak=peak2, per_token=eval_spt)
    add("routing_overlap", n_test, 4 * n_test, 4.0 * n_test, t_test or 64.0, "forward", cfg.profile.batch_size,
        "the targets' and references' routing, recorded", per_token=spt * routing)
    if not out:
        notes.append("the chosen stages read earlier tables only: no model work")
    return Plan(shape, data, out, spt, calibrate, float(tokens or t_ce or 128.0), efficiency, factor, fast_fe, notes,
                eval_spt)


@dataclass
class Calibration:
    """What ``--calibrate`` measured: seconds per token of a forward; exact's cost over its analytic bound; a
    profiling batch's and a routing pass's (capture without importance) time over a forward's; ``fast``'s
    forward-equivalents; seconds per scored token of evaluation (None: no test items); a worker's start (None:
    the local executor)."""

    seconds_per_token: float
    exact_efficiency: float
    profile_factor: float
    routing_factor: float
    fast_fe: float
    eval_spt: float | None
    worker_start_s: float | None


def _calibrate(cfg: StudyConfig, shape: ModelShape, tokens: int, test: Sequence[Any] | None = None) -> Calibration:
    """Seconds per token of a forward of the real model (a batch of ``profile.batch_size`` inputs of ``tokens``
    tokens, the median over at least 3 calls and :data:`CALIBRATION_SECONDS`, after a warm-up; at the study's
    ``threads``), exact's cost against its analytic bound, from the restarts of up to 8
    experts at the first and the last MoE layer on two inputs, a profiling batch's time over a forward's,
    ``fast``'s forward-equivalents on one input, and, given the ``test`` domains, evaluation's seconds per scored
    token: ``evaluate`` on one batch of each domain's items, over what :func:`~expertscope.evaluation.scoring_cost`
    counts for them (decoding steps and evaluation's own work included);
    with a ``process`` or ``ray`` executor, the seconds a worker takes to start (a fresh interpreter importing
    the libraries, plus the model's load here)."""
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # the run's own thread count (two on busy cores spin, not help)
    try:
        return _measure(cfg, shape, tokens, test)
    finally:
        torch.set_num_threads(threads)


def _measure(cfg: StudyConfig, shape: ModelShape, tokens: int, test: Sequence[Any] | None) -> Calibration:
    """:func:`_calibrate`'s measurements, at the thread count it set."""
    import torch

    from ..causal import causal_effects
    from ..models.loading import load_model
    from ..stats.profile import profile

    t = time.perf_counter()
    moe = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                     allow_pickle=cfg.allow_pickle)
    start = _worker_start() + time.perf_counter() - t if cfg.executor != "local" else None
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (1 + tokens // 8))
    ids = moe.tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens].to(moe.device)
    batch = ids.expand(max(1, cfg.profile.batch_size), -1)
    with torch.no_grad():
        moe.model(input_ids=batch, use_cache=False)  # warm-up
        spt = _timed(lambda: moe.model(input_ids=batch, use_cache=False), min_reps=3) / batch.numel()

    def profiled(importance: bool) -> float:
        return _timed(lambda: profile(moe, {"c": [text] * batch.shape[0]}, max_length=tokens,
                                      batch_size=batch.shape[0], importance=importance))

    prof = profiled(cfg.profile.importance)
    prof_factor = prof / (spt * batch.numel())
    routed = profiled(False) if cfg.profile.importance else prof  # without importance the profile is a routing pass
    routing_factor = max(1.0, routed / (spt * batch.numel()))
    causal_effects(moe, {"c": ["warm up"]}, max_length=tokens, batch_size=1, noise_inputs=0)  # the engine's check
    # the first and the middle MoE layer: the last one's restart also pays the LM head, which the bound omits
    first, mid = moe.layers[0], moe.layers[len(moe.layers) // 2]
    picked = (first, mid) if mid != first else (first,)
    experts = tuple(range(min(8, min(moe.site(la).num_experts for la in picked))))
    t = time.perf_counter()
    causal_effects(moe, {"c": [text, text[: len(text) // 2 + 1]]}, max_length=tokens, batch_size=2,
                   only_layers=picked, only_experts=experts, noise_inputs=0)
    spent = time.perf_counter() - t
    n_tok = ids.shape[1] * 1.5  # the two inputs
    clean = spt * n_tok
    restarts = len(experts) * sum((shape.n_layers - la) / shape.n_layers for la in picked) * spt * n_tok
    efficiency = max(0.05, min(2.0, (spent - clean) / restarts)) if restarts > 0 else 1.0
    t = time.perf_counter()
    causal_effects(moe, {"c": [text]}, method="fast", max_length=tokens, batch_size=1, noise_inputs=0,
                   fast_probes=cfg.causal.fast_probes)
    fast_fe = (time.perf_counter() - t) / (spt * ids.shape[1])
    return Calibration(spt, efficiency, max(1.0, prof_factor), routing_factor, fast_fe,
                       _eval_rate(moe, cfg, test) if test else None, start)


#: Decoding steps ``--calibrate`` lets evaluation run (at most): a big model's calibration stays minutes.
EVAL_CALIBRATION_STEPS = 32
#: A warm-up item slower than this (seconds) marks a compute-bound model: two items are timed, not a batch.
EVAL_SLOW_ITEM_S = 1.0


def _eval_rate(moe: Any, cfg: StudyConfig, test: Sequence[Any]) -> float | None:
    """Seconds per scored token of ``evaluate``: one batch of each domain's test items (two where the warm-up
    item took over :data:`EVAL_SLOW_ITEM_S`; decoding at most :data:`EVAL_CALIBRATION_STEPS` steps), over the
    tokens :func:`~expertscope.evaluation.scoring_cost` counts for them."""
    from ..evaluation import evaluate, scoring_cost

    ci = cfg.intervention
    new = min(ci.max_new_tokens, EVAL_CALIBRATION_STEPS)
    spent = counted = 0.0
    for d in test:
        if not d.examples or d.task is None:
            continue
        t = time.perf_counter()
        evaluate(moe, d.task, d.head(1), batch_size=1, max_new_tokens=1)  # warm-up
        # a small model's rate depends on the batch shape (per-call costs): its own batch; a model whose one item
        # takes seconds is compute-bound, and two items give its rate without minutes of calibration
        slow = time.perf_counter() - t > EVAL_SLOW_ITEM_S
        head = d.head(min(ci.batch_size, 2) if slow else ci.batch_size)
        t = time.perf_counter()
        evaluate(moe, head.task, head, batch_size=ci.batch_size, max_new_tokens=new)
        spent += time.perf_counter() - t
        counted += scoring_cost(head.task, head, moe.tokenizer, ci.batch_size, max_new_tokens=new).token_forwards
    return spent / counted if counted else None


#: Calibration repeats a timed call until this many seconds have passed (small models: one call takes
#: milliseconds, and a handful of them is mostly noise).
CALIBRATION_SECONDS = 1.0


def _timed(fn: Any, min_reps: int = 1, max_reps: int = 200) -> float:
    """The median seconds of ``fn()`` over at least ``min_reps`` calls, repeated until
    :data:`CALIBRATION_SECONDS` have passed (at most ``max_reps``)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < CALIBRATION_SECONDS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _worker_start() -> float:
    """Seconds a fresh interpreter takes to import what a worker imports (torch, transformers, the profiler)."""
    import subprocess
    import sys

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, expertscope.stats.profile"], check=False,
                   capture_output=True)
    return time.perf_counter() - t


__all__ = ["ModelShape", "Plan", "StagePlan", "count_text", "duration_text", "model_shape", "plan"]
