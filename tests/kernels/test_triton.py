"""The Triton decompressor (src/endor/kernels/triton_decompress.py). On CPU tensors it runs under
Triton's interpreter (TRITON_INTERPRET=1, set here per test): bit-exact against the dense tensor
and the reference decompressor on odd shapes, every dtype and sparsities 0 to 1; loads of
`values` never leave [0, nnz) even for a crafted tile index; the rule-6 checks flag such tensors.
Tests marked `gpu` run the compiled kernel on CUDA."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import endor
from endor.format.tensor import EndorTensor
from endor.format import reference
from endor.format.decompress import backends
from endor.kernels import triton_decompress
from endor.format.equal import bit_equal
from endor.kernels.triton_common import triton_installed
from tests.helpers import DTYPES, INT_VIEW, sparse_tensor

pytestmark = pytest.mark.skipif(not triton_installed(),
                                reason="triton is not installed")

SPARSITIES = [0.0, 0.5, 0.99, 1.0]
# Odd shapes, 0-d, 3-D, empty, sizes off multiples of 8 and 4096, whole tiles, a partial tile.
SHAPES = [(1, 1), (), (7, 13), (830, 545), (3, 67, 129), (0,), (5, 0, 3), (4096,), (4097,),
          (8191,), (2 * 4096 + 63,)]
CANARY = 0x7E57  # an int16/int32 pattern the tests' values never hold


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The backend serves CPU tensors only when TRITON_INTERPRET=1 is asked for."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def garbage_like(et, extra=0):
    """An output buffer full of a non-zero pattern, so an element left unwritten shows."""
    return torch.full((et.numel + extra,), CANARY, dtype=INT_VIEW[et.dtype]).view(et.dtype)


def reference_decompress(et):
    out = torch.empty(et.numel, dtype=et.dtype)
    if et.numel:
        reference.decompress(et, out)
    return out


def with_parts(et, *, bitmap=None, values=None, tiles=None):
    return EndorTensor(et.shape, et.dtype, et.bitmap if bitmap is None else bitmap,
                       et.values if values is None else values,
                       et.tiles if tiles is None else tiles, et.checksum)


def fenced_values(et, margin=5000):
    """et's values as a view into a buffer fenced by CANARY on both sides: a load outside
    [0, nnz) would bring a CANARY into the output."""
    ints = INT_VIEW[et.dtype]
    fence = torch.full((et.nnz + 2 * margin,), CANARY, dtype=ints, device=et.device)
    fence[margin:margin + et.nnz] = et.values.view(ints)
    return fence[margin:margin + et.nnz].view(et.dtype)


# ------------------------------------------------------------------ bit-exact on the interpreter

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_decompress_is_bit_exact(shape, dtype, sparsity):
    dense = sparse_tensor(shape, dtype, sparsity, seed=len(shape) * 1000 + int(sparsity * 100))
    et = endor.compress(dense, values="raw")
    out = garbage_like(et)
    triton_decompress.decompress(et, out)
    assert bit_equal(out.view(shape), dense)
    assert bit_equal(out, reference_decompress(et))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decompress_through_the_registry(dtype):
    dense = sparse_tensor((33, 257), dtype, 0.5, seed=3)
    assert bit_equal(endor.decompress(endor.compress(dense, values="raw"), backend="triton"), dense)


def special_values(dtype) -> torch.Tensor:
    """NaNs with several payloads and both signs, +-inf, -0.0, subnormals, extremes, and zeros
    between them, as raw bit patterns."""
    if dtype == torch.float32:
        bits = [0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0xFFC00001, 0x7F800000, 0xFF800000,
                0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000]
        width = 32
    elif dtype == torch.float16:
        bits = [0x7E00, 0x7C01, 0x7DFF, 0xFE01, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x83FF, 0x7BFF,
                0xFBFF, 0x3C00]
        width = 16
    else:
        bits = [0x7FC0, 0x7F81, 0x7FBF, 0xFFC1, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F, 0x7F7F,
                0xFF7F, 0x3F80]
        width = 16
    pattern = [b for v in bits for b in (v, 0)] * 700  # crosses several tile boundaries
    signed = [b - (1 << width) if b >= 1 << (width - 1) else b for b in pattern]
    return torch.tensor(signed, dtype=INT_VIEW[dtype]).view(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_keep_their_bits(dtype):
    dense = special_values(dtype)
    out = endor.decompress(endor.compress(dense, values="raw"), backend="triton")
    assert bit_equal(out, dense)


@st.composite
def raw_tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    bits = 32 if dtype == torch.float32 else 16
    pattern = draw(st.lists(st.one_of(st.just(0), st.integers(-2**(bits - 1), 2**(bits - 1) - 1)),
                            min_size=0, max_size=40))
    # Tile boundaries need more elements than hypothesis draws one by one: repeat the draw.
    repeat = draw(st.sampled_from([1, 150, 300]))
    ints = torch.tensor(pattern * repeat, dtype=INT_VIEW[dtype])
    return ints.view(dtype)


@settings(max_examples=15, deadline=None)
@given(raw_tensors())
def test_any_bit_patterns(t):
    et = endor.compress(t, values="raw")
    out = garbage_like(et)
    triton_decompress.decompress(et, out)
    assert bit_equal(out, t)


def test_out_buffer_is_filled_in_place():
    dense = sparse_tensor((65, 70), torch.bfloat16, 0.5, seed=1)
    et = endor.compress(dense, values="raw")
    buf = garbage_like(et)
    out = endor.decompress(et, out=buf, backend="triton")
    assert out.data_ptr() == buf.data_ptr() and out.shape == dense.shape
    assert bit_equal(out, dense)


def test_nothing_is_written_past_the_last_element():
    dense = sparse_tensor((4096 + 13,), torch.float16, 0.3, seed=2)
    et = endor.compress(dense, values="raw")
    buf = garbage_like(et, extra=4096)
    triton_decompress.decompress(et, buf[:et.numel])
    assert bit_equal(buf[:et.numel], dense)
    assert bool((buf[et.numel:].view(torch.int16) == CANARY).all())


@pytest.mark.parametrize("tiles_per_program", [1, 2, 3])
@pytest.mark.parametrize("num_warps", [1, 4, 8])
def test_launch_parameters_do_not_change_the_result(tiles_per_program, num_warps):
    dense = sparse_tensor((7 * 4096 + 5,), torch.float32, 0.5, seed=4)
    et = endor.compress(dense, values="raw")
    out = garbage_like(et)
    triton_decompress.decompress(et, out, num_warps=num_warps, tiles_per_program=tiles_per_program)
    assert bit_equal(out, dense)


# ------------------------------------------------------------------ rule 6 and bounded loads

@pytest.mark.parametrize("shape", SHAPES)
def test_valid_tensors_pass_both_checks(shape):
    et = endor.compress(sparse_tensor(shape, torch.float16, 0.5, seed=5), values="raw")
    ok = triton_decompress.validate_tiles(et)
    assert ok.dtype == torch.bool and ok.dim() == 0 and bool(ok)
    assert bool(triton_decompress.decompress_and_validate(et, garbage_like(et)))


def crafted_tile_indexes(et):
    """Tile indexes that pass nothing but the shape check, each able to steer loads out of
    [0, nnz) if a decompressor trusted it: past the end, before the start, and moved interior
    boundaries whose popcounts disagree."""
    nnz, tiles = et.nnz, et.tiles
    past_end = tiles.clone()
    past_end[1:-1] = nnz - 3
    before_start = tiles.clone()
    before_start[:-1] -= 4000
    shifted = tiles.clone()
    shifted[1:-1] += 700
    huge = tiles.clone()
    huge[1:] = 2**40
    return {"past_end": past_end, "before_start": before_start, "shifted": shifted,
            "huge": huge}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["past_end", "before_start", "shifted", "huge"])
def test_crafted_tile_index_never_reads_out_of_bounds(dtype, case):
    dense = sparse_tensor((3 * 4096 + 100,), dtype, 0.4, seed=6)
    et = endor.compress(dense, values="raw")
    crafted = with_parts(et, values=fenced_values(et), tiles=crafted_tile_indexes(et)[case])
    out = garbage_like(crafted)
    ok = triton_decompress.decompress_and_validate(crafted, out)
    assert not bool((out.view(INT_VIEW[dtype]) == CANARY).any()), "a load left [0, nnz)"
    assert not bool(ok)
    assert not bool(triton_decompress.validate_tiles(crafted))
    with pytest.raises(endor.FormatError):
        reference.decompress(crafted, torch.empty(crafted.numel, dtype=dtype))


def test_popcount_mismatch_in_one_tile_is_flagged():
    dense = sparse_tensor((2 * 4096,), torch.bfloat16, 0.5, seed=7)
    et = endor.compress(dense, values="raw")
    bitmap = et.bitmap.clone()
    bitmap[600] ^= 0x10  # one bit flipped in tile 1: its popcount no longer matches
    crafted = with_parts(et, bitmap=bitmap, values=fenced_values(et))
    out = garbage_like(crafted)
    assert not bool(triton_decompress.decompress_and_validate(crafted, out))
    assert not bool((out.view(torch.int16) == CANARY).any())
    assert not bool(triton_decompress.validate_tiles(crafted))


def test_set_padding_bits_are_flagged_and_not_decompressed():
    dense = sparse_tensor((4096 + 11,), torch.float16, 0.5, seed=8)
    et = endor.compress(dense, values="raw")
    bitmap = et.bitmap.clone()
    bitmap[-1] |= 0x80  # bit of element 4096 + 15, past the last element
    crafted = with_parts(et, bitmap=bitmap)
    buf = garbage_like(crafted, extra=64)
    assert not bool(triton_decompress.decompress_and_validate(crafted, buf[:crafted.numel]))
    assert not bool(triton_decompress.validate_tiles(crafted))
    assert bit_equal(buf[:crafted.numel], dense)
    assert bool((buf[crafted.numel:].view(torch.int16) == CANARY).all())


def test_tile_index_ends_are_checked():
    et = endor.compress(sparse_tensor((5000,), torch.float32, 0.5, seed=9), values="raw")
    tiles = et.tiles.clone()
    tiles[0] = 1
    assert not bool(triton_decompress.validate_tiles(with_parts(et, tiles=tiles)))
    empty = endor.compress(torch.empty(0), values="raw")
    assert bool(triton_decompress.validate_tiles(empty))
    assert not bool(triton_decompress.validate_tiles(
        with_parts(empty, tiles=torch.tensor([1], dtype=torch.int64))))


# ------------------------------------------------------------------ errors and availability

def test_malformed_parts_raise_format_error():
    et = endor.compress(sparse_tensor((100,), torch.float16, 0.5, seed=10), values="raw")
    out = torch.empty(100, dtype=torch.float16)
    with pytest.raises(endor.FormatError, match="bitmap"):
        triton_decompress.decompress(with_parts(et, bitmap=et.bitmap[:-1]), out)
    with pytest.raises(endor.FormatError, match="tiles"):
        triton_decompress.decompress(with_parts(et, tiles=et.tiles.int()), out)
    with pytest.raises(endor.FormatError, match="tiles"):
        triton_decompress.validate_tiles(with_parts(et, tiles=et.tiles[:1]))


def test_bad_arguments_raise():
    et = endor.compress(sparse_tensor((100,), torch.float16, 0.5, seed=11), values="raw")
    with pytest.raises(ValueError, match="out"):
        triton_decompress.decompress(et, torch.empty(100, dtype=torch.float32))
    with pytest.raises(ValueError, match="out"):
        triton_decompress.decompress(et, torch.empty(200, dtype=torch.float16)[::2])
    with pytest.raises(ValueError, match="num_warps"):
        triton_decompress.decompress(et, torch.empty(100, dtype=torch.float16), num_warps=3)
    with pytest.raises(ValueError, match="tiles_per_program"):
        triton_decompress.decompress(et, torch.empty(100, dtype=torch.float16), tiles_per_program=0)


def test_registered_and_available_only_where_it_can_run(monkeypatch):
    backend = backends()["triton"]
    assert backend.device_types == ("cuda", "cpu") and backend.available()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backend.available() == torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            endor.decompress(endor.compress(torch.ones(3), values="raw"), backend="triton")
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            triton_decompress.decompress(endor.compress(torch.ones(3), values="raw"), torch.empty(3))


def test_import_endor_imports_no_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, endor, endor.kernels.triton_decompress; "
            "assert 'triton' not in sys.modules, 'import endor imported triton'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ------------------------------------------------------------------ compiled kernel on CUDA

LLM_SHAPE = (4096, 14336)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_bit_exact_at_llm_size(dtype):
    dense = sparse_tensor(LLM_SHAPE, dtype, 0.5, seed=12).cuda()
    et = endor.compress(dense, values="raw")
    out = garbage_like(et).cuda()
    triton_decompress.decompress(et, out)
    assert bit_equal(out.view(LLM_SHAPE), dense)
    assert bool(triton_decompress.validate_tiles(et))
    assert bit_equal(endor.decompress(et), dense)  # "auto" picks triton on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_cuda_matches_reference_on_odd_shapes(shape, dtype, sparsity):
    dense = sparse_tensor(shape, dtype, sparsity, seed=13).cuda()
    et = endor.compress(dense, values="raw")
    out = endor.decompress(et, backend="triton")
    assert bit_equal(out, dense)
    assert bit_equal(out, endor.decompress(et, backend="reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_special_values_keep_their_bits(dtype):
    dense = special_values(dtype).cuda()
    assert bit_equal(endor.decompress(endor.compress(dense, values="raw"), backend="triton"), dense)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["past_end", "before_start", "shifted", "huge"])
def test_cuda_crafted_tile_index_never_reads_out_of_bounds(case):
    et = endor.compress(sparse_tensor((3 * 4096 + 100,), torch.bfloat16, 0.4, seed=14).cuda(), values="raw")
    crafted = with_parts(et, values=fenced_values(et), tiles=crafted_tile_indexes(et)[case])
    out = garbage_like(et).cuda()
    ok = triton_decompress.decompress_and_validate(crafted, out)
    assert not bool((out.view(torch.int16) == CANARY).any())
    assert not bool(ok) and not bool(triton_decompress.validate_tiles(crafted))


@pytest.mark.gpu
def test_cuda_decompress_and_checks_need_no_host_sync():
    """Captured in a CUDA graph (which fails on any host sync), on a side stream."""
    dense = sparse_tensor((1000, 1003), torch.bfloat16, 0.5, seed=15).cuda()
    et = endor.compress(dense, values="raw")
    out = torch.empty(et.numel, dtype=et.dtype, device="cuda")
    triton_decompress.decompress(et, out)  # compile and warm up outside the capture
    triton_decompress.decompress_and_validate(et, out)
    triton_decompress.validate_tiles(et)
    torch.cuda.synchronize()
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_decompress.decompress(et, out)
        ok_fused = triton_decompress.decompress_and_validate(et, out)
        ok_torch = triton_decompress.validate_tiles(et)
    graph.replay()
    torch.cuda.synchronize()
    assert bit_equal(out.view(dense.shape), dense)
    assert bool(ok_fused) and bool(ok_torch)
