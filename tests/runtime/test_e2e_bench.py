"""`endor bench e2e --quick` (src/endor/bench/e2e.py; kept with the runtime it measures)."""

import argparse

from endor.bench import e2e


def test_quick_e2e_document(tmp_path):
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    args = parser.parse_args(["--workdir", str(tmp_path), "--systems",
                              "endor,dense,accelerate-cold", "--new-tokens", "3"])
    args.quick, args.repeat, args.warmup = True, 1, 0
    doc = e2e.run(args)
    assert doc["schema"] == "endor-bench/1" and doc["benchmark"] == "e2e"
    rows = {r["system"]: r for r in doc["results"]}
    assert set(rows) == {"endor", "dense", "accelerate-cold", "ideal", "disk"}
    for name in ("endor", "dense", "accelerate-cold"):
        assert rows[name]["tokens_match"] and rows[name]["decode_tokens_per_s"] > 0
        assert rows[name]["streamed_layers"] == 4 and rows[name]["resident_layers"] == 0
    assert rows["endor"]["mb_read_per_token"] < rows["dense"]["mb_read_per_token"]
    assert rows["ideal"]["s_per_token"] == rows["dense"]["s_per_token"] * \
        rows["endor"]["mb_read_per_token"] / rows["dense"]["mb_read_per_token"]
    assert set(doc["ratios"]) >= {"endor_vs_dense", "endor_vs_ideal_time",
                                  "endor_vs_accelerate_cold"}
    assert doc["params"]["budget_bytes"] <= 0.1 * doc["params"]["model_bytes"]
