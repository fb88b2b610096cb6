import pytest

from endor.runtime.reader import evict_files
from endor.bench.baseline import evict_on_read, load_accelerate
from tests.runtime.checkpoints import greedy
from tests.conftest import NEW_TOKENS, PROMPT


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gemma3"])
def test_accelerate_disk_offload_matches_the_reference(tiny, arch):
    path, _, want = tiny(arch, "dense")
    model = load_accelerate(path, max_memory=0)
    assert evict_files(model.endor_files)
    evict_on_read(model)
    assert greedy(model, PROMPT, NEW_TOKENS) == want
    stats = model.endor_stats()
    assert stats["streamed_layers"] == [0, 1, 2, 3] and stats["runtime"] == "accelerate"
    assert stats["decode_tokens"] == NEW_TOKENS - 1 and stats["decode_tokens_per_s"] > 0
    assert {v for k, v in model.hf_device_map.items() if ".layers." in k} == {"disk"}


def test_accelerate_keeps_the_same_layers_resident_as_load_model(tiny):
    from endor.runtime import load_model

    path, _, want = tiny("llama", "dense")
    ours = load_model(path, max_memory=0)
    budget = ours.endor_stats()["resident_bytes"] + ours.endor_stats()["streamed_dense_bytes"] // 2
    ours.endor_close()
    model = load_accelerate(path, max_memory=budget)
    ours = load_model(path, max_memory=budget)
    assert model.endor_stats()["resident_layers"] == ours.endor_stats()["resident_layers"] == [0, 1]
    assert greedy(model, PROMPT, NEW_TOKENS) == want
    ours.endor_close()


def test_accelerate_needs_dense_weights(tiny):
    path, _, _ = tiny("llama", "endor")
    with pytest.raises(ValueError, match="only dense"):
        load_accelerate(path, max_memory=0)
    with pytest.raises(ValueError, match="offloads nothing"):
        load_accelerate(path, offload="cpu")


def test_accelerate_moe_experts_offloaded_at_load_are_evicted_and_removed(tmp_path, monkeypatch):
    """transformers fuses an MoE checkpoint's per-expert tensors while loading and writes the
    fused ones into offload_folder: Accelerate reads them there, so a cold run evicts them too."""
    from pathlib import Path

    from endor.bench import baseline
    from endor.convert import convert
    from tests.moe_models import save_moe

    save_moe("qwen3_moe", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "dense", method="magnitude", sparsity=0.5,
            weights="dense", progress=False)
    evicted = []
    monkeypatch.setattr(baseline, "evict_page_cache", lambda p: evicted.append(p) or True)
    model = load_accelerate(tmp_path / "dense", max_memory=0)
    offloaded = model.endor_offloaded
    assert sorted(offloaded) == model.endor_stats()["streamed_layers"]
    assert all(any("experts.gate_up_proj" in p for p in ps) for ps in offloaded.values())
    evict_on_read(model)
    greedy(model, PROMPT, 2)
    assert {p for ps in offloaded.values() for p in ps} <= set(evicted)
    folder = Path(offloaded[0][0]).parent
    model.endor_close()
    assert not folder.exists()
