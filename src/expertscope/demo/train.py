"""Train the bundled demo MoE on the synthetic three-domain benchmark (``expertscope demo train``).

Recipe (seeded end to end, CPU only):

1. Training text: the training splits of :mod:`expertscope.data.synthetic` rendered with the exact
   evaluation prompts (:mod:`expertscope.evaluation.prompts`), each followed by its gold target; the
   knowledge base's fact statements (so every fact, including those asked about in test, is learnable);
   and open-form questions (``"Question: <q>\\nAnswer: <value>"``) for the training split's
   (fact, template) pairs only. Test questions pair facts with templates never seen with them in training.
2. A byte-level BPE tokenizer (``tokenizers``, 2048 tokens, every digit its own token) trained on that text.
3. A Mixtral-architecture model (8 routed experts, top-2, 4 MoE layers, hidden 128; ~3.9 M parameters,
   ~16 MB as fp32 safetensors) trained with AdamW, a cosine schedule and Mixtral's load-balancing loss.
   The loss covers the targets (labels, letters, solutions, values) and whole fact statements; prompts
   are context only.
4. Phase 2 (:func:`finetune_phase`): 10 000 steps of multiple-choice training from the phase-1 weights:
   option matching ("Which option is <value>?", single-token and knowledge values), training-split
   knowledge questions, and emotion / math replay. Letter binding has a long plateau, hence the length.
   Phases 1 and 2 use the first demo's emotion data (``emotion_v1``), so they reproduce its weights.
5. Phase 3 (:func:`finetune_v2`): the v2 demos. ``demo`` continues the Mixtral model; ``demo-deepseek``
   first cuts every expert into fine-grained ones plus a silent shared expert (:mod:`.upcycle`, same
   function), then both learn the EmotionLines-like emotion v2 with knowledge / math replay, with a small
   load-balancing coefficient so that routing can follow the domain. Validation accuracy and per-layer
   routing MI are logged every ``phase3_eval_every`` steps (recipes are chosen on those, never on test
   scores or steering outcomes).
6. The model and tokenizer are saved as a standard Hugging Face directory, then scored on the test splits;
   ``training_manifest.json`` records the seed, steps, time, the validation curves, the test accuracies
   and the test label-margin distribution.

Reproduction: the same seed and thread count give the same data, tokenizer and initial weights; CPU float
nondeterminism across machines can move the final accuracies by a few points, so a retrained demo is
expected to match the shipped model's test accuracies within ±0.05 (``REPRODUCTION_TOLERANCE``; compare
its ``training_manifest.json`` with the shipped one). ``--from-phase2`` on the first demo's phase-2
weights reruns phase 3 alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import prompts, synthetic
from ..data.types import Example

log = logging.getLogger(__name__)

ARCHITECTURES: tuple[str, ...] = ("mixtral", "deepseek")
DEMO_ARCHITECTURES: dict[str, str] = {"demo": "mixtral", "demo-deepseek": "deepseek"}
"""The bundled demos by ``--model`` name and the architecture each is trained as."""

PHASE3_RECIPES: dict[str, dict[str, float]] = {
    "mixtral": {"phase3_aux_loss_coef": 0.01, "phase3_router_lr_mult": 1.0},
    "deepseek": {"phase3_aux_loss_coef": 0.001, "phase3_router_lr_mult": 1.0},
}
"""The phase-3 settings each shipped demo was chosen with (on validation MI and accuracy; see the manifests'
``recipes_tried``)."""

REPRODUCTION_TOLERANCE = 0.05
"""Absolute accuracy tolerance within which a retrained demo reproduces the shipped model's scores."""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass
class TrainConfig:
    """Every setting of a demo training run (all recorded in the manifest)."""

    seed: int = 0
    n_emotion: int = 50_000
    n_knowledge: int = 60_000
    n_open_questions: int = 25_000
    statement_repeats: int = 40
    n_math: int = 100_000
    epochs: int = 1
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    router_aux_loss_coef: float = 0.01
    batch_size: int = 48
    lr: float = 2e-3
    warmup_steps: int = 150
    weight_decay: float = 0.01
    max_len: int = 160
    threads: int = 2
    eval_n: int = 300
    # Phase 2: a long fine-tune that teaches multiple choice (mapping a recalled value to its letter).
    # Letter binding is learned late: in probes it only left chance after ~2000 steps (see finetune_phase).
    phase2_steps: int = 10_000
    phase2_batch_size: int = 32
    phase2_lr: float = 1e-3
    phase2_warmup_steps: int = 50
    # Shares of phase-2 sequences: single-token option matching, option matching on knowledge values,
    # training-split knowledge questions, and emotion / math replay against forgetting.
    phase2_mix: tuple[float, float, float, float, float] = (0.15, 0.25, 0.45, 0.05, 0.10)
    # Phase 3 (the v2 demos): from the phase-2 weights (upcycled to fine-grained experts for demo-deepseek),
    # learn the EmotionLines-like emotion v2 while replaying knowledge and math; a small load-balancing
    # coefficient lets routing follow the domain (see :func:`finetune_v2`).
    architecture: str = "mixtral"  # "mixtral" (demo) or "deepseek" (demo-deepseek: Qwen2-MoE upcycled)
    upcycle_split: int = 2  # deepseek: each Mixtral expert becomes this many fine-grained experts
    shared_expert_size: int = 256  # deepseek: intermediate size of the one shared expert
    phase3_steps: int = 1000
    phase3_batch_size: int = 24
    phase3_lr: float = 1e-3
    phase3_warmup_steps: int = 100
    phase3_aux_loss_coef: float | None = None  # None: the architecture's recipe (PHASE3_RECIPES)
    phase3_router_lr_mult: float | None = None  # routers' learning rate / phase3_lr; None: the recipe's
    phase3_eval_every: int = 500
    phase3_eval_n: int = 100  # validation items per domain in each phase-3 validation report
    # Shares of phase-3 sequences: emotion v2, knowledge multiple choice, math, option matching on
    # knowledge values, fact statements.
    phase3_mix: tuple[float, float, float, float, float] = (0.45, 0.2, 0.25, 0.05, 0.05)

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown demo architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        for key, value in PHASE3_RECIPES[self.architecture].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.phase2_mix = tuple(self.phase2_mix)  # type: ignore[assignment]
        self.phase3_mix = tuple(self.phase3_mix)  # type: ignore[assignment]

    def scaled(self, scale: float) -> TrainConfig:
        """A copy with every data size (training sets, steps, validation and test items) multiplied by ``scale``
        (for quick smoke runs); each stays at least 1 (steps) or 8 (items)."""
        out = TrainConfig(**asdict(self))
        for name in ("n_emotion", "n_knowledge", "n_open_questions", "n_math"):
            setattr(out, name, max(8, int(getattr(self, name) * scale)))
        out.statement_repeats = max(1, round(self.statement_repeats * scale))
        out.warmup_steps = max(1, int(self.warmup_steps * min(1.0, scale)))
        if self.phase2_steps > 0:
            out.phase2_steps = max(1, int(self.phase2_steps * min(1.0, scale)))
        out.phase2_warmup_steps = max(1, int(self.phase2_warmup_steps * min(1.0, scale)))
        if self.phase3_steps > 0:
            out.phase3_steps = max(1, int(self.phase3_steps * min(1.0, scale)))
        out.phase3_warmup_steps = max(1, int(self.phase3_warmup_steps * min(1.0, scale)))
        out.phase3_eval_every = max(1, int(self.phase3_eval_every * min(1.0, scale)))
        out.phase3_eval_n = max(8, int(self.phase3_eval_n * min(1.0, scale)))
        out.eval_n = max(8, int(self.eval_n * min(1.0, scale)))  # the recorded test scores: a data size too
        return out


