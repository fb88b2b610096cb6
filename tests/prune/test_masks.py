import pytest
import torch

from endor.prune.masks import (apply_prune_mask, canonical_zeros, lowest_in_block,
                               lowest_per_group, lowest_per_row, pruned_count)
from endor.prune.reference import lowest_indices, score_prune_mask_reference


def tie_heavy_scores(rows, cols, levels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (rows, cols), generator=g).to(torch.float32)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 130), (3, 1)])
@pytest.mark.parametrize("levels", [1, 3, 16, 1 << 20])
def test_lowest_per_row_matches_reference_with_ties(shape, levels):
    scores = tie_heavy_scores(*shape, levels)
    for count in sorted({0, 1, shape[1] // 2, shape[1] - 1, shape[1]}):
        got = lowest_per_row(scores, count)
        assert torch.equal(got, score_prune_mask_reference(scores, count))
        assert torch.equal(got.sum(dim=1), torch.full((shape[0],), count))


@pytest.mark.parametrize("levels", [1, 4, 1 << 20])
def test_lowest_in_block_matches_reference(levels):
    scores = tie_heavy_scores(9, 21, levels, seed=1)
    for count in (0, 1, 50, 94, 189):
        got = lowest_in_block(scores, count)
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[lowest_indices(scores.reshape(-1).tolist(), count)] = True
        assert torch.equal(got, expected.view(scores.shape))
        assert int(got.sum()) == count


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (4, 4), (1, 1), (3, 5)])
@pytest.mark.parametrize("levels", [2, 1 << 20])
def test_lowest_per_group_matches_reference(nm, levels):
    keep, group = nm
    scores = tie_heavy_scores(11, group * 7, levels, seed=2)
    got = lowest_per_group(scores, keep, group)
    assert torch.equal(got, score_prune_mask_reference(scores, 0, nm))
    per_group = got.view(11, 7, group).sum(dim=2)
    assert torch.equal(per_group, torch.full((11, 7), group - keep))


def test_empty_scores():
    assert lowest_per_row(torch.zeros(0, 5), 2).shape == (0, 5)
    assert lowest_per_row(torch.zeros(3, 0), 0).shape == (3, 0)
    assert lowest_per_group(torch.zeros(0, 8), 2, 4).shape == (0, 8)


def test_row_chunks_give_the_same_mask(monkeypatch):
    scores = tie_heavy_scores(37, 20, 5, seed=3)
    whole = lowest_per_row(scores, 9)
    monkeypatch.setattr("endor.prune.masks._CHUNK_ELEMENTS", 60)  # 3 rows per chunk
    assert torch.equal(lowest_per_row(scores, 9), whole)


def test_pruned_count_rounds():
    assert pruned_count(0.5, 130) == 65
    assert pruned_count(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004
    assert pruned_count(0.0, 13) == 0
    assert pruned_count(0.99, 13) == 13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zeros_become_positive_zero(dtype):
    weight = torch.tensor([[-0.0, 1.0, -2.0, 0.0, 3.0]], dtype=dtype)
    prune = torch.tensor([[False, False, True, False, False]])
    out = apply_prune_mask(weight, prune)
    ints = out.view(torch.int16 if dtype != torch.float32 else torch.int32)
    assert torch.equal(ints[0, [0, 2, 3]], torch.zeros(3, dtype=ints.dtype))
    assert out[0, 1] == 1 and out[0, 4] == 3
    assert torch.equal(canonical_zeros(torch.tensor([-0.0])).view(torch.int32),
                       torch.zeros(1, dtype=torch.int32))
    assert weight[0, 2] == -2  # the input is left alone
