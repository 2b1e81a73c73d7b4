"""Score a causal LM on a task: classification, multiple choice or math (docs/methods.md §7, paper §3.1.2).

* classification: every label's verbalisation (:func:`prompts.verbalise`) is scored by its summed
  log-likelihood after the prompt; the best label is the prediction; accuracy and weighted F1.
* multiple choice: the next-token log-probabilities of the letters at the answer position; accuracy.
* math: batched greedy generation (at most ``max_new_tokens``), the final number extracted
  (:func:`extract.extract_answer`); accuracy.

Every result carries its sample count and a Wilson 95 % interval for the accuracy.

Batch-size invariance: sequences are padded by hand with an attention mask, on the right for scoring
(real tokens keep positions 0..L-1 and never see padding under the causal mask) and on the left for
generation (position ids are computed from the mask), so a batch computes the same quantities as one
example alone, up to float reduction order (~1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data import prompts
from ..data.types import TASKS, Domain, Example
from ..errors import ConfigError, DataError
from ..routing import pad_ids
from .extract import answers_equal, extract_answer, normalise_number
from .metrics import accuracy, weighted_f1, wilson_interval

DEFAULT_MAX_NEW_TOKENS = 96
STOP_SEQUENCES: tuple[str, ...] = ("\nQuestion:", "\nDialogue:", "\n\n")
"""Generated text is cut at the first of these (a base model may run on into a new example)."""


@dataclass
class EvalResult:
    """The score of one task.

    ``accuracy`` with its Wilson 95 % interval ``[ci_low, ci_high]`` over ``n`` examples; ``weighted_f1`` for
    classification only; ``predictions`` holds one dict per example (id, gold, prediction, correct and
    the label scores or the generated text).
    """

    task: str
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    weighted_f1: float | None = None
    ci_method: str = "wilson"
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


# ------------------------------------------------------------------------------------------ validation


def _resolve(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(HF model, tokenizer) from either an object with ``.model``/``.tokenizer`` or a bare HF model."""
    if not isinstance(model, torch.nn.Module) and hasattr(model, "model"):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        model = model.model
    if tokenizer is None:
        raise ConfigError("no tokenizer for evaluation: pass tokenizer= or a loaded model with a tokenizer")
    return model, tokenizer


def _describe(i: int, ex: Example) -> str:
    return f"example {i}" + (f" ({ex.id})" if ex.id else "")


def validate_examples(
    task: str, examples: Sequence[Example], labels: Sequence[str] | None = None
) -> list[Example]:
    """Check that every example has the fields ``task`` needs; raise :class:`DataError` on the first gap."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    examples = list(examples)
    if not examples:
        raise DataError(f"no examples to evaluate for task {task}: pass at least one example")
    label_set = tuple(labels) if labels is not None else prompts.LABELS
    for i, ex in enumerate(examples):
        where = _describe(i, ex)
        if task == "classification":
            if ex.label is None:
                raise DataError(f"{where} has no 'label': classification examples need one")
            if ex.label not in label_set:
                raise DataError(
                    f"{where} has label {ex.label!r} outside the task's label set: use one of "
                    f"{', '.join(label_set)}"
                )
        elif task == "multiple_choice":
            if not ex.choices or not 2 <= len(ex.choices) <= len(prompts.LETTERS):
                raise DataError(
                    f"{where} needs 2-{len(prompts.LETTERS)} 'choices' for multiple choice: add them"
                )
            if ex.label is None:
                raise DataError(f"{where} has no 'label': give the answer letter (A-D)")
            allowed = prompts.LETTERS[: len(ex.choices)]
            if ex.label not in allowed:
                raise DataError(f"{where} has answer {ex.label!r} outside its letters: use one of {allowed}")
        else:
            if ex.answer is None:
                raise DataError(f"{where} has no 'answer': math examples need the final number")
            if normalise_number(ex.answer) is None:
                raise DataError(f"{where} has a non-numeric answer {ex.answer!r}: give a number")
    return examples


# ---------------------------------------------------------------------------------------------- model


def _device_of(model: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a parameterless model
        return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    """The pad id: the tokenizer's, else its EOS (only ever placed where the attention mask is 0)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pid) if pid is not None else 0


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape (batch, max_len), padded on the left or the right."""
    return pad_ids(seqs, pad_id, left)


@torch.inference_mode()
def sequence_logprobs(
    model: Any, seqs: list[list[int]], starts: list[int], pad_id: int, device: torch.device
) -> list[float]:
    """Summed log-probability of tokens ``seq[start:]`` given ``seq[:start]``, for each sequence.

    One right-padded forward pass over the batch (logits: batch × len × vocab); the log-softmax is taken in
    float32 only over each row's scored positions, so memory stays at one row's (len × vocab).
    """
    ids, mask = _pad(seqs, pad_id, left=False)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for row, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        # Position t predicts token t+1, so tokens start..len-1 are scored by positions start-1..len-2.
        start = max(start, 1)  # the first token has no prediction to score
        logp = torch.log_softmax(logits[row, start - 1 : len(s) - 1].float(), dim=-1)
        tgt = ids[row, start : len(s)].to(device)
        out.append(float(logp.gather(-1, tgt.unsqueeze(-1)).sum()))
    return out


@torch.inference_mode()
def next_token_logprobs(model: Any, seqs: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Log-probabilities (batch, vocab) of the token after each sequence's last token."""
    ids, mask = _pad(seqs, pad_id, left=False)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    picked = logits[torch.arange(len(seqs), device=device), last].float()
    return torch.log_softmax(picked, dim=-1).cpu()


