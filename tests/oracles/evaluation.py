"""The evaluation code path as it was before the fast path (kept verbatim as a reference, not for use).

:func:`evaluate_reference` scores every classification label as its own ``prompt + label`` sequence, batches
examples in input order and runs math generation to EOS or ``max_new_tokens``. The tests and
``benchmarks/bench_eval.py`` compare :func:`expertscope.evaluation.evaluate` against it: the same predictions
and accuracy, the scores equal up to float reduction order, and the speed-up measured in one run. It does not
guard the model's context (that check is new), so keep inputs short when comparing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from expertscope.data import prompts
from expertscope.data.types import Domain, Example
from expertscope.evaluation.evaluate import (
    DEFAULT_MAX_NEW_TOKENS,
    EvalResult,
    _cut,
    _device_of,
    _encode,
    _letter_ids,
    _pad_id,
    _resolve,
    _result,
    next_token_logprobs,
    sequence_logprobs,
    validate_examples,
)
from expertscope.evaluation.extract import answers_equal, extract_answer, normalise_number


@torch.inference_mode()
def greedy_generate_reference(
    model: Any, seqs: list[list[int]], pad_id: int, eos_id: int | None, max_new_tokens: int, device: torch.device
) -> list[list[int]]:
    """Greedy continuations (token ids, EOS excluded) of left-padded prompts, at most ``max_new_tokens``."""
    from expertscope.routing import pad_ids

    ids, mask = pad_ids(seqs, pad_id, True)
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id, temperature=None, top_p=None, top_k=None,
    )
    result = []
    for row in out[:, ids.shape[1]:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result


def evaluate_reference(
    model: Any,
    task: str,
    examples: Sequence[Example] | Domain,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    device: str | torch.device | None = None,
    labels: Sequence[str] | None = None,
) -> EvalResult:
    """The old :func:`~expertscope.evaluation.evaluate`: one ``prompt + label`` row per label, input order."""
    if isinstance(examples, Domain):
        examples = examples.examples
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
                l_ids = [_encode(tokenizer, prompts.verbalise(lab), special=False) for lab in label_set]
                seqs = [p + lab for p in p_ids for lab in l_ids]
                starts = [len(p) for p in p_ids for _ in l_ids]
                lls = sequence_logprobs(hf, seqs, starts, pad_id, dev)
                for i, ex in enumerate(batch):
                    scores = dict(zip(label_set, lls[i * len(l_ids) : (i + 1) * len(l_ids)], strict=True))
                    pred = max(label_set, key=lambda lab: scores[lab])
                    records.append({"id": ex.id, "gold": ex.label, "prediction": pred,
                                    "correct": pred == ex.label, "scores": scores})
            elif task == "multiple_choice":
                records += _mc_reference(hf, tokenizer, batch, p_ids, pad_id, dev)
            else:
                gen = greedy_generate_reference(hf, p_ids, pad_id, tokenizer.eos_token_id,
                                                max_new_tokens or DEFAULT_MAX_NEW_TOKENS, dev)
                for ex, g in zip(batch, gen, strict=True):
                    text = _cut(tokenizer.decode(g, skip_special_tokens=True))
                    answer = extract_answer(text)
                    records.append({"id": ex.id, "gold": normalise_number(str(ex.answer)), "prediction": answer,
                                    "correct": answers_equal(answer, ex.answer), "generation": text})
    finally:
        hf.train(was_training)
    return _result(task, records)


def _mc_reference(hf: Any, tokenizer: Any, batch: list[Example], p_ids: list[list[int]], pad_id: int,
                  dev: torch.device) -> list[dict[str, Any]]:
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
        pred = max(sc, key=lambda x: sc[x])
        out.append({"id": ex.id, "gold": ex.label, "prediction": pred, "correct": pred == ex.label, "scores": sc})
    return out
