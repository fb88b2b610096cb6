"""Converting mixture-of-experts checkpoints: each expert pruned on its own, the router dense,
experts stored last and one byte range each; calibrated methods prune experts by magnitude and
say so in endor.json."""

import json

import pytest
import torch
from safetensors.torch import load_file

from endor.convert import convert
from endor.format import EndorFile
from endor.format import load_file as endor_load_file
from endor.reference_loader import load_in_memory
from endor.moe import parse_expert_name
from endor.prune import prune_weight
from endor.runtime import load_model
from tests.convert.conftest import CALIB_TEXT, SAMPLES, SEQLEN, make_tokenizer
from endor.format.equal import bit_equal
from tests.moe_models import save_moe
from tests.runtime.checkpoints import greedy


def _converted(out) -> dict:
    tensors = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        tensors.update(endor_load_file(shard))
    return tensors


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_each_expert_is_pruned_on_its_own_and_stored_as_one_range(tmp_path, arch):
    save_moe(arch, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "out", method="magnitude", sparsity=0.5,
            progress=False)
    source = load_file(tmp_path / "hf" / "model.safetensors")
    ours = _converted(tmp_path / "out")
    experts = [n for n in source if parse_expert_name(n)]
    assert experts and set(ours) | {"lm_head.weight"} >= set(source)
    for name in experts:
        assert bit_equal(ours[name], prune_weight(source[name], method="magnitude",
                                                  sparsity=0.5)), name
    router = next(n for n in source if n.endswith(".gate.weight") and "layers.1." in n)
    assert bit_equal(ours[router], source[router])  # the router is never pruned
    with EndorFile(sorted((tmp_path / "out").glob("model-*.safetensors"))[1]) as f:
        ranges = {}
        core_end = 0
        for n in f.keys():
            span = f.byte_ranges(n)
            parsed = parse_expert_name(n)
            if parsed is None:
                core_end = max(core_end, max(e for _, e in span))
            else:
                ranges.setdefault(parsed[1], []).extend(span)
        ordered = [sorted(ranges[e]) for e in sorted(ranges)]
        assert core_end <= ordered[0][0][0]
        for e, spans in enumerate(ordered):  # one contiguous run, right after the previous
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            if e:
                assert spans[0][0] == ordered[e - 1][-1][1]
    manifest = json.loads((tmp_path / "out" / "endor.json").read_text())
    assert manifest["expert_pruning"] == "magnitude"
    down = "block_sparse_moe.experts.*.w2" if arch == "mixtral" else "mlp.experts.*.down_proj"
    assert manifest["summary"]["by_type"][down]["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_prune_experts_by_magnitude_and_run(tmp_path, method):
    save_moe("qwen3_moe", tmp_path / "hf", dtype=torch.float32, vocab_size=320)
    make_tokenizer(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "out", method=method, sparsity=0.5,
            calib_text=CALIB_TEXT, calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False)
    source = load_file(tmp_path / "hf" / "model.safetensors")
    ours = _converted(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "endor.json").read_text())
    assert manifest["method"] == method and manifest["expert_pruning"] == "magnitude"
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    assert bit_equal(ours[name], prune_weight(source[name], method="magnitude", sparsity=0.5))
    q = "model.layers.2.self_attn.q_proj.weight"  # calibrated: not the magnitude choice
    assert not bit_equal(ours[q], prune_weight(source[q], method="magnitude", sparsity=0.5))
    assert (ours[q] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    reference, _ = load_in_memory(tmp_path / "out")
    prompt = torch.tensor([[5, 17, 3, 44, 9, 2, 71, 30]])
    model = load_model(tmp_path / "out", max_memory=0)
    try:
        assert greedy(model, prompt, 4) == greedy(reference, prompt, 4)
    finally:
        model.endor_close()
