"""decompress(): every available CPU-side backend agrees bit-exactly with the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import endor
from endor.format.decompress import backends
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, sparse_tensor

# Triton runs on the CPU only under its (slow) interpreter: tests/kernels/test_triton.py covers it.
CPU_BACKENDS = [name for name, b in backends().items()
                if "cpu" in b.device_types and b.available() and name != "triton"]
SHAPES = [(1, 1), (7, 13), (830, 545), (3, 5, 7), (0,), (), (4096,), (4097, 3)]


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_round_trip_is_bit_exact(backend, shape, dtype, sparsity):
    t = sparse_tensor(shape, dtype, sparsity, seed=hash((shape, sparsity)) % 1000)
    out = endor.decompress(endor.compress(t), backend=backend)
    assert bit_equal(out, t)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 10), min_size=0, max_size=3))
    n = 1
    for d in shape:
        n *= d
    bits = 32 if dtype == torch.float32 else 16
    # Raw bit patterns: NaN payloads, infinities, -0.0, subnormals all appear.
    raw = draw(st.lists(st.one_of(st.just(0), st.integers(0, 2**bits - 1)), min_size=n,
                        max_size=n))
    # Tile boundaries need more elements than hypothesis draws one by one: tile the draw.
    repeat = draw(st.sampled_from([1, 1, 5000]))
    if repeat > 1 and n:
        shape, raw = [n * repeat], raw * repeat
    ints = torch.tensor([r - 2**bits if r >= 2**(bits - 1) else r for r in raw],
                        dtype=torch.int32 if bits == 32 else torch.int16)
    return ints.view(dtype).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(tensors())
def test_round_trip_any_bits(t):
    et = endor.compress(t)
    for backend in ["auto", *CPU_BACKENDS]:
        assert bit_equal(endor.decompress(et, backend=backend), t)


def test_out_buffer_is_reused():
    t = sparse_tensor((65, 70), torch.bfloat16, 0.5)
    buf = torch.full((65 * 70,), 7.0, dtype=torch.bfloat16)
    out = endor.decompress(endor.compress(t), out=buf)
    assert out.data_ptr() == buf.data_ptr() and out.shape == t.shape and bit_equal(out, t)


def test_out_buffer_mismatch_is_rejected():
    et = endor.compress(sparse_tensor((4, 4), torch.float16, 0.5))
    with pytest.raises(ValueError, match="expected"):
        endor.decompress(et, out=torch.empty(16, dtype=torch.float32))
    with pytest.raises(ValueError, match="expected"):
        endor.decompress(et, out=torch.empty(15, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        endor.decompress(et, out=torch.empty(32, dtype=torch.float16)[::2])


def test_unknown_backend_is_rejected():
    et = endor.compress(torch.ones(3))
    with pytest.raises(ValueError, match="unknown backend"):
        endor.decompress(et, backend="magic")
    with pytest.raises(TypeError):
        endor.decompress(torch.ones(3))
