"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with Optimal Brain Surgeon updates.

Columns are visited left to right. Pruning a weight moves its contribution onto the columns not
yet visited, through the upper Cholesky factor U of H^-1 (H = 2/n X^T X): row j of U is the OBS
update direction for column j once the columns before it are frozen, and U_jj^2 its saliency
denominator. The mask is chosen per block of 128 columns; updates are applied column by column
inside a sub-block of 16 and lazily, with one matmul, to the columns after it (a sub-block, then
a block). Same algorithm as the authors' reference implementation, and checked against a plain
OBS loop in reference.py."""

from __future__ import annotations

import warnings

import torch

from ..format.codecs.quant import dequantize, groups_per_row, mse_scales
from .masks import canonical_zeros, lowest_in_block, lowest_per_group, pruned_count

BLOCK_SIZE = 128
SUB_BLOCK_SIZE = 16
# Fraction of the mean Hessian diagonal added to the diagonal. The paper's 1% fits our small
# calibration set (32 x 256 tokens of Python documentation) too closely: on the evaluation text
# the layer output error of pruning, and more so of joint int4 rounding, is then often above
# Wanda's and round-to-nearest's; 10% is lower on both texts for most Linears
# (scripts/prune-layer-errors.py, docs/benchmarks/quality-quant/). Calibrated on text like the
# evaluated text, 1% is the better one (quality-quant/validation/): `--damping`.
DAMPING = 0.1
_DAMPING_RETRIES = 4  # each retry multiplies the dampening by 10
# Joint passes after the first, each with its groups' scales refit to the weights the pass
# before it rounded (JointGrid.seen). SmolLM2 int4 joint on the article's validation part, 1%
# dampening: 50% (raw 35.22) 40.03 with the first pass's scales, 38.36 after one refit, 41.56
# after two; 2:4 (raw 55.55) 57.47, 55.88 after one (docs/benchmarks/quality-quant/validation/).
REFITS = 1


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
                                  RuntimeWarning, stacklevel=5)  # the caller of prune_weight
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


def sub_block_size_for(nm) -> int:
    """About 16 columns, a multiple of M: an N:M group must see every earlier update."""
    group = 1 if nm is None else nm[1]
    return group * max(1, SUB_BLOCK_SIZE // group)


class JointGrid:
    """SparseGPT's joint quantization (as GPTQ): each kept weight is rounded onto the int`bits`
    grid of its group of `group_size` columns as the loop reaches its column, and the rounding
    error is compensated on the columns after it exactly as a pruned weight's is.

    The scales (symmetric, in the weight's dtype) come from a first SparseGPT pass without
    quantization: GPTQ's rule, a group's scale chosen from the current weights when the loop
    reaches its first column, clamps too often here, because pruning's compensating updates
    (far larger than rounding's) grow the group's later weights past it. Each group's scale is
    the one of absmax/qmax x (1 ... 0.4) with the least squared rounding error on those weights
    (format.codecs.quant.mse_scales). A joint pass moves the weights it has yet to round, so
    sparsegpt_prune refits the scales to `seen` (each weight as this grid rounded it, before
    rounding) and runs the pass again. `columns` (act-order) maps the loop's column positions
    to the weight's columns, whose groups the scales belong to."""

    def __init__(self, scales: torch.Tensor, bits: int, group_size: int, columns: torch.Tensor):
        self.scales, self.group_size, self.dtype = scales, group_size, scales.dtype
        self.qmax = (1 << (bits - 1)) - 1
        positions = columns.cpu()
        self.columns = positions.tolist()  # the weight column of each loop position
        self.groups = (positions // group_size).tolist()  # the scale column of each position
        self.error_sq = self.kept_sq = 0.0  # the rounding steps' squared error and weights
        # [out, in] float32, in the weight's column order
        self.seen = torch.zeros(scales.shape[0], len(self.columns), device=scales.device)

    @classmethod
    def from_weights(cls, w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype,
                     columns: torch.Tensor | None = None):
        rows, cols = w.shape
        per_row = groups_per_row(cols, group_size)
        padded = torch.nn.functional.pad(w.to(torch.float32), (0, per_row * group_size - cols))
        scales = mse_scales(padded.view(rows, per_row, group_size), (1 << (bits - 1)) - 1,
                            dtype)
        return cls(scales, bits, group_size, torch.arange(cols) if columns is None else columns)

    @property
    def relative_error(self) -> float:
        """sqrt(sum (kept - rounded)^2 / sum kept^2) over every rounding step: the same measure
        as round-to-nearest's error on the kept weights (convert records both)."""
        return (self.error_sq / self.kept_sq) ** 0.5 if self.kept_sq else 0.0

    def round(self, column: int, kept: torch.Tensor) -> torch.Tensor:
        """The loop's column `column` with its pruned weights zeroed -> on the grid, as the
        float32 values the decoder will return."""
        self.seen[:, self.columns[column]] = kept
        group = self.groups[column]
        scale = self.scales[:, group].to(torch.float32)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.where(scale == 0, 0.0, torch.round(kept / safe)).clamp_(-self.qmax - 1,
                                                                            self.qmax)
        rounded = dequantize(q, self.scales[:, group], self.dtype).to(torch.float32)
        self.error_sq += float((kept - rounded).square().sum())
        self.kept_sq += float(kept.square().sum())
        return rounded


def act_order(hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: columns by decreasing Hessian diagonal (the inputs with the most
    energy first, while many columns remain to absorb their rounding error). Returns the
    permutation (int64 [in], on the Hessian's device); ties keep column order."""
    return torch.argsort(hessian.diagonal().to(torch.float32), descending=True, stable=True)


def prune_block(block: torch.Tensor, u_block: torch.Tensor, prune: torch.Tensor,
                nm, grid: JointGrid | None = None, first_column: int = 0) -> torch.Tensor:
    """OBS over one block of columns, in place: prune (and, with nm, choose) column by column,
    each error updating the columns after it. Returns the errors (pruned weight / U_jj), whose
    product with U gives the update of the columns after the block.

    The updates inside the block are themselves deferred by sub-blocks of ~16 columns: one
    rank-1 update per column within its sub-block, one matmul per sub-block for the rest. The
    same arithmetic as updating every later column at once, with far fewer passes over memory
    and few enough small parallel regions not to stall on a busy machine."""
    width = block.shape[1]
    diag = u_block.diagonal()
    errors = torch.zeros_like(block)
    step = sub_block_size_for(nm)
    for j1 in range(0, width, step):
        j2 = min(j1 + step, width)
        for i in range(j1, j2):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                prune[:, group] = lowest_per_group(
                    block[:, group].square() / diag[group].square(), *nm)
            column = block[:, i]
            kept = column.masked_fill(prune[:, i], 0)
            if grid is not None:
                kept = grid.round(first_column + i, kept)
            error = (column - kept) / diag[i]
            # Column i itself would become `kept` up to rounding: store `kept` exactly.
            block[:, i + 1:j2].addr_(error, u_block[i, i + 1:j2], alpha=-1)
            block[:, i] = kept
            errors[:, i] = error
        block[:, j2:].addmm_(errors[:, j1:j2], u_block[j1:j2, j2:], alpha=-1)
    return errors


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float, nm=None,
                    block_size: int | None = None, damping: float = DAMPING,
                    quantize: tuple[int, int] | None = None):
    """Prune `weight` [out, in] given H [in, in]; returns a new tensor of weight's dtype.

    Without nm, each block prunes round(sparsity * out * block_columns) weights, the lowest by
    w^2 / U_jj^2 over the whole block (rows get different sparsities, the block gets the
    target). With nm=(N, M) every M columns keep the N highest of that score per row, chosen as
    the loop reaches them (so from weights already updated by the columns before).

    Computes in float32. Pruned positions are exactly +0.0 after the cast back; a kept weight
    that underflows to zero in that cast becomes +0.0 as well (it is a zero to the bitmap
    format), so the result can be marginally sparser than asked.

    quantize=(bits, group_size): joint pruning and quantization (JointGrid): the mask of a raw
    pass in column order, held fixed while int8 rounds in column order and int4 in act-order
    (act_order); returns
    (weight on the grid, scales [out, ceil(in / group_size)] in weight's dtype, the relative
    error of the rounding steps), ready
    for endor.compress(weight, values=f"int{bits}", group_size=group_size, scales=scales). A
    kept weight that rounds to 0 is pruned too."""
    options = {"sparsity": sparsity, "nm": nm, "block_size": block_size, "damping": damping}
    if quantize is None:
        return _sparsegpt(weight, hessian, grid=None, **options)
    # The mask is that of a raw pass in column order, held fixed while the joint passes round,
    # its pruned weights compensated like rounding errors. Chosen in act-order instead, the
    # unstructured mask loses half the weights of the inputs with the most energy (each block
    # of 128 columns in loop order loses the same fraction: SmolLM2 50% int8 joint 85.1 against
    # 77.5, raw 75.8), and the 2:4 mask changes with the model (quality-quant, article
    # calibration, 2:4 int8 joint over raw: SmolLM2 0.93, Gemma-3 1.04; int4 joint: 1.00,
    # 1.35). A fixed mask makes the joint rows the raw model's weights, rounded and
    # compensated. int8 rounds in column order (its pass is then the raw pass plus rounding
    # errors, with no in x in permuted copies), int4 in act-order (SmolLM2 50% int4 joint,
    # Python-docs calibration: 97.5, against 120.9 in column order).
    rounded = _sparsegpt(weight, hessian, grid=None, **options)  # what the first pass rounds
    mask = rounded == 0
    fixed = {**options, "nm": None}  # the mask fixed, nothing is chosen per N:M group
    if quantize[0] > 4:
        w, h, order, unpermute = weight, hessian, None, slice(None)
    else:
        order = act_order(hessian)
        order_dev = order.to(weight.device)
        w, h = weight[:, order_dev], hessian[order][:, order]
        mask, unpermute = mask[:, order_dev], torch.argsort(order_dev)
    for _ in range(1 + REFITS):
        grid = JointGrid.from_weights(rounded, *quantize, weight.dtype, columns=order)
        out = _sparsegpt(w, h, grid=grid, mask=mask, **fixed)[:, unpermute]
        rounded = grid.seen
    return out, grid.scales, grid.relative_error


def _sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float, nm,
               block_size: int | None, damping: float, grid: JointGrid | None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """One SparseGPT pass over the columns in their order, rounding onto `grid` if given;
    `mask` (unstructured only: True = pruned) fixes which weights go instead of choosing them."""
    w = weight.detach().to(torch.float32, copy=True)
    cols = w.shape[1]
    h = prepare_hessian(hessian, w)
    u = inverse_hessian_factor(h, damping)
    del h
    step = block_size or block_size_for(nm)
    assert nm is None or step % nm[1] == 0, (step, nm)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        block = w[:, i1:i2].clone()
        u_block = u[i1:i2, i1:i2]
        if mask is not None:
            prune = mask[:, i1:i2].clone()
        elif nm is None:
            scores = block.square() / u_block.diagonal().square()
            prune = lowest_in_block(scores, pruned_count(sparsity, block.numel()))
        else:
            prune = torch.zeros_like(block, dtype=torch.bool)
        errors = prune_block(block, u_block, prune, nm, grid, i1)
        w[:, i1:i2] = block
        w[:, i2:].addmm_(errors, u[i1:i2, i2:], alpha=-1)
    out = canonical_zeros(w.to(weight.dtype))
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"SparseGPT produced non-finite weights in {weight.dtype} (the "
                         "compensating updates overflowed); collect more calibration tokens or "
                         "prune this layer with wanda")
    return out
