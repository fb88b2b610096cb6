"""The int8/int4 value codecs (docs/FORMAT.md section 1.6): the decoded tensor is exactly the
format's definition of the stored bytes, the encoder's error is what round-to-nearest promises,
and the sizes meet the issue's budget."""

import numpy as np
import pytest
import torch

import endor
from endor.format.codecs.quant import (DEFAULT_GROUP_SIZE, dequantize, group_index,
                                       mse_scales, pack_int4, quantize, symmetric_scales,
                                       unpack_int4)
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, INT_VIEW, sparse_tensor

CODECS = {"int8": 8, "int4": 4}
SHAPES = [(1, 1), (7, 13), (830, 545), (3, 5, 300), (4097,), ()]


def reference_out(et):
    return endor.decompress(et, backend="reference")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, nearest even (finite inputs)."""
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def definition(et, q_all, scales, dtype):
    """FORMAT.md's decoded value, element by element, in numpy (independent of torch's casts)."""
    mask = reference_mask(et)
    n = mask.size
    cols = et.shape[-1] if len(et.shape) else 1
    g = et.codec_params["group_size"]
    idx = np.flatnonzero(mask)
    group = (idx // cols) * (-(-cols // g)) + (idx % cols) // g
    s32 = scales.float().numpy()[group].astype(np.float32)
    prod = (s32 * q_all.astype(np.float32)).astype(np.float32)
    if dtype == torch.float32:
        bits = prod.view(np.int32)
        out = np.zeros(n, dtype=np.int32)
    elif dtype == torch.float16:
        bits = prod.astype(np.float16).view(np.int16)
        out = np.zeros(n, dtype=np.int16)
    else:
        bits = f32_to_bf16_bits(prod).view(np.int16)
        out = np.zeros(n, dtype=np.int16)
    out[idx] = bits
    return torch.from_numpy(out).view(dtype).view(et.shape)


def reference_mask(et):
    return np.unpackbits(et.bitmap.numpy(), bitorder="little")[:et.numel].astype(bool)


def stored_integers(et):
    q = et.codec_parts["qvalues"]
    return (q if et.values_codec == "int8" else unpack_int4(q, et.nnz)).numpy()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("group_size", [1, 7, 128])
def test_decoded_tensor_is_the_definition_and_the_quantizer_output(codec, dtype, shape,
                                                                   sparsity, group_size):
    dense = sparse_tensor(shape, dtype, sparsity)
    et = endor.compress(dense, values=codec, group_size=group_size)
    assert et.values_codec == codec and et.codec_params == {"group_size": group_size}
    assert et.values is None
    out = reference_out(et)
    quantized = quantize(dense, CODECS[codec], group_size)
    assert bit_equal(out, quantized.dequantized)
    assert bit_equal(out, definition(et, stored_integers(et), et.codec_parts["scales"], dtype))
    # A weight that rounds to 0 is a zero of the bitmap: the bitmap is the decoded non-zeros.
    assert np.array_equal(reference_mask(et), (out.reshape(-1) != 0).numpy())
    assert not bool((stored_integers(et) == 0).any())


@pytest.mark.parametrize("codec, bound", [("int8", 0.5 / 127), ("int4", 0.5 / 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_is_half_a_step(codec, bound, dtype):
    """Round-to-nearest with absmax/qmax scales: |w - deq| <= scale / 2 (+ the output dtype's
    rounding), scale = absmax(group) / qmax."""
    w = sparse_tensor((64, 300), dtype, 0.5, seed=3)
    out = endor.decompress(endor.compress(w, values=codec, group_size=32)).float()
    wf = w.float()
    padded = torch.nn.functional.pad(wf, (0, 20)).view(64, 10, 32)
    absmax = padded.abs().amax(-1).repeat_interleave(32, dim=1)[:, :300]
    eps = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert bool(((wf - out).abs() <= absmax * (bound * (1 + 2 * eps)) + wf.abs() * eps).all())
    assert bool((out[wf == 0] == 0).all())  # pruned weights stay pruned


def test_sizes_at_half_sparsity_meet_the_budget():
    """bits per element at 50% (normal weights, magnitude-pruned per row), G = 128."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 4096, generator=g) * 0.02
    w[w.abs() < w.abs().median(dim=1, keepdim=True).values] = 0
    for dtype in (torch.float16, torch.bfloat16):
        bits = {c: endor.compress(w.to(dtype), values=c).nbytes * 8 / w.numel() for c in CODECS}
        assert bits["int8"] <= 5.2 and bits["int4"] <= 3.2, bits
        assert bits["int4"] > 3.0  # a real cost: bitmap + 2 bits + scales


