"""MUST rules of the int8/int4 codecs (docs/FORMAT.md section 1.6): one malformed file per
field, each rejected with FormatError naming the file and the tensor."""

import dataclasses

import pytest
import torch

import endor
from tests.format.test_malformed_v2 import edit_meta, load_error
from tests.helpers import sparse_tensor


def good_tensor(codec="int4", dtype=torch.float16, shape=(7, 13)):
    et = endor.compress(sparse_tensor(shape, dtype, 0.5), values=codec, group_size=8)
    assert et.nnz % 2 == 1  # so the int4 padding nibble exists
    return et


def write(path, et):
    endor.save_file({"w": et, "bias": torch.arange(3, dtype=torch.float32)}, path)
    return path


def rehashed(et, **parts):
    """`et` with parts replaced and the checksum a writer would compute (only the rule under
    test is broken)."""
    bad = dataclasses.replace(et, codec_parts={**et.codec_parts, **parts})
    return dataclasses.replace(bad, checksum=bad.compute_checksum())


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_good_file_loads(tmp_path, codec):
    et = good_tensor(codec)
    loaded = endor.load_file(write(tmp_path / "a.safetensors", et))
    assert torch.equal(loaded["w"], endor.decompress(et))


# Q1 / rule 3: the values object.
@pytest.mark.parametrize("values, words", [
    ({"codec": "int4"}, "exactly 'group_size'"),
    ({"codec": "int4", "group_size": 8, "zero_point": 1}, "exactly 'group_size'"),
    ({"codec": "int4", "group_size": 0}, "group_size"),
    ({"codec": "int4", "group_size": -8}, "group_size"),
    ({"codec": "int4", "group_size": 8.0}, "group_size"),
    ({"codec": "int4", "group_size": True}, "group_size"),
    ({"codec": "int4", "group_size": "8"}, "group_size"),
    ({"codec": "int4", "group_size": 2**24 + 1}, "group_size"),
    ({"codec": "int5", "group_size": 8}, "not one of"),
])
def test_bad_values_entry(tmp_path, values, words):
    path = edit_meta(write(tmp_path / "a.safetensors", good_tensor()),
                     lambda m: m["tensors"]["w"].update(values=values))
    err = load_error(path)
    assert words in err and "'w'" in err


def test_group_size_edit_changes_the_scales_shape(tmp_path):
    """Another valid group size needs another number of scales: rule 4 catches it before any
    read."""
    path = edit_meta(write(tmp_path / "a.safetensors", good_tensor()),
                     lambda m: m["tensors"]["w"]["values"].update(group_size=4))
    assert "w.endor.scales" in load_error(path)


def test_codec_swap_is_caught(tmp_path):
    path = edit_meta(write(tmp_path / "a.safetensors", good_tensor("int4")),
                     lambda m: m["tensors"]["w"]["values"].update(codec="int8"))
    assert "w.endor.qvalues" in load_error(path)


# Q1 / rule 4: the parts.
def rewrite(path, edit):
    """Rewrite the safetensors file with edit(tensors) applied, metadata unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file as st_save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    edit(tensors)
    st_save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("codec, part, change, words", [
    ("int4", "qvalues", None, "missing"),
    ("int4", "scales", None, "missing"),
    ("int4", "qvalues", lambda t: t.view(torch.int8), "expected U8"),
    ("int4", "qvalues", lambda t: t[:-1], "expected U8"),
    ("int8", "qvalues", lambda t: t.view(torch.uint8), "expected I8"),
    ("int8", "qvalues", lambda t: torch.cat([t, t[:1]]), "expected I8"),
    ("int4", "scales", lambda t: t.view(torch.bfloat16), "expected F16"),
    ("int4", "scales", lambda t: t[1:], "expected F16"),
    ("int4", "scales", lambda t: t.view(2, -1), "expected F16"),
])
def test_parts(tmp_path, codec, part, change, words):
    name = f"w.endor.{part}"

    def edit(tensors):
        if change is None:
            del tensors[name]
        else:
            tensors[name] = change(tensors[name]).clone()
    path = rewrite(write(tmp_path / "a.safetensors", good_tensor(codec)), edit)
    err = load_error(path)
    assert words in err and "'w'" in err


# Q2: the int4 padding nibble.
def test_int4_padding_nibble(tmp_path):
    et = good_tensor()
    q = et.codec_parts["qvalues"].clone()
    q[-1] |= 0x30
    err = load_error(write(tmp_path / "a.safetensors", rehashed(et, qvalues=q)))
    assert "nibble" in err and "'w'" in err


# Q3: finite scales.
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scales_must_be_finite(tmp_path, value, dtype):
    et = good_tensor("int8", dtype)
    scales = et.codec_parts["scales"].clone()
    scales[2] = value
    err = load_error(write(tmp_path / "a.safetensors", rehashed(et, scales=scales)))
    assert "NaN or infinity" in err and "'w'" in err


# Rule 7: every part is covered by the checksum.
@pytest.mark.parametrize("part", ["qvalues", "scales"])
def test_bit_flip_is_a_checksum_error(tmp_path, part):
    path = write(tmp_path / "a.safetensors", good_tensor())
    with endor.open_file(path) as f:
        start, _ = f.part_ranges("w")[part]
    data = bytearray(path.read_bytes())
    data[start] ^= 0x01
    path.write_bytes(bytes(data))
    assert "checksum mismatch" in load_error(path)


def test_group_size_edit_is_a_checksum_error(tmp_path):
    """Group sizes 8 and 9 both give 2 scales per 13-column row: only the checksum can tell."""
    path = edit_meta(write(tmp_path / "a.safetensors", good_tensor()),
                     lambda m: m["tensors"]["w"]["values"].update(group_size=9))
    assert "checksum mismatch" in load_error(path)
