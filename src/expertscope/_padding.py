"""Padding token-id lists into batches: the one place every routing pass, evaluation and training uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``(batch, longest)`` int64, padded on the right (or left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[row, sl] = 1
    return ids, mask
