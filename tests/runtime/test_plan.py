import pytest
import torch

import endor
from endor.runtime.plan import (OUT_ALIGN, parse_size, plan_layer, plan_memory)


@pytest.mark.parametrize("text, expected", [
    (None, None), (0, 0), (1234, 1234), ("1234", 1234), ("500MB", 500 * 10**6),
    ("2GiB", 2 * 2**30), ("1.5 gb", 1_500_000_000), ("64KiB", 65536), ("3k", 3000),
    ({"cpu": "1MB"}, 10**6),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad, error", [("lots", ValueError), ("5 parsecs", ValueError),
                                        (-1, ValueError), (True, TypeError), ([1], TypeError),
                                        ({"cuda": 5}, ValueError)])
def test_parse_size_rejects(bad, error):
    with pytest.raises(error):
        parse_size(bad)


def test_plan_memory_keeps_leading_layers_that_fit():
    plan = plan_memory(100 + 2 * 50 + 49, 100, [50, 50, 50, 50])
    assert plan.resident == (0, 1) and plan.streamed == (2, 3)
    assert plan.resident_bytes == 200
    assert plan_memory(None, 100, [50] * 3).streamed == ()
    zero = plan_memory(0, 100, [50] * 3)
    assert zero.resident == () and zero.streamed == (0, 1, 2) and zero.budget == 100
    with pytest.raises(ValueError, match="at least 100"):
        plan_memory(99, 100, [50])


def test_plan_layer_views_dense_tensors_and_decompresses_endor_ones(tmp_path):
    w = torch.randn(7, 13, dtype=torch.bfloat16)
    w[w.abs() < 0.5] = 0
    norm = torch.randn(13, dtype=torch.bfloat16)
    path = tmp_path / "layer.safetensors"
    endor.save_file({"m.layers.0.proj.weight": endor.compress(w),
                     "m.layers.0.norm.weight": norm}, path)
    expected = {"proj.weight": (w.shape, w.dtype), "norm.weight": (norm.shape, norm.dtype)}
    with endor.open_file(path) as f:
        plan = plan_layer(0, f, "m.layers.0.", expected)
    by_name = {t.name: t for t in plan.tensors}
    # a layer with compressed tensors is decompressed whole: its dense ones are copied beside them
    assert not by_name["norm.weight"].compressed and by_name["norm.weight"].out is not None
    assert by_name["proj.weight"].compressed and by_name["proj.weight"].out % OUT_ALIGN == 0
    assert by_name["norm.weight"].out % OUT_ALIGN == 0 and not plan.keeps_image
    assert plan.dense_buffer_bytes >= (w.numel() + norm.numel()) * 2
    assert plan.dense_buffer_bytes % OUT_ALIGN == 0
    assert plan.weight_bytes == (w.numel() + norm.numel()) * 2
    assert plan.file_size == path.stat().st_size

    dense_path = tmp_path / "dense.safetensors"  # a dense layer is used in place
    endor.save_file({"m.layers.0.proj.weight": w, "m.layers.0.norm.weight": norm}, dense_path)
    with endor.open_file(dense_path) as f:
        plan = plan_layer(0, f, "m.layers.0.", expected)
    assert all(t.out is None for t in plan.tensors) and plan.keeps_image
    assert plan.dense_buffer_bytes == 0


def test_plan_layer_rejects_mismatches(tmp_path):
    path = tmp_path / "layer.safetensors"
    endor.save_file({"m.layers.0.a": torch.zeros(4, dtype=torch.float16),
                     "m.layers.0.c": endor.compress(torch.ones(4, dtype=torch.float32))}, path)
    with endor.open_file(path) as f:
        with pytest.raises(endor.FormatError, match="lacks"):
            plan_layer(0, f, "m.layers.0.", {"a": ((4,), torch.float16), "b": ((4,), torch.float16),
                                            "c": ((4,), torch.float32)})
        with pytest.raises(endor.FormatError, match="no place"):
            plan_layer(0, f, "m.layers.0.", {"a": ((4,), torch.float16)})
        with pytest.raises(endor.FormatError, match="shape"):
            plan_layer(0, f, "m.layers.0.", {"a": ((2, 2), torch.float16),
                                            "c": ((4,), torch.float32)})
        with pytest.raises(endor.FormatError, match="compressed as torch.float32"):
            plan_layer(0, f, "m.layers.0.", {"a": ((4,), torch.float16),
                                            "c": ((4,), torch.float16)})
        with pytest.raises(endor.FormatError, match="outside decoder layer"):
            plan_layer(0, f, "m.layers.0.a", {"": ((4,), torch.float16)})
