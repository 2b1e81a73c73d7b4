"""Decision positions: where each input's task is decided, and the teacher-forced token ids to run.

A causal effect is measured at the positions whose next-token prediction decides the input's task:

* classification: the position that predicts the gold label's verbalisation (``" joy"``) at the first token
  where the label verbalisations differ (the labels of the domain; the standard emotion labels when the
  domain's labels are among them) (a leading-space token shared by every label is not the decision);
  the prompt is extended, teacher-forced, by the gold tokens before that token;
* multiple choice: the same rule over the answer letters (``" A"`` … ``" D"``);
* math (generation with a gold answer): every position that predicts a token of the gold continuation
  (``prompts.target``: the worked solution), teacher-forced (appended to the prompt), averaged;
* plain text with no task, an example without a gold answer, or ``decision="last"``: the last real token.

Prompt and gold continuation are tokenised separately and concatenated, as evaluation scores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.types import Domain, Example


@dataclass
class Prepared:
    """The inputs of a causal run.

    ``token_ids[i]`` the ids the model runs on; ``decisions[i]`` the positions (ascending, 0-based) whose
    next-token distribution is measured; ``kinds[i]`` ``"label" | "letter" | "answer" | "last"``;
    ``truncated`` inputs cut by ``max_length``; ``lost`` inputs whose decision positions were all cut (they
    fall back to their last kept token).
    """

    token_ids: list[list[int]] = field(default_factory=list)
    decisions: list[list[int]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    truncated: int = 0
    lost: int = 0

    def kind_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.kinds:
            out[k] = out.get(k, 0) + 1
        return out


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the token id lists ``seqs``."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _encode(tok: Any, text: str, special: bool) -> list[int]:
    return [int(x) for x in tok(text, add_special_tokens=special)["input_ids"]]


def choice_verbalisations(domain: Domain) -> list[str] | None:
    """The verbalisations whose first differing token decides ``domain``'s task (None: not a choice task)."""
    from ..data.prompts import LABELS, LETTER_VERBALISATIONS, verbalise

    if domain.task == "multiple_choice":
        return list(LETTER_VERBALISATIONS.values())
    if domain.task == "classification":
        if domain.labels is not None:  # the domain's own label set (from its data or ?labels=)
            return [verbalise(x) for x in sorted(domain.labels)]
        labels = {str(e.label) for e in domain if e.label is not None}
        if labels and labels <= set(LABELS):
            labels = set(LABELS)  # the standard label set, whatever subset these examples happen to use
        return [verbalise(x) for x in sorted(labels)] if len(labels) >= 2 else None
    return None


def decision_index(options: Sequence[Sequence[int]], gold: Sequence[int]) -> int:
    """Index into ``gold``'s tokens of the decision token: the first where the options differ (at most the
    last gold token, when ``gold`` is a prefix of another option)."""
    return min(common_prefix([*options, gold]), len(gold) - 1)


def _one(tok: Any, task: str, ex: Example, options: list[list[int]] | None) -> tuple[list[int], list[int], str]:
    from ..data.prompts import LETTER_VERBALISATIONS, prompt, target, verbalise

    p = _encode(tok, prompt(task, ex), True)
    last = (p, [len(p) - 1], "last")
    if task in ("classification", "multiple_choice"):
        if ex.label is None or not options:
            return last
        text = verbalise(str(ex.label)) if task == "classification" else \
            LETTER_VERBALISATIONS.get(str(ex.label), f" {ex.label}")
        g = _encode(tok, text, False)
        if not g:
            return last
        j = decision_index(options, g)
        ids = p + g[:j]
        return ids, [len(ids) - 1], "label" if task == "classification" else "letter"
    # generation with a gold continuation
    if not ex.solution and ex.answer is None:
        return last
    g = _encode(tok, target(task, ex), False)
    if not g:
        return last
    ids = p + g[:-1]  # the last gold token is predicted, never read
    return ids, list(range(len(p) - 1, len(p) + len(g) - 1)), "answer"


def prepare_inputs(tok: Any, domains: Sequence[Domain], limit: int | None, decision: str,
                   max_len: int | None) -> tuple[Prepared, list[str], list[int]]:
    """Token ids and decision positions of the first ``limit`` examples of every domain.

    Returns the :class:`Prepared` inputs and each input's domain name and index within its domain.
    """
    out, dom_of, tix = Prepared(), [], []
    for d in domains:
        task = None if decision == "last" else d.task
        verbs = choice_verbalisations(d) if task in ("classification", "multiple_choice") else None
        options = None if verbs is None else [_encode(tok, v, False) for v in verbs]
        head = d.head(limit)
        texts = head.texts  # what profiling shows the model: the prompt when the domain has a task
        for n, ex in enumerate(head.examples):
            if task is None:
                ids = _encode(tok, texts[n], True)
                dec, kind = [len(ids) - 1], "last"
            else:
                ids, dec, kind = _one(tok, task, ex, options)
            if max_len and len(ids) > max_len:
                out.truncated += 1
                ids = ids[:max_len]
                dec = [x for x in dec if x < max_len]
                if not dec:
                    out.lost += 1
                    dec, kind = [max_len - 1], "last"
            out.token_ids.append(ids)
            out.decisions.append(dec)
            out.kinds.append(kind)
            dom_of.append(d.name)
            tix.append(n)
    return out, dom_of, tix
