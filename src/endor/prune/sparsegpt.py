"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with Optimal Brain Surgeon updates.

Columns are visited left to right. Pruning a weight moves its contribution onto the columns not
yet visited, through the upper Cholesky factor U of H^-1 (H = 2/n X^T X): row j of U is the OBS
update direction for column j once the columns before it are frozen, and U_jj^2 its saliency
denominator. Updates are applied eagerly inside a block of 128 columns and lazily, with one
matmul, to the columns after it. Same structure as the authors' reference implementation."""

from __future__ import annotations

import warnings

import torch

from .masks import canonical_zeros, lowest_in_block, lowest_per_group, pruned_count

BLOCK_SIZE = 128
DAMPING = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
_DAMPING_RETRIES = 4  # each retry multiplies the dampening by 10


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Handle dead inputs as the reference does: an input that was always zero (H_jj = 0) gets
    H_jj = 1 and its weights are zeroed in place (they never contributed to the output).
    Returns a float32 copy of the Hessian on the weight's device."""
    h = hessian.to(weight.device, torch.float32, copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    weight[:, dead] = 0
    return h


def inverse_hessian_factor(hessian: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping * mean(diag H) * I)^-1, so that U^T U = H^-1.
    Retries with 10x the dampening (and a warning) when a factorization fails. Dampens
    `hessian` in place (it is prepare_hessian's private copy: no in^2 copy more)."""
    diagonal = hessian.diagonal()
    mean_diag = diagonal.mean()
    added = 0.0
    for attempt in range(_DAMPING_RETRIES):
        fraction = damping * 10 ** attempt
        diagonal.add_((fraction - added) * mean_diag)
        added = fraction
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                if attempt:
                    warnings.warn(f"SparseGPT: the calibration Hessian is not positive definite "
                                  f"with dampening {damping:g} of its mean diagonal; used "
                                  f"{fraction:g} instead (more calibration tokens help)",
                                  RuntimeWarning, stacklevel=4)  # the caller of prune_weight
                return upper
    raise ValueError(f"SparseGPT: the calibration Hessian is not positive definite even with "
                     f"dampening {fraction:g} of its mean diagonal; collect more calibration "
                     "tokens for this layer")


def block_size_for(nm) -> int:
    """128 columns, rounded down to a multiple of M so that no N:M group straddles blocks."""
    if nm is None:
        return BLOCK_SIZE
    group = nm[1]
    return max(group, BLOCK_SIZE - BLOCK_SIZE % group)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float, nm=None,
                    block_size: int | None = None, damping: float = DAMPING) -> torch.Tensor:
    """Prune `weight` [out, in] given H [in, in]; returns a new tensor of weight's dtype.

    Without nm, each block prunes round(sparsity * out * block_columns) weights, the lowest by
    w^2 / U_jj^2 over the whole block (rows get different sparsities, the block gets the
    target). With nm=(N, M) every M columns keep the N highest of that score per row, chosen as
    the loop reaches them (so from weights already updated by the columns before).

    Computes in float32. Pruned positions are exactly +0.0 after the cast back; a kept weight
    that underflows to zero in that cast becomes +0.0 as well (it is a zero to the bitmap
    format), so the result can be marginally sparser than asked."""
    w = weight.detach().to(torch.float32, copy=True)
    rows, cols = w.shape
    h = prepare_hessian(hessian, w)
    u = inverse_hessian_factor(h, damping)
    del h
    step = block_size or block_size_for(nm)
    assert nm is None or step % nm[1] == 0, (step, nm)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        block = w[:, i1:i2].clone()
        u_block = u[i1:i2, i1:i2]
        diag = u_block.diagonal()
        if nm is None:
            prune = lowest_in_block(block.square() / diag.square(),
                                    pruned_count(sparsity, block.numel()))
        else:
            prune = torch.zeros_like(block, dtype=torch.bool)
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                prune[:, group] = lowest_per_group(
                    block[:, group].square() / diag[group].square(), *nm)
            column = block[:, i]
            kept = column.masked_fill(prune[:, i], 0)
            error = (column - kept) / diag[i]
            # Column i itself would become kept up to rounding: store kept exactly.
            block[:, i + 1:].addr_(error, u_block[i, i + 1:], alpha=-1)
            block[:, i] = kept
            errors[:, i] = error
        w[:, i1:i2] = block
        w[:, i2:].addmm_(errors, u[i1:i2, i2:], alpha=-1)
    out = canonical_zeros(w.to(weight.dtype))
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"SparseGPT produced non-finite weights in {weight.dtype} (the "
                         "compensating updates overflowed); collect more calibration tokens or "
                         "prune this layer with wanda")
    return out
