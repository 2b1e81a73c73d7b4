"""Router adapters, registered in the order they are tried (specific classes first, structure last)."""

from . import (  # noqa: F401
    deepseek,
    gpt_oss,
    granite,
    linear_gate,
    phimoe,
    remote_moegate,
    softmax_topk,
)
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
