"""Choosing which weights to prune from their scores, by rank, and zeroing them.

Masks here are *prune* masks: True marks a weight that becomes zero. Selection is by rank, never
by a threshold alone: dequantized weights have many exact ties, and a threshold would prune too
many or too few. Ties are broken towards the lower index, as a stable sort would (reference.py
does exactly that, slowly).

On the CPU, scores are turned into integers that order as the scores do (a float's bit pattern,
negative ones flipped), and numpy's vectorised introselect (`np.partition`) finds each row's k-th
smallest; the few scores tied with it are then resolved by position. Working on rows in chunks
keeps every temporary in cache. Elsewhere (a CUDA tensor) a torch selection (kthvalue plus a
count of the tied scores) does the same; the two are compared in the tests."""

from __future__ import annotations

import numpy as np
import torch

# Rows are processed in chunks of about this many elements: the temporaries of a chunk stay in
# the CPU's cache, and memory does not grow with the matrix.
_CHUNK_ELEMENTS = 1 << 18
_TORCH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def pruned_count(sparsity: float, size: int) -> int:
    """How many of `size` weights a fraction `sparsity` prunes: round(sparsity * size), halves
    to even as Python's round."""
    return round(sparsity * size)


# -- selection ---------------------------------------------------------------------------------
def _use_numpy(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and (t.is_floating_point() or t.dtype in (
        torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))


def _order_keys(bits: np.ndarray) -> np.ndarray:
    """Integers in the order of the floats whose bit patterns are `bits` (a signed integer view).
    Bit patterns of non-negative floats order as the values; negative ones are flipped below
    them, and -0.0 lands on +0.0 (equal scores must tie). NaNs sort beyond +-inf."""
    sign = bits >> (8 * bits.itemsize - 1)  # 0, or -1 for negative values
    magnitude_bits = np.array(np.iinfo(bits.dtype).max, dtype=bits.dtype)
    return (bits ^ (sign & magnitude_bits)) - sign


def _numpy_scores(scores: torch.Tensor) -> np.ndarray:
    scores = scores.detach().contiguous()
    if scores.is_floating_point():
        scores = scores.view(_TORCH_INT[scores.element_size()])
    return scores.numpy()


def _lowest_rows(keys: np.ndarray, count: int) -> np.ndarray:
    """bool [R, L]: the `count` lowest of every row of integer `keys`, ties to the lower index.
    1 <= count <= L."""
    length = keys.shape[1]
    kth = np.partition(keys, count - 1, axis=1)[:, count - 1:count]
    prune = keys < kth
    allowed = count - np.add.reduce(prune.view(np.uint8), axis=1, dtype=np.int64)
    # Of the keys equal to the k-th (flat positions, row by row, in column order), prune the
    # first `allowed` of every row.
    tied = np.flatnonzero(keys == kth)
    rows = tied // length
    rank = np.arange(tied.size) - np.searchsorted(rows, rows)
    prune.reshape(-1)[tied[rank < allowed[rows]]] = True
    return prune


def _lowest_along_last_numpy(scores: torch.Tensor, count: int) -> torch.Tensor:
    length = scores.shape[-1]
    flat = _numpy_scores(scores).reshape(-1, length)
    keys = _order_keys if scores.is_floating_point() else (lambda ints: ints)
    out = np.empty(flat.shape, dtype=bool)
    step = max(1, _CHUNK_ELEMENTS // max(length, 1))
    for start in range(0, flat.shape[0], step):
        out[start:start + step] = _lowest_rows(keys(flat[start:start + step]), count)
    return torch.from_numpy(out).view(scores.shape)


def _lowest_along_last_torch(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The device-generic selection: kthvalue, then the first (count - below) tied scores."""
    kth = scores.kthvalue(count, dim=-1, keepdim=True).values
    below = scores < kth
    tied = scores == kth
    missing = count - below.sum(dim=-1, keepdim=True, dtype=torch.int32)
    return below | (tied & (tied.cumsum(dim=-1, dtype=torch.int32) <= missing))


def _lowest_along_last(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool, shape of `scores`: the `count` lowest of every last-dimension row, ties to the
    lower index. 1 <= count <= scores.shape[-1]."""
    if _use_numpy(scores):
        return _lowest_along_last_numpy(scores, count)
    return _lowest_along_last_torch(scores, count)


def lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool [out, in]: the `count` lowest scores of every row. Scores may be floats or integers
    (magnitude pruning passes the |w| bit patterns, which order as |w| does)."""
    rows, cols = scores.shape
    if count == 0 or rows == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if _use_numpy(scores):
        return _lowest_along_last_numpy(scores, count)
    chunk = max(1, _CHUNK_ELEMENTS // cols)
    return torch.cat([_lowest_along_last_torch(scores[start:start + chunk], count)
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


# -- zeroing -----------------------------------------------------------------------------------
def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Integers that order as |w| does: the bit patterns of float32/float16/bfloat16 weights
    with the sign cleared (exactly the order of |w| converted to float32, ties included).
    Other dtypes get |w| in float32."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float16, torch.bfloat16,
                                                          torch.float32):
        return weight.detach().abs().to(torch.float32)
    bits = _numpy_scores(weight)
    return torch.from_numpy(bits & np.array(np.iinfo(bits.dtype).max, dtype=bits.dtype))


def prune_smallest_magnitudes(weight: torch.Tensor, count: int) -> torch.Tensor:
    """apply_prune_mask(weight, lowest_per_row(magnitude_scores(weight), count)) in one pass
    over row chunks, with no whole-matrix temporaries: a CPU float32/float16/bfloat16 [out, in]
    weight, 0 <= count <= in."""
    bits = _numpy_scores(weight)
    rows, cols = bits.shape
    out = np.empty_like(bits)
    magnitude_bits = np.array(np.iinfo(bits.dtype).max, dtype=bits.dtype)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        part = bits[start:start + step]
        keys = part & magnitude_bits
        drop = keys == 0  # zeros, -0.0 included, become +0.0
        if count:
            drop |= _lowest_rows(keys, count)
        np.multiply(part, ~drop, out=out[start:start + step])
    return torch.from_numpy(out).view(weight.dtype)


def canonical_zeros(weight: torch.Tensor) -> torch.Tensor:
    """Every zero becomes +0.0. The Endor bitmap counts -0.0 as a non-zero (its bits are not all
    zero), so a -0.0 left by pruning or by an underflowing cast would waste a stored value."""
    return weight.masked_fill(weight == 0, 0)


def _apply_prune_mask_numpy(weight: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    bits = _numpy_scores(weight).reshape(-1)
    drop = prune.detach().contiguous().numpy().reshape(-1)
    out = np.empty_like(bits)
    magnitude_bits = np.array(np.iinfo(bits.dtype).max, dtype=bits.dtype)
    for start in range(0, bits.size, _CHUNK_ELEMENTS):
        part = bits[start:start + _CHUNK_ELEMENTS]
        keep = ~(drop[start:start + _CHUNK_ELEMENTS] | ((part & magnitude_bits) == 0))
        np.multiply(part, keep, out=out[start:start + _CHUNK_ELEMENTS])
    return torch.from_numpy(out).view(weight.dtype).view(weight.shape)


def apply_prune_mask(weight: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """A new tensor: `weight` with the masked positions (and any existing -0.0) set to +0.0."""
    if weight.device.type == "cpu" and prune.device.type == "cpu" and \
            prune.shape == weight.shape and weight.dtype in (torch.float16, torch.bfloat16,
                                                             torch.float32, torch.float64):
        return _apply_prune_mask_numpy(weight, prune)
    return canonical_zeros(weight.masked_fill(prune, 0))
