"""The value-codec slot: a codec plugged in from outside (a toy one here) goes through
compress, save_file, the layout checks, the checksum and every decoder entry point; fast
backends that do not declare it fall back to the reference."""

import pytest
import torch

import endor
from endor.format import codecs
from endor.format.codecs import ValueCodec, get_codec, register_codec
from endor.format.decompress import choose
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, INT_VIEW, sparse_tensor


class XorCodec(ValueCodec):
    """Values XORed with a key, stored as integers, in two halves: enough to exercise params,
    several parts and a declared order."""
    name = "test_xor"
    dtypes = tuple(INT_VIEW)

    def check_params(self, params, dtype):
        if set(params) != {"key"} or not isinstance(params["key"], int):
            raise endor.FormatError(f"test_xor wants an integer 'key', got {params}")
        return dict(params)

    def parts(self, shape, dtype, nnz, params):
        st = {2: "I16", 4: "I32"}[dtype.itemsize]
        return {"low": (st, [nnz // 2]), "high": (st, [nnz - nnz // 2])}

    def encode(self, values, tiles, key=5):
        ints = values.view(INT_VIEW[values.dtype]) ^ key
        return {"key": key}, {"low": ints[:ints.numel() // 2], "high": ints[ints.numel() // 2:]}

    def decode_values(self, params, parts, tiles, dtype):
        return (torch.cat([parts["low"], parts["high"]]) ^ params["key"]).view(dtype)


@pytest.fixture
def xor_codec():
    codec = register_codec(XorCodec())
    yield codec
    codecs._CODECS.pop(codec.name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, sparsity", [((1, 1), 0.0), ((7, 13), 0.5), ((830, 545), 0.9),
                                             ((64, 64), 1.0)])
def test_plugged_codec_roundtrips_through_a_file(tmp_path, xor_codec, dtype, shape, sparsity):
    t = sparse_tensor(shape, dtype, sparsity)
    et = endor.compress(t, values="test_xor")
    assert et.values_codec == "test_xor" and et.values is None and et.codec_params == {"key": 5}
    assert et.verify_checksum()
    for backend in ("auto", "reference", "cpu"):
        assert bit_equal(endor.decompress(et, backend=backend), t)
    path = tmp_path / "x.safetensors"
    endor.save_file({"w": et}, path)
    with endor.open_file(path) as f:
        assert f.part_suffixes("w") == ["bitmap", "tiles", "low", "high"]
        assert f.entry("w").params == {"key": 5}
        assert bit_equal(f.get_tensor("w"), t)


def test_backends_declare_their_codecs(xor_codec):
    cpu = torch.device("cpu")
    assert choose("auto", cpu, "test_xor").name == "reference"
    assert choose("cpu", cpu, "test_xor").name == "reference"
    assert choose("reference", cpu, "raw").name == "reference"


def test_bad_params_and_unknown_codecs_are_format_errors(xor_codec):
    with pytest.raises(endor.FormatError, match="integer 'key'"):
        get_codec("test_xor").check_params({"key": "x"}, torch.float16)
    with pytest.raises(endor.FormatError, match="not one of"):
        get_codec("nope")
    with pytest.raises(ValueError, match="not a value codec"):
        endor.compress(torch.ones(3), values="nope")


def test_raw_is_registered_and_default():
    assert "raw" in codecs.codec_names()
    assert endor.compress(torch.ones(3), values="raw").values_codec == "raw"
