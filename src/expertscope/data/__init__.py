"""Domains: shared types, local/hub/preset sources, and the synthetic generator."""

from . import sources, types  # noqa: F401
