"""Every prompt format of expertscope, in one place.

Evaluation, profiling (:attr:`expertscope.data.types.Domain.texts`) and the demo's training all build
their text here, so the model is trained, profiled and scored on exactly the same strings.

classification (emotion)::

    Dialogue:
    Ann: Guess what, we won the cup final.
    Ben: Really?
    Emotion:                      <- prompt ends here; each label is scored as " joy", " anger", ...

multiple choice::

    Question: What is the capital of Selromar?
    A. Lomonmora
    B. Kadogard
    C. Lorone
    D. Mirbadia
    Answer:                       <- the next-token scores of " A" ... " D" decide

math::

    Question: Tom has 5 apples. Tom buys 3 more apples. How many apples does Tom have now?
    Answer:                       <- greedy generation, e.g. " 5 + 3 = 8. #### 8"

A target (what follows the prompt) always starts with a space, and the model is trained on
``prompt + target`` so that tokenising the prompt and the target separately matches training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .types import Example

LABELS: tuple[str, ...] = ("neutral", "joy", "sadness", "anger", "fear", "disgust", "surprise")
"""The classification label set (the 7 EmotionLines emotions)."""

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
"""The multiple-choice answer letters."""

LABEL_VERBALISATIONS: dict[str, str] = {label: f" {label}" for label in LABELS}
"""The continuation whose log-likelihood scores each classification label."""

LETTER_VERBALISATIONS: dict[str, str] = {letter: f" {letter}" for letter in LETTERS}
"""The continuation whose first token is scored for each multiple-choice letter."""

_TASKS = ("classification", "multiple_choice", "math")


def _check_task(task: str) -> None:
    if task not in _TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(_TASKS)}")


def verbalise(label: str) -> str:
    """The continuation text of a classification label (a leading space, then the label)."""
    return LABEL_VERBALISATIONS.get(label, f" {label}")


def prompt(task: str, example: Example) -> str:
    """The text shown to the model before its answer, for ``task`` (see the module docstring)."""
    _check_task(task)
    if task == "classification":
        lines = [*(example.context or ()), example.text]
        return "Dialogue:\n" + "\n".join(lines) + "\nEmotion:"
    if task == "multiple_choice":
        choices = example.choices or ()
        options = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices, strict=False))
        return f"Question: {example.text}{options}\nAnswer:"
    return f"Question: {example.text}\nAnswer:"


def target(task: str, example: Example) -> str:
    """The gold continuation after :func:`prompt` (used for training the demo): label, letter or solution."""
    _check_task(task)
    if task == "classification":
        return verbalise(str(example.label))
    if task == "multiple_choice":
        return LETTER_VERBALISATIONS.get(str(example.label), f" {example.label}")
    if example.solution:
        return " " + example.solution.strip()
    return f" #### {example.answer}"


def profile_text(task: str, example: Example) -> str:
    """The text profiling feeds the model for an example of ``task``: the evaluation prompt itself."""
    return prompt(task, example)
