import json

import pytest
import torch
from safetensors import safe_open

from endor.convert.synthetic import parameter_shapes, write_synthetic_checkpoint
from tests.convert.conftest import tiny_config


def files_of(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_deterministic_per_seed_and_sharded(tmp_path):
    config = tiny_config("llama")
    a = write_synthetic_checkpoint(tmp_path / "a", config, seed=3, max_shard_bytes=40_000)
    b = write_synthetic_checkpoint(tmp_path / "b", config, seed=3, max_shard_bytes=40_000)
    c = write_synthetic_checkpoint(tmp_path / "c", config, seed=4, max_shard_bytes=40_000)
    assert files_of(a) == files_of(b)
    shards_a, shards_c = sorted(a.glob("model-*")), sorted(c.glob("model-*"))
    assert len(shards_a) == len(shards_c) > 2
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(shards_a, shards_c))
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shapes = parameter_shapes(config)
    assert set(index["weight_map"]) == set(shapes) and "lm_head.weight" not in shapes  # tied
    total = 0
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(a / file), framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * 2 for k in f.keys()]
            assert sum(sizes) <= 40_000 or len(sizes) == 1
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == torch.float16 and tuple(t.shape) == shapes[k]
                assert index["weight_map"][k] == file
                total += t.numel() * 2
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loads_with_transformers_in_its_dtype(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    src = write_synthetic_checkpoint(tmp_path, tiny_config("qwen2"), dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(src)
    assert model.dtype == dtype
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert bool(torch.isfinite(logits).all())
    weight = model.model.layers[0].mlp.up_proj.weight.detach().float()
    assert 0.015 < float(weight.std()) < 0.025  # initializer_range 0.02
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_synthetic_checkpoint(tmp_path, tiny_config("llama"), dtype=torch.int8)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        write_synthetic_checkpoint(tmp_path, tiny_config("llama"), max_shard_bytes=0)
