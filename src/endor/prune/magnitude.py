"""Magnitude pruning: zero the smallest |w| of every output row (or of every N:M group)."""

from __future__ import annotations

import torch

from .masks import (apply_prune_mask, lowest_per_group, lowest_per_row, magnitude_scores,
                    prune_smallest_magnitudes, pruned_count)


def score_prune_mask(scores: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    """The prune mask shared by the score-based methods: per row, or per N:M group."""
    if nm is not None:
        return lowest_per_group(scores, *nm)
    return lowest_per_row(scores, pruned_count(sparsity, scores.shape[1]))


def magnitude_prune(weight: torch.Tensor, *, sparsity: float, nm=None) -> torch.Tensor:
    # Ranked by |w| as float32 (the bit patterns with the sign cleared order exactly so).
    weight = weight.detach()
    if nm is None and weight.device.type == "cpu" and weight.dtype in (
            torch.float16, torch.bfloat16, torch.float32):
        return prune_smallest_magnitudes(weight, pruned_count(sparsity, weight.shape[1]))
    return apply_prune_mask(weight, score_prune_mask(magnitude_scores(weight), sparsity, nm))
