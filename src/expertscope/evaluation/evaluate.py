"""Score a causal LM on a task: classification, multiple choice or math (docs/methods.md §7, paper §3.1.2).

* classification: every label's verbalisation (:func:`prompts.verbalise`) is scored by its summed
  log-likelihood after the prompt; the best label is the prediction; accuracy and weighted F1.
* multiple choice: the next-token log-probabilities of the letters at the answer position; accuracy.
* math: batched greedy generation (at most ``max_new_tokens``, a row stopped once its answer is settled),
  the final number extracted (:func:`extract.extract_answer`); accuracy.

Every result carries its sample count and a Wilson 95 % interval for the accuracy.

Batch-size invariance: sequences are padded by hand with an attention mask, on the right for scoring
(real tokens keep positions 0..L-1 and never see padding under the causal mask) and on the left for
generation (position ids are computed from the mask), so a batch computes the same quantities as one
example alone, up to float reduction order (~1e-6). :mod:`.reference` keeps the earlier, slower code path
that the tests and ``benchmarks/bench_eval.py`` compare against.

Prompts never run past the model's context: longer ones are cut from the left (``n_truncated``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data import prompts
from ..data.types import TASKS, Domain, Example
from ..errors import ConfigError, DataError
from ..progress import ProgressCallback
from ..routing import greedy_generate, pad_ids
from .extract import _STRICT_NUMBER, ANSWER_MARKER, answers_equal, extract_answer, normalise_number
from .metrics import accuracy, weighted_f1, wilson_interval

DEFAULT_MAX_NEW_TOKENS = 96
STOP_SEQUENCES: tuple[str, ...] = ("\nQuestion:", "\nDialogue:", "\n\n")
"""Generated text is cut at the first of these (a base model may run on into a new example)."""


@dataclass
class EvalResult:
    """The score of one task.

    ``accuracy`` with its Wilson 95 % interval ``[ci_low, ci_high]`` over ``n`` examples; ``weighted_f1`` for
    classification only; ``predictions`` holds one dict per example (id, gold, prediction, correct and
    the label scores or the generated text). ``n_truncated`` counts the prompts cut from the left to fit
    the model's context (see :func:`evaluate`).
    """

    task: str
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    weighted_f1: float | None = None
    ci_method: str = "wilson"
    predictions: list[dict[str, Any]] = field(default_factory=list)
    n_truncated: int = 0

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


# ------------------------------------------------------------------------------------------- context


def context_length(model: Any, hf: Any = None) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its config), or None when unknown."""
    n = getattr(model, "context_length", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    config = getattr(hf if hf is not None else model, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def fit_to_context(
    seqs: list[list[int]], limit: int | None, keep: Sequence[int] = ()
) -> tuple[list[list[int]], list[bool]]:
    """Cut every sequence longer than ``limit`` tokens from the left, keeping a leading ``keep`` (e.g. BOS).

    The task's cue (``Emotion:``, ``Answer:``) is at the end of a prompt, so the start is what goes. Returns
    the sequences and, per sequence, whether it was cut. ``limit=None`` leaves everything as it is.
    """
    if limit is None:
        return seqs, [False] * len(seqs)
    out, cut = [], []
    for s in seqs:
        if len(s) <= limit:
            out.append(s)
            cut.append(False)
            continue
        k = 0  # how much of the special prefix this sequence starts with (kept, if it leaves room)
        while k < len(keep) and k < len(s) and s[k] == keep[k]:
            k += 1
        k = k if k < limit else 0
        out.append(s[:k] + s[len(s) - (limit - k):])
        cut.append(True)
    return out, cut


# -------------------------------------------------------------------------------------- early stopping


def _stop_start(text: str) -> tuple[int, int | None]:
    """``(P, Q)``: P, the first position at which a stop sequence starts in ``text`` or may start once more
    text follows (a suffix that is a proper prefix of one); Q, the first complete occurrence (None if none)."""
    p, q = len(text), None
    for stop in STOP_SEQUENCES:
        i = text.find(stop)
        if i >= 0:
            p = min(p, i)
            q = i if q is None else min(q, i)
        for k in range(1, len(stop)):
            if text.endswith(stop[:k]):
                p = min(p, len(text) - k)
    return p, q


# A character after the answer's number that no continuation can join to it: not a digit, comma, point or
# space (a tokenizer's clean-up may drop a space before punctuation), and ASCII (a partly decoded character
# is U+FFFD and may complete to a Unicode digit).
_FINAL_ASCII = frozenset(chr(c) for c in range(128)) - set("0123456789,. ")


def answer_settled(text: str) -> bool:
    """Whether the answer extracted from the final generation no longer depends on what is generated next.

    ``text`` is the decoded generation so far. The final text is cut (:data:`STOP_SEQUENCES`) at or after
    P (see :func:`_stop_start`) and starts with ``text[:P]``; when that prefix holds ``####`` and a number
    followed by a character no continuation can join to the number (or the number ends the prefix and the
    newline of a stop sequence follows), the first number after the first ``####`` is fixed. Once a stop
    sequence is complete at Q, the final text is ``text[:c]`` for some P ≤ c ≤ Q + 1 (``"\\n\\n"`` then
    ``"Question:"`` cuts one later; this bound is specific to the present :data:`STOP_SEQUENCES`); if every
    such prefix gives the same answer it is fixed too. Math generation stops a row here: the extracted
    answer equals that of running on to EOS or the token limit (tested against that on random strings and
    on generations).
    """
    if ANSWER_MARKER not in text and "\n" not in text:
        return False  # no marker and no stop sequence (each starts with a newline): nothing is fixed yet
    p, q = _stop_start(text)
    head = text[:p]
    if ANSWER_MARKER in head:
        rest = head.split(ANSWER_MARKER, 1)[1]
        m = _STRICT_NUMBER.search(rest)
        if m is not None:
            # The character after the number: inside the head, or (the number ends the head) the newline
            # that starts a stop sequence at P, which the final text either has there or ends before.
            end = len(head) - len(rest) + m.end()
            if end < len(text) and text[end] in _FINAL_ASCII:
                return True
    if q is None:
        return False
    answers = {extract_answer(text[:c]) for c in range(p, min(q + 1, len(text)) + 1)}
    return len(answers) == 1


class _AnswerStop:
    """A ``transformers`` stopping criterion: a row is finished once :func:`answer_settled` holds for it.

    ``generated[row]`` is the number of generated tokens at which the row stopped (rows ended by EOS or the
    token limit are left to ``generate``). Decoding is incremental per unfinished row.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, eos_id: int | None) -> None:
        self.tokenizer, self.width, self.eos_id = tokenizer, prompt_width, eos_id
        self.generated: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        gen = input_ids[:, self.width:].tolist()
        for row, toks in enumerate(gen):
            if row in self.generated:
                done[row] = True
                continue
            if self.eos_id is not None and self.eos_id in toks:
                continue  # generate ends this row itself; the tokens after EOS are padding
            if answer_settled(self.tokenizer.decode(toks, skip_special_tokens=True)):
                self.generated[row] = len(toks)
                done[row] = True
        return done


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
    progress: ProgressCallback | None = None,
) -> EvalResult:
    """Score ``model`` on ``examples`` of ``task`` and return accuracy, its 95 % CI and predictions.

    ``model`` is a loaded expertscope model (``.model`` and ``.tokenizer``) or a Hugging Face causal LM
    with ``tokenizer=``. ``labels`` is the classification label set (default: a Domain's own ``labels``, else
    :data:`prompts.LABELS`).
    ``max_new_tokens`` bounds math generation (default 96). ``on_batch(k)`` is called with the number
    of examples finished after each batch; ``progress("evaluating <task>", done, total)`` once with 0 and
    after every batch (the library's progress protocol). Scores do not depend on ``batch_size``.

    How (same numbers as scoring each example alone, up to float reduction order):

    * prompts are tokenised once; batches take prompts of similar length together (less padding; for math
      also fewer generation steps, as solution length follows question length);
    * a label of one token is scored from the prompt's own next-token distribution (one forward per
      example for all such labels); longer labels are scored as ``prompt + label`` rows;
    * a math row stops once its extracted answer can no longer change (:func:`answer_settled`).

    A prompt longer than the model's context minus the room its answer needs (the longest label, one
    letter, or ``max_new_tokens``) is cut from the left (a leading BOS kept); ``n_truncated`` counts them
    and their predictions carry ``"truncated": true``.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} is not positive: pass --batch-size 1 or more")
    examples, labels = _unpack(examples, labels)
    if isinstance(examples, str | bytes | dict) or not all(isinstance(e, Example) for e in examples):
        from ..errors import InputTypeError

        bad = examples if isinstance(examples, str | bytes | dict) else next(
            e for e in examples if not isinstance(e, Example))
        raise InputTypeError(f"examples holds a {type(bad).__name__}: expected a Domain or a list of Example "
                             "(es.Example(text=..., label=...))")
    hf, tokenizer = _resolve(model, tokenizer)
    exs = validate_examples(task, examples, labels)
    label_set = tuple(labels) if labels is not None else prompts.LABELS
    new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    dev = _device_of(hf, device)
    pad_id = _pad_id(tokenizer)
    p_ids = _encode_many(tokenizer, [prompts.prompt(task, ex) for ex in exs], special=True)
    l_ids = [_encode(tokenizer, prompts.verbalise(lab), special=False) for lab in label_set]
    p_ids, cut = _fit_prompts(model, hf, tokenizer, task, exs, p_ids, l_ids, new_tokens)
    name = f"evaluating {task}"
    if progress is not None:
        progress(name, 0, len(exs))
    was_training = hf.training
    hf.eval()
    records: list[dict[str, Any] | None] = [None] * len(exs)
    done = 0
    try:
        for idx in _batches(p_ids, batch_size):
            batch, b_ids = [exs[i] for i in idx], [p_ids[i] for i in idx]
            if task == "classification":
                recs = _score_classification(hf, batch, b_ids, label_set, l_ids, pad_id, dev)
            elif task == "multiple_choice":
                recs = _score_multiple_choice(hf, tokenizer, batch, b_ids, pad_id, dev)
            else:
                recs = _generate_math(hf, tokenizer, batch, b_ids, pad_id, new_tokens, dev)
            for i, rec in zip(idx, recs, strict=True):
                if cut[i]:
                    rec["truncated"] = True
                records[i] = rec
            done += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
            if progress is not None:
                progress(name, done, len(exs))
    finally:
        hf.train(was_training)
    return _result(task, [r for r in records if r is not None], n_truncated=sum(cut))