# ------------------------------------------------------------------------------------------------ data


def training_pairs(cfg: TrainConfig) -> list[tuple[str, str]]:
    """The training text as ``(prompt, target)`` pairs; loss is taken on the target only.

    Fact statements have an empty prompt (the whole statement is the target).
    """
    pairs: list[tuple[str, str]] = []
    for name, n in (("emotion_v1", cfg.n_emotion), ("knowledge", cfg.n_knowledge), ("math", cfg.n_math)):
        dom = synthetic.generate(name, n, seed=cfg.seed, split="train")
        assert dom.task is not None
        pairs += [(prompts.prompt(dom.task, ex), prompts.target(dom.task, ex)) for ex in dom.examples]
    pairs += [("", " " + s) for s in synthetic.knowledge_statements()] * cfg.statement_repeats
    open_q = synthetic.knowledge_open_questions("train")
    rng = random.Random(f"demo-open-questions|{cfg.seed}")
    for _ in range(cfg.n_open_questions):
        q, a = rng.choice(open_q)
        pairs.append((prompts.prompt("math", Example(text=q)), " " + a))
    return pairs


_MATCH_FORMS = (
    "Which option is {v}?",
    "Which option says {v}?",
    "Pick the option {v}.",
    "The answer is {v}. Which option?",
)
# Single-token option values: the easiest form of the letter-binding skill, learned first.
_TOKEN_VALUES = (*(str(i) for i in range(10)), "red", "blue", "green", "cat", "dog", "sun", "tree", "fish")


