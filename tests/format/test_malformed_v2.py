"""Version 2's own MUST rules (docs/FORMAT.md): the `values` codec slot, codec parts, dense
checksums and checksums that cover shape, dtype, nnz and the codec. Version 1's rules, which
version 2 keeps, are tested in test_malformed.py."""

import json
import struct

import pytest
import torch

import endor
from endor.format.checksum import checksum_v2, endor_description
from tests.helpers import sparse_tensor


def write_good(path, dtype=torch.float16, shape=(70, 130)):
    endor.save_file({"w": endor.compress(sparse_tensor(shape, dtype, 0.5), values="raw"),
                     "bias": torch.arange(13, dtype=torch.float32)}, path)
    return path


def read_header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path, header, body):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_meta(path, edit):
    """Rewrite the `endor` metadata of `path` with edit(meta) (in place, data untouched)."""
    header, body = read_header(path)
    meta = json.loads(header["__metadata__"]["endor"])
    edit(meta)
    header["__metadata__"]["endor"] = json.dumps(meta)
    write_header(path, header, body)
    return path


def load_error(path):
    with pytest.raises(endor.FormatError) as e:
        endor.load_file(path)
    assert str(path) in str(e.value)
    return str(e.value)


def rehash(meta, path):
    """Recompute w's checksum as a writer would for the edited entry (so only the rule under
    test is broken)."""
    f = endor.open_file(path)
    e = meta["tensors"]["w"]
    parts = [f._read(f"w.endor.{s}") for s in ("bitmap", "tiles", "values")]
    e["checksum"] = checksum_v2(endor_description(e["shape"], e["dtype"], e["nnz"], e["values"]),
                                parts)


def test_good_file_loads(tmp_path):
    loaded = endor.load_file(write_good(tmp_path / "a.safetensors"))
    assert sorted(loaded) == ["bias", "w"]


# Rule 2: versions.
def test_version_3_says_upgrade(tmp_path):
    path = edit_meta(write_good(tmp_path / "a.safetensors"), lambda m: m.update(version=3))
    assert "upgrade endor" in load_error(path)


def test_v2_without_dense_object(tmp_path):
    path = edit_meta(write_good(tmp_path / "a.safetensors"), lambda m: m.pop("dense"))
    assert "'dense'" in load_error(path)


# Rule 3: the values object and its codec.
@pytest.mark.parametrize("values, words", [
    (None, "fields"),  # field missing
    ("raw", "'codec'"),
    ({}, "'codec'"),
    ({"codec": "zstd"}, "not one of"),
    ({"codec": 7}, "not one of"),
    ({"codec": "raw", "level": 3}, "no parameters"),
])
def test_bad_values_entry(tmp_path, values, words):
    def edit(meta):
        if values is None:
            del meta["tensors"]["w"]["values"]
        else:
            meta["tensors"]["w"]["values"] = values
    path = edit_meta(write_good(tmp_path / "a.safetensors"), edit)
    err = load_error(path)
    assert words in err and "'w'" in err


def test_bad_dense_entry(tmp_path):
    for entry, words in [({"checksum": "md5:00"}, "checksum"), ({}, "dense metadata entry"),
                         ({"checksum": "xxh3_64:" + "0" * 16, "x": 1}, "dense metadata entry")]:
        path = edit_meta(write_good(tmp_path / "a.safetensors"),
                         lambda m: m["dense"].update(bias=entry))
        err = load_error(path)
        assert words in err and "'bias'" in err


def test_dense_list_must_match_the_dense_tensors(tmp_path):
    path = edit_meta(write_good(tmp_path / "a.safetensors"), lambda m: m["dense"].pop("bias"))
    assert "unlisted: ['bias']" in load_error(path)
    path = edit_meta(write_good(tmp_path / "b.safetensors"),
                     lambda m: m["dense"].update(ghost={"checksum": "xxh3_64:" + "0" * 16}))
    assert "absent: ['ghost']" in load_error(path)


# Rule 4: the codec's parts.
def test_codec_part_missing_or_misshapen(tmp_path):
    def drop(name, reshape=None):
        path = write_good(tmp_path / f"{name}{reshape}.safetensors")
        header, body = read_header(path)
        if reshape is None:
            del header[f"w.endor.{name}"]
        else:
            header[f"w.endor.{name}"]["dtype"] = reshape
        write_header(path, header, body)
        return path
    assert "missing" in load_error(drop("values"))
    assert "expected F16" in load_error(drop("values", "BF16"))


def test_nnz_edit_no_longer_matches_the_parts(tmp_path):
    def edit(meta):
        meta["tensors"]["w"]["nnz"] -= 1
    assert "expected F16" in load_error(edit_meta(write_good(tmp_path / "a.safetensors"), edit))


# Rule 7: checksums cover the description, not only the bytes.
def test_same_size_reshape_in_the_metadata_is_a_checksum_error(tmp_path):
    path = edit_meta(write_good(tmp_path / "a.safetensors"),
                     lambda m: m["tensors"]["w"].update(shape=[130, 70]))
    assert "checksum mismatch" in load_error(path)


def test_dtype_edit_is_a_checksum_error(tmp_path):
    """float16 -> bfloat16 keeps every part's size; only the checksum can tell."""
    def edit(meta):
        meta["tensors"]["w"]["dtype"] = "bfloat16"
    path = write_good(tmp_path / "a.safetensors")
    header, body = read_header(path)
    header["w.endor.values"]["dtype"] = "BF16"
    write_header(path, header, body)
    assert "checksum mismatch" in load_error(edit_meta(path, edit))


def test_rehashed_edit_is_accepted(tmp_path):
    """The checksum test above fails for the right reason: the same edit with the checksum a
    writer would compute loads."""
    path = write_good(tmp_path / "a.safetensors")
    edit_meta(path, lambda m: (m["tensors"]["w"].update(shape=[130, 70]), rehash(m, path)))
    assert endor.load_file(path)["w"].shape == (130, 70)


def test_dense_reshape_in_the_header_is_a_checksum_error(tmp_path):
    path = write_good(tmp_path / "a.safetensors")
    header, body = read_header(path)
    header["bias"]["shape"] = [1, 13]
    write_header(path, header, body)
    assert "checksum mismatch" in load_error(path)


@pytest.mark.parametrize("reader", ["load_file", "get_tensor", "verify"])
def test_dense_bit_flip_is_a_checksum_error(tmp_path, reader):
    path = write_good(tmp_path / "a.safetensors")
    with endor.open_file(path) as f:
        start, end = f.byte_ranges("bias")[0]
    data = bytearray(path.read_bytes())
    data[start + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(endor.FormatError, match="'bias'.*checksum mismatch"):
        if reader == "load_file":
            endor.load_file(path)
        elif reader == "get_tensor":
            endor.open_file(path).get_tensor("bias")
        else:
            from endor.inspect import describe
            describe(path, verify=True)
    assert endor.open_file(path).get_tensor("w").shape == (70, 130)  # the others still read


# Rule 8: any NAME.endor.<word> is reserved in version 2.
def test_stray_codec_like_part(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file as st_save_file

    path = write_good(tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["w.endor.extra"] = torch.ones(3)
    st_save_file(tensors, str(path), metadata=meta)
    assert "no metadata entry" in load_error(path)


def test_writer_refuses_reserved_names(tmp_path):
    with pytest.raises(ValueError, match="reserve"):
        endor.save_file({"x.endor.scales": torch.ones(2)}, tmp_path / "a.safetensors")
