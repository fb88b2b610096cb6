"""Choosing which weights to prune from their scores, by rank, and zeroing them.

Masks here are *prune* masks: True marks a weight that becomes zero. Selection is by rank, never
by a threshold alone: dequantized weights have many exact ties, and a threshold would prune too
many or too few. Ties are broken towards the lower index, as a stable sort would (reference.py
does exactly that, slowly); here a selection (kthvalue) plus a count of the tied scores does it
in linear time and without sorting."""

from __future__ import annotations

import torch

# Selection allocates a few temporaries per element: bound them by working on row chunks.
_CHUNK_ELEMENTS = 1 << 24


def pruned_count(sparsity: float, size: int) -> int:
    """How many of `size` weights a fraction `sparsity` prunes: round(sparsity * size), halves
    to even as Python's round."""
    return round(sparsity * size)


def _lowest_along_last(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool, shape of `scores`: the `count` lowest of every last-dimension row, ties to the
    lower index. 1 <= count <= scores.shape[-1]."""
    kth = scores.kthvalue(count, dim=-1, keepdim=True).values
    below = scores < kth
    tied = scores == kth
    # Of the scores equal to the k-th, prune the first (count - below) of them.
    missing = count - below.sum(dim=-1, keepdim=True, dtype=torch.int32)
    return below | (tied & (tied.cumsum(dim=-1, dtype=torch.int32) <= missing))


def lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool [out, in]: the `count` lowest scores of every row."""
    rows, cols = scores.shape
    if count == 0 or rows == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    chunk = max(1, _CHUNK_ELEMENTS // cols)
    return torch.cat([_lowest_along_last(scores[start:start + chunk], count)
                      for start in range(0, rows, chunk)])


def lowest_in_block(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool, shape of `scores`: the `count` lowest scores of the whole block (flattened)."""
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _lowest_along_last(scores.reshape(-1), count).view(scores.shape)


def lowest_per_group(scores: torch.Tensor, keep: int, group: int) -> torch.Tensor:
    """bool [out, in] for N:M sparsity: in every run of `group` consecutive columns of a row,
    all but the `keep` highest scores. `in` must be a multiple of `group`."""
    rows, cols = scores.shape
    assert cols % group == 0, (cols, group)
    if group == keep or scores.numel() == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    grouped = scores.reshape(rows, cols // group, group)
    return _lowest_along_last(grouped, group - keep).view(rows, cols)


def canonical_zeros(weight: torch.Tensor) -> torch.Tensor:
    """Every zero becomes +0.0. The Endor bitmap counts -0.0 as a non-zero (its bits are not all
    zero), so a -0.0 left by pruning or by an underflowing cast would waste a stored value."""
    return weight.masked_fill(weight == 0, 0)


def apply_prune_mask(weight: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """A new tensor: `weight` with the masked positions (and any existing -0.0) set to +0.0."""
    return canonical_zeros(weight.masked_fill(prune, 0))