#: A decoding step of one row costs about this share of a forward of its prompt (at least one token's work):
#: the key/value cache makes a step one token, but a step's fixed costs do not shrink with it.
DECODE_STEP_SHARE = 0.05


@dataclass(frozen=True)
class ScoringCost:
    """The model work :func:`evaluate` does on some examples, counted before running it.

    ``token_forwards``: tokens run through the model, padding included, summed over its forward passes (a
    math row's decoding steps counted as :data:`DECODE_STEP_SHARE` of its prompt's forward each, at least one
    token); ``largest`` ``(rows, length)``: the largest forward pass (what its peak memory follows);
    ``items``: the examples; ``forwards``: the forward passes (decoding steps not counted)."""

    token_forwards: float
    largest: tuple[int, int]
    items: int
    forwards: int

    def per_item(self) -> float:
        """Tokens run per example."""
        return self.token_forwards / max(self.items, 1)


def scoring_cost(
    task: str,
    examples: Sequence[Example] | Domain,
    tokenizer: Any,
    batch_size: int = 8,
    labels: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
) -> ScoringCost:
    """What :func:`evaluate` will run on ``examples``, from the tokenizer alone (no model): the same prompts,
    label set, batches (longest prompts first) and rows — one forward for one-token labels or letters, a
    ``prompt + label`` row per longer label or letter, right-padded to the batch's longest row; a math batch
    its left-padded prompts and ``max_new_tokens`` decoding steps. Prompts are not cut to a context here
    (:func:`evaluate` cuts only prompts longer than the model's context)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    examples, labels = _unpack(examples, labels)
    exs = list(examples)
    label_set = tuple(labels) if labels is not None else prompts.LABELS
    new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    p_ids = _encode_many(tokenizer, [prompts.prompt(task, ex) for ex in exs], special=True) if exs else []
    l_lens = [len(_encode(tokenizer, prompts.verbalise(lab), special=False)) for lab in label_set]
    letters = {x: len(_encode(tokenizer, prompts.LETTER_VERBALISATIONS[x], special=False)) for x in prompts.LETTERS}
    total, passes, largest = 0.0, 0, (0, 0)

    def run(rows: int, length: int) -> None:
        nonlocal total, passes, largest
        total += rows * length
        passes += 1
        largest = max(largest, (rows, length), key=lambda x: x[0] * x[1])

    for idx in _batches(p_ids, max(batch_size, 1)):
        lens = [len(p_ids[i]) for i in idx]
        if task == "classification":
            if any(n == 1 for n in l_lens):
                run(len(idx), max(lens))
            multi = [n for n in l_lens if n != 1]
            if multi:
                run(len(idx) * len(multi), max(lens) + max(multi))
        elif task == "multiple_choice":
            n_ch = [len(exs[i].choices or ()) for i in idx]
            one = [all(letters[x] == 1 for x in prompts.LETTERS[:n]) for n in n_ch]
            if any(one):
                run(sum(one), max(n for n, o in zip(lens, one, strict=True) if o))
            rows = [(n, c) for n, c, o in zip(lens, n_ch, one, strict=True) if not o]
            if rows:
                width = max(n + max(letters[x] for x in prompts.LETTERS[:c]) for n, c in rows)
                run(sum(c for _, c in rows), width)
        else:
            run(len(idx), max(lens))
            total += new_tokens * len(idx) * max(1.0, DECODE_STEP_SHARE * max(lens))
    return ScoringCost(total, largest, len(exs), passes)


def _unpack(examples: Sequence[Example] | Domain, labels: Sequence[str] | None
            ) -> tuple[Sequence[Example], Sequence[str] | None]:
    """A Domain's examples and, unless ``labels`` is given, its own label set; anything else as it is."""
    if isinstance(examples, Domain):
        return examples.examples, examples.labels if labels is None else labels
    return examples, labels


