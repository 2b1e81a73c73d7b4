"""Task evaluation: prompts, answer extraction, metrics and the ``evaluate`` entry point."""

from __future__ import annotations

from ..data.prompts import LABELS, LETTERS, profile_text, prompt, target
from .evaluate import EvalResult, ScoringCost, evaluate, scoring_cost, validate_examples
from .extract import answers_equal, extract_answer, normalise_number
from .metrics import accuracy, weighted_f1, wilson_interval

__all__ = [
    "LABELS",
    "LETTERS",
    "EvalResult",
    "ScoringCost",
    "accuracy",
    "answers_equal",
    "evaluate",
    "extract_answer",
    "normalise_number",
    "profile_text",
    "prompt",
    "scoring_cost",
    "target",
    "validate_examples",
    "weighted_f1",
    "wilson_interval",
]
