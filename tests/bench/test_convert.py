"""`endor bench convert` (src/endor/bench/convert.py)."""

import sys

import pytest

from endor.bench import convert as bench


def test_default_synthetic_checkpoint_is_above_3_gb():
    config = bench.synthetic_config(None, quick=False)
    per_layer = 2 * (4 * 2560 ** 2 + 3 * 2560 * 6912 + 2 * 2560)
    total = config.num_hidden_layers * per_layer + 2 * (2 * 32000 * 2560 + 2560)
    assert 3.0e9 < bench.DEFAULT_SIZE_GB * 1e9 <= total < bench.DEFAULT_SIZE_GB * 1e9 + per_layer
    assert bench.synthetic_config(8.0, quick=False).num_hidden_layers > config.num_hidden_layers


def test_peak_rss_is_the_childs_own(tmp_path):
    """A child allocating 300 MB reports about 300 MB more than an idle one, not this test
    process's RSS (which the kernel would carry into a child forked from it)."""
    big = bytearray(400 * 2**20)  # make this process large: it must not leak into the child
    touch = "b = bytearray({}); b[::4096] = b'x' * len(b[::4096])"
    idle = bench.run_child([sys.executable, "-S", "-c", "pass"], tmp_path / "idle.log")
    busy = bench.run_child([sys.executable, "-S", "-c", touch.format(300 * 2**20)],
                           tmp_path / "busy.log")
    del big
    assert idle["returncode"] == 0 and busy["returncode"] == 0
    assert idle["peak_rss"] < 100e6
    # about 300 MiB: the two interpreters' own footprints differ by a few hundred KiB
    assert 290 * 2**20 < busy["peak_rss"] - idle["peak_rss"] < 340 * 2**20


@pytest.mark.slow
def test_quick_run(tmp_path):
    params = dict(size_gb=None, method="magnitude", sparsity=0.5, weights="endor",
                  conversions=1, workdir=str(tmp_path), quick=True, repeat=1, warmup=0)
    doc = bench.run(**params)
    assert doc["schema"] == "endor-bench/1" and doc["benchmark"] == "convert"
    rows = {r["case"].split()[0]: r for r in doc["results"]}
    conv = rows["convert"]
    assert conv["gbps"] > 0 and conv["ratio"] > 1.2 and conv["peak_rss_gb"] > 0.1
    assert rows["copy"]["gbps"] > 0 and rows["imports"]["peak_rss_gb"] > 0.05
    assert doc["done_when"]["met"] is False  # a few MB is not the >= 3 GB case
    assert set(doc["params"]["load_avg"]) == {"before", "after"}
    assert "load_avg_before" in conv["runs"][0]
    assert list(tmp_path.iterdir()) == []  # the work directory is removed


def test_bad_options():
    params = dict(size_gb=None, method="magnitude", sparsity=0.5, weights="endor",
                  conversions=0, workdir=None, quick=True, repeat=1, warmup=0)
    with pytest.raises(ValueError, match="conversions"):
        bench.run(**params)


def test_plot(tmp_path):
    import json
    from pathlib import Path

    from endor.bench import plot
    doc = json.loads((Path(__file__).parents[2] / "docs/benchmarks/convert.json").read_text())
    path = plot.draw("convert", doc, tmp_path / "convert.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