def _batches(p_ids: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """The example indices of each batch: prompts of similar length together, longest first (a stable sort: ties
    keep the input order): less padding, and for math fewer steps, as a longer question tends to a longer
    solution."""
    order = sorted(range(len(p_ids)), key=lambda i: -len(p_ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _encode_many(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of every text, in one tokenizer call (what :func:`_encode` gives text by text)."""
    return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _fit_prompts(model: Any, hf: Any, tokenizer: Any, task: str, exs: list[Example], p_ids: list[list[int]],
                 l_ids: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Prompts cut from the left so that prompt + answer fit the context; which ones were cut.

    The room kept for the answer: the longest label (classification), the longest letter (multiple choice),
    ``new_tokens`` (math). Raises :class:`ConfigError` when that room alone fills the context.
    """
    ctx = context_length(model, hf)
    if ctx is None:
        return p_ids, [False] * len(p_ids)
    if task == "classification":
        room, what = max(len(x) for x in l_ids), "the longest label"
    elif task == "multiple_choice":
        n = max(len(ex.choices or ()) for ex in exs)
        room = max(len(_encode(tokenizer, prompts.LETTER_VERBALISATIONS[x], special=False))
                   for x in prompts.LETTERS[:n])
        what = "an answer letter"
    else:
        room, what = new_tokens, f"max_new_tokens={new_tokens}"
    if room >= ctx:
        raise ConfigError(f"{what} takes {room} of the model's {ctx}-token context, leaving no room for the "
                          f"prompt: pass a smaller --max-new-tokens (below {ctx})")
    return fit_to_context(p_ids, ctx - room, keep=_encode(tokenizer, "", special=True))


def _score_classification(
    hf: Any,
    batch: list[Example],
    p_ids: list[list[int]],
    label_set: Sequence[str],
    l_ids: list[list[int]],
    pad_id: int,
    dev: torch.device,
) -> list[dict[str, Any]]:
    """One record per example: every label's summed log-likelihood and the argmax label.

    One-token labels are read off the prompt's next-token log-probabilities (one forward for all of them);
    a label of several tokens is scored on its own ``prompt + label`` row.
    """
    lls: list[list[float]] = [[0.0] * len(label_set) for _ in batch]
    single = [j for j, x in enumerate(l_ids) if len(x) == 1]
    if single:
        logp = next_token_logprobs(hf, p_ids, pad_id, dev)  # (batch, vocab)
        picked = logp[:, [l_ids[j][0] for j in single]].tolist()
        for i in range(len(batch)):
            for col, j in enumerate(single):
                lls[i][j] = picked[i][col]
    multi = [j for j, x in enumerate(l_ids) if len(x) != 1]
    if multi:
        seqs = [p + l_ids[j] for p in p_ids for j in multi]
        starts = [len(p) for p in p_ids for _ in multi]
        flat = sequence_logprobs(hf, seqs, starts, pad_id, dev)
        for i in range(len(batch)):
            for col, j in enumerate(multi):
                lls[i][j] = flat[i * len(multi) + col]
    out = []
    for i, ex in enumerate(batch):
        scores = dict(zip(label_set, lls[i], strict=True))
        pred = max(label_set, key=lambda lab: scores[lab])  # first label wins exact ties
        out.append(
            {"id": ex.id, "gold": ex.label, "prediction": pred, "correct": pred == ex.label, "scores": scores}
        )
    return out


def _generate_math(hf: Any, tokenizer: Any, batch: list[Example], p_ids: list[list[int]], pad_id: int,
                   new_tokens: int, dev: torch.device) -> list[dict[str, Any]]:
    """One record per example: the greedy generation (cut at a stop sequence), its answer and correctness.

    Rows stop once their answer is settled (:func:`answer_settled`), so ``generation`` may end right after
    the answer where a run to EOS would have gone on; the extracted answer is the same.
    """
    gen = greedy_generate(hf, p_ids, pad_id, tokenizer.eos_token_id, new_tokens, dev,
                          stop=lambda width, eos: _AnswerStop(tokenizer, width, eos))
    out = []
    for ex, g in zip(batch, gen, strict=True):
        text = _cut(tokenizer.decode(g, skip_special_tokens=True))
        pred = extract_answer(text)
        out.append({"id": ex.id, "gold": normalise_number(str(ex.answer)), "prediction": pred,
                    "correct": answers_equal(pred, ex.answer), "generation": text})
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


def _result(task: str, records: list[dict[str, Any]], n_truncated: int = 0) -> EvalResult:
    n = len(records)
    k = sum(bool(r["correct"]) for r in records)
    lo, hi = wilson_interval(k, n)
    f1 = None
    if task == "classification":
        f1 = weighted_f1([r["gold"] for r in records], [r["prediction"] for r in records])
    acc = accuracy([True] * n, [bool(r["correct"]) for r in records]) if n else math.nan
    return EvalResult(
        task=task, n=n, accuracy=acc, ci_low=lo, ci_high=hi, weighted_f1=f1, predictions=records,
        n_truncated=n_truncated,
    )
