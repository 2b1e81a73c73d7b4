"""Router adapters, registered in the order they are tried (specific classes first, structure last)."""

from . import deepseek, gpt_oss, granite, phimoe, remote_moegate, softmax_topk  # noqa: F401
from . import linear_gate  # noqa: F401  (structural match: keep last)
from .base import (
    RouterAdapter,
    RouterSite,
    find_adapter,
    register_adapter,
    registered_adapters,
    supported_families,
)

__all__ = [
    "RouterAdapter",
    "RouterSite",
    "find_adapter",
    "register_adapter",
    "registered_adapters",
    "supported_families",
]