def phase2_pairs(cfg: TrainConfig, n: int) -> list[tuple[str, str]]:
    """``n`` phase-2 training pairs, in the shares of ``cfg.phase2_mix``.

    Option matching shows a multiple-choice block whose question names the correct option ("Which option
    is <value>?"), so the only skill needed is mapping a value to its letter; its options are either
    single tokens or the values of one knowledge relation. Then training-split knowledge questions, and
    emotion and math training items against forgetting. Nothing here touches the test split.
    """
    rng = random.Random(f"demo-phase2|{cfg.seed}")
    by_rel: dict[str, list[str]] = {}
    for f in synthetic.knowledge_base():
        by_rel.setdefault(f.relation, [])
        if f.value not in by_rel[f.relation]:
            by_rel[f.relation].append(f.value)
    rels = sorted(r for r, v in by_rel.items() if len(v) >= 4)
    shares = [int(n * w) for w in cfg.phase2_mix]
    shares[-1] = n - sum(shares[:-1])
    n_tok, n_match, n_mc, n_emo, n_math = shares

    def matching(values: list[str]) -> tuple[str, str]:
        k = rng.randrange(4)
        ex = Example(text=rng.choice(_MATCH_FORMS).format(v=values[k]), label="ABCD"[k], choices=tuple(values))
        return prompts.prompt("multiple_choice", ex), prompts.target("multiple_choice", ex)

    pairs = [matching(rng.sample(_TOKEN_VALUES, 4)) for _ in range(n_tok)]
    pairs += [matching(rng.sample(by_rel[rng.choice(rels)], 4)) for _ in range(n_match)]
    for name, m in (("knowledge", n_mc), ("emotion_v1", n_emo), ("math", n_math)):
        dom = synthetic.generate(name, m, seed=cfg.seed + 1, split="train")
        assert dom.task is not None
        pairs += [(prompts.prompt(dom.task, ex), prompts.target(dom.task, ex)) for ex in dom.examples]
    rng.shuffle(pairs)
    return pairs


