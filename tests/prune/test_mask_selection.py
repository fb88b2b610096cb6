"""The CPU rank selection of endor.prune.masks (integer order keys + numpy introselect) against
the device-generic torch selection it replaced and the Python reference, on tie-heavy inputs."""

import pytest
import torch

from endor.prune import masks
from endor.prune.reference import score_prune_mask_reference
from tests.helpers import DTYPES, INT_VIEW

SHAPES = [(1, 1), (7, 13), (33, 130), (3, 1), (830, 545)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scores_of(shape, dtype, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":  # signed: -0.0, negatives and positives must order as floats do
        t = torch.randn(shape, generator=g)
        t.view(-1)[::5] = -0.0
        t.view(-1)[1::5] = 0.0
    elif kind == "levels":  # a handful of values: every row is full of ties
        t = torch.randint(-2, 3, shape, generator=g).to(torch.float32)
    else:  # specials beside ordinary values
        t = torch.randn(shape, generator=g)
        specials = torch.tensor([float("inf"), -float("inf"), 1e-45, -1e-45, 0.0, -0.0])
        t.view(-1)[::3] = specials[torch.randint(0, 6, (t.view(-1)[::3].numel(),), generator=g)]
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "levels", "specials"])
def test_numpy_selection_equals_torch_selection(dtype, shape, kind):
    scores = scores_of(shape, dtype, kind, seed=shape[1])
    counts = {1, 2, shape[1] // 2, shape[1] - 1, shape[1]} & set(range(1, shape[1] + 1))
    for count in sorted(counts):
        fast = masks._lowest_along_last_numpy(scores, count)
        slow = masks._lowest_along_last_torch(scores, count)
        assert torch.equal(fast, slow), (count, kind)
        assert torch.equal(fast.sum(dim=1), torch.full((shape[0],), count))


@pytest.mark.parametrize("levels", [1, 3, 1 << 20])
def test_numpy_selection_equals_reference(levels):
    g = torch.Generator().manual_seed(levels)
    scores = torch.randint(0, levels, (40, 77), generator=g).to(torch.float32)
    for count in (1, 30, 77):
        assert torch.equal(masks.lowest_per_row(scores, count),
                           score_prune_mask_reference(scores, count))


def test_integer_scores_and_chunks(monkeypatch):
    scores = torch.randint(0, 4, (37, 20), generator=torch.Generator().manual_seed(1),
                           dtype=torch.int16)
    whole = masks.lowest_per_row(scores, 9)
    assert torch.equal(whole, masks._lowest_along_last_torch(scores, 9))
    monkeypatch.setattr(masks, "_CHUNK_ELEMENTS", 60)  # 3 rows per chunk
    assert torch.equal(masks.lowest_per_row(scores, 9), whole)
    assert torch.equal(masks.lowest_per_group(scores, 2, 4),
                       masks._lowest_along_last_torch(scores.view(37, 5, 4), 2).view(37, 20))


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_scores_order_as_float32_magnitudes(dtype):
    w = scores_of((29, 31), dtype, "specials", seed=3)
    w.view(-1)[::7] = w.view(-1)[1::7][:w.view(-1)[::7].numel()]  # exact ties of |w|
    keys = masks.magnitude_scores(w)
    assert keys.dtype == INT_VIEW[dtype]
    reference = w.abs().to(torch.float32)
    for count in (1, 10, 16, 31):
        assert torch.equal(masks.lowest_per_row(keys, count),
                           masks._lowest_along_last_torch(reference, count))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (830, 545), (0, 4)])
def test_apply_prune_mask_equals_masked_fill(dtype, shape, monkeypatch):
    monkeypatch.setattr(masks, "_CHUNK_ELEMENTS", 1000)  # several chunks, a short last one
    w = scores_of(shape, dtype, "specials", seed=4)
    prune = torch.rand(shape, generator=torch.Generator().manual_seed(5)) < 0.4
    view = {torch.float64: torch.int64}.get(dtype) or INT_VIEW[dtype]
    fast = masks.apply_prune_mask(w, prune)
    slow = masks.canonical_zeros(w.masked_fill(prune, 0))
    assert fast.dtype == dtype and fast.shape == w.shape
    assert torch.equal(fast.view(view), slow.view(view))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (830, 545), (3, 0)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99])
def test_fused_magnitude_pruning_equals_the_composed_steps(dtype, shape, sparsity, monkeypatch):
    monkeypatch.setattr(masks, "_CHUNK_ELEMENTS", 5000)  # several chunks of rows
    w = scores_of(shape, dtype, "levels" if sparsity == 0.3 else "specials", seed=6)
    count = masks.pruned_count(sparsity, shape[1])
    fused = masks.prune_smallest_magnitudes(w, count)
    composed = masks.apply_prune_mask(w, masks.lowest_per_row(masks.magnitude_scores(w), count))
    assert fused.dtype == dtype and fused.shape == w.shape
    assert torch.equal(fused.view(INT_VIEW[dtype]), composed.view(INT_VIEW[dtype]))
