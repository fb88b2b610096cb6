"""`endor bench gemv` (src/endor/bench/gemv.py): the quick document has every method per dtype
and batch, the ratios it claims are computed from its own rows, and bad options are errors."""

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
    doc = gemv.run(**_args("--batches", "1,3"))
    rows = {(r["dtype"], r["batch"], r["method"]): r for r in doc["results"]}
    assert set(rows) == {(d, b, m) for d in ("bfloat16", "float16") for b in (1, 3)
                         for m in gemv.METHODS}
    for d in ("bfloat16", "float16"):
        fused, dense = rows[(d, 1, "fused")], rows[(d, 1, "dense")]
        assert fused["fused_vs_dense"] == pytest.approx(dense["median_s"] / fused["median_s"])
        assert doc["ratios"][f"fused_vs_dense_batch1_{d}"] == fused["fused_vs_dense"]
        assert fused["packed_bytes"] < fused["dense_bytes"]
        assert fused["max_abs_diff_vs_dense_rel"] < 1e-2  # same product, another sum order
    png = plot.draw("gemv", doc, tmp_path / "gemv.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options():
    with pytest.raises(ValueError, match="--shape"):
        gemv.run(**_args("--shape", "3"))
    with pytest.raises(ValueError, match="--batches"):
        gemv.run(**_args("--batches", "0"))
