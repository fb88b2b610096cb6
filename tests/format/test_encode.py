import math

import pytest
import torch

import endor
from endor.format import spec
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, sparse_tensor

SHAPES = [(1, 1), (7, 13), (830, 545), (3, 5, 7), (0,), (0, 4), (), (4097,), (8191,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_parts_follow_the_spec(shape, dtype, sparsity):
    t = sparse_tensor(shape, dtype, sparsity)
    et = endor.compress(t, values="raw")
    n = math.prod(shape)
    assert et.shape == t.shape and et.dtype == dtype and et.numel == n
    assert et.bitmap.dtype == torch.uint8 and et.bitmap.shape == (spec.bitmap_bytes(n),)
    assert et.tiles.dtype == torch.int64 and et.tiles.shape == (spec.num_tiles(n) + 1,)
    nonzero = t.reshape(-1).view(torch.int32 if dtype == torch.float32 else torch.int16) != 0
    assert et.nnz == int(nonzero.sum())
    # LSB-first bit order, one bit per element.
    for i in [0, n // 3, n - 1] if n else []:
        assert bool((int(et.bitmap[i // 8]) >> (i % 8)) & 1) == bool(nonzero[i])
    assert bit_equal(et.values, t.reshape(-1)[nonzero])
    assert et.verify_checksum()


def test_negative_zero_nan_inf_subnormal_are_nonzero():
    for dtype in DTYPES:
        info = torch.finfo(dtype)
        specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"),
                                 info.tiny / 2, -info.tiny / 4, 0.0], dtype=dtype)
        et = endor.compress(specials, values="raw")
        assert et.nnz == 6  # all but the two +0.0
        assert int(et.bitmap[0]) == 0b01111110


def test_nan_payloads_survive():
    raw = torch.tensor([0x7FC1, 0xFFFF - 65536, 0x7C01, 0], dtype=torch.int16)  # fp16 NaNs
    t = raw.view(torch.float16)
    assert bit_equal(endor.decompress(endor.compress(t, values="raw"), backend="reference"), t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_size_within_a_twentieth_of_a_bit_of_the_bound(dtype, sparsity):
    t = sparse_tensor((1024, 1024), dtype, sparsity)
    et = endor.compress(t, values="raw")
    actual_sparsity = 1 - et.nnz / et.numel
    bound = (1 - actual_sparsity) * dtype.itemsize * 8 + 1
    bits = et.nbytes * 8 / et.numel
    assert bound <= bits <= bound + 0.05, (bits, bound)


def test_rejects_unsupported_input():
    with pytest.raises(endor.FormatError, match="int64"):
        endor.compress(torch.zeros(3, dtype=torch.int64), values="raw")
    with pytest.raises(TypeError):
        endor.compress([1.0, 2.0], values="raw")
    with pytest.raises(endor.FormatError, match="rank"):
        endor.compress(torch.zeros([1] * 9), values="raw")


def test_non_contiguous_input():
    t = sparse_tensor((40, 30), torch.float16, 0.5).t()
    assert bit_equal(endor.decompress(endor.compress(t, values="raw")), t)
