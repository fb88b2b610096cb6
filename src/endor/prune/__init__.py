"""Pruning to unstructured or N:M sparsity: magnitude, Wanda, SparseGPT.

    stats = CalibrationStats(in_features, hessian=needs_hessian(method))
    for x in layer_inputs: stats.update(x)
    pruned = prune_weight(weight, method=method, sparsity=0.5, stats=stats)

The result has the weight's shape and dtype; pruned positions (and any other zero) are exactly
+0.0, the only zero the Endor bitmap format treats as zero.

N:M: when `nm=(N, M)` is given, every M consecutive input weights of a row keep at most N
non-zeros and the `sparsity` argument is ignored (the sparsity is 1 - N/M; it is still checked
to be a valid fraction). `in_features` must be a multiple of M."""

from __future__ import annotations

import math

import numpy as np
import torch

from .magnitude import magnitude_prune
from .nm import check_divisible, check_nm, nm_sparsity, parse_nm
from .sparsegpt import DAMPING, sparsegpt_prune
from .stats import CalibrationStats
from .wanda import wanda_prune

METHODS = ("none", "magnitude", "wanda", "sparsegpt")
_CALIBRATED = ("wanda", "sparsegpt")
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["DAMPING", "METHODS", "CalibrationStats", "check_damping", "check_settings",
           "check_sparsity", "needs_calibration",
           "needs_hessian", "nm_sparsity", "parse_nm", "prune_weight"]


def _check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")


def needs_calibration(method: str) -> bool:
    """Whether `method` needs CalibrationStats (activations from calibration text)."""
    _check_method(method)
    return method in _CALIBRATED


def needs_hessian(method: str) -> bool:
    """Whether `method` needs CalibrationStats(..., hessian=True)."""
    _check_method(method)
    return method == "sparsegpt"


def check_damping(damping) -> float:
    """SparseGPT's dampening (None: DAMPING), a finite number in (0, 100]."""
    if damping is None:
        return DAMPING
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) \
            or not 0 < damping <= 100:  # NaN fails both comparisons
        raise ValueError(f"damping must be a number in (0, 100] (a fraction of the mean "
                         f"Hessian diagonal), got {damping!r}")
    return float(damping)


def check_sparsity(sparsity) -> float:
    """`sparsity` as a float in [0, 1), else a ValueError saying what it must be."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not (math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), "
                         f"got {sparsity!r}")
    return float(sparsity)


def check_settings(method, sparsity, nm=None) -> tuple[str, float, tuple[int, int] | None]:
    """The pruning settings, checked in one place for every caller (prune_weight, convert(), the
    CLI's argument types): (method, sparsity as a float, nm as an (N, M) tuple or None)."""
    _check_method(method)
    sparsity = check_sparsity(sparsity)
    nm = None if nm is None else check_nm(nm)
    if method == "none" and nm is not None:
        raise ValueError(f"nm={nm} asks for N:M sparsity but method is 'none'; choose a pruning "
                         f"method: {', '.join(METHODS[1:])}")
    return method, sparsity, nm


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"prune_weight takes a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"prune_weight takes a floating-point weight (float32, float16, "
                        f"bfloat16), got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"prune_weight takes a 2-D weight [out_features, in_features], got "
                         f"shape {list(weight.shape)}")
    if not _all_finite(weight):
        raise ValueError("the weight contains NaN or infinity; it cannot be ranked for pruning")


# A float is NaN or infinite exactly when its exponent bits are all ones. Testing the bits with
# numpy is ~20x faster than torch.isfinite on CPU fp16/bf16, and conversion calls this per weight.
_EXPONENT_BITS = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
                  torch.float32: (torch.int32, 0x7F800000)}


def _all_finite(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dtype not in _EXPONENT_BITS:
        return bool(torch.isfinite(weight).all())
    int_dtype, exponent = _EXPONENT_BITS[weight.dtype]
    bits = weight.detach().contiguous().view(int_dtype).numpy()
    return not bool(np.any((bits & exponent) == exponent))


def _check_stats(stats, method: str, in_features: int) -> None:
    hint = f"CalibrationStats({in_features}, hessian={method == 'sparsegpt'})"
    if stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics: pass stats={hint} "
                         "updated with the layer's inputs")
    if not isinstance(stats, CalibrationStats):
        raise TypeError(f"stats must be a CalibrationStats, got {type(stats).__name__}")
    if stats.in_features != in_features:
        raise ValueError(f"shape mismatch: the weight has {in_features} input features but the "
                         f"calibration statistics have {stats.in_features}")
    if stats.nsamples == 0:
        raise ValueError(f"method {method!r}: the calibration statistics hold no samples; call "
                         "stats.update(x) with the layer's inputs first")
    if method == "sparsegpt" and not stats.with_hessian:
        raise ValueError(f"method 'sparsegpt' needs the Hessian: collect the statistics with "
                         f"{hint}")


def prune_weight(weight: torch.Tensor, *, method: str, sparsity: float,
                 nm: tuple[int, int] | None = None,
                 stats: CalibrationStats | None = None,
                 quantize: tuple[int, int] | None = None, damping: float | None = None):
    """Prune a Linear weight [out_features, in_features] with `method` (one of METHODS).

    Returns a new tensor of the same shape and dtype, except for method "none", which returns
    `weight` itself. Magnitude and Wanda prune exactly round(sparsity * in_features) weights of
    every row, chosen by rank (plus any weights already zero beyond that count); SparseGPT
    prunes that fraction of every block of 128 columns and updates the rest. `stats` is needed
    by wanda and sparsegpt (see needs_calibration / needs_hessian) and ignored otherwise.
    SparseGPT computes in float32; a kept weight that underflows to zero when cast back to the
    weight's dtype becomes +0.0 too (the result may be marginally sparser than asked).

    quantize=(bits, group_size), sparsegpt only: joint pruning and int`bits` quantization
    (see sparsegpt_prune); returns (weight, scales, relative rounding error). `damping`,
    sparsegpt only: the fraction of the mean Hessian diagonal added to it (default DAMPING)."""
    method, sparsity, nm = check_settings(method, sparsity, nm)
    if quantize is not None and method != "sparsegpt":
        raise ValueError(f"joint quantization is SparseGPT's (quantize=... with method "
                         f"'sparsegpt'); method {method!r} prunes, then endor.compress rounds")
    if method == "none":
        return weight
    _check_weight(weight)
    in_features = weight.shape[1]
    if nm is not None:
        check_divisible(in_features, nm)
    if method in _CALIBRATED:
        _check_stats(stats, method, in_features)
    if method == "magnitude":
        return magnitude_prune(weight, sparsity=sparsity, nm=nm)
    if method == "wanda":
        return wanda_prune(weight, stats, sparsity=sparsity, nm=nm)
    return sparsegpt_prune(weight, stats.hessian, sparsity=sparsity, nm=nm, quantize=quantize,
                           damping=check_damping(damping))
