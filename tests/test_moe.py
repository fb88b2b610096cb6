"""endor.moe: per-expert checkpoint names onto transformers' fused experts, bit for bit what
transformers itself builds when it loads the same checkpoint."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from endor.reference_loader import load_in_memory
from endor.moe import fuse, find_experts, model_names, parse_expert_name, to_model_names
from endor.format.equal import bit_equal
from tests.moe_models import ARCHS, random_moe, save_moe


def test_parse_expert_name():
    assert parse_expert_name("model.layers.3.mlp.experts.7.up_proj.weight") == \
        ("model.layers.3.mlp", 7, "up")
    assert parse_expert_name("model.layers.0.block_sparse_moe.experts.0.w2.weight") == \
        ("model.layers.0.block_sparse_moe", 0, "down")
    assert parse_expert_name("model.layers.0.mlp.shared_expert.up_proj.weight") is None
    assert parse_expert_name("model.layers.0.mlp.experts.0.other.weight") is None


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_as_transformers_loads_them(tmp_path, arch):
    save_moe(arch, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    stored = load_file(tmp_path / "model.safetensors")
    ours = to_model_names(random_moe(arch), stored)
    tied = set(theirs) - set(ours)
    assert tied <= {"lm_head.weight"}
    for name, t in ours.items():
        assert bit_equal(t, theirs[name]), name
    assert model_names(random_moe(arch), stored) == set(ours)


def test_mismatched_experts_are_a_value_error():
    model = random_moe("qwen3_moe")
    layer = model.model.layers[0]
    names = [f"mlp.experts.{e}.{p}.weight" for e in range(7)
             for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(ValueError, match="missing"):
        find_experts(layer, names)
    with pytest.raises(ValueError, match="no per-expert"):
        find_experts(layer, ["mlp.gate.weight"])
    assert find_experts(model.model.layers[0].self_attn, ["q_proj.weight"]) is None


def test_fuse_puts_gate_rows_above_up_rows():
    model = random_moe("mixtral")
    layer = model.model.layers[0]
    names = find_experts(layer, [f"block_sparse_moe.experts.{e}.w{k}.weight" for e in range(4)
                                 for k in (1, 2, 3)])
    assert names.module == "mlp.experts" and names.stored_block == "block_sparse_moe"
    assert names.model_name("block_sparse_moe.gate.weight") == "mlp.gate.weight"
    tensors = {n: torch.full((24, 32) if "w2" not in n else (32, 24), float(i))
               for i, n in enumerate(names.all_names())}
    fused = fuse(names, tensors)
    g, u, d = names.names[2]
    assert bit_equal(fused["mlp.experts.gate_up_proj"][2, :24], tensors[g])
    assert bit_equal(fused["mlp.experts.gate_up_proj"][2, 24:], tensors[u])
    assert bit_equal(fused["mlp.experts.down_proj"][2], tensors[d])


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_hf_directory_loads_in_memory_like_transformers(tmp_path, arch):
    save_moe(arch, tmp_path)
    ours, _ = load_in_memory(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, t in theirs.state_dict().items():
        assert bit_equal(t, ours.state_dict()[name]), name
