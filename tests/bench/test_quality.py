"""endor.bench.quality (tests of the benchmark live beside the evaluation it drives)."""

import argparse

import pytest

from endor.bench import quality
from tests.evaluate.tiny_models import char_tokenizer, tiny_model


def parse(argv) -> dict:
    """The benchmark's own options, as run() takes them."""
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    return vars(parser.parse_args(argv))


@pytest.fixture
def tiny_hf_dir(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    char_tokenizer(add_bos=False).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.slow
def test_every_method_and_pattern_on_a_tiny_model(tiny_hf_dir, tmp_path):
    args = parse(["--models", str(tiny_hf_dir), "--window", "32", "--max-windows", "2",
                  "--calib-samples", "2", "--workdir", str(tmp_path / "work")])
    doc = quality.run(**args, quick=False, warmup=0, repeat=1)
    assert doc["schema"] == "endor-bench/1" and doc["benchmark"] == "quality"
    rows = doc["results"]
    assert [(r["method"], r["pattern"]) for r in rows] == [("dense", "dense")] + [
        (m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("50%", "2:4")]
    dense = rows[0]
    # tiny_model already zeroes half of every decoder Linear weight
    assert dense["linear_sparsity"] == pytest.approx(0.5, abs=0.05)
    for row in rows[1:]:
        assert row["linear_sparsity"] >= 0.5
        assert row["ratio"] > 1.0 and row["perplexity"] > 1.0
        assert row["vs_dense"] == pytest.approx(row["perplexity"] / dense["perplexity"],
                                                rel=1e-3)
        assert row["eval"]["tokens"] == 2 * 31
        # SparseGPT's dampening changes its results: recorded with them
        assert row["damping"] == (quality.DEFAULT_DAMPING if row["method"] == "sparsegpt"
                                  else None)
    assert not any((tmp_path / "work").iterdir())  # converted checkpoints removed
    fig = quality.draw(doc)
    assert [ax.get_title() for ax in fig.axes] == [str(tiny_hf_dir)]
    fig.savefig(tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_settings():
    quick = quality._settings(**_with_quick(parse([]), True))
    assert quick["models"] == ["smollm2"] and quick["max_windows"] == 4
    full = quality._settings(**_with_quick(parse(["--methods", "wanda", "--patterns", "2:4"]),
                                         False))
    assert full["models"] == list(quality.MODELS) and full["methods"] == ["wanda"]
    assert full["patterns"] == ["2:4"]
    with pytest.raises(SystemExit):
        parse(["--methods", "obs"])
    with pytest.raises(ValueError, match="window"):
        quality._settings(**_with_quick(parse(["--window", "1"]), False))


def _with_quick(options: dict, quick: bool) -> dict:
    """_settings' arguments: the options but the work directory and merge file, and --quick."""
    return {k: v for k, v in options.items() if k not in ("workdir", "merge")} | {"quick": quick}


TINY = ["--window", "32", "--max-windows", "2", "--calib-samples", "2", "--group-size", "32"]


def test_quantized_rows_on_a_tiny_model(tiny_hf_dir, tmp_path):
    args = parse(["--models", str(tiny_hf_dir), *TINY, "--methods", "wanda,sparsegpt",
                  "--patterns", "50%", "--values", "raw,int8,int4", "--damping", "0.05",
                  "--workdir", str(tmp_path / "work")])
    doc = quality.run(**args, quick=False, warmup=0, repeat=1)
    rows = doc["results"]
    assert [(r["method"], r["values"], r["rounding"]) for r in rows[1:]] == [
        ("wanda", "raw", None), ("wanda", "int8", "rtn"), ("wanda", "int4", "rtn"),
        ("sparsegpt", "raw", None), ("sparsegpt", "int8", "joint"),
        ("sparsegpt", "int8", "rtn"), ("sparsegpt", "int4", "joint"),
        ("sparsegpt", "int4", "rtn")]
    raws = {r["method"]: r for r in rows[1:] if r["values"] == "raw"}
    assert {r["damping"] for r in rows[1:]} == {None, 0.05}  # SparseGPT's rows: the option's
    for quantized in (r for r in rows[1:] if r["values"] != "raw"):
        raw = raws[quantized["method"]]
        assert quantized["ratio"] > 1.3 * raw["ratio"]
        assert quantized["linear_bits_per_element"] < 0.6 * raw["linear_bits_per_element"]
        assert raw["quantization_error"] is None and 0 < quantized["quantization_error"] < 0.3
        assert quantized["vs_raw"] == pytest.approx(quantized["perplexity"] / raw["perplexity"],
                                                    rel=1e-3)
        assert quantized["group_size"] == 32
        if quantized["rounding"] == "rtn":
            # the raw checkpoint rounded: its zeros stay, a weight rounding to 0 adds one
            assert quantized["linear_sparsity"] >= raw["linear_sparsity"]
        if quantized["values"] == "int8":  # few weights round to 0 on the int8 grid
            assert quantized["linear_sparsity"] < raw["linear_sparsity"] + 0.01
    assert raws["wanda"]["vs_raw"] == 1.0 and rows[0]["vs_raw"] is None
    assert {b["bar"] for b in doc["bars"]} == {
        "wanda int8 rtn <= 1.01 x raw", "sparsegpt int8 joint <= 1.01 x raw",
        "sparsegpt int8 rtn <= 1.01 x raw", "sparsegpt int4 joint <= 1.15 x raw",
        "sparsegpt int4 joint < wanda int4 rtn", "sparsegpt int4 joint < sparsegpt int4 rtn"}
    assert not any((tmp_path / "work").iterdir())  # converted checkpoints removed
    fig = quality.draw(doc)
    assert len(fig.axes) == 1
    fig.savefig(tmp_path / "quality.png")


def test_merge_keeps_the_rows_this_run_lacks(tiny_hf_dir, tmp_path):
    from endor.bench import harness
    first = quality.run(**parse(["--models", str(tiny_hf_dir), *TINY, "--methods", "magnitude",
                                 "--values", "raw,int4", "--patterns", "2:4"]),
                        quick=False, warmup=0, repeat=1)
    path = harness.write_json(first, tmp_path / "quality.json")
    # only the int4 row again: the raw row (the ratio's base) comes from the earlier file
    second = quality.run(**parse(["--models", str(tiny_hf_dir), *TINY, "--methods", "magnitude",
                                  "--values", "int4", "--patterns", "2:4", "--merge",
                                  str(path)]), quick=False, warmup=0, repeat=1)
    rows = second["results"]
    assert [(r["method"], r["values"]) for r in rows] == [
        ("dense", "dense"), ("magnitude", "raw"), ("magnitude", "int4")]
    assert rows[:2] == first["results"][:2]  # kept as they were (the dense row reused)
    assert rows[2]["vs_raw"] == pytest.approx(rows[2]["perplexity"] / rows[1]["perplexity"],
                                              rel=1e-3)
    with pytest.raises(ValueError, match="max_windows"):
        quality.run(**parse(["--models", str(tiny_hf_dir), *TINY, "--max-windows", "3",
                             "--merge", str(path)]), quick=False, warmup=0, repeat=1)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a quality result"):
        quality.run(**parse(["--models", str(tiny_hf_dir), "--merge",
                             str(tmp_path / "bad.json")]), quick=False, warmup=0, repeat=1)


def test_row_plan():
    params = {"values": ["raw", "int8", "int4"], "rounding": ["joint", "rtn"]}
    assert quality.row_plan("wanda", params) == [("raw", None), ("int8", "rtn"),
                                                 ("int4", "rtn")]
    assert quality.row_plan("sparsegpt", params | {"values": ["int4"], "rounding": ["joint"]}) \
        == [("int4", "joint")]


def _row(method, values, rounding, ppl, pattern="50%"):
    return {"model": "m", "method": method, "pattern": pattern, "values": values,
            "rounding": rounding, "perplexity": ppl}


def test_bars_say_which_bar_is_met():
    rows = [_row("wanda", "raw", None, 100.0), _row("wanda", "int8", "rtn", 100.5),
            _row("wanda", "int4", "rtn", 130.0), _row("sparsegpt", "raw", None, 100.0),
            _row("sparsegpt", "int8", "joint", 101.5), _row("sparsegpt", "int4", "joint", 114.0),
            _row("sparsegpt", "int4", "rtn", 113.0)]
    met = {b["bar"]: b["met"] for b in quality.bars(rows)}
    assert met == {"wanda int8 rtn <= 1.01 x raw": True,
                   "sparsegpt int8 joint <= 1.01 x raw": False,
                   "sparsegpt int4 joint <= 1.15 x raw": True,
                   "sparsegpt int4 joint < wanda int4 rtn": True,
                   "sparsegpt int4 joint < sparsegpt int4 rtn": False}


def test_calibration_texts(tmp_path):
    from endor.data.text import article_split, calibration_text
    assert quality.calibration("article")[1] == article_split()[2]
    assert quality.calibration("pydoc")[1] == calibration_text()
    (tmp_path / "mine.txt").write_text("my own calibration text\n")
    assert quality.calibration(str(tmp_path / "mine.txt")) == (str(tmp_path / "mine.txt"),
                                                                "my own calibration text\n")
    with pytest.raises(ValueError, match="no such file"):
        quality.calibration(str(tmp_path / "missing.txt"))


def test_merge_needs_the_same_calibration(tmp_path):
    import json
    params = quality._settings(**_with_quick(parse([]), False))
    assert params["calib"] == "article" and params["scored"] == "evaluation"
    earlier = {"benchmark": "quality", "params": {**params, "calib": "pydoc"}, "results": []}
    (tmp_path / "pydoc.json").write_text(json.dumps(earlier))
    with pytest.raises(ValueError, match="calib=pydoc"):
        quality.earlier_rows(tmp_path / "pydoc.json", params)
    assert quality.earlier_rows(tmp_path / "pydoc.json", {**params, "calib": "pydoc"}) == []
    # files written before --calib existed were calibrated on the Python docs
    del earlier["params"]["calib"]
    (tmp_path / "legacy.json").write_text(json.dumps(earlier))
    with pytest.raises(ValueError, match="calib"):
        quality.earlier_rows(tmp_path / "legacy.json", params)
    assert quality.earlier_rows(tmp_path / "legacy.json", {**params, "calib": "pydoc"}) == []


def test_scored_part(tiny_hf_dir):
    docs = {part: quality.run(**parse(["--models", str(tiny_hf_dir), *TINY, "--methods",
                                       "magnitude", "--patterns", "2:4", "--scored", part]),
                              quick=False, warmup=0, repeat=1)
            for part in quality.SCORED_PARTS}
    assert docs["validation"]["params"]["scored"] == "validation"
    assert "validation part" in docs["validation"]["text"]["evaluation"]
    dense = {part: doc["results"][0]["perplexity"] for part, doc in docs.items()}
    assert dense["evaluation"] != dense["validation"]  # other text, other perplexity
