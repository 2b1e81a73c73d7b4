"""Package faces that import on first use (PEP 562), so that `import expertscope` and `expertscope --help`
load no torch, transformers or pandas until a name that needs them is asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str], namespace: dict[str, Any],
                 subpackages: Sequence[str] = ()) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps each public name to the (relative) module that
    defines it, ``subpackages`` are reachable as attributes; the value is imported the first time it is asked
    for and kept in ``namespace`` (the package's globals), so later lookups do not come back here."""

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
        elif name in subpackages:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    return __getattr__


__all__ = ["lazy_getattr"]
