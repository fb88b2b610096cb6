"""`endor bench gemv` (src/endor/bench/gemv.py): the quick document has every method per dtype,
batch and codec, the ratios it claims are computed from its own rows, the fused result agrees
with the dense GEMV, and bad options are errors."""

import argparse

import pytest

from endor.bench import gemv, plot


def _args(*argv):
    parser = argparse.ArgumentParser()
    gemv.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.quick, args.repeat, args.warmup = True, 2, 1
    return vars(args)


def test_quick_gemv_document(tmp_path):
    codecs = ("raw", "exp", "int4")
    doc = gemv.run(**_args("--batches", "1,3"))
    rows = {(r["dtype"], r["batch"], r["method"], r["values"]): r for r in doc["results"]}
    want = {(d, b, "dense", "-") for d in ("bfloat16", "float16") for b in (1, 3)}
    want |= {(d, b, m, c) for d in ("bfloat16", "float16") for b in (1, 3) for c in codecs
             for m in ("fused", "decompress+gemm", "check")}
    assert set(rows) == want
    for d in ("bfloat16", "float16"):
        dense = rows[(d, 1, "dense", "-")]
        for c in codecs:
            fused = rows[(d, 1, "fused", c)]
            assert fused["fused_vs_dense"] == pytest.approx(dense["median_s"] / fused["median_s"])
            assert doc["ratios"][f"fused_vs_dense_batch1_{d}_{c}"] == fused["fused_vs_dense"]
            assert fused["packed_bytes"] < fused["dense_bytes"]
            assert fused["mbytes"] * 1e6 == fused["packed_bytes"]
            # same (decoded) weight, another sum order
            assert rows[(d, 1, "check", c)]["max_abs_diff_vs_dense_rel"] < 1e-2
        assert rows[(d, 1, "fused", "int4")]["packed_bytes"] < \
            rows[(d, 1, "fused", "exp")]["packed_bytes"] < rows[(d, 1, "fused", "raw")]["packed_bytes"]
    assert set(doc["met"]) == {"fused_vs_dense_batch1_bfloat16_raw",
                               "fused_vs_dense_batch1_float16_raw"}
    png = plot.draw("gemv", doc, tmp_path / "gemv.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options():
    with pytest.raises(ValueError, match="--shape"):
        gemv.run(**_args("--shape", "3"))
    with pytest.raises(ValueError, match="--batches"):
        gemv.run(**_args("--batches", "0"))
    with pytest.raises(ValueError, match="--values"):
        gemv.run(**_args("--values", "raw,zstd"))
