"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class ExpertscopeError(Exception):
    """A problem with the user's input or environment, with the fix in the message.

    The message is one sentence naming the problem, then the fix: ``"<problem>: <fix>"``.
    """

    exit_code: int = 2


class ConfigError(ExpertscopeError, ValueError):
    """An invalid option value (bad threshold, unknown mode, ...)."""


class DataError(ExpertscopeError, ValueError):
    """A data source that is missing, empty or lacks a required field."""


class ModelError(ExpertscopeError, ValueError):
    """A model that cannot be loaded or adapted (no MoE layers, unknown router, offline hub id, ...)."""


class OutputError(ExpertscopeError, ValueError):
    """An output directory that would mix two runs, or a report directory missing its tables."""


class InputTypeError(ExpertscopeError, TypeError):
    """An API argument of the wrong type (a string where a list of domains belongs, a number as text, ...)."""
