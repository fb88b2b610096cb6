import pytest
import torch

from endor.prune import prune_weight
from endor.prune.reference import score_prune_mask_reference
from tests.helpers import DTYPES, INT_VIEW
from tests.prune.inputs import quantized_weight, random_weight

SHAPES = [(1, 1), (7, 13), (33, 130)]
SPARSITIES = [0.0, 0.1, 0.5, 0.7, 0.95]


def check_pruned_from(original, pruned):
    """Same shape and dtype; each entry is either bit-identical or +0.0."""
    assert pruned.shape == original.shape and pruned.dtype == original.dtype
    ints, original_ints = pruned.view(INT_VIEW[pruned.dtype]), original.view(INT_VIEW[pruned.dtype])
    assert bool(((ints == original_ints) | (ints == 0)).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_exact_count_of_smallest_per_row(dtype, shape, sparsity):
    weight = random_weight(shape, dtype, seed=shape[1])
    pruned = prune_weight(weight, method="magnitude", sparsity=sparsity)
    check_pruned_from(weight, pruned)
    zero = pruned == 0
    assert torch.equal(zero.sum(dim=1), torch.full((shape[0],), round(sparsity * shape[1])))
    magnitude = weight.abs().float()
    largest_pruned = magnitude.masked_fill(~zero, 0).amax(dim=1)
    smallest_kept = magnitude.masked_fill(zero, float("inf")).amin(dim=1)
    assert bool((largest_pruned <= smallest_kept).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_ties_still_give_exact_counts(dtype, sparsity):
    weight = quantized_weight((33, 130), dtype, levels=16)
    pruned = prune_weight(weight, method="magnitude", sparsity=sparsity)
    count = round(sparsity * 130)
    assert torch.equal((pruned == 0).sum(dim=1), torch.full((33,), count))
    expected = score_prune_mask_reference(weight.abs().float(), count)
    assert torch.equal(pruned == 0, expected)


def test_existing_zeros_are_pruned_first_and_kept():
    weight = random_weight((20, 40), seed=5)
    weight[:10, :30] = 0.0  # rows 0-9: 30 zeros, more than the 20 asked for
    weight[10:, :5] = -0.0
    pruned = prune_weight(weight, method="magnitude", sparsity=0.5)
    assert torch.equal((pruned == 0).sum(dim=1), torch.tensor([30] * 10 + [20] * 10))
    assert not bool((pruned.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_n_m_keeps_largest_of_every_group(dtype, nm):
    keep, group = nm
    weight = quantized_weight((9, 8 * group), dtype, levels=16, seed=7)
    pruned = prune_weight(weight, method="magnitude", sparsity=0.5, nm=nm)
    check_pruned_from(weight, pruned)
    nonzeros = (pruned != 0).view(9, 8, group).sum(dim=2)
    assert torch.equal(nonzeros, torch.full((9, 8), keep))
    expected = score_prune_mask_reference(weight.abs().float(), 0, nm)
    assert torch.equal(pruned == 0, expected)


@pytest.mark.parametrize("shape", [(0, 8), (5, 0), (0, 0)])
def test_empty_weights(shape):
    weight = torch.zeros(shape, dtype=torch.float16)
    pruned = prune_weight(weight, method="magnitude", sparsity=0.5)
    assert pruned.shape == shape and pruned.dtype == torch.float16


def test_input_is_not_modified():
    weight = random_weight((7, 13))
    before = weight.clone()
    pruned = prune_weight(weight, method="magnitude", sparsity=0.5)
    assert torch.equal(weight, before) and pruned.data_ptr() != weight.data_ptr()
