import pytest
import torch

from endor.prune import CalibrationStats
from tests.prune.inputs import correlated_inputs


def exact_stats(x: torch.Tensor):
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return rows.square().sum(dim=0), 2 / rows.shape[0] * rows.T @ rows


def test_batched_updates_equal_one_shot():
    x = correlated_inputs(300, 24, seed=1)
    once = CalibrationStats(24, hessian=True)
    once.update(x)
    batched = CalibrationStats(24, hessian=True)
    for part in x.split([1, 7, 100, 0, 192]):
        batched.update(part)
    assert once.nsamples == batched.nsamples == 300
    col, hessian = exact_stats(x)
    for stats in (once, batched):
        assert stats.col_sq_norm.dtype == stats.hessian.dtype == torch.float32
        torch.testing.assert_close(stats.col_sq_norm.double(), col, rtol=1e-5, atol=0)
        torch.testing.assert_close(stats.hessian.double(), hessian, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(once.col_norm.double(), col.sqrt(), rtol=1e-5, atol=0)


def test_leading_dimensions_are_samples():
    x = correlated_inputs(2 * 5 * 3, 8, seed=2).view(2, 5, 3, 8)
    stats = CalibrationStats(8, hessian=True)
    stats.update(x)
    assert stats.nsamples == 30
    col, hessian = exact_stats(x)
    torch.testing.assert_close(stats.col_sq_norm.double(), col, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.hessian.double(), hessian, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    # 4000 values of 1.0: a float16/bfloat16 running sum would stall at 2048/256.
    x = torch.ones(4000, 3, dtype=dtype)
    stats = CalibrationStats(3, hessian=True)
    for part in x.split(1000):
        stats.update(part)
    assert torch.equal(stats.col_sq_norm, torch.full((3,), 4000.0))
    assert torch.equal(stats.hessian, torch.full((3, 3), 2.0))


def test_without_hessian_keeps_no_matrix():
    stats = CalibrationStats(1000, hessian=False)
    stats.update(torch.ones(2, 1000))
    assert stats._gram is None and stats.nsamples == 2
    with pytest.raises(ValueError, match="hessian=True"):
        stats.hessian


def test_empty_statistics():
    stats = CalibrationStats(4, hessian=True)
    stats.update(torch.zeros(0, 4))
    assert stats.nsamples == 0
    assert torch.equal(stats.hessian, torch.zeros(4, 4))


@pytest.mark.parametrize("in_features", [0, -3, 2.0, True, "8"])
def test_bad_in_features(in_features):
    with pytest.raises(ValueError, match="in_features"):
        CalibrationStats(in_features, hessian=False)


def test_bad_updates():
    stats = CalibrationStats(4, hessian=True)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        stats.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        stats.update(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating point"):
        stats.update(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        stats.update([[0.0] * 4])
    with pytest.raises(ValueError, match="NaN or infinity"):
        stats.update(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))
    assert stats.nsamples == 0  # a rejected batch leaves no trace