@torch.inference_mode()
def greedy_generate(
    model: Any,
    seqs: list[list[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy continuations (token ids, EOS excluded) of left-padded prompts, at most ``max_new_tokens``."""
    ids, mask = _pad(seqs, pad_id, left=True)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    gen = out[:, ids.shape[1] :].tolist()
    result = []
    for row in gen:
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result


def _letter_ids(tokenizer: Any, n: int) -> list[int] | None:
    """The single token of " A" ... for the first ``n`` letters, or None if a letter takes several tokens."""
    ids = [_encode(tokenizer, prompts.LETTER_VERBALISATIONS[x], special=False) for x in prompts.LETTERS[:n]]
    if all(len(s) == 1 for s in ids) and len({s[0] for s in ids}) == n:
        return [s[0] for s in ids]
    return None


def _cut(text: str) -> str:
    for stop in STOP_SEQUENCES:
        pos = text.find(stop)
        if pos >= 0:
            text = text[:pos]
    return text


# ------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: Any,
    task: str | None,
    examples: Sequence[Example] | Domain,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    device: str | torch.device | None = None,
    labels: Sequence[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score ``model`` on ``examples`` of ``task`` and return accuracy, its 95 % CI and predictions.

    ``model`` is a loaded expertscope model (``.model`` and ``.tokenizer``) or a Hugging Face causal LM
    with ``tokenizer=``. ``labels`` is the classification label set (default :data:`prompts.LABELS`).
    ``max_new_tokens`` bounds math generation (default 96). ``on_batch(k)`` is called with the number
    of examples finished after each batch (for progress bars). Scores do not depend on ``batch_size``.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} is not positive: pass --batch-size 1 or more")
    if isinstance(examples, Domain):
        examples = examples.examples
    if isinstance(examples, str | bytes | dict) or not all(isinstance(e, Example) for e in examples):
        from ..errors import InputTypeError

        bad = examples if isinstance(examples, str | bytes | dict) else next(
            e for e in examples if not isinstance(e, Example))
        raise InputTypeError(f"examples holds a {type(bad).__name__}: expected a Domain or a list of Example "
                             "(es.Example(text=..., label=...))")
    hf, tokenizer = _resolve(model, tokenizer)
    exs = validate_examples(task, examples, labels)
    label_set = tuple(labels) if labels is not None else prompts.LABELS
    dev = _device_of(hf, device)
    pad_id = _pad_id(tokenizer)
    was_training = hf.training
    hf.eval()
    records: list[dict[str, Any]] = []
    try:
        for start in range(0, len(exs), batch_size):
            batch = exs[start : start + batch_size]
            p_ids = [_encode(tokenizer, prompts.prompt(task, ex), special=True) for ex in batch]
            if task == "classification":
                records += _score_classification(hf, tokenizer, batch, p_ids, label_set, pad_id, dev)
            elif task == "multiple_choice":
                records += _score_multiple_choice(hf, tokenizer, batch, p_ids, pad_id, dev)
            else:
                gen = greedy_generate(
                    hf, p_ids, pad_id, tokenizer.eos_token_id, max_new_tokens or DEFAULT_MAX_NEW_TOKENS, dev
                )
                for ex, g in zip(batch, gen, strict=True):
                    text = _cut(tokenizer.decode(g, skip_special_tokens=True))
                    pred = extract_answer(text)
                    records.append(
                        {
                            "id": ex.id,
                            "gold": normalise_number(str(ex.answer)),
                            "prediction": pred,
                            "correct": answers_equal(pred, ex.answer),
                            "generation": text,
                        }
                    )
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        hf.train(was_training)
    return _result(task, records)


def _score_classification(
    hf: Any,
    tokenizer: Any,
    batch: list[Example],
    p_ids: list[list[int]],
    label_set: Sequence[str],
    pad_id: int,
    dev: torch.device,
) -> list[dict[str, Any]]:
    """One record per example: every label's summed log-likelihood and the argmax label."""
    l_ids = [_encode(tokenizer, prompts.verbalise(lab), special=False) for lab in label_set]
    seqs = [p + lab for p in p_ids for lab in l_ids]
    starts = [len(p) for p in p_ids for _ in l_ids]
    lls = sequence_logprobs(hf, seqs, starts, pad_id, dev)
    out = []
    for i, ex in enumerate(batch):
        scores = dict(zip(label_set, lls[i * len(l_ids) : (i + 1) * len(l_ids)], strict=True))
        pred = max(label_set, key=lambda lab: scores[lab])  # first label wins exact ties
        out.append(
            {"id": ex.id, "gold": ex.label, "prediction": pred, "correct": pred == ex.label, "scores": scores}
        )
    return out


def _score_multiple_choice(
    hf: Any, tokenizer: Any, batch: list[Example], p_ids: list[list[int]], pad_id: int, dev: torch.device
) -> list[dict[str, Any]]:
    """One record per example: each letter's log-probability at the answer position, and the argmax.

    When every " A" ... " D" is one token this is the next-token log-probability after the prompt (one
    forward pass); tokenizers that split off the space get the summed log-likelihood of the letter's tokens.
    """
    n_choices = [len(ex.choices or ()) for ex in batch]
    letter_ids = {n: _letter_ids(tokenizer, n) for n in set(n_choices)}
    scores: list[dict[str, float]] = [{} for _ in batch]
    single = [i for i, n in enumerate(n_choices) if letter_ids[n] is not None]
    if single:
        logp = next_token_logprobs(hf, [p_ids[i] for i in single], pad_id, dev)
        for row, i in enumerate(single):
            ids = letter_ids[n_choices[i]] or []
            scores[i] = {x: float(logp[row, t]) for x, t in zip(prompts.LETTERS, ids, strict=False)}
    multi = [i for i, n in enumerate(n_choices) if letter_ids[n] is None]
    if multi:
        seqs, starts, owners = [], [], []
        for i in multi:
            for x in prompts.LETTERS[: n_choices[i]]:
                seqs.append(p_ids[i] + _encode(tokenizer, prompts.LETTER_VERBALISATIONS[x], special=False))
                starts.append(len(p_ids[i]))
                owners.append((i, x))
        for (i, x), lp in zip(owners, sequence_logprobs(hf, seqs, starts, pad_id, dev), strict=True):
            scores[i][x] = lp
    out = []
    for ex, sc in zip(batch, scores, strict=True):
        pred = max(sc, key=lambda x: sc[x])  # dicts keep letter order: A wins exact ties
        out.append(
            {"id": ex.id, "gold": ex.label, "prediction": pred, "correct": pred == ex.label, "scores": sc}
        )
    return out


def _result(task: str, records: list[dict[str, Any]]) -> EvalResult:
    n = len(records)
    k = sum(bool(r["correct"]) for r in records)
    lo, hi = wilson_interval(k, n)
    f1 = None
    if task == "classification":
        f1 = weighted_f1([r["gold"] for r in records], [r["prediction"] for r in records])
    acc = accuracy([True] * n, [bool(r["correct"]) for r in records]) if n else math.nan
    return EvalResult(
        task=task, n=n, accuracy=acc, ci_low=lo, ci_high=hi, weighted_f1=f1, predictions=records
    )
