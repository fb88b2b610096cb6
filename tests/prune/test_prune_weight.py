"""The public API of endor.prune: dispatch and argument checking."""

import pytest
import torch

from endor.prune import (METHODS, CalibrationStats, needs_calibration, needs_hessian,
                         prune_weight)
from tests.prune.inputs import random_weight


def stats_for(in_features, hessian=True, samples=16):
    stats = CalibrationStats(in_features, hessian=hessian)
    if samples:
        stats.update(torch.randn(samples, in_features))
    return stats


def test_methods_and_their_needs():
    assert METHODS == ("none", "magnitude", "wanda", "sparsegpt")
    assert [needs_calibration(m) for m in METHODS] == [False, False, True, True]
    assert [needs_hessian(m) for m in METHODS] == [False, False, False, True]
    for ask in (needs_calibration, needs_hessian):
        with pytest.raises(ValueError, match="unknown pruning method 'obs'"):
            ask("obs")


def test_none_returns_the_weight_itself():
    weight = random_weight((4, 8))
    assert prune_weight(weight, method="none", sparsity=0.5) is weight
    with pytest.raises(ValueError, match="method is 'none'"):
        prune_weight(weight, method="none", sparsity=0.5, nm=(2, 4))


@pytest.mark.parametrize("method", METHODS[1:])
def test_n_m_overrides_sparsity(method):
    weight = random_weight((8, 16))
    pruned = prune_weight(weight, method=method, sparsity=0.1, nm=(1, 4), stats=stats_for(16))
    assert int((pruned == 0).sum()) == 8 * 12


def test_magnitude_ignores_stats():
    weight = random_weight((8, 16))
    with_stats = prune_weight(weight, method="magnitude", sparsity=0.5, stats=stats_for(3))
    assert torch.equal(with_stats, prune_weight(weight, method="magnitude", sparsity=0.5))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", None,
                                      True])
def test_sparsity_outside_zero_one(method, sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        prune_weight(random_weight((4, 8)), method=method, sparsity=sparsity,
                     stats=stats_for(8))


@pytest.mark.parametrize("method", METHODS[1:])
@pytest.mark.parametrize("nm", [(0, 4), (5, 4), (2,), (2.0, 4), 4])
def test_malformed_n_m(method, nm):
    with pytest.raises(ValueError, match="nm"):
        prune_weight(random_weight((4, 8)), method=method, sparsity=0.5, nm=nm,
                     stats=stats_for(8))


@pytest.mark.parametrize("method", METHODS[1:])
def test_n_m_needs_divisible_in_features(method):
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_weight(random_weight((4, 10)), method=method, sparsity=0.5, nm=(2, 4),
                     stats=stats_for(10))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_need_matching_stats(method):
    weight = random_weight((4, 8))
    with pytest.raises(ValueError, match="needs calibration statistics"):
        prune_weight(weight, method=method, sparsity=0.5)
    with pytest.raises(ValueError, match="shape mismatch.*8 input features.*have 9"):
        prune_weight(weight, method=method, sparsity=0.5, stats=stats_for(9))
    with pytest.raises(ValueError, match="hold no samples"):
        prune_weight(weight, method=method, sparsity=0.5, stats=stats_for(8, samples=0))
    with pytest.raises(TypeError, match="CalibrationStats"):
        prune_weight(weight, method=method, sparsity=0.5, stats=torch.ones(8))


def test_sparsegpt_needs_the_hessian():
    with pytest.raises(ValueError, match="hessian=True"):
        prune_weight(random_weight((4, 8)), method="sparsegpt", sparsity=0.5,
                     stats=stats_for(8, hessian=False))


def test_wanda_does_not_need_the_hessian():
    pruned = prune_weight(random_weight((4, 8)), method="wanda", sparsity=0.5,
                          stats=stats_for(8, hessian=False))
    assert int((pruned == 0).sum()) == 16


@pytest.mark.parametrize("method", METHODS[1:])
def test_bad_weights(method):
    stats = stats_for(8)
    with pytest.raises(ValueError, match="2-D weight"):
        prune_weight(torch.ones(8), method=method, sparsity=0.5, stats=stats)
    with pytest.raises(ValueError, match="2-D weight"):
        prune_weight(torch.ones(2, 4, 8), method=method, sparsity=0.5, stats=stats)
    with pytest.raises(TypeError, match="floating-point"):
        prune_weight(torch.ones(4, 8, dtype=torch.int8), method=method, sparsity=0.5,
                     stats=stats)
    with pytest.raises(TypeError, match="torch.Tensor"):
        prune_weight([[1.0] * 8], method=method, sparsity=0.5, stats=stats)
    with pytest.raises(ValueError, match="NaN or infinity"):
        prune_weight(torch.full((4, 8), float("nan")), method=method, sparsity=0.5,
                     stats=stats)


def test_unknown_method():
    with pytest.raises(ValueError, match="choose one of none, magnitude, wanda, sparsegpt"):
        prune_weight(random_weight((4, 8)), method="Magnitude", sparsity=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected_in_every_dtype(dtype, bad):
    from endor.prune import _all_finite
    w = torch.randn(7, 13).to(dtype)
    assert _all_finite(w) == bool(torch.isfinite(w).all())
    w[3, 5] = bad
    assert not _all_finite(w)
    with pytest.raises(ValueError, match="NaN or infinity"):
        prune_weight(w, method="magnitude", sparsity=0.5)
