"""endor bench decompress: the numpy baseline decompresses bit-exactly, every available backend
and both copies are timed with both kinds of output, and the ratios are computed against the copy
and numpy rows of the same case."""

import pytest
import torch

import endor
from endor.bench import decompress, harness
from endor.cli import build_parser
from endor.cli.bench import benchmark_params
from endor.kernels import backends
from endor.format.equal import bit_equal
from tests.helpers import DTYPES

SHAPES = [(), (1, 1), (7, 13), (830, 545), (3, 5, 7), (0,), (4097,)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_baseline_is_bit_exact(dtype):
    for shape in SHAPES:
        for sparsity in (0.0, 0.5, 1.0):
            dense = harness.random_sparse(shape, dtype, sparsity, seed=5)
            assert bit_equal(decompress.numpy_decompressor(endor.compress(dense))(), dense)


def test_numpy_baseline_keeps_special_values():
    dense = torch.tensor([-0.0, float("nan"), 0.0, float("-inf"), 1e-42])
    assert bit_equal(decompress.numpy_decompressor(endor.compress(dense))(), dense)


def _args(*extra):
    return benchmark_params(build_parser().parse_args(["bench", "decompress", "--quick", "--device",
                                                       "cpu", "--repeat", "1", *extra]))


@pytest.fixture(scope="module")
def doc():
    return decompress.run(**_args("--shape", "96,130", "--dtypes", "fp16,bf16",
                            "--sparsities", "0.5,0.9", "--warmup", "0"))


def _cpu_backends():
    return sorted(n for n, b in backends().items()
                  if "cpu" in b.device_types and b.available()
                  and n not in decompress.INTERPRETED_ON_CPU)


def test_every_backend_and_baseline_is_timed_per_case(doc):
    for dtype in ("float16", "bfloat16"):
        for sparsity in (0.5, 0.9):
            rows = [r for r in doc["results"]
                    if r["dtype"] == dtype and r["sparsity"] == sparsity]
            got = {(r["method"], r["output"]) for r in rows}
            want = {("copy", "fresh"), ("copy", "out")}
            want |= {(b, o) for b in _cpu_backends() for o in ("fresh", "out")}
            if (dtype, sparsity) == ("float16", 0.5):
                want.add(("numpy", "fresh"))  # the headline case only, by default
            assert got == want
            assert all(r["gbps"] > 0 and r["n"] == 1 and r["pct_of_hbm"] is None for r in rows)


def test_ratios_are_against_the_same_case(doc):
    rows = doc["results"]
    for r in rows:
        same = [c for c in rows if c["dtype"] == r["dtype"] and c["sparsity"] == r["sparsity"]]
        copy = next(c for c in same if c["method"] == "copy" and c["output"] == r["output"])
        assert r["ratio_vs_copy"] == pytest.approx(r["median_s"] / copy["median_s"])
        assert r["gbps"] == pytest.approx(r["dense_bytes"] / r["median_s"] / 1e9)
        numpy_rows = [c for c in same if c["method"] == "numpy"]
        if numpy_rows:
            assert r["speedup_vs_numpy"] == pytest.approx(
                numpy_rows[0]["median_s"] / r["median_s"])
        else:
            assert r["speedup_vs_numpy"] is None
    # bitmap + values + tile index of 96*130 fp16 elements at 50%
    fp16 = next(r for r in rows if r["dtype"] == "float16" and r["sparsity"] == 0.5
                and r["method"] == "reference")
    n = 96 * 130
    assert fp16["read_bytes"] == -(-n // 8) + n // 2 * 2 + 8 * (-(-n // 4096) + 1)


def test_backend_choice_and_errors():
    d = decompress.run(**_args("--shape", "16,16", "--dtypes", "fp32", "--sparsities", "0.5",
                         "--backends", "reference", "--numpy", "none", "--warmup", "0"))
    assert {r["method"] for r in d["results"]} == {"copy", "reference"}
    with pytest.raises(ValueError, match="unknown backend"):
        decompress.run(**_args("--shape", "8,8", "--backends", "simd9000"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            decompress.run(**_args("--shape", "8,8", "--device", "cuda"))


@pytest.mark.gpu
def test_cuda_rows_report_hbm_and_device_copy():
    args = build_parser().parse_args(["bench", "decompress", "--quick", "--device", "cuda",
                                      "--dtypes", "bf16", "--sparsities", "0.5", "--repeat", "2"])
    rows = decompress.run(**benchmark_params(args))["results"]
    assert {r["device"] for r in rows} == {"cuda"}
    assert all(r["pct_of_hbm"] > 0 for r in rows)
    assert {("copy", "fresh"), ("copy", "out")} <= {(r["method"], r["output"]) for r in rows}