def test_file_roundtrip_and_metadata(tmp_path):
    w = sparse_tensor((70, 130), torch.bfloat16, 0.5)
    et = endor.compress(w, values="int4", group_size=64)
    endor.save_file({"w": et}, tmp_path / "a.safetensors")
    with endor.open_file(tmp_path / "a.safetensors") as f:
        entry = f.entry("w")
        assert (entry.codec, entry.params) == ("int4", {"group_size": 64})
        assert f.part_suffixes("w") == ["bitmap", "tiles", "qvalues", "scales"]
        back = f.get_compressed("w")
    assert back.values_codec == "int4" and back.nnz == et.nnz
    assert bit_equal(endor.load_file(tmp_path / "a.safetensors")["w"], endor.decompress(et))


def test_default_group_size_and_options():
    w = sparse_tensor((3, 300), torch.float16, 0.5)
    assert endor.compress(w, values="int8").codec_params == {"group_size": DEFAULT_GROUP_SIZE}
    for bad in (0, -1, 1.5, True, "128", 2**24 + 1):
        with pytest.raises(ValueError, match="group_size"):
            endor.compress(w, values="int4", group_size=bad)
    with pytest.raises(ValueError, match="no options"):
        endor.compress(w, values="raw", group_size=128)
    with pytest.raises(ValueError, match="NaN or infinity"):
        endor.compress(torch.tensor([1.0, float("nan")]), values="int8")


def test_given_scales_are_used():
    """SparseGPT's joint quantization passes its scales: they are stored as given."""
    w = sparse_tensor((4, 10), torch.float16, 0.3)
    scales = torch.full((4, 2), 0.25, dtype=torch.float16)
    et = endor.compress(w, values="int4", group_size=5, scales=scales)
    assert torch.equal(et.codec_parts["scales"], scales.reshape(-1))
    out = endor.decompress(et).float()
    assert bool(((out / 0.25) == (out / 0.25).round()).all())  # on the grid
    assert float(out.abs().max()) <= 0.25 * 8


def test_int4_packing():
    q = torch.tensor([-8, 7, 0, -1, 3], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.tolist() == [0x78, 0xF0, 0x03]  # low nibble first, two's complement
    assert torch.equal(unpack_int4(packed, 5), q)


def test_group_index_follows_rows_and_columns():
    idx = torch.arange(2 * 10)
    assert group_index(idx, (2, 10), 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2,
                                                     3, 3, 3, 3, 4, 4, 4, 4, 5, 5]


def test_extreme_scales_decode_as_defined():
    """Subnormal, negative and overflowing scales (crafted through `scales=`) follow the
    definition: IEEE product, one rounding, overflow to infinity, no flush to zero."""
    for dtype, big, w_big in ((torch.float16, 26192.0, 65504.0), (torch.bfloat16, 1e38, 3e38)):
        tiny = torch.finfo(dtype).smallest_normal / 4
        scales = torch.tensor([[tiny], [-0.5], [big]]).to(dtype)
        w = torch.tensor([[tiny * 3, -tiny * 5], [1.5, -2.0], [w_big, big]]).to(dtype)
        et = endor.compress(w, values="int8", group_size=2, scales=scales)
        out = endor.decompress(et)
        assert bit_equal(out, definition(et, stored_integers(et), et.codec_parts["scales"],
                                         dtype))
        assert out[0, 0] != 0 and float(out[1, 0]) == 1.5
        if dtype == torch.float16:  # 65504 / 26192 = 2.5009 -> 3 -> 78576: infinity
            assert bool(torch.isinf(out[2, 0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qmax", [7, 127])
def test_mse_scales_never_lose_to_absmax(dtype, qmax):
    """The search starts from absmax / qmax and keeps a scale only when it rounds the group
    with less squared error; heavy-tailed groups (one large weight) gain by clipping it."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 3, 64, generator=g)
    w[:, :, 0] *= 8  # an outlier per group
    w[5, 1] = 0  # an all-zero group keeps scale 0
    w = w.to(dtype).to(torch.float32)

    def group_error(scales):
        s32 = scales.to(torch.float32).unsqueeze(-1)
        safe = torch.where(s32 == 0, torch.ones_like(s32), s32)
        q = torch.where(s32 == 0, 0.0, torch.round(w / safe)).clamp(-qmax - 1, qmax)
        return (dequantize(q, s32, dtype).to(torch.float32) - w).square().sum(-1)

    absmax = symmetric_scales(w, qmax, dtype)
    searched = mse_scales(w, qmax, dtype)
    assert searched.dtype == dtype and searched.shape == absmax.shape
    assert bool((group_error(searched) <= group_error(absmax)).all())
    assert float(searched[5, 1]) == 0.0
    assert bool((searched.float() <= absmax.float()).all())
    if qmax == 7:  # coarse grid, outliers: clipping pays in most groups
        assert float(group_error(searched).sum()) < 0.9 * float(group_error(absmax).sum())
