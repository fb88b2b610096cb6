import pytest
import torch

from endor.prune import CalibrationStats, prune_weight
from endor.prune.reference import score_prune_mask_reference
from tests.helpers import DTYPES, INT_VIEW
from tests.prune.inputs import correlated_inputs, quantized_weight, random_weight


def stats_of(x: torch.Tensor, hessian=False) -> CalibrationStats:
    stats = CalibrationStats(x.shape[-1], hessian=hessian)
    stats.update(x)
    return stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 130)])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_ranks_by_weight_times_activation_norm(dtype, shape, sparsity):
    weight = random_weight(shape, dtype, seed=3)
    x = correlated_inputs(64, shape[1], seed=4)
    pruned = prune_weight(weight, method="wanda", sparsity=sparsity, stats=stats_of(x))
    count = round(sparsity * shape[1])
    assert torch.equal((pruned == 0).sum(dim=1), torch.full((shape[0],), count))
    scores = weight.abs().double() * x.double().norm(dim=0)
    assert torch.equal(pruned == 0, score_prune_mask_reference(scores, count))
    ints, original = pruned.view(INT_VIEW[dtype]), weight.view(INT_VIEW[dtype])
    assert torch.equal(ints[pruned != 0], original[pruned != 0])
    assert bool((ints[pruned == 0] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_uniform_norms_equal_magnitude(dtype, nm):
    weight = quantized_weight((33, 132), dtype, levels=16)
    stats = stats_of(torch.full((10, 132), 0.5))
    wanda = prune_weight(weight, method="wanda", sparsity=0.6, nm=nm, stats=stats)
    magnitude = prune_weight(weight, method="magnitude", sparsity=0.6, nm=nm)
    assert torch.equal(wanda.view(INT_VIEW[dtype]), magnitude.view(INT_VIEW[dtype]))


def test_huge_norm_column_is_kept():
    weight = random_weight((16, 40), seed=8)
    weight[:, 17] = 0.001 * weight[:, 17].sign()  # the smallest weights of every row...
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(9))
    x[:, 17] *= 1e4  # ...meet by far the largest input
    pruned = prune_weight(weight, method="wanda", sparsity=0.9, stats=stats_of(x))
    assert bool((pruned[:, 17] != 0).all())
    assert bool((prune_weight(weight, method="magnitude", sparsity=0.9)[:, 17] == 0).all())


def test_tied_scores_give_exact_counts():
    weight = quantized_weight((33, 130), torch.bfloat16, levels=16)
    x = torch.ones(8, 130)
    x[:, ::2] = 2.0  # two norms only: ties everywhere
    for sparsity in (0.3, 0.5, 0.77):
        pruned = prune_weight(weight, method="wanda", sparsity=sparsity, stats=stats_of(x))
        assert torch.equal((pruned == 0).sum(dim=1), torch.full((33,), round(sparsity * 130)))


@pytest.mark.parametrize("nm", [(2, 4), (1, 4)])
def test_n_m_structure(nm):
    weight = random_weight((12, 64), torch.float16, seed=10)
    x = correlated_inputs(50, 64, seed=11)
    pruned = prune_weight(weight, method="wanda", sparsity=0.5, nm=nm, stats=stats_of(x))
    nonzeros = (pruned != 0).view(12, 16, 4).sum(dim=2)
    assert torch.equal(nonzeros, torch.full((12, 16), nm[0]))
    scores = weight.abs().double() * x.double().norm(dim=0)
    assert torch.equal(pruned == 0, score_prune_mask_reference(scores, 0, nm))


def test_dead_inputs_are_pruned_first():
    weight = random_weight((6, 10), seed=12)
    x = torch.randn(20, 10)
    x[:, 3] = 0
    pruned = prune_weight(weight, method="wanda", sparsity=0.1, stats=stats_of(x))
    assert bool((pruned[:, 3] == 0).all()) and int((pruned == 0).sum()) == 6
