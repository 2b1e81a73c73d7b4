"""Per-token routing quantities of docs/methods.md §1–2."""

from __future__ import annotations

import torch


def topk_renormalised(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """p̃ of paper Eq. 2: softmax of the selected experts' logits over the selected set.

    ``logits`` ``(N, E)``, ``indices`` ``(N, k)`` → ``(N, k)`` probabilities, each row summing to 1.
    """
    return torch.softmax(torch.gather(logits.float(), 1, indices), dim=-1)


def bernoulli_entropy(p: torch.Tensor) -> torch.Tensor:
    """``h(p) = -p log2 p - (1-p) log2(1-p)`` elementwise, with ``h(0) = h(1) = 0`` (bits)."""
    q = 1.0 - p
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(q, q)) / torch.log(torch.tensor(2.0, dtype=p.dtype))


def eq1_entropy(p: torch.Tensor) -> torch.Tensor:
    """The literal paper Eq. 1 summand ``-p ln p`` (nats), with ``0 ln 0 = 0``."""
    return -torch.special.xlogy(p, p)
