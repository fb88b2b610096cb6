"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, prune the lowest of every output row (or
N:M group). No weight update."""

from __future__ import annotations

import torch

from .magnitude import score_prune_mask
from .masks import apply_prune_mask
from .stats import CalibrationStats


def wanda_scores(weight: torch.Tensor, stats: CalibrationStats) -> torch.Tensor:
    """float32 [out, in]: |W_ij| * ||X_j||_2 over the calibration tokens."""
    norms = stats.col_norm.to(weight.device)
    return weight.detach().abs().to(torch.float32) * norms


def wanda_prune(weight: torch.Tensor, stats: CalibrationStats, *, sparsity: float,
                nm=None) -> torch.Tensor:
    scores = wanda_scores(weight, stats)
    return apply_prune_mask(weight.detach(), score_prune_mask(scores, sparsity, nm))
