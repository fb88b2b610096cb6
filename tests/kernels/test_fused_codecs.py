"""The fused linear on the value codecs: exp (exponent-coded, escapes exercised), int8 and int4
(every group size shape: 1, odd, a multiple of the kernel's 32-column chunk) read straight by
the CPU kernel, every instruction-set path, within the documented bound of the decoded weight;
the bfloat16 dot path (vdpbf16ps) and the float32 path both; a wrong value breaks the bound;
corrupt codec data is a FormatError."""

import dataclasses
import functools

import pytest
import torch

import endor
from endor.errors import FormatError
from endor.kernels import linear, linear_backends
from endor.kernels.cpu import fused as cpu_fused
from tests.helpers import DTYPES, sparse_tensor
from tests.kernels.test_fused import assert_within_bound

CODECS = ["exp", "int8", "int4"]
SHAPES = [(1, 1), (7, 13), (830, 545), (3, 4097), (5, 8191), (33, 129)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
needs_cpu = pytest.mark.skipif(not cpu_fused.available(), reason="fused CPU extension not built")
ISA_PARAMS = [pytest.param(isa, marks=pytest.mark.skipif(
    isa not in cpu_fused.supported_isas(), reason=f"this CPU does not run {isa}"))
    for isa in ("scalar", "avx2", "avx512")]


def spread(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Some values scaled by 2**+-8: exponents outside a tile's 7-exponent window (escapes), and
    float16 results still finite."""
    g = torch.Generator().manual_seed(seed + 7)
    scale = torch.ones(t.shape)
    pick = torch.rand(t.shape, generator=g)
    scale[pick < 0.01] = 2.0**8
    scale[pick > 0.99] = 2.0**-8
    return (t.float() * scale).to(t.dtype)


@functools.lru_cache(maxsize=None)
def case(codec, shape, dtype, sparsity, batch, group_size=7, seed=0):
    weight = sparse_tensor(shape, dtype, sparsity, seed=seed)
    if codec == "exp":
        weight = spread(weight, seed)
    options = {"group_size": group_size} if codec.startswith("int") else {}
    et = endor.compress(weight, values=codec, **options)
    decoded = endor.decompress(et, backend="reference").view(shape)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, shape[1], generator=g).to(dtype)
    return decoded, et, x


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_cpu_codec_within_bound(isa, codec, shape, dtype, sparsity):
    decoded, et, x, = case(codec, shape, dtype, sparsity, 3)
    assert et.values_codec == codec
    y = cpu_fused.matmul(x.float(), et, isa=isa).to(dtype)
    assert_within_bound(y, x, decoded)


@needs_cpu
def test_escapes_are_exercised():
    _, et, _ = case("exp", (830, 545), torch.bfloat16, 0.5, 3)
    assert et.codec_params["escapes"] > 100


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("group_size", [1, 7, 32, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_quantized_group_sizes(isa, codec, group_size, dtype):
    decoded, et, x = case(codec, (67, 545), dtype, 0.5, 9, group_size)
    y = cpu_fused.matmul(x.float(), et, isa=isa).to(dtype)
    assert_within_bound(y, x, decoded)


@needs_cpu
@pytest.mark.skipif("avx512" not in cpu_fused.supported_isas(), reason="no avx512 on this CPU")
@pytest.mark.parametrize("shape", [(5, 96), (31, 224), (9, 4160), (3, 8224)])
@pytest.mark.parametrize("group_size", [32, 96, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_int4_table_lookup_runs(shape, group_size, dtype, sparsity):
    """int4 looked up in registers (avx512, groups of whole chunks): rows that are whole chunks,
    walked in runs two chunks per step, groups of an odd number of chunks, a short last group,
    rows across tiles at odd value offsets; the bfloat16 dot and float32 paths both."""
    decoded, et, x = case("int4", shape, dtype, sparsity, 3, group_size)
    y = cpu_fused.matmul(x.float(), et, isa="avx512")
    assert_within_bound(y.to(dtype), x, decoded)
    if dtype == torch.bfloat16 and cpu_fused.bf16_dot_supported():
        plain = cpu_fused.matmul(x.float(), et, isa="avx512", bf16_dot=False)
        assert_within_bound(plain.to(dtype), x, decoded)


@needs_cpu
@pytest.mark.skipif(not cpu_fused.bf16_dot_supported(), reason="no AVX512_BF16 on this CPU")
@pytest.mark.parametrize("codec", ["raw", *CODECS])
@pytest.mark.parametrize("batch", [1, 3, 9])
def test_bf16_dot_and_float32_paths_both_within_bound(codec, batch):
    if codec == "raw":
        decoded = sparse_tensor((830, 545), torch.bfloat16, 0.5)
        et = endor.compress(decoded, values="raw")
        x = torch.randn(batch, 545).to(torch.bfloat16)
    else:
        decoded, et, x = case(codec, (830, 545), torch.bfloat16, 0.5, batch)
    dot = cpu_fused.matmul(x.float(), et, isa="avx512", bf16_dot=True)
    plain = cpu_fused.matmul(x.float(), et, isa="avx512", bf16_dot=False)
    assert torch.equal(cpu_fused.matmul(x.float(), et, isa="avx512"), dot)  # auto: x is bf16
    for y in (dot, plain):
        assert_within_bound(y.to(torch.bfloat16), x, decoded)
    with pytest.raises(ValueError, match="exactly bfloat16"):
        cpu_fused.matmul(x.float() + 1e-3, et, isa="avx512", bf16_dot=True)


@needs_cpu
@pytest.mark.parametrize("codec", CODECS)
def test_bound_catches_one_wrong_value(codec):
    """Not vacuous for the codecs either: the result of a weight one step off (one ulp for exp,
    q off by one for int8/int4) breaks the bound against the true decoded weight."""
    decoded, et, x = case(codec, (7, 13), torch.float32, 0.0, 1)
    if codec == "exp":
        wrong = decoded.clone()
        wrong[3, 5] = wrong[3, 5] * (1 + 2.0**-8)
        wrong_et = endor.compress(wrong, values="exp")
    else:
        q = et.codec_parts["qvalues"].clone()
        if codec == "int8":
            q[20] = q[20] + (1 if q[20] < 127 else -1)
        else:  # value 20's nibble: the low one of byte 10
            low = int(q[10]) & 15
            q[10] = (int(q[10]) & 0xF0) | (low ^ 1)
        wrong_et = dataclasses.replace(et, codec_parts={**et.codec_parts, "qvalues": q})
    assert_within_bound(cpu_fused.matmul(x.float(), et).to(x.dtype), x, decoded)
    y = cpu_fused.matmul(x.float(), wrong_et).to(x.dtype)
    with pytest.raises(AssertionError):
        assert_within_bound(y, x, decoded)


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_corrupt_codec_data_is_a_format_error(isa):
    _, et, x = case("exp", (70, 130), torch.float16, 0.5, 1)
    escidx = et.codec_parts["escidx"].clone()
    escidx[1] = escidx[-1] + 5
    bad = dataclasses.replace(et, codec_parts={**et.codec_parts, "escidx": escidx})
    with pytest.raises(FormatError, match="escape"):
        cpu_fused.matmul(x.float(), bad, isa=isa)
    _, et, x = case("int4", (7, 13), torch.bfloat16, 0.0, 1)  # 91 values: odd
    q = et.codec_parts["qvalues"].clone()
    q[-1] |= 0x70
    bad = dataclasses.replace(et, codec_parts={**et.codec_parts, "qvalues": q})
    with pytest.raises(FormatError, match="nibble"):
        cpu_fused.matmul(x.float(), bad, isa=isa)
    short = dataclasses.replace(et, codec_parts={**et.codec_parts,
                                                 "scales": et.codec_parts["scales"][:-1]})
    with pytest.raises(FormatError, match="scales"):
        cpu_fused.matmul(x.float(), short, isa=isa)


def test_a_backend_without_the_codec_decompresses():
    """linear() sends a codec a backend does not read through decompression + GEMM (triton reads
    raw only); the reference and cpu backends name every codec."""
    decoded, et, x = case("exp", (33, 129), torch.bfloat16, 0.5, 2)
    assert set(linear_backends()["reference"].codecs) >= {"raw", *CODECS}
    if cpu_fused.available():
        assert set(linear_backends()["cpu"].codecs) >= {"raw", *CODECS}
    assert_within_bound(linear(x, et, backend="reference"), x, decoded)
    triton = linear_backends().get("triton")
    if triton is not None and triton.available():
        assert "exp" not in triton.codecs
        assert_within_bound(linear(x, et, backend="triton"), x, decoded)
