import pytest
import torch

from endor.prune import CalibrationStats, prune_weight
from endor.prune.reference import sparsegpt_reference
from endor.prune.sparsegpt import DAMPING, block_size_for, sparsegpt_prune, sub_block_size_for
from tests.helpers import DTYPES, INT_VIEW
from tests.prune.inputs import correlated_inputs, random_weight


def stats_of(x: torch.Tensor) -> CalibrationStats:
    stats = CalibrationStats(x.shape[-1], hessian=True)
    stats.update(x)
    return stats


def output_error(weight, pruned, x) -> float:
    return float(((weight.double() - pruned.double()) @ x.double().T).square().sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_lower_reconstruction_error_than_magnitude_and_wanda(nm):
    weight = random_weight((64, 256), seed=1)
    x = correlated_inputs(2048, 256, seed=2)
    stats = stats_of(x)
    errors = {method: output_error(weight, prune_weight(weight, method=method, sparsity=0.5,
                                                        nm=nm, stats=stats), x)
              for method in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < 0.5 * min(errors["magnitude"], errors["wanda"]), errors


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_sparsity_is_on_target(sparsity):
    weight = random_weight((48, 300), seed=3)  # blocks of 128, 128, 44 columns
    pruned = prune_weight(weight, method="sparsegpt", sparsity=sparsity,
                          stats=stats_of(correlated_inputs(400, 300, seed=4)))
    assert abs(float((pruned == 0).double().mean()) - sparsity) <= 0.005


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 130)])
def test_dtype_shape_and_positive_zeros(dtype, shape):
    weight = random_weight(shape, dtype, seed=5)
    pruned = prune_weight(weight, method="sparsegpt", sparsity=0.5,
                          stats=stats_of(correlated_inputs(64, shape[1], seed=6)))
    assert pruned.shape == weight.shape and pruned.dtype == dtype
    ints = pruned.view(INT_VIEW[dtype])
    assert not bool((ints == torch.tensor(-0.0, dtype=dtype).view(INT_VIEW[dtype])).any())
    assert bool(torch.isfinite(pruned).all())
    if shape[1] > 1:
        assert int((pruned == 0).sum()) == round(0.5 * pruned.numel())


def test_underflow_to_zero_in_the_cast_gives_positive_zero():
    # float16 subnormal weights: the float32 updates push some kept ones below half the smallest
    # subnormal, and the cast rounds them to +-0.0.
    g = torch.Generator().manual_seed(7)
    weight = (torch.randint(-3, 4, (64, 64), generator=g) * 6e-8).to(torch.float16)
    weight[weight == 0] = 6e-8
    pruned = prune_weight(weight, method="sparsegpt", sparsity=0.5,
                          stats=stats_of(correlated_inputs(256, 64, seed=8)))
    assert int((pruned == 0).sum()) > 0.5 * pruned.numel()  # some kept weights underflowed
    assert bool((pruned.view(torch.int16)[pruned == 0] == 0).all())


@pytest.mark.parametrize("nm, block_size", [(None, 8), (None, 32), ((2, 4), 8), ((2, 4), 32),
                                            ((1, 4), 32), ((2, 3), 27)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_matches_the_obs_reference(nm, block_size, sparsity):
    # Blocks of 32 hold two sub-blocks of 16; blocks of 27 with 2:3, sub-blocks of 15 and 12.
    weight = random_weight((6, 48), seed=9)
    x = correlated_inputs(100, 48, seed=10)
    x[:, 5] = 0  # a dead input
    hessian = stats_of(x).hessian
    fast = sparsegpt_prune(weight, hessian, sparsity=sparsity, nm=nm, block_size=block_size)
    slow = sparsegpt_reference(weight, hessian, sparsity=sparsity, nm=nm,
                               block_size=block_size, damping=DAMPING)
    assert torch.equal(fast == 0, slow == 0)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-5)
    assert bool((fast[:, 5] == 0).all())


def test_sub_blocks_are_whole_n_m_groups():
    assert sub_block_size_for(None) == 16
    assert sub_block_size_for((2, 4)) == 16
    assert sub_block_size_for((2, 3)) == 15
    assert sub_block_size_for((1, 32)) == 32


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
def test_n_m_structure(nm):
    keep, group = nm
    weight = random_weight((16, 320), torch.bfloat16, seed=11)  # 128 + 128 + 64 columns
    pruned = prune_weight(weight, method="sparsegpt", sparsity=0.1, nm=nm,
                          stats=stats_of(correlated_inputs(500, 320, seed=12)))
    nonzeros = (pruned != 0).view(16, 320 // group, group).sum(dim=2)
    assert int(nonzeros.max()) <= keep
    assert float((pruned == 0).double().mean()) == pytest.approx(1 - keep / group, abs=0.005)


def test_block_size_is_a_multiple_of_m():
    assert block_size_for(None) == 128
    assert block_size_for((2, 4)) == 128
    assert block_size_for((2, 3)) == 126
    assert block_size_for((1, 200)) == 200


def test_dead_inputs_are_zeroed_without_error():
    weight = random_weight((8, 32), seed=13)
    x = correlated_inputs(64, 32, seed=14)
    x[:, [0, 31]] = 0
    pruned = prune_weight(weight, method="sparsegpt", sparsity=0.5, stats=stats_of(x))
    assert bool((pruned[:, [0, 31]] == 0).all())
    assert bool(torch.isfinite(pruned).all())


def test_indefinite_hessian_retries_with_more_dampening():
    hessian = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))  # 10% dampening is not enough
    with pytest.warns(RuntimeWarning, match="used 1 instead"):
        pruned = sparsegpt_prune(torch.ones(2, 4), hessian, sparsity=0.5)
    assert int((pruned == 0).sum()) == 4


def test_hopeless_hessian_is_rejected():
    hessian = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1e4]))
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_prune(torch.ones(2, 4), hessian, sparsity=0.5)


def test_input_is_not_modified():
    weight = random_weight((7, 13), torch.float16)
    before = weight.clone()
    x = correlated_inputs(30, 13)
    x[:, 2] = 0
    prune_weight(weight, method="sparsegpt", sparsity=0.5, stats=stats_of(x))
    assert torch.equal(weight, before)


def test_empty_rows():
    pruned = prune_weight(torch.zeros(0, 16), method="sparsegpt", sparsity=0.5,
                          stats=stats_of(correlated_inputs(20, 16)))
    assert pruned.shape == (0, 16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_dampening_generalizes_past_the_calibration_inputs(seed):
    # Calibration text and evaluated text differ (as Python docs and an encyclopedia article
    # do): here, inputs with another mixing. 1% dampening fits the calibration inputs best and
    # the others worse than the default, for pruning and for joint int4 alike.
    weight = random_weight((64, 256), seed=10 + seed)
    fit = correlated_inputs(512, 256, seed=20 + seed)
    other = correlated_inputs(2048, 256, seed=30 + seed)
    hessian = stats_of(fit).hessian
    assert DAMPING > 0.01
    errors = {}
    for damping in (0.01, DAMPING):
        pruned = sparsegpt_prune(weight, hessian, sparsity=0.5, damping=damping)
        joint = sparsegpt_prune(weight, hessian, sparsity=0.5, damping=damping,
                                quantize=(4, 64))[0]
        errors[damping] = [output_error(weight, pruned, fit), output_error(weight, pruned, other),
                           output_error(weight, joint, other)]
    assert errors[0.01][0] < errors[DAMPING][0], errors
    assert errors[DAMPING][1] < 0.8 * errors[0.01][1], errors
    assert errors[DAMPING][2] < 0.8 * errors[0.01][2], errors
