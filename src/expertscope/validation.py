"""Input checks run before any expensive stage: ranges, devices, domain specs, steering files, API types.

Each check raises a one-line :class:`~expertscope.errors.ExpertscopeError` naming the problem and the fix.
``name`` is how the value is spelled to the user: an option (``"--limit"``, shown as ``--limit 0``) or a
setting (``"limit"``, shown as ``limit=0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, DataError, InputTypeError


def _show(name: str, value: Any) -> str:
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(value: Any, name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    """An integer ≥ 1 (≥ 0 with ``allow_zero``); None passes only with ``allow_none`` (meaning "all")."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputTypeError(f"{_show(name, value)} is not an integer: pass a whole number")
    low = 0 if allow_zero else 1
    if value < low:
        hint = "" if not allow_none else " (leave it out for all)" if name.startswith("--") else " (None for all)"
        raise ConfigError(f"{_show(name, value)} is out of range: pass {low} or more{hint}")


def check_finite(value: Any, name: str, example: str = "2.0") -> None:
    """A finite real number (not NaN, not ±inf)."""
    if not _is_number(value):
        raise InputTypeError(f"{_show(name, value)} is not a number: pass a finite number, e.g. {example}")
    if not math.isfinite(value):
        raise ConfigError(f"{_show(name, value)} is not finite: pass a finite number, e.g. {example}")


# Router logits are at most float32 (bf16 shares its range): a factor beyond it overflows to inf.
FLOAT32_MAX = 3.4028234663852886e38


def check_positive_finite(value: Any, name: str, example: str = "1.2") -> None:
    """A finite number > 0 (steering scales, magnitudes) that float32, the widest router dtype, can hold."""
    check_finite(value, name, example)
    if value <= 0:
        raise ConfigError(f"{_show(name, value)} is not positive: pass a finite number > 0, e.g. {example}")
    if value > FLOAT32_MAX:
        raise ConfigError(f"{_show(name, value)} overflows float32, the router logits' precision (largest "
                          f"3.4e+38): pass e.g. {example}")


def check_nonnegative(value: Any, name: str, example: str = "1") -> None:
    """A finite number ≥ 0 (GPU counts per worker, which Ray allows to be fractional)."""
    check_finite(value, name, example)
    if value < 0:
        raise ConfigError(f"{_show(name, value)} is negative: pass 0 or more, e.g. {example}")


def check_open_unit(value: Any, name: str) -> None:
    """A number strictly between 0 and 1 (significance levels)."""
    check_finite(value, name, "0.05")
    if not 0 < value < 1:
        raise ConfigError(f"{_show(name, value)} is not in (0, 1): pass e.g. 0.05")


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    """One of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{_show(name, value)} is not a valid choice: use one of {', '.join(choices)}")


def check_device(device: Any) -> None:
    """A device torch can parse and this machine has (``cuda:7`` on a 1-GPU machine is refused)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} is not available (no CUDA GPU found): use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {device!r} does not exist ({n} CUDA GPU(s): cuda:0..cuda:{n - 1}): "
                              "pick one of those")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {device!r} is not available (no Apple MPS): use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")


def parse_limit(value: str, where: str) -> int:
    """``?limit=N`` of a domain spec as an integer ≥ 1."""
    try:
        n = int(value)
    except ValueError:
        raise DataError(f"limit={value!r} in {where!r} is not a whole number: e.g. ?limit=100") from None
    if n < 1:
        raise DataError(f"limit={n} in {where!r} is out of range: pass 1 or more (leave it out for all)")
    return n


def check_text(value: Any, where: str, field: str = "text") -> str:
    """A text field's value as a string; anything else (a number, list, dict, None) is refused, not repr'd,
    and so is a string that is not valid Unicode (see :func:`check_unicode`)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__} ({_preview(value)}), not text: "
                        "make it a string")
    check_unicode(value, where, field)
    return value


def check_unicode(value: str, where: str, field: str = "text") -> None:
    """``value`` encodes as UTF-8: no lone surrogate (``"\\ud800"`` in JSON without its pair, or bytes
    decoded with ``errors="surrogateescape"``), which tokenizers cannot take."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        raise DataError(f"{where}: field {field!r} holds a lone surrogate \\u{ord(bad):04x} at character {e.start} "
                        "(half of a UTF-16 pair, not a character): remove it or write the whole character") from None


def _preview(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."




def check_type(value: Any, types: type | tuple[type, ...], name: str, expected: str) -> None:
    """``value`` is an instance of ``types``; else :class:`InputTypeError` naming what was expected."""
    if not isinstance(value, types):
        raise InputTypeError(f"{name} is a {type(value).__name__}, not {expected}")


__all__ = ["FLOAT32_MAX", "check_choice", "check_device", "check_finite", "check_nonnegative", "check_open_unit",
           "check_positive", "check_positive_finite", "check_text", "check_type", "check_unicode",
           "parse_limit"]
