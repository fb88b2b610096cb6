"""endor.inspect.budgets: the budgets a converted checkpoint runs in, checked against what the
runtime actually holds."""

from endor.inspect import budgets
from endor.runtime import open_model


def test_budgets_match_the_runtime(tiny):
    path, _, _ = tiny("llama", "endor")
    b = budgets(path)
    with open_model(path, max_memory=b["rest_resident_bytes"]) as least:
        assert least.endor_stats()["resident_layers"] == []
        assert least.endor_stats()["resident_bytes"] == b["rest_resident_bytes"]
    with open_model(path, max_memory=b["all_resident_fused_bytes"], compute="fused") as fused:
        assert fused.endor_stats()["streamed_layers"] == []
    with open_model(path, max_memory=b["all_resident_fused_bytes"], compute="dense") as dense:
        assert dense.endor_stats()["streamed_layers"] != []  # dense needs more
    with open_model(path, max_memory=b["all_resident_dense_bytes"], compute="dense") as dense:
        assert dense.endor_stats()["streamed_layers"] == []
    assert b["largest_layer_shard_bytes"] > 0


def test_a_single_file_has_no_budgets(tmp_path):
    import torch

    import endor
    endor.save_file({"w": torch.zeros(2, 2)}, tmp_path / "a.safetensors")
    assert budgets(tmp_path / "a.safetensors") is None
