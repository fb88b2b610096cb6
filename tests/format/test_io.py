import json

import pytest
import torch
from safetensors import safe_open

import endor
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, sparse_tensor


def test_save_and_load_mixed_file(tmp_path):
    dense = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tensors = {f"w.{str(d)[6:]}": sparse_tensor((33, 17), d, 0.5) for d in DTYPES}
    path = tmp_path / "m.safetensors"
    endor.save_file({**{k: endor.compress(v, values="raw") for k, v in tensors.items()}, "bias": dense,
                     "empty": endor.compress(torch.zeros(0, 5), values="raw")}, path, metadata={"who": "me"})
    loaded = endor.load_file(path)
    assert set(loaded) == {*tensors, "bias", "empty"}
    for k, v in tensors.items():
        assert bit_equal(loaded[k], v)
    assert torch.equal(loaded["bias"], dense) and loaded["empty"].shape == (0, 5)
    with endor.open_file(path) as f:
        assert f.metadata() == {"who": "me"}
        assert f.is_compressed("w.float16") and not f.is_compressed("bias")
        et = f.get_compressed("w.bfloat16")
        assert isinstance(et, endor.EndorTensor) and bit_equal(endor.decompress(et),
                                                              tensors["w.bfloat16"])


def test_any_safetensors_reader_opens_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    t = sparse_tensor((10, 10), torch.float16, 0.5)
    endor.save_file({"w": endor.compress(t, values="raw")}, path)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["w.endor.bitmap", "w.endor.tiles", "w.endor.values"]
        meta = json.loads(f.metadata()["endor"])
        assert meta["version"] == 2 and meta["tensors"]["w"]["shape"] == [10, 10]


def test_byte_ranges_point_at_the_stored_bytes(tmp_path):
    path = tmp_path / "m.safetensors"
    t = sparse_tensor((50, 50), torch.bfloat16, 0.5)
    et = endor.compress(t, values="raw")
    endor.save_file({"w": et}, path)
    data = path.read_bytes()
    with endor.open_file(path) as f:
        assert f.part_suffixes("w") == ["bitmap", "tiles", "values"]  # checksum order
        (b0, b1), (t0, t1), (v0, v1) = f.byte_ranges("w")
    assert data[b0:b1] == et.bitmap.numpy().tobytes()
    assert data[v0:v1] == et.values.view(torch.int16).numpy().tobytes()
    assert data[t0:t1] == et.tiles.numpy().tobytes()


def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "m.safetensors"
    endor.save_file({"a": torch.ones(2)}, path)
    with pytest.raises(TypeError):
        endor.save_file({"a": [1, 2]}, path)
    assert torch.equal(endor.load_file(path)["a"], torch.ones(2))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_rejects_reserved_names_and_metadata(tmp_path):
    with pytest.raises(ValueError, match="reserve"):
        endor.save_file({"x.endor.values": torch.ones(1)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="reserve"):
        endor.save_file({"x": torch.ones(1)}, tmp_path / "a.safetensors", metadata={"endor": "{}"})


def test_missing_file_and_missing_tensor(tmp_path):
    with pytest.raises(FileNotFoundError):
        endor.open_file(tmp_path / "nope.safetensors")
    path = tmp_path / "m.safetensors"
    endor.save_file({"a": torch.ones(2)}, path)
    with endor.open_file(path) as f, pytest.raises(KeyError, match="'b'"):
        f.get_tensor("b")


def test_identical_inputs_give_identical_files(tmp_path):
    tensors = {"w": endor.compress(sparse_tensor((9, 9), torch.float16, 0.5), values="raw"), "b": torch.ones(3)}
    meta = {f"key{i}": str(i) for i in range(20)}
    endor.save_file(tensors, tmp_path / "a.safetensors", metadata=meta)
    endor.save_file(tensors, tmp_path / "b.safetensors", metadata=meta)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with endor.open_file(tmp_path / "a.safetensors") as f:
        assert f.metadata() == meta


def test_tensors_are_read_into_owned_memory_never_mapped(tmp_path):
    """No mapping of the file outlives open_file or a read; what was read is a copy."""
    path = tmp_path / "owned.safetensors"
    endor.save_file({"d": torch.randn(64, 64), "e": endor.compress(torch.randn(64, 64))}, path)
    with endor.open_file(path) as f:
        dense, compressed = f.get_tensor("d"), f.get_compressed("e")
        with open("/proc/self/maps") as maps:
            assert str(path) not in maps.read()
        before = dense.clone()
        path.write_bytes(b"\0" * path.stat().st_size)  # same size, every byte changed
        assert torch.equal(dense, before) and compressed.verify_checksum()
        path.write_bytes(b"")  # truncated: the next read is an error naming the file
        with pytest.raises(endor.FormatError, match="owned.safetensors.*truncated"):
            f.get_tensor("d")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_process_umask(tmp_path, umask):
    import os

    before = os.umask(umask)
    try:
        endor.save_file({"d": torch.zeros(2)}, tmp_path / "m.safetensors")
    finally:
        os.umask(before)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("dtype", DTYPES)
def test_ordered_save_puts_each_listed_tensor_in_one_range_in_sequence(tmp_path, dtype):
    tensors = {"a.dense": torch.arange(5, dtype=torch.int64),
               "b": endor.compress(sparse_tensor((7, 13), dtype, 0.5, seed=1)),
               "c": endor.compress(sparse_tensor((1, 1), dtype, 1.0, seed=2)),
               "d": endor.compress(sparse_tensor((830, 545), dtype, 0.3, seed=3)),
               "e.norm": torch.ones(3, dtype=dtype)}
    path = tmp_path / "ordered.safetensors"
    endor.save_file(tensors, path, metadata={"k": "v"}, order=["d", "b", "c"])
    with endor.open_file(path) as f:
        spans = {n: sorted(f.byte_ranges(n)) for n in tensors}
        assert f.metadata() == {"k": "v"}
        for name, t in tensors.items():
            want = endor.decompress(t) if isinstance(t, endor.EndorTensor) else t
            assert bit_equal(f.get_tensor(name), want) if want.is_floating_point() else \
                torch.equal(f.get_tensor(name), want)
    for name in ("b", "c", "d"):  # parts adjacent: one range
        assert all(x[1] == y[0] for x, y in zip(spans[name], spans[name][1:]))
    last = max(e for n in ("a.dense", "e.norm") for _, e in spans[n])
    assert spans["d"][0][0] == last  # unlisted tensors first, then d, b, c
    assert spans["b"][0][0] == spans["d"][-1][1] and spans["c"][0][0] == spans["b"][-1][1]
    with safe_open(str(path), "pt") as f:  # still a safetensors file for any reader
        assert set(f.keys()) >= {"a.dense", "e.norm", "d.endor.tiles", "d.endor.bitmap"}
    endor.save_file(tensors, tmp_path / "again.safetensors", metadata={"k": "v"},
                    order=["d", "b", "c"])
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="order"):
        endor.save_file(tensors, tmp_path / "bad.safetensors", order=["nope"])
