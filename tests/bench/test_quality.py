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
    """_settings' arguments: the options but the work directory, and --quick."""
    return {k: v for k, v in options.items() if k != "workdir"} | {"quick": quick}
