"""The CPU decompressor (src/endor/kernels/cpu): every instruction-set path this machine runs
agrees bit-exactly with the dense tensor and the reference decompressor, never reads or writes out
of bounds, and rejects corrupt tile indexes and bitmaps with FormatError."""

import ctypes
import functools
import mmap
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import endor
from endor.format.tensor import EndorTensor
from endor.format import reference
from endor.format.decompress import backends, choose
from endor.kernels import cpu
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, INT_VIEW, sparse_tensor

needs_extension = pytest.mark.skipif(not cpu.available(), reason="CPU extension not built")
ISA_PARAMS = [pytest.param(isa, marks=pytest.mark.skipif(
    isa not in cpu.supported_isas(), reason=f"this CPU does not run {isa}")) for isa in cpu.ISAS]
SPARSITIES = [0.0, 0.01, 0.5, 0.99, 1.0]
# Odd shapes, 3-D, empty, sizes off multiples of 8, 64 and 4096, and a whole number of tiles.
SHAPES = [(1, 1), (), (7, 13), (830, 545), (3, 67, 129), (0,), (5, 0, 3), (4096,), (4097,),
          (8191,), (2 * 4096 + 63,), (3 * 4096 + 65,)]

pytestmark = needs_extension


@functools.lru_cache(maxsize=None)
def compressed(shape, dtype, sparsity, seed=0):
    dense = sparse_tensor(shape, dtype, sparsity, seed=seed)
    return dense, endor.compress(dense, values="raw")


def decompress(et, *, isa, threads=None, fill=0x5A):
    """Decompress into a buffer pre-filled with garbage, so that unwritten zeros would show."""
    out = torch.full((et.numel,), fill, dtype=torch.uint8).repeat_interleave(
        et.dtype.itemsize).view(et.dtype) if et.numel else torch.empty(0, dtype=et.dtype)
    cpu.decompress(et, out, isa=isa, threads=threads)
    return out.view(et.shape)


@functools.lru_cache(maxsize=None)
def reference_decompress(shape, dtype, sparsity):
    et = compressed(shape, dtype, sparsity)[1]
    out = torch.empty(et.numel, dtype=et.dtype)
    if et.numel:
        reference.decompress(et, out)
    return out.view(et.shape)


def corrupt(et, *, bitmap=None, values=None, tiles=None):
    return EndorTensor(et.shape, et.dtype, et.bitmap if bitmap is None else bitmap,
                       et.values if values is None else values,
                       et.tiles if tiles is None else tiles, et.checksum)


# ------------------------------------------------------------------ bit-exact on every path

@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_matches_dense_and_reference(isa, dtype, shape, sparsity):
    dense, et = compressed(shape, dtype, sparsity)
    out = decompress(et, isa=isa)
    assert bit_equal(out, dense)
    assert bit_equal(out, reference_decompress(shape, dtype, sparsity))


