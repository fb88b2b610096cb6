"""The CPU (every instruction-set path this machine runs) and Triton (interpreter) decoders of
the int8/int4 codecs agree bit-exactly with the reference decoder: odd shapes, every dtype,
sparsities 0 to 1, group sizes that cut rows anywhere, tiles that start on a high nibble, and
extreme scales; corrupt tile indexes are FormatError."""

import functools

import pytest
import torch

import endor
from endor.format.codecs.quant import quantize
from endor.format import reference
from endor.kernels import cpu
from endor.format.decompress import choose
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, sparse_tensor

CODECS = ("int8", "int4")
SHAPES = [(1, 1), (), (7, 13), (830, 545), (3, 67, 129), (0,), (5, 0, 3), (4097,),
          (2 * 4096 + 63,)]
SPARSITIES = [0.0, 0.5, 0.99, 1.0]
needs_cpu = pytest.mark.skipif(not cpu.available(), reason="CPU extension not built")
ISA_PARAMS = [pytest.param(isa, marks=pytest.mark.skipif(
    isa not in cpu.supported_isas(), reason=f"this CPU does not run {isa}")) for isa in cpu.ISAS]


@functools.lru_cache(maxsize=None)
def compressed(codec, shape, dtype, sparsity, group_size=128):
    return endor.compress(sparse_tensor(shape, dtype, sparsity), values=codec,
                          group_size=group_size)


def reference_decode(et):
    out = torch.empty(et.numel, dtype=et.dtype)
    if et.numel:
        reference.decompress(et, out)
    return out.view(et.shape)


def garbage(et):
    return torch.full((et.numel * et.dtype.itemsize,), 0x5A, dtype=torch.uint8).view(et.dtype)


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_cpu_matches_reference(isa, codec, dtype, shape, sparsity):
    et = compressed(codec, shape, dtype, sparsity)
    out = garbage(et)
    cpu.decompress(et, out, isa=isa)
    assert bit_equal(out.view(et.shape), reference_decode(et))


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("group_size", [1, 3, 16, 17, 100, 4096])
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_group_sizes_and_threads(isa, codec, group_size, threads):
    for dtype in DTYPES:
        et = compressed(codec, (37, 1000), dtype, 0.45, group_size)
        out = garbage(et)
        cpu.decompress(et, out, isa=isa, threads=threads)
        assert bit_equal(out.view(et.shape), reference_decode(et))


def extreme(dtype, codec):
    """Subnormal, negative, large and overflowing scales with every integer, 0 and the most
    negative included (writers never store q = 0; decoders must still follow the definition:
    +-0.0 by the sign of the scale)."""
    import dataclasses

    from endor.format.codecs.quant import pack_int4
    big = {torch.float32: 3e38, torch.float16: 60000.0, torch.bfloat16: 3e38}[dtype]
    tiny = torch.finfo(dtype).smallest_normal / 8
    qmax = 127 if codec == "int8" else 7
    scales = torch.tensor([[tiny], [-0.03], [big / qmax * 1.2], [1.0]] * 10).to(dtype)
    g = torch.Generator().manual_seed(5)
    steps = torch.randint(1, qmax + 1, (40, 257), generator=g) * (sparse_tensor((40, 257),
                                                                               torch.float32,
                                                                               0.3) != 0)
    finite = torch.finfo(dtype).max
    w = (scales.float() * steps.float()).clamp(-finite, finite).to(dtype)
    et = endor.compress(w, values=codec, group_size=257, scales=scales)
    q = torch.randint(-qmax - 1, qmax + 1, (et.nnz,), generator=g, dtype=torch.int8)
    q[::7] = -qmax - 1
    q[::11] = 0
    stored = q if codec == "int8" else pack_int4(q)
    return dataclasses.replace(et, codec_parts={**et.codec_parts, "qvalues": stored})


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_extreme_scales(isa, codec, dtype):
    et = extreme(dtype, codec)
    out = garbage(et)
    cpu.decompress(et, out, isa=isa)
    ref = reference_decode(et)
    assert bit_equal(out.view(et.shape), ref)
    assert bool(torch.isinf(ref).any())
    negative_zero = (ref == 0) & torch.signbit(ref)
    assert bool(negative_zero.any())


@needs_cpu
def test_auto_picks_cpu_and_rejects_corrupt_tiles():
    et = compressed("int4", (830, 545), torch.bfloat16, 0.5)
    assert choose("auto", torch.device("cpu"), "int4").name == "cpu"
    tiles = et.tiles.clone()
    tiles[3] += 1
    import dataclasses
    bad = dataclasses.replace(et, tiles=tiles)
    for backend in ("cpu", "reference"):
        with pytest.raises(endor.FormatError, match="popcount|tile"):
            endor.decompress(bad, backend=backend)


@needs_cpu
def test_cpu_rejects_bad_scales_and_padding():
    import dataclasses
    et = compressed("int4", (7, 13), torch.float16, 0.5)
    scales = et.codec_parts["scales"].clone()
    scales[0] = float("nan")
    bad = dataclasses.replace(et, codec_parts={**et.codec_parts, "scales": scales})
    for backend in ("cpu", "reference"):
        with pytest.raises(endor.FormatError, match="NaN or infinity"):
            endor.decompress(bad, backend=backend)
    assert et.nnz % 2 == 1
    q = et.codec_parts["qvalues"].clone()
    q[-1] |= 0x70
    bad = dataclasses.replace(et, codec_parts={**et.codec_parts, "qvalues": q})
    for backend in ("cpu", "reference"):
        with pytest.raises(endor.FormatError, match="nibble"):
            endor.decompress(bad, backend=backend)


triton_only = pytest.mark.skipif(
    not __import__("endor.kernels.triton_decompress", fromlist=["x"]).available(),
    reason="triton (TRITON_INTERPRET=1) not available")


@triton_only
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (830, 545), (3, 5, 300), (4097,)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_triton_matches_reference(codec, dtype, shape, sparsity):
    from endor.kernels import triton_quant
    et = compressed(codec, shape, dtype, sparsity, 100)
    out = garbage(et)
    triton_quant.decode(et, out)
    assert bit_equal(out.view(et.shape), reference_decode(et))


@triton_only
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_extreme_scales(codec, dtype):
    from endor.kernels import triton_quant
    et = extreme(dtype, codec)
    out = garbage(et)
    triton_quant.decode(et, out)
    assert bit_equal(out.view(et.shape), reference_decode(et))


@triton_only
def test_triton_backend_dispatches_quantized():
    et = compressed("int8", (7, 13), torch.float16, 0.5)
    assert bit_equal(endor.decompress(et, backend="triton"), reference_decode(et))