def warmup_cosine_lr(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """Learning rate at 0-based ``step``: linear warmup to ``peak``, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def finetune_phase(model: Any, tokenizer: Any, cfg: TrainConfig, on_step: Any = None) -> dict[str, Any]:
    """Phase 2: ``cfg.phase2_steps`` AdamW steps on :func:`phase2_pairs` (fresh optimiser, cosine schedule).

    Seeded by ``cfg.seed``; returns ``{"steps", "seconds", "final_loss", "validation_knowledge"}`` (zeros
    when disabled). Every 1000 steps the knowledge accuracy on 200 validation questions is logged.

    Why so long: letter binding (answer with the letter of the option that holds a value) has a long
    plateau. In probes from the phase-1 weights, 600-1000 steps left even "Which option is <value>?" at
    chance; with single-token matching in the mix, accuracy left chance after ~1500 steps and kept rising.
    """
    if cfg.phase2_steps <= 0:
        return {"steps": 0, "seconds": 0.0, "final_loss": 0.0, "validation_knowledge": []}
    from ..evaluation import evaluate

    torch.manual_seed(cfg.seed + 2)
    total, bs = cfg.phase2_steps, cfg.phase2_batch_size
    encoded = encode_pairs(tokenizer, phase2_pairs(cfg, total * bs), cfg.max_len)
    batches = _batches(encoded, bs, random.Random(f"demo-phase2-batches|{cfg.seed}"))[:total]
    val = synthetic.generate("knowledge", 200, seed=cfg.seed, split="validation").examples
    model.config.output_router_logits = True
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters()], lr=cfg.phase2_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, cfg.phase2_lr, cfg.phase2_warmup_steps, total, floor=0.1)

    t0, running, curve = time.perf_counter(), 0.0, []
    for step, batch in enumerate(batches, start=1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1)
        loss = _optimizer_step(model, opt, _collate(batch, tokenizer.pad_token_id))
        running = 0.98 * running + 0.02 * loss if step > 1 else loss
        if on_step is not None:
            on_step(step, total, running)
        if step % 1000 == 0 or step == len(batches):
            model.eval()
            acc = evaluate(model, "multiple_choice", val, tokenizer=tokenizer, batch_size=32).accuracy
            model.train()
            curve.append([step, round(acc, 3)])
            log.info(
                "phase 2 step %d/%d loss %.4f validation knowledge %.3f (%.0fs)",
                step,
                total,
                running,
                acc,
                time.perf_counter() - t0,
            )
    model.eval()
    model.config.output_router_logits = False
    return {
        "steps": len(batches),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(running, 4),
        "validation_knowledge": curve,
    }


def phase3_pairs(cfg: TrainConfig, n: int) -> list[tuple[str, str]]:
    """``n`` phase-3 training pairs in the shares of ``cfg.phase3_mix`` (training splits only).

    Emotion v2 dialogues, knowledge multiple choice, math word problems, option matching on knowledge
    values (keeps letter binding) and fact statements (keeps the facts).
    """
    rng = random.Random(f"demo-phase3|{cfg.seed}")
    shares = [int(n * w) for w in cfg.phase3_mix]
    shares[-1] = n - sum(shares[:-1])
    n_emo, n_mc, n_math, n_match, n_state = shares
    pairs: list[tuple[str, str]] = []
    for name, m in (("emotion", n_emo), ("knowledge", n_mc), ("math", n_math)):
        if m <= 0:
            continue
        dom = synthetic.generate(name, m, seed=cfg.seed + 3, split="train")
        assert dom.task is not None
        pairs += [(prompts.prompt(dom.task, ex), prompts.target(dom.task, ex)) for ex in dom.examples]
    by_rel: dict[str, list[str]] = {}
    for f in synthetic.knowledge_base():
        if f.value not in by_rel.setdefault(f.relation, []):
            by_rel[f.relation].append(f.value)
    rels = sorted(r for r, v in by_rel.items() if len(v) >= 4)
    for _ in range(n_match):
        values = rng.sample(by_rel[rng.choice(rels)], 4)
        k = rng.randrange(4)
        ex = Example(text=rng.choice(_MATCH_FORMS).format(v=values[k]), label="ABCD"[k], choices=tuple(values))
        pairs.append((prompts.prompt("multiple_choice", ex), prompts.target("multiple_choice", ex)))
    statements = synthetic.knowledge_statements()
    pairs += [("", " " + rng.choice(statements)) for _ in range(n_state)]
    rng.shuffle(pairs)
    return pairs


def validation_report(model: Any, tokenizer: Any, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """What recipes are chosen on: validation accuracy per domain and per-layer routing MI (validation prompts).

    Returns ``{"accuracy": {domain: acc}, "mi_bits": [per layer], "mi_normalised": [per layer],
    "mi_bias_bits": float, "n": n}``. Never looks at the test split or at steering.
    """
    from ..evaluation import evaluate
    from ..models.model import MoEModel
    from ..stats.profile import profile
    from ..stats.routing_mi import routing_mutual_information

    was_training, aux = model.training, model.config.output_router_logits
    model.eval()
    model.config.output_router_logits = False  # generation breaks on the auxiliary loss with a KV cache
    doms = [synthetic.generate(d, n, seed=seed, split="validation") for d in synthetic.DOMAINS]
    acc = {}
    for dom in doms:
        assert dom.task is not None
        acc[dom.name] = round(evaluate(model, dom.task, dom.examples, tokenizer=tokenizer, batch_size=32).accuracy, 4)
    moe = MoEModel.from_model(model, tokenizer=tokenizer, verify=False)
    mi = routing_mutual_information(profile(moe, doms, batch_size=32))
    model.config.output_router_logits = aux
    if was_training:
        model.train()
    return {
        "n": n,
        "accuracy": acc,
        "mi_bits": [round(float(x), 4) for x in mi["mi_bits"]],
        "mi_normalised": [round(float(x), 4) for x in mi["mi_normalised"]],
        "mi_bias_bits": round(float(mi["mi_bias_bits"].iloc[0]), 5),
    }


def finetune_v2(model: Any, tokenizer: Any, cfg: TrainConfig, on_step: Any = None) -> dict[str, Any]:
    """Phase 3: ``cfg.phase3_steps`` AdamW steps on :func:`phase3_pairs` with load-balancing coefficient
    ``cfg.phase3_aux_loss_coef``; every ``cfg.phase3_eval_every`` steps a :func:`validation_report`.

    Returns ``{"steps", "seconds", "final_loss", "validation": [[step, report], ...]}``. Seeded by ``cfg.seed``.
    Why a small coefficient: Mixtral's load-balancing loss pushes every expert towards the same share of
    each batch, and batches mix the domains, so a large one works against domain-dependent routing.
    """
    if cfg.phase3_steps <= 0:
        return {"steps": 0, "seconds": 0.0, "final_loss": 0.0, "validation": []}
    torch.manual_seed(cfg.seed + 4)
    total, bs = cfg.phase3_steps, cfg.phase3_batch_size
    encoded = encode_pairs(tokenizer, phase3_pairs(cfg, total * bs), cfg.max_len)
    batches = _batches(encoded, bs, random.Random(f"demo-phase3-batches|{cfg.seed}"))[:total]
    aux = float(cfg.phase3_aux_loss_coef or 0.0)  # resolved from the recipe on creation
    model.config.router_aux_loss_coef = aux
    model.config.output_router_logits = aux > 0
    model.train()
    # The routers (``...mlp.gate.weight``) may learn faster than the rest: another lever for routing to move.
    routers = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("mlp.gate.weight")]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr_mult": 1.0}, {"params": routers, "lr_mult": float(cfg.phase3_router_lr_mult or 1.0)}],
        lr=cfg.phase3_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay,
    )
    t0, running, curve = time.perf_counter(), 0.0, []
    for step, batch in enumerate(batches, start=1):
        for group in opt.param_groups:
            lr = warmup_cosine_lr(step - 1, cfg.phase3_lr, cfg.phase3_warmup_steps, total, floor=0.1)
            group["lr"] = lr * group["lr_mult"]
        loss = _optimizer_step(model, opt, _collate(batch, tokenizer.pad_token_id))
        running = 0.98 * running + 0.02 * loss if step > 1 else loss
        if on_step is not None:
            on_step(step, total, running)
        if step % 100 == 0:
            log.info("phase 3 step %d/%d loss %.4f (%.0fs)", step, total, running, time.perf_counter() - t0)
        if step % cfg.phase3_eval_every == 0 or step == len(batches):
            report = validation_report(model, tokenizer, n=cfg.phase3_eval_n, seed=cfg.seed)
            curve.append([step, report])
            log.info("phase 3 step %d/%d loss %.4f (%.0fs) validation %s", step, total, running,
                     time.perf_counter() - t0, json.dumps(report))
    model.eval()
    model.config.output_router_logits = False
    return {
        "steps": len(batches),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(running, 4),
        "validation": curve,
    }


def prepare_phase3_model(model: Any, cfg: TrainConfig) -> Any:
    """The model phase 3 starts from: ``model`` itself (mixtral), or its fine-grained upcycling (deepseek)."""
    if cfg.architecture == "deepseek":
        from .upcycle import upcycle_mixtral

        return upcycle_mixtral(model, split=cfg.upcycle_split, shared_intermediate_size=cfg.shared_expert_size,
                               router_aux_loss_coef=float(cfg.phase3_aux_loss_coef or 0.0))
    return model


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` with single-digit tokens, wrapped for transformers.

    It prepends ``<s>`` to every encoded text, ends nothing with ``</s>`` (the trainer appends it), and pads
    with ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits first, so every number is spelled digit by digit (arithmetic is then learnable).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )


def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """Token ids of ``prompt + target + </s>`` and the index where the target starts.

    The prompt (with ``<s>``) and the target are tokenised separately, exactly as evaluation does.
    """
    p_ids = tokenizer([p for p, _ in pairs])["input_ids"]
    t_ids = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for p, t in zip(p_ids, t_ids, strict=True):
        ids = (list(p) + list(t) + [eos])[:max_len]
        out.append((ids, len(p)))
    return out


def _batches(
    encoded: list[tuple[list[int], int]], batch_size: int, rng: random.Random
) -> list[list[tuple[list[int], int]]]:
    """Shuffled batches of similar length (sorted within chunks of 50 batches, to cut padding)."""
    idx = list(range(len(encoded)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(idx), chunk):
        part = sorted(idx[start : start + chunk], key=lambda i: len(encoded[i][0]))
        batches += [[encoded[i] for i in part[j : j + batch_size]] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _optimizer_step(model: Any, opt: torch.optim.Optimizer, inputs: dict[str, torch.Tensor]) -> float:
    """One training step shared by every phase: loss, backward, clip the gradient norm at 1, step; the loss."""
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.item())


def _collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` of shape (batch, max_len)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (ids, start) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ----------------------------------------------------------------------------------------------- train


def build_model(cfg: TrainConfig, tokenizer: Any) -> Any:
    """A freshly initialised ``MixtralForCausalLM`` sized by ``cfg`` (seeded by the caller)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=512,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config)


