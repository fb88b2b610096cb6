"""Slow, obviously correct versions of the pruning methods, for tests of the fast ones.

Selection: Python sorts with explicit (score, index) keys. SparseGPT: plain Optimal Brain Surgeon
in float64, inverting the Hessian of the columns not yet visited at every column (O(in^4)), with
no Cholesky trick and no lazy block updates. Tiny matrices only."""

from __future__ import annotations

import torch


def lowest_indices(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` lowest scores, ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (scores[j], j))
    return order[:count]


def score_prune_mask_reference(scores: torch.Tensor, count: int, nm=None) -> torch.Tensor:
    """bool [out, in]: per row the `count` lowest, or with nm=(N, M) per group all but N."""
    rows, cols = scores.shape
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        row = scores[r].tolist()
        if nm is None:
            for j in lowest_indices(row, count):
                prune[r, j] = True
        else:
            keep, group = nm
            for g in range(0, cols, group):
                for j in lowest_indices(row[g:g + group], group - keep):
                    prune[r, g + j] = True
    return prune


def sparsegpt_reference(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float,
                        nm=None, block_size: int = 128, damping: float = 0.01) -> torch.Tensor:
    """SparseGPT by the paper's definition, float64, returned in float64 (no cast, no rounding
    of zeros): for column c with the columns c.. still free, Hinv = (H[c:, c:])^-1; a weight
    w_rc is pruned by rank of w_rc^2 / Hinv[0, 0] over its block (unstructured) or its group of
    M (N:M), and pruning it adds -w_rc / Hinv[0, 0] * Hinv[0, :] to w_r[c:]."""
    w = weight.to(torch.float64, copy=True)
    h = hessian.to(torch.float64, copy=True)
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damping * h.diagonal().mean())

    def free_inverse(c):  # inverse Hessian of the columns c.. (the ones not yet frozen)
        return torch.linalg.inv(h[c:, c:])

    prune = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if nm is None:
            saliency = [[(w[r, c] ** 2 / free_inverse(c)[0, 0]).item() for c in range(i1, i2)]
                        for r in range(rows)]
            flat = [s for row in saliency for s in row]
            for k in lowest_indices(flat, round(sparsity * len(flat))):
                prune[k // (i2 - i1), i1 + k % (i2 - i1)] = True
        for c in range(i1, i2):
            hinv = free_inverse(c)
            if nm is not None and (c - i1) % nm[1] == 0:
                keep, group = nm
                for r in range(rows):
                    saliency = [(w[r, c + j] ** 2 / free_inverse(c + j)[0, 0]).item()
                                for j in range(group)]
                    for j in lowest_indices(saliency, group - keep):
                        prune[r, c + j] = True
            for r in range(rows):
                if prune[r, c]:
                    w[r, c:] -= w[r, c] / hinv[0, 0] * hinv[0, :]
                    w[r, c] = 0.0
    return w
