"""The numpy CPU encoder of endor.format.encode against the torch functions it replaced
(pack_bits, tile_offsets, boolean indexing), part by part, across chunk boundaries."""

import pytest
import torch

from endor.format import encode, spec
from tests.helpers import DTYPES, INT_VIEW, sparse_tensor

SHAPES = [(1, 1), (7, 13), (830, 545), (3, 5, 7), (0,), (0, 4), (), (4095,), (4097,), (8191,),
          (3 * 4096 + 5,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("chunk_tiles", [1, 64])
def test_cpu_encoder_equals_torch_encoder(dtype, shape, sparsity, chunk_tiles, monkeypatch):
    monkeypatch.setattr(encode, "_CHUNK_ELEMENTS", chunk_tiles * spec.TILE_SIZE)
    t = sparse_tensor(shape, dtype, sparsity, seed=len(shape))
    if t.numel() > 2:
        t.view(-1)[1] = -0.0  # a non-zero to the format
    et = encode.compress(t, values="raw")
    flat = t.reshape(-1).view(INT_VIEW[dtype])
    mask = flat != 0
    assert torch.equal(et.bitmap, encode.pack_bits(mask))
    assert torch.equal(et.tiles, encode.tile_offsets(mask))
    assert et.values.dtype == dtype
    assert torch.equal(et.values.view(INT_VIEW[dtype]), flat[mask])
    assert et.verify_checksum()