def train(
    out: str | Path,
    cfg: TrainConfig | None = None,
    evaluate_after: bool = True,
    on_step: Any = None,
) -> dict[str, Any]:
    """Train the demo model into ``out`` (a Hugging Face model directory) and return its manifest.

    ``on_step(step, total, loss)`` is called after every optimiser step (for progress bars).
    """
    from ..io import make_manifest, write_json

    cfg = cfg or TrainConfig()
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    pairs = training_pairs(cfg)
    tokenizer = train_tokenizer([p + t for p, t in pairs], cfg.vocab_size)
    encoded = encode_pairs(tokenizer, pairs, cfg.max_len)
    log.info("training on %d sequences, %d tokens", len(encoded), sum(len(e[0]) for e in encoded))

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    rng = random.Random(f"demo-batches|{cfg.seed}")
    epochs = [_batches(encoded, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    total = sum(len(e) for e in epochs)

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, total, floor=0.05)

    step, t_train, running = 0, time.perf_counter(), 0.0
    for batches in epochs:
        for batch in batches:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = _optimizer_step(model, opt, _collate(batch, tokenizer.pad_token_id))
            step += 1
            running = 0.98 * running + 0.02 * loss if step > 1 else loss
            if on_step is not None:
                on_step(step, total, running)
            if step % 100 == 0 or step == total:
                log.info("step %d/%d loss %.4f (%.0fs)", step, total, running, time.perf_counter() - t_train)
    train_seconds = time.perf_counter() - t_train
    phase2 = finetune_phase(model, tokenizer, cfg, on_step=on_step)
    model = prepare_phase3_model(model, cfg)
    phase3 = finetune_v2(model, tokenizer, cfg, on_step=on_step)
    _finish(model, tokenizer)
    _save_atomically(model, tokenizer, out)

    manifest = make_manifest(
        "demo-model",
        asdict(cfg),
        steps=step,
        sequences=len(encoded),
        tokens=sum(len(e[0]) for e in encoded),
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(train_seconds, 1),
        final_loss=round(running, 4),
        phase2=phase2,
        phase3=phase3,
        architecture=cfg.architecture,
        reproduction_tolerance=REPRODUCTION_TOLERANCE,
        test_accuracy={},
    )
    write_json(out / "training_manifest.json", manifest)
    if evaluate_after:
        manifest = record_test_scores(out, model, tokenizer)
    return manifest


def _finish(model: Any, tokenizer: Any) -> None:
    """Inference settings of a trained demo: eval mode, no auxiliary loss, the tokenizer's special ids."""
    model.eval()
    model.config.output_router_logits = False  # inference does not need the auxiliary loss
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def label_margins(predictions: list[dict[str, Any]]) -> list[float]:
    """Per example: the gold label's score minus the best other label's score (nats; > 0 when correct).

    ``predictions`` are :class:`~expertscope.evaluation.EvalResult` prediction dicts with ``scores``.
    """
    out = []
    for p in predictions:
        scores = p.get("scores")
        if not scores or p["gold"] not in scores:
            continue
        others = [v for k, v in scores.items() if k != p["gold"]]
        out.append(float(scores[p["gold"]] - max(others)))
    return out


def margin_summary(margins: list[float]) -> dict[str, Any]:
    """Quantiles (5, 25, 50, 75, 95 %) of label margins, the share below 1 nat, and n."""
    import numpy as np

    if not margins:
        return {"n": 0}
    m = np.asarray(margins)
    q = np.quantile(m, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "n": int(m.size),
        "quantiles": {k: round(float(v), 3) for k, v in zip(("p5", "p25", "p50", "p75", "p95"), q, strict=True)},
        "share_abs_below_1_nat": round(float((np.abs(m) < 1).mean()), 4),
    }


def record_test_scores(out: str | Path, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Score a trained demo directory on the test splits and add the scores to its training manifest.

    ``model``/``tokenizer`` default to loading them from ``out`` (fp32, CPU). Returns the updated manifest.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..io import write_json

    out = Path(out)
    manifest = json.loads((out / "training_manifest.json").read_text())
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(out)
    cfg = manifest["config"]
    t0 = time.perf_counter()
    results, margins = evaluate_demo(model, tokenizer, cfg["eval_n"], seed=cfg["seed"], with_margins=True)
    manifest["test_results"] = results
    manifest["test_label_margins"] = margins
    manifest["test_accuracy"] = {k: v["accuracy"] for k, v in results.items()}
    manifest["eval_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "training_manifest.json", manifest)
    return manifest


def _save_atomically(model: Any, tokenizer: Any, out: Path) -> None:
    """Save model and tokenizer into a temporary sibling directory, then move each file into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # shipped as package data: readable by everyone
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate_demo(model: Any, tokenizer: Any, n: int, seed: int = 0, batch_size: int = 16,
                  with_margins: bool = False) -> Any:
    """Scores of ``model`` on the first ``n`` test examples of each synthetic domain, as dicts.

    With ``with_margins`` also returns ``{domain: margin_summary}`` for the scored (non-generative) tasks.
    """
    from ..evaluation import evaluate

    results, margins = {}, {}
    for name in synthetic.DOMAINS:
        dom = synthetic.generate(name, n, seed=seed, split="test")
        assert dom.task is not None
        res = evaluate(model, dom.task, dom.examples, tokenizer=tokenizer, batch_size=batch_size)
        results[name] = {k: v for k, v in res.to_dict().items() if k != "predictions"}
        if dom.task != "math":
            margins[name] = margin_summary(label_margins(res.predictions))
    return (results, margins) if with_margins else results


def run_phase2(
    init_from: str | Path, out: str | Path, cfg: TrainConfig | None = None, evaluate_after: bool = True
) -> dict[str, Any]:
    """Run only phase 2 from the phase-1 weights in ``init_from``; save into ``out`` and return its manifest.

    The phase-1 manifest of ``init_from`` (when present) is carried over, with the phase-2 settings, stats
    and the test scores of the result. ``train()`` runs both phases in one go; this resumes after phase 1.
    """
    from ..io import write_json
    from ..models.loading import load_model

    cfg = cfg or TrainConfig()
    init_from, out = Path(init_from), Path(out)
    torch.set_num_threads(cfg.threads)
    # The project's loader: safetensors only, one-line errors for a missing or non-model directory.
    loaded = load_model(str(init_from), dtype="float32", verify=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    phase1 = init_from / "training_manifest.json"
    manifest: dict[str, Any] = (
        json.loads(phase1.read_text()) if phase1.exists() else {"kind": "demo-model", "config": {}}
    )
    stats = finetune_phase(model, tokenizer, cfg)
    _save_atomically(model, tokenizer, out)
    phase2_cfg = {k: v for k, v in asdict(cfg).items() if k.startswith("phase2")}
    manifest["config"] = {**manifest.get("config", {}), **phase2_cfg}
    manifest["phase2"] = stats
    manifest.pop("test_results", None)
    manifest["test_accuracy"] = {}
    write_json(out / "training_manifest.json", manifest)
    return record_test_scores(out, model, tokenizer) if evaluate_after else manifest


def run_phase3(
    init_from: str | Path, out: str | Path, cfg: TrainConfig | None = None, evaluate_after: bool = True
) -> dict[str, Any]:
    """Run only phase 3 from the phase-2 weights in ``init_from`` (upcycled first when ``cfg.architecture`` is
    ``"deepseek"``); save into ``out`` and return its manifest (the phase-1/2 record of ``init_from`` is kept).
    """
    from ..io import write_json
    from ..models.loading import load_model

    cfg = cfg or TrainConfig()
    init_from, out = Path(init_from), Path(out)
    torch.set_num_threads(cfg.threads)
    loaded = load_model(str(init_from), dtype="float32", verify=False)
    if getattr(loaded.model.config, "model_type", None) != "mixtral":
        from ..errors import ConfigError

        raise ConfigError(f"{init_from} is not a Mixtral phase-2 demo: pass the directory phase 2 wrote")
    tokenizer = loaded.tokenizer
    previous = init_from / "training_manifest.json"
    manifest: dict[str, Any] = (
        json.loads(previous.read_text()) if previous.exists() else {"kind": "demo-model", "config": {}}
    )
    model = prepare_phase3_model(loaded.model, cfg)
    stats = finetune_v2(model, tokenizer, cfg)
    _finish(model, tokenizer)
    _save_atomically(model, tokenizer, out)
    phase3_cfg = {k: v for k, v in asdict(cfg).items()
                  if k.startswith("phase3") or k in ("architecture", "upcycle_split", "shared_expert_size")}
    manifest["config"] = {**manifest.get("config", {}), **phase3_cfg}
    manifest["phase3"] = stats
    manifest["architecture"] = cfg.architecture
    manifest["parameters"] = sum(p.numel() for p in model.parameters())
    for key in ("test_results", "test_label_margins"):
        manifest.pop(key, None)
    manifest["test_accuracy"] = {}
    write_json(out / "training_manifest.json", manifest)
    return record_test_scores(out, model, tokenizer) if evaluate_after else manifest


def check_demo_training(out: str | Path, demo: str = "demo", scale: float = 1.0, threads: int = 2,
                        from_phase1: str | Path | None = None, from_phase2: str | Path | None = None) -> None:
    """Check the arguments of :func:`train_demo` before anything is generated or written.

    Raises :class:`~expertscope.errors.ConfigError` for an unknown ``demo``, a ``scale`` that is not a finite
    number > 0, ``threads`` < 1 or both ``from_phase1`` and ``from_phase2``; :class:`OutputError` when ``out``
    cannot be a writable directory.
    """
    from ..errors import ConfigError
    from ..rundir import check_out_dir
    from ..validation import check_positive, check_positive_finite

    check_positive_finite(scale, "--scale")
    check_positive(threads, "--threads")
    if demo not in DEMO_ARCHITECTURES:
        raise ConfigError(f"unknown demo {demo!r}: pass --demo {' or --demo '.join(DEMO_ARCHITECTURES)}")
    if from_phase1 is not None and from_phase2 is not None:
        raise ConfigError("--from-phase1 and --from-phase2 exclude each other: pass one")
    check_out_dir(out)


def train_demo(out: str | Path, demo: str = "demo", seed: int = 0, scale: float = 1.0, threads: int = 2,
               evaluate: bool = True, from_phase1: str | Path | None = None, from_phase2: str | Path | None = None,
               on_step: Any = None) -> dict[str, Any]:
    """Train the bundled ``demo`` into ``out`` (``expertscope demo train``): all phases, or phases 2-3 from a
    phase-1 model, or phase 3 from a phase-2 model; returns the training manifest. The arguments are checked
    first (:func:`check_demo_training`); ``out`` is created if needed and locked while training (removed again
    if training fails before writing into it; :class:`OutputError` if another process is writing to it)."""
    from ..rundir import lock_dir

    check_demo_training(out, demo, scale, threads, from_phase1, from_phase2)
    cfg = TrainConfig(seed=seed, threads=threads, architecture=DEMO_ARCHITECTURES[demo])
    cfg = cfg.scaled(scale) if scale != 1.0 else cfg
    with lock_dir(out, require_manifest=False, create=True, option="--out"):
        if from_phase1 is not None:
            with tempfile.TemporaryDirectory(prefix="expertscope-phase2-") as tmp:
                run_phase2(from_phase1, tmp, cfg, evaluate_after=False)
                return run_phase3(tmp, out, cfg, evaluate_after=evaluate)
        if from_phase2 is not None:
            return run_phase3(from_phase2, out, cfg, evaluate_after=evaluate)
        return train(out, cfg, evaluate_after=evaluate, on_step=on_step)


if __name__ == "__main__":  # pragma: no cover
    # `python -m expertscope.demo.train OUT [SCALE] [--architecture deepseek]`, or resume:
    # `... OUT --init-from PHASE1_DIR --phase 2` / `... OUT --init-from PHASE2_DIR --phase 3`
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("scale", nargs="?", type=float, default=1.0)
    ap.add_argument("--init-from")
    ap.add_argument("--phase", type=int, choices=(1, 2, 3))
    ap.add_argument("--architecture", choices=ARCHITECTURES, default="mixtral")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a TrainConfig field (a recipe probe), e.g. --set phase3_aux_loss_coef=0")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    config = TrainConfig(architecture=args.architecture, **overrides)
    config = config.scaled(args.scale) if args.scale != 1.0 else config
    if args.threads:
        config.threads = args.threads
    if args.phase == 2:
        print(run_phase2(args.init_from, args.out, config))
    elif args.phase == 3:
        print(run_phase3(args.init_from, args.out, config))
    else:
        print(train(args.out, config))

