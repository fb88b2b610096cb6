"""Version-1 files stay readable forever: fixtures written by the version-1 writer (see
fixtures/make_v1.py) load bit-exact under version 1's rules; writing them again gives version 2."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load_file

import endor
from endor.kernels import backends
from endor.format.equal import bit_equal

FIXTURES = Path(__file__).parent / "fixtures"
CPU_BACKENDS = [n for n, b in backends().items()
                if "cpu" in b.device_types and b.available() and n != "triton"]


@pytest.fixture
def expected():
    return st_load_file(str(FIXTURES / "v1_expected.safetensors"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_v1_file_loads_bit_exact(expected, backend):
    loaded = endor.load_file(FIXTURES / "v1.safetensors", backend=backend)
    assert sorted(loaded) == sorted(expected)
    for name, t in expected.items():
        if t.is_floating_point():
            assert bit_equal(loaded[name], t), name
        else:
            assert torch.equal(loaded[name], t)


def test_v1_entries_are_read_as_raw_without_dense_checksums():
    with endor.open_file(FIXTURES / "v1.safetensors") as f:
        assert f.version == 1 and f.metadata() == {"who": "fixture"}
        assert f.entry("w.bfloat16").codec == "raw" and f.dense_checksum("bias") is None
        et = f.get_compressed("w.float16")
        assert et.version == 1 and et.values_codec == "raw" and et.verify_checksum()


def test_v1_tensor_saved_again_is_version_2(tmp_path, expected):
    with endor.open_file(FIXTURES / "v1.safetensors") as f:
        tensors = {n: f.get_compressed(n) if f.is_compressed(n) else f.get_tensor(n)
                   for n in f.keys()}
    path = tmp_path / "v2.safetensors"
    endor.save_file(tensors, path)
    with endor.open_file(path) as f:
        assert f.version == 2 and f.dense_checksum("bias") is not None
        assert f.get_compressed("w.float32").version == 2
    loaded = endor.load_file(path)
    assert all(bit_equal(loaded[n], expected[n]) for n in expected if n.startswith("w."))


def test_corrupt_v1_tensor_is_not_blessed_by_saving(tmp_path):
    path = shutil.copy(FIXTURES / "v1.safetensors", tmp_path / "v1.safetensors")
    with endor.open_file(path) as f:
        start, end = f.part_ranges("w.float16")["values"]
    data = bytearray(Path(path).read_bytes())
    data[(start + end) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))
    with endor.open_file(path) as f:
        et = f.get_compressed("w.float16", verify=False)
    with pytest.raises(endor.FormatError, match="checksum mismatch"):
        endor.save_file({"w": et}, tmp_path / "out.safetensors")
    with pytest.raises(endor.FormatError, match="checksum mismatch"):
        endor.load_file(path)


def test_v1_fixture_is_really_version_1():
    with open(FIXTURES / "v1.safetensors", "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta = json.loads(json.loads(fh.read(n))["__metadata__"]["endor"])
    assert meta["version"] == 1 and "dense" not in meta
    assert all("values" not in e for e in meta["tensors"].values())
