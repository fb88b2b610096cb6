import json

import pytest
import torch

import endor
from endor.checkpoint import MANIFEST, Checkpoint, CheckpointWriter
from tests.helpers import sparse_tensor


def write_two_layer_checkpoint(out):
    w = CheckpointWriter(out, ["layers.0", "layers.1", "rest"], weights="endor")
    w.write(0, {"model.layers.0.q.weight": endor.compress(sparse_tensor((8, 8), torch.float16, .5))})
    w.write(1, {"model.layers.1.q.weight": endor.compress(sparse_tensor((8, 8), torch.float16, .5))})
    w.write(2, {"model.embed.weight": torch.ones(4, 8, dtype=torch.float16)})
    w.finish({"method": "magnitude", "sparsity": 0.5})
    return w


def test_write_then_read(tmp_path):
    write_two_layer_checkpoint(tmp_path)
    ck = Checkpoint(tmp_path)
    assert ck.weights == "endor" and [s.group for s in ck.shards] == ["layers.0", "layers.1", "rest"]
    assert ck.weight_map["model.layers.1.q.weight"] == "model-00002-of-00003.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == ck.weight_map
    assert ck.file_of("model.embed.weight").get_tensor("model.embed.weight").sum() == 32


def test_finish_requires_every_shard(tmp_path):
    w = CheckpointWriter(tmp_path, ["layers.0", "rest"])
    w.write(0, {"a": torch.ones(1)})
    assert w.is_done(0) and not w.is_done(1)
    with pytest.raises(RuntimeError, match="never written"):
        w.finish({})


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(endor.FormatError, match="endor convert"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("change, words", [
    ({"format": "x"}, "manifest"), ({"version": 9}, "upgrade"), ({"weights": "int4"}, "weights"),
    ({"shards": [{"file": "../evil.safetensors", "group": "rest"}]}, "shards"),
])
def test_bad_manifest(tmp_path, change, words):
    write_two_layer_checkpoint(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**m, **change}))
    with pytest.raises(endor.FormatError, match=words):
        Checkpoint(tmp_path)


def test_missing_shard(tmp_path):
    write_two_layer_checkpoint(tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(endor.FormatError, match="missing"):
        Checkpoint(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    w = CheckpointWriter(tmp_path, ["layers.0", "rest"])
    w.write(0, {"a": torch.ones(1)})
    w.write(1, {"a": torch.ones(1)})
    w.finish({})
    with pytest.raises(endor.FormatError, match="both"):
        Checkpoint(tmp_path)
