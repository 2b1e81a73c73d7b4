"""Router-only LoRA (paper "Finetuning Router", docs/methods.md §5): LoRA on the router projection of the last MoE
layers, through PEFT ``target_parameters``; everything else frozen; loss on the answer tokens only."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.types import Domain, Example
from ..errors import ConfigError, DataError
from ..io import make_dirs
from ..models.model import MoEModel
from ..routing import pad_ids


def router_parameter_names(model: MoEModel, layers: str | Sequence[int] = "last3") -> list[str]:
    """Full dotted names of the chosen routers' weight parameters (``"lastN"``, ``"all"`` or indices)."""
    if isinstance(layers, str):
        if layers == "all":
            chosen = model.layers
        elif layers.startswith("last") and layers[4:].isdigit():
            n = int(layers[4:])
            if not 1 <= n <= len(model.layers):  # never adapt other layers than the ones recorded
                raise ConfigError(f"layers={layers!r} asks for the last {n} MoE layers but the model has "
                                  f"{len(model.layers)}: pass 'last1' to 'last{len(model.layers)}', or 'all'")
            chosen = model.layers[-n:]
        else:
            raise ConfigError(f"layers={layers!r} is not 'all', 'lastN' or a list of MoE layers: e.g. 'last3'")
    else:
        if not hasattr(layers, "__iter__") or any(not isinstance(x, int) or isinstance(x, bool) for x in layers):
            from ..errors import InputTypeError

            raise InputTypeError(f"layers={layers!r} is not 'all', 'lastN' or a list of MoE layer indices: "
                                 "e.g. 'last3' or [2, 3]")
        chosen = sorted(set(layers))
        if not chosen:
            raise ConfigError("layers=[] adapts nothing: pass MoE layer indices, 'lastN' or 'all'")
        bad = sorted(set(chosen) - set(model.layers))
        if bad:
            raise ConfigError(f"layer {bad[0]} is not an MoE layer: choose from {model.layers}")
    names = []
    for layer in chosen:
        site = model.site(layer)
        if not isinstance(getattr(site.module, "weight", None), torch.nn.Parameter):
            raise ConfigError(f"the router at {site.path} has no weight parameter to adapt")
        names.append(f"{site.path}.weight")
    return names


@dataclass
class RouterFinetune:
    """A router-LoRA run: the PEFT model (shares weights with ``model``), settings and the loss curve."""

    model: MoEModel
    peft_model: Any
    adapted: list[str]
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """Save the adapter (safetensors) with PEFT's own format."""
        make_dirs(directory)  # inside a run: never through a link, never outside it
        self.peft_model.save_pretrained(str(directory), safe_serialization=True)
        return Path(directory)

    def unload(self) -> None:
        """Remove the adapter, restoring the original routers."""
        self.peft_model.unload()


def _pairs(task: str | None, examples: Sequence[Example]) -> list[tuple[str, str]]:
    from ..data.prompts import prompt, target

    if task is None:
        return [(ex.text, "") for ex in examples]
    return [(prompt(task, ex), target(task, ex)) for ex in examples]


def _batch(tokenizer: Any, pairs: Sequence[tuple[str, str]], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` that are -100 except on answer tokens."""
    seqs, labels = [], []
    for p, t in pairs:
        pi = tokenizer(p, add_special_tokens=True)["input_ids"]
        ti = tokenizer(t, add_special_tokens=False)["input_ids"] if t else []
        if not ti:  # no answer text: language-model loss on the whole text
            seqs.append(pi)
            labels.append(pi)
            continue
        seqs.append(pi + ti)
        labels.append([-100] * len(pi) + ti)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_ids(seqs, pad)
    lab = pad_ids(labels, -100)[0]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}


def finetune_router(
    model: MoEModel,
    train_examples: Domain | Sequence[Example],
    task: str | None = None,
    layers: str | Sequence[int] = "last3",
    rank: int = 8,
    alpha: int = 16,
    lr: float = 1e-3,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> RouterFinetune:
    """Train LoRA adapters on the routers of ``layers`` only; backbone and experts stay frozen.

    Loss: cross-entropy on the answer tokens (``evaluation.prompts.target``) after each prompt; with no task,
    a language-model loss on the whole text. Returns the PEFT model (in place on ``model.model``), the adapted
    parameter names (asserted to be exactly the chosen routers'), the trainable count and the loss per step.
    """
    from peft import LoraConfig, get_peft_model

    from ..validation import check_positive, check_positive_finite, check_type

    check_type(model, MoEModel, "model", "an MoEModel (es.load_model(...))")
    if any("lora_" in n for n, _ in model.model.named_parameters()):  # PEFT would fail with its own message
        raise ConfigError("the model already carries a router LoRA adapter: call .unload() on the earlier "
                          "finetune_router result first, or load the model again")
    for key, value in (("rank", rank), ("epochs", epochs), ("batch_size", batch_size)):
        check_positive(value, key)
    check_positive(max_steps, "max_steps", allow_none=True)
    check_positive_finite(lr, "lr", "1e-3")
    check_positive_finite(alpha, "alpha", "16")
    if isinstance(train_examples, str | bytes) or not isinstance(train_examples, Domain | Sequence):
        from ..errors import InputTypeError

        raise InputTypeError(f"train_examples is a {type(train_examples).__name__}, not a Domain or a list of "
                             "Example: e.g. es.load_domain('math=train.jsonl')")
    if isinstance(train_examples, Domain):
        task = task or train_examples.task
        train_examples = train_examples.examples
    if not train_examples:
        raise DataError("the training set is empty: pass training examples (e.g. the domain's train split)")
    if rank <= 0 or lr <= 0 or epochs <= 0 or batch_size <= 0:
        raise ConfigError("rank, lr, epochs and batch_size must be positive: e.g. rank=8 lr=1e-3")
    names = router_parameter_names(model, layers)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=[], target_parameters=names)
    peft_model = get_peft_model(model.model, config)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    adapted = sorted({n.split(".lora_")[0].replace("base_model.model.", "") for n in trainable})
    expected = sorted(n.rsplit(".weight", 1)[0] for n in names)
    if adapted != expected:
        peft_model.unload()
        raise ConfigError(f"PEFT adapted {adapted} instead of exactly {expected}: please report this model")
    n_trainable = sum(p.numel() for p in trainable.values())
    opt = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=0.0)
    pairs = _pairs(task, train_examples)
    rng = random.Random(seed)
    device = model.device
    losses: list[float] = []
    t0 = time.perf_counter()
    peft_model.train()
    try:
        step = 0
        for _ in range(epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for j in range(0, len(order), batch_size):
                batch = _batch(model.tokenizer, [pairs[i] for i in order[j:j + batch_size]], device)
                loss = peft_model(**batch, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                if max_steps is not None and step >= max_steps:
                    break
            if max_steps is not None and step >= max_steps:
                break
    finally:
        peft_model.eval()
    settings = {"layers": layers if isinstance(layers, str) else list(layers), "rank": rank, "alpha": alpha,
                "lr": lr, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "seed": seed,
                "task": task, "n_train": len(pairs), "seconds": round(time.perf_counter() - t0, 3)}
    return RouterFinetune(model, peft_model, adapted, n_trainable, losses, settings)


def load_router_adapter(model: MoEModel, directory: str | Path) -> Any:
    """Load a saved router adapter onto ``model`` (returns the PEFT model)."""
    from peft import PeftModel

    d = Path(directory)
    if not (d / "adapter_config.json").exists():
        raise ConfigError(f"no adapter in {d}: pass a directory written by RouterFinetune.save")
    return PeftModel.from_pretrained(model.model, str(d))
