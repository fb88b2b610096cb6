"""Bytes changed on disk before a model is loaded: every stored tensor, in both shard kinds, is
caught: an endor.FormatError naming file and tensor; `endor inspect --verify` and `endor
generate` exit 1 with one line. Format v2's checksums cover dense tensors and every tensor's
shape and dtype (docs/FORMAT.md)."""

import json
import struct

import pytest
import torch

import endor
from endor.cli import main
from endor.runtime import load_model
from tests.adversarial.conftest import assert_one_line_error, flip_bytes, shard_of

# (shard group, tensor): an Endor tensor and a dense tensor in a layer shard and in 'rest'.
ENDOR_TENSORS = [("layers.1", "model.layers.1.mlp.up_proj.weight"),
                 ("rest", "model.embed_tokens.weight")]
DENSE_TENSORS = [("layers.1", "model.layers.1.post_attention_layernorm.weight"),
                 ("rest", "model.norm.weight")]


def _flip_in(ckpt_dir, group, name, part_index):
    shard = shard_of(ckpt_dir, group)
    with endor.open_file(shard) as f:
        start, end = f.byte_ranges(name)[part_index]
    flip_bytes(shard, (start + end) // 2, min(8, end - start))
    return shard


def _every_reader_refuses(ckpt_dir, shard, name, capsys):
    with pytest.raises(endor.FormatError, match="checksum|tile|bitmap|nnz") as e:
        endor.open_file(shard).get_tensor(name)
    assert str(shard) in str(e.value) and name in str(e.value)
    with pytest.raises(endor.FormatError):
        endor.load_file(shard)
    for budget in (None, 0):  # every layer resident; every decoder layer streamed
        with pytest.raises(endor.FormatError, match=shard.name):
            load_model(ckpt_dir, max_memory=budget)
    capsys.readouterr()
    assert main(["inspect", str(ckpt_dir), "--verify"]) == 1
    assert_one_line_error(capsys.readouterr().err, "inspect", shard.name)
    assert main(["generate", str(ckpt_dir), "--prompt", "x", "--max-new-tokens", "1",
                 "--max-memory", "0"]) == 1
    assert_one_line_error(capsys.readouterr().err, "generate", shard.name)


@pytest.mark.parametrize("part", [0, 1, 2], ids=["bitmap", "values", "tiles"])
@pytest.mark.parametrize("group,name", ENDOR_TENSORS, ids=["layer-shard", "rest-shard"])
def test_endor_tensor_bytes_flipped(ckpt, group, name, part, capsys):
    ckpt_dir = ckpt[0]
    shard = _flip_in(ckpt_dir, group, name, part)
    _every_reader_refuses(ckpt_dir, shard, name, capsys)


@pytest.mark.parametrize("group,name", DENSE_TENSORS, ids=["layer-shard", "rest-shard"])
def test_dense_tensor_bytes_flipped(ckpt, group, name, capsys):
    ckpt_dir = ckpt[0]
    shard = _flip_in(ckpt_dir, group, name, 0)
    _every_reader_refuses(ckpt_dir, shard, name, capsys)


def _rewrite_header(path, edit):
    """Apply `edit(header dict)`, keeping the header's length (so only a check can tell)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    data[8:8 + n] = raw.ljust(n, b" ")
    path.write_bytes(bytes(data))


def test_endor_tensor_reshaped_in_the_metadata(tmp_path):
    path = tmp_path / "one.safetensors"
    endor.save_file({"w": endor.compress(torch.randn(6, 10))}, path)

    def reshape(header):
        meta = json.loads(header["__metadata__"]["endor"])
        meta["tensors"]["w"]["shape"] = [10, 6]  # same size, same byte count
        header["__metadata__"]["endor"] = json.dumps(meta)
    _rewrite_header(path, reshape)
    with pytest.raises(endor.FormatError):
        endor.load_file(path)


def test_dense_tensor_reshaped_in_the_header(tmp_path):
    path = tmp_path / "one.safetensors"
    endor.save_file({"w": endor.compress(torch.randn(6, 10)), "d": torch.randn(6, 10)}, path)

    def reshape(header):
        header["d"]["shape"] = [10, 6]
    _rewrite_header(path, reshape)
    with pytest.raises(endor.FormatError):
        endor.load_file(path)


def test_every_endor_part_of_every_shard_is_covered(ckpt):
    """The cases above are not a sample: every shard kind holds Endor and dense tensors."""
    ckpt_dir = ckpt[0]
    for group in ("layers.0", "rest"):
        with endor.open_file(shard_of(ckpt_dir, group)) as f:
            kinds = {f.is_compressed(n) for n in f.keys()}
        assert kinds == {True, False}, group
