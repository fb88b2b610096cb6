"""StreamWriter: chunked writes give the very file io.save_file writes; misuse is refused."""

import pytest
import torch

from endor.format import load_file, save_file
from endor.format.stream_writer import StreamWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(830, 545, generator=g).to(torch.bfloat16),
        "head": torch.randn(7, 13, generator=g).to(torch.float16),
        "norm": torch.randn(13, generator=g),
        "one": torch.randn(1, 1, generator=g).to(torch.float16),
        "ids": torch.arange(5, dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
    }


def _stream(path, tensors, metadata, rows_per_chunk):
    writer = StreamWriter(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()},
                          metadata)
    for name in writer.order:
        t = tensors[name]
        if t.dim() == 0 or t.shape[0] == 0:
            writer.write(name, t)
            continue
        for start in range(0, t.shape[0], rows_per_chunk):
            writer.write(name, t[start:start + rows_per_chunk])
    return writer.close()


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 1000])
def test_byte_identical_to_save_file(tmp_path, rows_per_chunk):
    tensors = _tensors()
    meta = {"z": "last", "a": "first", "endor.group": "rest"}
    save_file(tensors, tmp_path / "ref.safetensors", metadata=meta)
    out = _stream(tmp_path / "new.safetensors", tensors, meta, rows_per_chunk)
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(out)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        if t.numel():
            assert torch.equal(back[name].view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert not list(tmp_path.glob("*.tmp"))


def test_no_metadata_matches_too(tmp_path):
    tensors = {"w": torch.ones(3, 4)}
    save_file(tensors, tmp_path / "ref.safetensors")
    out = _stream(tmp_path / "new.safetensors", tensors, None, 2)
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_out_of_order_and_wrong_dtype_refused(tmp_path):
    writer = StreamWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (2, 2)),
                                                      "b": (torch.float32, (2, 2))})
    with pytest.raises(ValueError, match="expected 'a'"):
        writer.write("b", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="float16 chunk"):
        writer.write("a", torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="more bytes"):
        writer.write("a", torch.zeros(3, 2))
    writer.write("a", torch.zeros(2, 2))
    writer.write("b", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="'b' was not written whole"):
        writer.close()
    assert not (tmp_path / "x.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_exception_inside_with_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StreamWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (2,))}) as writer:
            writer.write("a", torch.zeros(1))
            raise RuntimeError("reader failed")
    assert list(tmp_path.iterdir()) == []


def test_bad_entries_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot be stored"):
        StreamWriter(tmp_path / "x.safetensors", {"a": (torch.complex64, (2,))})
    with pytest.raises(ValueError, match="metadata"):
        StreamWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (2,))}, {"k": 1})
