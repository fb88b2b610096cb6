"""The rest shard, streamed in row chunks: same bytes as tensors held whole, tied copies compared
chunk by chunk, the read-back check catching a disk fault."""

import pytest
import torch

from endor.checkpoint import CheckpointWriter
from endor.convert import rest_shard
from endor.convert.source import SourceCheckpoint
from endor.errors import FormatError
from endor.format import load_file, save_file


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(830, 545, generator=g).to(torch.bfloat16)
    head = emb.clone()
    head[829, 544] = 1.5  # differs in its very last element only
    tensors = {"embed.weight": emb, "same.weight": emb.clone(), "head.weight": head,
               "norm.weight": torch.randn(545, generator=g), "scalar": torch.tensor(2.0),
               "empty": torch.empty(0, 4)}
    save_file(tensors, src / "model.safetensors")
    return SourceCheckpoint(src), tensors


@pytest.mark.parametrize("chunk_bytes", [1, 545 * 2 * 7, 10**9])
def test_row_chunks_rebuild_the_tensor(source, chunk_bytes):
    src, tensors = source
    for name, t in tensors.items():
        chunks = list(rest_shard.row_chunks(src, name, chunk_bytes))
        got = torch.cat(chunks) if t.dim() else chunks[0]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    rows = max(1, chunk_bytes // (545 * 2))
    assert len(list(rest_shard.row_chunks(src, "embed.weight", chunk_bytes))) == -(-830 // rows)


def test_same_tensor_compares_every_chunk(source):
    src, _ = source
    for chunk_bytes in (1, 545 * 2 * 100, 10**9):
        assert rest_shard.same_tensor(src, "embed.weight", "same.weight", chunk_bytes)
        assert not rest_shard.same_tensor(src, "embed.weight", "head.weight", chunk_bytes)
    assert not rest_shard.same_tensor(src, "embed.weight", "norm.weight")
    tied = {"same.weight": "embed.weight", "head.weight": "embed.weight"}
    assert rest_shard.untied(src, sorted(src.names()), tied) == [
        "embed.weight", "empty", "head.weight", "norm.weight", "scalar"]


def test_written_shard_holds_the_tensors(source, tmp_path, monkeypatch):
    src, tensors = source
    monkeypatch.setattr(rest_shard, "CHUNK_BYTES", 4096)  # many chunks per tensor
    writer = CheckpointWriter(tmp_path / "out", ["rest"])
    rest_shard.write_rest_shard(src, src.names(), {"same.weight": "embed.weight"}, writer, 0,
                                {"k": "v"}, verify=True)
    back = load_file(writer.path(0))
    assert set(back) == set(tensors) - {"same.weight"}
    for name, t in back.items():
        assert torch.equal(t.reshape(-1).view(torch.uint8),
                           tensors[name].reshape(-1).view(torch.uint8))


def test_a_disk_fault_is_caught_and_the_shard_removed(source, tmp_path, monkeypatch):
    src, _ = source
    writer = CheckpointWriter(tmp_path / "out", ["rest"])
    real = rest_shard._hash_on_disk
    monkeypatch.setattr(rest_shard, "_hash_on_disk", lambda *a: real(*a)[::-1])
    with pytest.raises(FormatError, match="verification failed"):
        rest_shard.write_rest_shard(src, ["embed.weight"], {}, writer, 0, {}, verify=True)
    assert not writer.path(0).exists()
