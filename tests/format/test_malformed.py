"""One malformed file per MUST rule of docs/FORMAT.md: each is a FormatError naming the problem,
never a crash, a huge allocation or silently different data."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file as st_save_file

import endor
from endor.format.checksum import checksum_v1 as checksum
from endor.kernels import backends
from tests.helpers import sparse_tensor

CPU_BACKENDS = [n for n, b in backends().items()
                if "cpu" in b.device_types and b.available() and n != "triton"]


def good_parts(shape=(70, 130), dtype=torch.float16, sparsity=0.5):
    """The parts and the version-1 entry (this file tests version 1's rules, which v1 files
    keep forever; tests/format/test_malformed_v2.py tests version 2's)."""
    et = endor.compress(sparse_tensor(shape, dtype, sparsity), values="raw")
    entry = {k: v for k, v in et.metadata().items() if k != "values"}
    return {"bitmap": et.bitmap.clone(), "values": et.values.clone(), "tiles": et.tiles.clone()}, \
        entry


def write(path, parts, entry, *, name="w", meta=None, extra=None, rehash=True):
    if rehash and isinstance(entry, dict) and "checksum" in entry:
        entry = {**entry, "checksum": checksum(parts["bitmap"], parts["values"], parts["tiles"])}
    tensors = {f"{name}.endor.{k}": v for k, v in parts.items()}
    tensors.update(extra or {})
    if meta is None:
        meta = {"endor": json.dumps({"format": "endor", "version": 1, "tensors": {name: entry}})}
    st_save_file(tensors, str(path), metadata=meta)
    return path


def load_error(path, backend="reference"):
    with pytest.raises(endor.FormatError) as e:
        endor.load_file(path, backend=backend)
    assert str(path) in str(e.value)
    return str(e.value)


# Rule 1: the container.
def test_truncated_file(tmp_path):
    path = write(tmp_path / "a.safetensors", *good_parts())
    data = path.read_bytes()
    for cut in [len(data) - 1, len(data) // 2, 100, 9, 3, 0]:
        path.write_bytes(data[:cut])
        load_error(path)


def test_header_length_beyond_file_or_limit(tmp_path):
    path = tmp_path / "a.safetensors"
    for n in [2**63, 10**9, 50]:
        path.write_bytes(struct.pack("<Q", n) + b"{}")
        assert "header length" in load_error(path)


def test_header_not_json_or_not_utf8(tmp_path):
    path = tmp_path / "a.safetensors"
    for body in [b"{nope", b"\xff\xfe\xfd", b"[1, 2]", b'{"a": 1}', b'{"__metadata__": {"a": 1}}']:
        path.write_bytes(struct.pack("<Q", len(body)) + body)
        load_error(path)


def test_tensor_range_past_end(tmp_path):
    body = json.dumps({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 16)
    assert "truncated" in load_error(path)


# Rule 2: the metadata and its version.
@pytest.mark.parametrize("raw, words", [
    ("not json", "not valid JSON"),
    (json.dumps({"format": "other", "version": 1, "tensors": {}}), "format"),
    (json.dumps({"format": "endor", "tensors": {}}), "version"),
    (json.dumps({"format": "endor", "version": 3, "tensors": {}}), "upgrade endor"),
    (json.dumps({"format": "endor", "version": 1, "tensors": []}), "tensors"),
])
def test_bad_metadata(tmp_path, raw, words):
    parts, _ = good_parts()
    path = write(tmp_path / "a.safetensors", parts, None, meta={"endor": raw})
    assert words in load_error(path)


# Rule 3: the entry.
@pytest.mark.parametrize("change, words", [
    ({"dtype": "int8"}, "dtype"),
    ({"shape": [-1, 5]}, "shape"),
    ({"shape": "70x130"}, "shape"),
    ({"shape": [2**30, 2**30]}, "limit"),
    ({"shape": [1] * 9}, "shape"),
    ({"tile_size": 1024}, "tile_size"),
    ({"nnz": -1}, "nnz"),
    ({"nnz": 70 * 130 + 1}, "nnz"),
    ({"nnz": True}, "nnz"),
    ({"checksum": "md5:abc"}, "checksum"),
    ({"extra": 1}, "fields"),
])
def test_bad_entry(tmp_path, change, words):
    parts, entry = good_parts()
    entry = {**entry, **change}
    path = write(tmp_path / "a.safetensors", parts, entry, rehash="checksum" not in change)
    assert words in load_error(path)


def test_missing_entry_field(tmp_path):
    parts, entry = good_parts()
    del entry["nnz"]
    assert "fields" in load_error(write(tmp_path / "a.safetensors", parts, entry))


# Rule 4: the parts.
def test_missing_part(tmp_path):
    parts, entry = good_parts()
    del parts["tiles"]
    st_parts = {f"w.endor.{k}": v for k, v in parts.items()}
    path = tmp_path / "a.safetensors"
    st_save_file(st_parts, str(path), metadata={"endor": json.dumps(
        {"format": "endor", "version": 1, "tensors": {"w": entry}})})
    assert "missing" in load_error(path)


@pytest.mark.parametrize("part, bad", [
    ("bitmap", lambda t: t[:-1]),
    ("bitmap", lambda t: t.to(torch.int16)),
    ("values", lambda t: t.to(torch.float32)),
    ("values", lambda t: t[:-1]),
    ("tiles", lambda t: t.to(torch.int32)),
    ("tiles", lambda t: torch.cat([t, t[-1:]])),
])
def test_part_with_wrong_dtype_or_shape(tmp_path, part, bad):
    parts, entry = good_parts()
    parts[part] = bad(parts[part]).contiguous()
    assert "expected" in load_error(write(tmp_path / "a.safetensors", parts, entry))


# Rule 5: the tile index.
@pytest.mark.parametrize("corrupt", [
    lambda t: t.__setitem__(0, 1),
    lambda t: t.__setitem__(-1, t[-1] - 1),
    lambda t: t.__setitem__(1, t[2] + 1),  # decreasing
    lambda t: t.__setitem__(1, 5000),  # more than a tile holds
])
def test_bad_tile_index(tmp_path, corrupt):
    parts, entry = good_parts()
    corrupt(parts["tiles"])
    assert "tile" in load_error(write(tmp_path / "a.safetensors", parts, entry))


# Rule 6: popcounts and padding, checked by the decompressors.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_popcount_disagrees_with_tile_index(tmp_path, backend):
    parts, entry = good_parts()
    b = parts["bitmap"]
    # Move one set bit from tile 0 to tile 1: total nnz unchanged, per-tile counts wrong.
    i = int((b != 0).nonzero()[0])
    low = int(b[i]) & -int(b[i])
    b[i] ^= low
    j = 512 + int((b[512:] != 255).nonzero()[0])
    b[j] |= (~int(b[j]) & (int(b[j]) + 1)) & 255
    assert "popcount" in load_error(write(tmp_path / "a.safetensors", parts, entry), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_bits_set(tmp_path, backend):
    parts, entry = good_parts(shape=(7, 13), sparsity=1.0)  # 91 elements, 5 padding bits
    parts["bitmap"][-1] = 0x80
    parts["tiles"][-1] = 0
    assert "past the last element" in load_error(write(tmp_path / "a.safetensors", parts, entry),
                                                  backend)


# Rule 7: the checksum.
@pytest.mark.parametrize("part, words", [("bitmap", "checksum"), ("values", "checksum"),
                                         ("tiles", "checksum")])
def test_any_flipped_bit_is_an_error(tmp_path, part, words):
    parts, entry = good_parts()
    path = write(tmp_path / "a.safetensors", parts, entry)
    with endor.open_file(path) as f:
        start, _ = f.byte_ranges("w")[["bitmap", "values", "tiles"].index(part)]
    data = bytearray(path.read_bytes())
    data[start + 8] ^= 0x01
    path.write_bytes(bytes(data))
    assert words in load_error(path)


def test_values_bit_flip_is_a_checksum_error(tmp_path):
    parts, entry = good_parts()
    path = write(tmp_path / "a.safetensors", parts, entry)
    with endor.open_file(path) as f:
        start, _ = f.byte_ranges("w")[1]
    data = bytearray(path.read_bytes())
    data[start] ^= 0x10
    path.write_bytes(bytes(data))
    assert "checksum mismatch" in load_error(path)


# Rule 8: names.
def test_stray_part_without_entry(tmp_path):
    parts, entry = good_parts()
    path = write(tmp_path / "a.safetensors", parts, entry,
                 extra={"orphan.endor.values": torch.ones(3, dtype=torch.float16)})
    assert "no metadata entry" in load_error(path)


def test_name_both_dense_and_endor(tmp_path):
    parts, entry = good_parts()
    path = write(tmp_path / "a.safetensors", parts, entry, extra={"w": torch.ones(3)})
    assert "both" in load_error(path)
