"""compressed-tensors checkpoints as conversion sources: legacy sparse-bitmask decoded bit-exactly
(odd shapes, every dtype, sparsities 0 to 1), pack-quantized dequantized as compressed-tensors
does, malformed parts rejected naming the tensor, and `endor convert` on both, without pruning."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from endor.convert import convert
from endor.convert.ct_source import CompressedTensorsSource
from endor.convert.endor_source import open_source
from endor.errors import FormatError
from endor.format import load_file
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, sparse_tensor
from tests.runtime.checkpoints import pruned_model

BITMASK_QC = {"quant_method": "compressed-tensors", "format": "dense",
              "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"],
                                  "ignore": ["lm_head"]}}


def bitmask_parts(name: str, w: torch.Tensor) -> dict:
    """The legacy sparse-bitmask layout, written as compressed-tensors <= 0.12 did."""
    mask = (w.view(torch.int16 if w.element_size() == 2 else torch.int32) != 0).numpy()
    return {f"{name}.compressed": w[torch.from_numpy(mask)].contiguous(),
            f"{name}.bitmask": torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little")),
            f"{name}.row_offsets": torch.from_numpy(
                np.concatenate([[0], np.cumsum(mask.sum(1))[:-1]]).astype(np.int32)),
            f"{name}.shape": torch.tensor(list(w.shape), dtype=torch.int32)}


def write_dir(path, tensors: dict, qc: dict, config: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**(config or {}), "quantization_config": qc}))
    return path


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (830, 545)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_sparse_bitmask_decodes_bit_exactly(tmp_path, shape, dtype, sparsity):
    w = sparse_tensor(shape, dtype, sparsity)
    source = open_source(write_dir(tmp_path / "ct", {**bitmask_parts("w", w),
                                                     "bias": torch.ones(3)}, BITMASK_QC))
    assert isinstance(source, CompressedTensorsSource)
    assert source.names() == ["bias", "w"] and "w" in source and "w.bitmask" not in source
    assert source.shape("w") == shape and source.dtype("w") == dtype
    assert bit_equal(source.read("w"), w)
    assert bit_equal(source.read("bias"), torch.ones(3))


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.__setitem__("w.row_offsets", p["w.row_offsets"] + 1), "row_offsets"),
    (lambda p: p.__setitem__("w.compressed", p["w.compressed"][:-1]), "marks"),
    (lambda p: p.__setitem__("w.bitmask", p["w.bitmask"][:, :1].contiguous()), "bitmask is"),
    (lambda p: p.pop("w.row_offsets"), "lacks"),
    (lambda p: p.__setitem__("w.shape", torch.tensor([1.5, 2.0])), "shape tensor"),
])
def test_malformed_bitmask_parts_are_refused(tmp_path, damage, message):
    parts = bitmask_parts("w", sparse_tensor((7, 13), torch.float16, 0.5))
    damage(parts)
    with pytest.raises(FormatError, match=message) as e:
        open_source(write_dir(tmp_path / "ct", parts, BITMASK_QC)).read("w")
    assert "tensor 'w" in str(e.value)  # the weight or the part named


def _llama_dir(tmp_path, encode, qc):
    model = pruned_model("llama", torch.bfloat16)
    model.config.save_pretrained(tmp_path / "src")
    tensors = {}
    for name, t in model.state_dict().items():
        linear = ".layers." in name and name.endswith("proj.weight")
        tensors.update(encode(name, t) if linear else {name: t.clone()})
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config,
                                                              "quantization_config": qc}))
    return tmp_path / "src", model


def _converted(out) -> dict:
    tensors = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_convert_a_sparse_bitmask_checkpoint_keeps_its_weights(tmp_path):
    src, model = _llama_dir(tmp_path, bitmask_parts, BITMASK_QC)
    summary = convert(src, tmp_path / "out", method="none", progress=False)
    got = _converted(tmp_path / "out")
    for name, t in model.state_dict().items():
        assert bit_equal(got[name], t), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "endor"  # not compressed-tensors
    assert summary["run"]["shards_written"] == 5


def test_convert_a_pack_quantized_checkpoint_dequantizes_as_compressed_tensors(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": 16}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
          "ignore": ["lm_head"]}
    expected = {}

    def encode(name, w):
        prefix = name.removesuffix("weight")
        groups = w.float().reshape(w.shape[0], -1, 16).abs().amax(-1)
        scale = (groups / 7).clamp(min=1e-4).to(w.dtype)
        packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale},
                                                       scheme)
        expected[name] = PackedQuantizationCompressor.decompress(dict(packed),
                                                                 scheme)["weight"].to(w.dtype)
        return {prefix + k: v for k, v in packed.items()}

    src, model = _llama_dir(tmp_path, encode, qc)
    convert(src, tmp_path / "out", method="none", progress=False)
    got = _converted(tmp_path / "out")
    for name, t in model.state_dict().items():
        want = expected.get(name, t)
        assert bit_equal(got[name], want), name
    assert any(not torch.equal(expected[n], model.state_dict()[n]) for n in expected)
