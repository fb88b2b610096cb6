"""Benchmark pictures and tables: each benchmark's own plot and the generic fallback write a real
PNG from a document, and the table shows the chosen columns, aligned."""

import pytest

from endor.bench import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu": "test cpu"}


def _formats_doc():
    rows = []
    for dtype, b in (("float16", 16), ("float32", 32)):
        for s in (0.5, 0.7):
            for name, bits, gbps in (("dense", b, 20.0), ("endor", (1 - s) * b + 1.02, 5.0),
                                     ("endor-reference", (1 - s) * b + 1.02, 0.3),
                                     ("coo", (1 - s) * (b + 128), 2.0),
                                     ("zstd", (1 - s) * b + 2, 1.0)):
                rows.append({"format": name, "dtype": dtype, "sparsity": s,
                             "bits_per_element": bits, "bits_bound": (1 - s) * b + 1,
                             "decode_gbps": gbps})
    return {"benchmark": "formats", "machine": MACHINE, "results": rows}


def _decompress_doc():
    rows = [{"device": device, "dtype": "float16", "sparsity": s, "method": m, "output": o,
             "gbps": g}
            for device in ("cpu", "cuda") for s in (0.5, 0.9)
            for m, o, g in (("copy", "fresh", 5.0), ("copy", "out", 6.0), ("cpu", "out", 4.0),
                            ("numpy", "fresh", 0.25))]
    return {"benchmark": "decompress", "machine": MACHINE, "results": rows}


def _transfer_doc(with_gpu):
    rows = [{"link": "disk", "mode": m, "block_mib": b, "gbps": g}
            for b in (1, 4) for m, g in (("direct", 2.3), ("buffered_warm", 9.0))]
    rows += [{"link": "host_memcpy", "mode": "copy", "threads": 1, "gbps": 4.5}]
    if with_gpu:
        rows += [{"link": "host_device", "direction": "h2d", "memory": mem, "size_mib": size,
                  "gbps": g} for mem, g in (("pinned", 50.0), ("pageable", 20.0))
                 for size in (64, 256)]
    return {"benchmark": "transfer", "machine": MACHINE, "results": rows}


def _png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


@pytest.mark.parametrize("name, doc", [
    ("formats", _formats_doc()), ("decompress", _decompress_doc()),
    ("transfer", _transfer_doc(False)), ("transfer", _transfer_doc(True)),
    # A benchmark without a plot of its own (e2e, convert) gets the generic one.
    ("e2e", {"benchmark": "e2e", "machine": MACHINE, "results": [
        {"model": "smollm2", "pipeline": p, "tokens_per_s": t, "prompt_len": 16}
        for p, t in (("dense", 3.0), ("endor", 4.5))]}),
    ("convert", {"benchmark": "convert", "results": []}),
])
def test_draw_writes_a_png(tmp_path, name, doc):
    path = plot.draw(name, doc, tmp_path / "sub" / f"{name}.png")
    assert path == tmp_path / "sub" / f"{name}.png" and _png(path)


def test_headline_metric_prefers_throughput():
    assert plot.headline_metric([{"name": "a", "n": 3, "median_s": 0.1, "gbps": 2.0}]) == "gbps"
    assert plot.headline_metric([{"x": "a", "tokens_per_s": 1.0, "n": 2}]) == "tokens_per_s"
    assert plot.headline_metric([{"x": "a", "ok": True, "median_s": 0.5}]) == "median_s"
    assert plot.headline_metric([{"x": "a"}]) is None
    rows = [{"system": "endor", "gbps": 1.0, "decode_tokens_per_s": 3.0}]
    assert plot.headline_metric(rows) == "decode_tokens_per_s"
    rows = [{"model": "m", "ratio": 1.8, "perplexity": 20.0, "n": 1}]
    assert plot.headline_metric(rows, ["model", "perplexity", "ratio"]) == "perplexity"


def test_table_uses_chosen_columns_aligned():
    doc = {"benchmark": "x", "table_columns": ["name", "gbps", "note"],
           "results": [{"name": "endor", "gbps": 12.3456, "note": None, "hidden": 1},
                       {"name": "csr", "gbps": 0.000123, "note": True}]}
    lines = plot.format_table(doc).splitlines()
    assert lines[0].split() == ["name", "gbps", "note"]
    assert lines[2].split() == ["endor", "12.35", "-"]
    assert lines[3].split() == ["csr", "0.000123", "yes"]
    assert len({len(line) for line in lines}) == 1  # every line equally wide: aligned


def test_table_defaults_to_scalar_columns_and_handles_no_results(capsys):
    plot.print_table({"benchmark": "y", "results": [{"a": 1, "nested": {"b": 2}, "c": "z"}]})
    assert capsys.readouterr().out.splitlines()[0].split() == ["a", "c"]
    assert plot.format_table({"benchmark": "y", "results": []}) == "y: no results"