def special_values(dtype):
    bits = {
        torch.float16: [0x7C01, 0x7E00, 0xFE5A, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x83FF, 0x7BFF],
        torch.bfloat16: [0x7F81, 0x7FC0, 0xFFAB, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F, 0x7F7F],
        torch.float32: [0x7F800001, 0x7FC00000, 0xFFC0FFEE, 0x7F800000, 0xFF800000, 0x80000000,
                        0x00000001, 0x807FFFFF, 0x7F7FFFFF],
    }[dtype]
    width = 32 if dtype == torch.float32 else 16
    signed = [b - 2**width if b >= 2**(width - 1) else b for b in bits]
    # NaN payloads, +-inf, -0.0, subnormals, max: interleaved with true zeros, across a tile edge.
    pattern = torch.tensor(signed, dtype=INT_VIEW[dtype])
    pattern = torch.stack([pattern, torch.zeros_like(pattern)], dim=1).view(-1)
    return pattern.repeat(5001 // pattern.numel() + 1)[:5001].view(dtype)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_keep_their_bits(isa, dtype):
    dense = special_values(dtype)
    et = endor.compress(dense, values="raw")
    assert et.nnz == 2501  # every other element: -0.0, NaNs and subnormals all count
    assert bit_equal(decompress(et, isa=isa), dense)


@st.composite
def raw_tensors(draw):
    """Arbitrary bit patterns (every NaN payload, -0.0, subnormals) with runs of zeros, long
    enough to cross tiles and 64-element blocks."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.one_of(st.integers(0, 200), st.integers(4000, 13000)))
    seed = draw(st.integers(0, 2**31 - 1))
    sparsity = draw(st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
    g = torch.Generator().manual_seed(seed)
    width = 32 if dtype == torch.float32 else 16
    ints = torch.randint(-2**(width - 1), 2**(width - 1), (n,), generator=g,
                         dtype=torch.int64).to(INT_VIEW[dtype])
    ints[torch.rand(n, generator=g) < sparsity] = 0
    return ints.view(dtype)


@settings(max_examples=40, deadline=None)
@given(t=raw_tensors(), isa=st.sampled_from(cpu.supported_isas() or ("scalar",)),
       threads=st.integers(1, 4))
def test_property_any_bits_any_path(t, isa, threads):
    assert bit_equal(decompress(endor.compress(t, values="raw"), isa=isa, threads=threads), t)


# ------------------------------------------------------------------ threads, out=, selection

@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("threads", [None, 2, 3, 64])
def test_multithreaded_split(isa, threads):
    dense, et = compressed((2 * 2**20 + 4099,), torch.float16, 0.5, seed=3)
    assert cpu._default_threads(et.numel) == min(torch.get_num_threads(), 2)
    assert bit_equal(decompress(et, isa=isa, threads=threads), dense)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_more_threads_than_tiles(isa):
    dense, et = compressed((3, 4100), torch.float32, 0.5)
    assert bit_equal(decompress(et, isa=isa, threads=100), dense)


def test_out_buffer_is_filled_in_place():
    dense, et = compressed((830, 545), torch.bfloat16, 0.5)
    buf = torch.full((830 * 545,), float("nan"), dtype=torch.bfloat16)
    out = endor.decompress(et, out=buf, backend="cpu")
    assert out.data_ptr() == buf.data_ptr() and bit_equal(out, dense)
    buf2d = torch.full((830, 545), -1.0, dtype=torch.bfloat16)
    cpu.decompress(et, buf2d)  # any contiguous shape with the right number of elements
    assert bit_equal(buf2d, dense)


def test_bad_out_and_arguments_are_rejected():
    _, et = compressed((7, 13), torch.float16, 0.5)
    with pytest.raises(ValueError, match="expected"):
        cpu.decompress(et, torch.empty(91, dtype=torch.float32))
    with pytest.raises(ValueError, match="expected"):
        cpu.decompress(et, torch.empty(90, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        cpu.decompress(et, torch.empty(182, dtype=torch.float16)[::2])
    with pytest.raises(ValueError, match="threads"):
        cpu.decompress(et, torch.empty(91, dtype=torch.float16), threads=0)
    with pytest.raises(ValueError, match="not a CPU decompressor path"):
        cpu.decompress(et, torch.empty(91, dtype=torch.float16), isa="neon9")


def test_isa_from_environment(monkeypatch):
    dense, et = compressed((7, 13), torch.float16, 0.5)
    for isa in cpu.supported_isas():
        monkeypatch.setenv(cpu.ISA_ENV, isa)
        assert cpu._choose_isa(None) == cpu.ISAS.index(isa)
        assert bit_equal(endor.decompress(et, backend="cpu"), dense)
    monkeypatch.setenv(cpu.ISA_ENV, "auto")
    assert cpu._choose_isa(None) == cpu.ISAS.index(cpu.supported_isas()[-1])
    monkeypatch.setenv(cpu.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=cpu.ISA_ENV):
        endor.decompress(et, backend="cpu")
    missing = [isa for isa in cpu.ISAS if isa not in cpu.supported_isas()]
    if missing:
        monkeypatch.setenv(cpu.ISA_ENV, missing[0])
        with pytest.raises(ValueError, match="this CPU runs only"):
            endor.decompress(et, backend="cpu")


def test_registered_and_chosen_by_auto():
    assert backends()["cpu"].decompress is cpu.decompress
    assert choose("auto", torch.device("cpu")).name == "cpu"


@pytest.mark.parametrize("huge_pages", [True, False])
def test_huge_page_advice_keeps_results(huge_pages):
    dense, et = compressed((3 * 2**20 + 7,), torch.float16, 0.5, seed=5)
    out = torch.empty(et.numel, dtype=torch.float16)
    cpu.decompress(et, out, huge_pages=huge_pages)
    assert bit_equal(out, dense)


def test_without_extension_auto_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(cpu, "_decompress", None)
    assert not cpu.available() and cpu.supported_isas() == ()
    assert choose("auto", torch.device("cpu")).name == "reference"
    dense, et = compressed((7, 13), torch.float32, 0.5)
    assert bit_equal(endor.decompress(et), dense)
    with pytest.raises(ValueError, match="not available"):
        endor.decompress(et, backend="cpu")


# ------------------------------------------------------------------ corrupt input

@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extra_bitmap_bit_is_rejected(isa, dtype):
    _, et = compressed((3 * 4096 + 65,), dtype, 0.5)
    bitmap = et.bitmap.clone()
    i = 512 + int((et.bitmap[512:] != 0xFF).nonzero()[0])  # a byte of tile 1 with a clear bit
    bitmap[i] = int(bitmap[i]) | (int(bitmap[i]) + 1)  # set its lowest clear bit
    with pytest.raises(endor.FormatError, match="tile 1 has"):
        decompress(corrupt(et, bitmap=bitmap), isa=isa)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_bit_moved_between_tiles_is_rejected(isa):
    # Same total popcount and nnz: only the per-tile check sees it.
    dense = torch.ones(2 * 4096, dtype=torch.float16)
    dense[4095] = 0
    et = endor.compress(dense, values="raw")
    bitmap = et.bitmap.clone()
    bitmap[511] |= 0x80  # element 4095 (tile 0) claims a value...
    bitmap[512] &= 0xFE  # ...that element 4096 (tile 1) gives up
    with pytest.raises(endor.FormatError, match="tile 0 has 4096 bits set"):
        decompress(corrupt(et, bitmap=bitmap), isa=isa, threads=2)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_padding_bits_are_rejected(isa):
    _, et = compressed((13,), torch.float32, 0.0)
    bitmap = et.bitmap.clone()
    bitmap[1] |= 0x80  # element 15 does not exist
    with pytest.raises(endor.FormatError, match="bits set past the last element"):
        decompress(corrupt(et, bitmap=bitmap), isa=isa)


BAD_TILE_INDEXES = {
    "first not zero": lambda t: torch.cat([t[:1] + 1, t[1:]]),
    "decreasing": lambda t: torch.cat([t[:1], t[2:3], t[1:2], t[3:]]),
    "shifted": lambda t: torch.cat([t[:1], t[1:2] + 1, t[2:]]),
    "past nnz": lambda t: torch.cat([t[:-2], t[-2:-1] + 2**40, t[-1:]]),
    "negative": lambda t: torch.cat([t[:1], t[1:2] - 2**62, t[2:]]),
    "last not nnz": lambda t: torch.cat([t[:-1], t[-1:] - 1]),
}


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("case", BAD_TILE_INDEXES)
def test_corrupt_tile_index_is_rejected(isa, case):
    _, et = compressed((4 * 4096 + 9,), torch.float16, 0.5)
    tiles = BAD_TILE_INDEXES[case](et.tiles)
    with pytest.raises(endor.FormatError, match="bitmap popcounts disagree with the tile index"):
        decompress(corrupt(et, tiles=tiles), isa=isa, threads=3)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_values_shorter_than_bitmap_says_is_rejected(isa):
    # A decompressor that trusted the bitmap would read past the end of `values` here.
    _, et = compressed((2 * 4096 + 3,), torch.bfloat16, 0.0)
    tiles = et.tiles.clone()
    tiles[-1] = et.nnz - 100
    with pytest.raises(endor.FormatError, match="bitmap popcounts disagree"):
        decompress(corrupt(et, values=et.values[:-100], tiles=tiles), isa=isa)


def test_wrong_part_sizes_are_rejected():
    _, et = compressed((7, 13), torch.float16, 0.5)
    with pytest.raises(endor.FormatError, match="bitmap"):
        decompress(corrupt(et, bitmap=et.bitmap[:-1]), isa="scalar")
    with pytest.raises(endor.FormatError, match="tiles"):
        decompress(corrupt(et, tiles=torch.cat([et.tiles, et.tiles[-1:]])), isa="scalar")
    with pytest.raises(endor.FormatError, match="tiles"):
        decompress(corrupt(et, tiles=et.tiles.int()), isa="scalar")
    with pytest.raises(endor.FormatError, match="values"):
        decompress(corrupt(et, values=et.values.float()), isa="scalar")
    with pytest.raises(endor.FormatError, match="more than"):
        decompress(corrupt(et, values=torch.ones(92, dtype=torch.float16)), isa="scalar")


# ------------------------------------------------------------------ no out-of-bounds access

@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


_GUARDED = []  # mappings stay alive (and mapped) for the whole session: tensors point into them


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` whose last byte sits right before an inaccessible page: any access past its
    end kills the test process instead of passing silently."""
    nbytes = t.numel() * t.element_size()
    page = mmap.PAGESIZE
    data_pages = -(-max(nbytes, 1) // page)
    m = mmap.mmap(-1, (data_pages + 1) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = _libc()
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + data_pages * page, page, 0) == 0  # PROT_NONE
    _GUARDED.append(m)
    start = data_pages * page - nbytes
    raw = (ctypes.c_uint8 * nbytes).from_buffer(m, start) if nbytes else None
    if raw is None:
        return torch.empty(0, dtype=t.dtype)
    g = torch.frombuffer(raw, dtype=torch.uint8).view(t.dtype)
    g.copy_(t.reshape(-1))
    return g


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages via mprotect")
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel,sparsity", [(1, 0.0), (77, 0.3), (4096, 0.0), (4096 + 64, 0.5),
                                            (3 * 4096 + 100, 0.99), (2 * 4096 + 1, 0.0),
                                            # a last tile with a few values: the tile before
                                            # it ends just short of the end of `values`
                                            (4096 + 30, 0.5), (4096 + 12, 0.5), (4096 + 3, 0.1),
                                            (2 * 4096 + 20, 0.7), (4096 + 250, 0.9),
                                            (4096 + 100, 0.9)])
def test_no_access_past_any_buffer(isa, dtype, numel, sparsity):
    dense, et = compressed((numel,), dtype, sparsity, seed=7)
    tight = EndorTensor(et.shape, et.dtype, guarded(et.bitmap), guarded(et.values),
                        guarded(et.tiles), et.checksum)
    out = guarded(torch.zeros(numel, dtype=dtype))
    cpu.decompress(tight, out, isa=isa, threads=2)
    assert bit_equal(out, dense)
