"""Final-answer extraction for math generations (GSM8K convention)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: an optional minus sign that does not follow a word character (so "10-3" is not "-3"), digits
# with optional thousands separators, optional decimals.
_STRICT_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
ANSWER_MARKER = "####"


def normalise_number(s: str) -> str | None:
    """A canonical spelling of a number (``"1,000.50"`` -> ``"1000.5"``, ``"-0"`` -> ``"0"``), or None."""
    s = s.strip().removeprefix("$").replace(",", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str | None) -> str | None:
    """The final number of a generated solution, normalised, or None when there is none.

    The first number after the first ``####`` wins; without a number after ``####`` the last number in
    the text is taken. Thousands separators are dropped, a leading minus is kept, decimals are allowed.
    """
    if not text:
        return None
    if ANSWER_MARKER in text:
        m = _STRICT_NUMBER.search(text.split(ANSWER_MARKER, 1)[1])
        if m:
            return normalise_number(m.group())
    numbers = _STRICT_NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """Whether two answers denote the same number (``"8"`` == ``"8.0"`` == ``"1,000"`` vs ``"1000"``)."""
    if pred is None or gold is None:
        return False
    a, b = normalise_number(pred), normalise_number(gold)
    return a is not None and a == b
