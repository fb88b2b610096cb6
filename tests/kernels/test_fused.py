"""The fused linear (src/endor/kernels/fused.py and its backends): y = x @ W.T + b from the
compressed W agrees with the exact result within the documented bound, on odd shapes (rows that
start and end inside tiles and span several), every dtype, sparsities 0 to 1, batch sizes across
the CPU kernel's 8-row blocks, every instruction-set path this machine runs; and rejects corrupt
tiles and bad arguments."""

import functools

import pytest
import torch

import endor
from endor.errors import FormatError
from endor.format.tensor import EndorTensor
from endor.kernels import choose_linear, linear, linear_backends
from endor.kernels.cpu import fused as cpu_fused
from endor.kernels.fused import error_bound
from tests.helpers import DTYPES, sparse_tensor

SPARSITIES = [0.0, 0.5, 0.9, 1.0]
# (N, K): 1x1, odd, a row shorter than a tile, rows across tile boundaries, whole tiles.
SHAPES = [(1, 1), (7, 13), (830, 545), (3, 4097), (5, 8191), (2, 4096), (33, 129)]
BATCHES = [1, 3, 9]
needs_cpu = pytest.mark.skipif(not cpu_fused.available(), reason="fused CPU extension not built")
ISA_PARAMS = [pytest.param(isa, marks=pytest.mark.skipif(
    isa not in cpu_fused.supported_isas(), reason=f"this CPU does not run {isa}"))
    for isa in ("scalar", "avx2", "avx512")]


@functools.lru_cache(maxsize=None)
def case(shape, dtype, sparsity, batch, seed=0):
    weight = sparse_tensor(shape, dtype, sparsity, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, shape[1], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    return weight, endor.compress(weight, values="raw"), x, bias


def exact(x, weight, bias=None):
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


def assert_within_bound(y, x, weight, bias=None):
    want = exact(x, weight, bias)
    bound = error_bound(x, weight, bias, want, x.dtype)
    err = (y.double() - want).abs()
    assert y.dtype == x.dtype and y.shape == want.shape
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_reference_within_bound(shape, dtype, sparsity):
    weight, et, x, bias = case(shape, dtype, sparsity, 3)
    assert_within_bound(linear(x, et, bias, backend="reference"), x, weight, bias)


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", BATCHES)
def test_cpu_within_bound(isa, shape, dtype, sparsity, batch):
    weight, et, x, _ = case(shape, dtype, sparsity, batch)
    y = cpu_fused.matmul(x.float(), et, isa=isa).to(dtype)
    assert_within_bound(y, x, weight)


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_cpu_thread_count_does_not_change_the_result(isa):
    """Each output row is summed by one thread in one order: any split gives the same bits."""
    _, et, x, _ = case((830, 545), torch.bfloat16, 0.5, 9)
    one = cpu_fused.matmul(x.float(), et, isa=isa, threads=1)
    for threads in (2, 3, 7):
        assert torch.equal(cpu_fused.matmul(x.float(), et, isa=isa, threads=threads), one)


@needs_cpu
def test_bound_is_tight_enough_to_catch_a_wrong_weight():
    """The check above is not vacuous: one weight off by one bf16 ulp of its value breaks it."""
    weight, et, x, _ = case((7, 13), torch.float32, 0.0, 1)
    wrong = weight.clone()
    wrong[3, 5] = wrong[3, 5] * (1 + 2.0**-8)
    y = linear(x, endor.compress(wrong, values="raw"), backend="cpu")
    with pytest.raises(AssertionError):
        assert_within_bound(y, x, weight)


@needs_cpu
def test_leading_dimensions_bias_and_auto_backend():
    weight, et, x, bias = case((33, 129), torch.float16, 0.5, 6)
    x3 = x.view(2, 3, 129)
    y = linear(x3, et, bias)
    assert y.shape == (2, 3, 33)
    assert choose_linear("auto", torch.device("cpu")).name == "cpu"
    assert_within_bound(y.view(6, 33), x, weight, bias)


@pytest.mark.skipif("triton" not in linear_backends() or
                    not linear_backends()["triton"].available(), reason="triton not available")
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 4097), (2, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_triton_within_bound(shape, dtype, sparsity):
    weight, et, x, bias = case(shape, dtype, sparsity, 3)
    assert_within_bound(linear(x, et, bias, backend="triton"), x, weight, bias)


def corrupt(et, *, bitmap=None, tiles=None):
    return EndorTensor(et.shape, et.dtype, et.bitmap if bitmap is None else bitmap, et.values,
                       et.tiles if tiles is None else tiles, et.checksum)


@needs_cpu
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_cpu_rejects_a_popcount_that_disagrees_with_the_tile_index(isa):
    _, et, x, _ = case((5, 8191), torch.bfloat16, 0.5, 1)
    bitmap = et.bitmap.clone()
    bitmap[700] ^= 0x01  # tile 1: one bit more or less than tiles[2] - tiles[1]
    with pytest.raises(FormatError, match="tile 1"):
        cpu_fused.matmul(x.float(), corrupt(et, bitmap=bitmap), isa=isa)
    tiles = et.tiles.clone()
    tiles[3] = et.nnz + 10**9
    with pytest.raises(FormatError, match="tile index"):
        cpu_fused.matmul(x.float(), corrupt(et, tiles=tiles), isa=isa)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_bad_arguments_are_value_errors(backend):
    _, et, x, _ = case((7, 13), torch.float32, 0.5, 1)
    with pytest.raises(ValueError, match="13 input features"):
        linear(torch.zeros(1, 12), et, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        linear(x, et, torch.zeros(6), backend=backend)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        linear(torch.zeros(1, 13, dtype=torch.int32), et, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        linear(x, endor.compress(torch.zeros(7, 13, 1)), backend=backend)
    with pytest.raises(ValueError, match="unknown linear backend"):
        linear(x, et, backend="nope")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(7, 13), (830, 545), (4096, 14336)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_on_the_gpu_within_bound(shape, dtype):
    weight, et, x, bias = case(shape, dtype, 0.5, 4)
    device = torch.device("cuda")
    y = linear(x.to(device), et.to(device), bias.to(device), backend="triton").cpu()
    assert_within_bound(y, x, weight, bias)
