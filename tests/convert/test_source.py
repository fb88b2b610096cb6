import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import endor
from endor.convert.endor_source import open_source
from endor.convert.source import SourceCheckpoint
from endor.format.equal import bit_equal


def write_dir(path, tensors_per_file: dict, *, index=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    weight_map = {}
    for file, tensors in tensors_per_file.items():
        save_file(tensors, path / file)
        weight_map.update({n: file for n in tensors})
    if index:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(7, 13, generator=g).to(torch.bfloat16),
            "b": torch.randn(830, 545, generator=g).to(torch.float16),
            "c": torch.randn(3, 4, 5, generator=g),
            "empty": torch.zeros(0, 4),
            "ids": torch.arange(10, dtype=torch.int64),
            "scalar": torch.tensor(2.5)}


@pytest.mark.parametrize("layout", ["index", "single", "shards-without-index"])
def test_reads_every_tensor_exactly(tmp_path, layout):
    t = tensors()
    names = sorted(t)
    if layout == "single":
        src = write_dir(tmp_path, {"model.safetensors": t}, index=False)
    else:
        half = {n: t[n] for n in names[:3]}, {n: t[n] for n in names[3:]}
        src = write_dir(tmp_path, {"model-00001-of-00002.safetensors": half[0],
                                   "model-00002-of-00002.safetensors": half[1]},
                        index=layout == "index")
    source = SourceCheckpoint(src)
    assert source.names() == names
    for name in names:
        got = source.read(name)
        want = t[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert source.nbytes(name) == want.numel() * want.element_size()
        if want.is_floating_point() and want.numel():
            assert bit_equal(got, want)
        else:
            assert torch.equal(got, want)
    assert source.total_bytes == sum(v.numel() * v.element_size() for v in t.values())


def test_fingerprint_tells_other_weights_apart(tmp_path):
    a = SourceCheckpoint(write_dir(tmp_path / "a", {"model.safetensors": tensors(0)}))
    b = SourceCheckpoint(write_dir(tmp_path / "b", {"model.safetensors": tensors(0)}))
    c = SourceCheckpoint(write_dir(tmp_path / "c", {"model.safetensors": tensors(1)}))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_missing_shard_of_the_index(tmp_path):
    t = tensors()
    src = write_dir(tmp_path, {"one.safetensors": {"a": t["a"]}, "two.safetensors": {"b": t["b"]}})
    (src / "two.safetensors").unlink()
    with pytest.raises(endor.FormatError, match="two.safetensors.*missing"):
        SourceCheckpoint(src)


def test_missing_shard_without_index(tmp_path):
    t = tensors()
    src = write_dir(tmp_path, {"model-00001-of-00003.safetensors": {"a": t["a"]},
                               "model-00003-of-00003.safetensors": {"b": t["b"]}}, index=False)
    with pytest.raises(endor.FormatError, match="model-00002-of-00003"):
        SourceCheckpoint(src)


def test_truncated_shard(tmp_path):
    src = write_dir(tmp_path, {"model.safetensors": tensors()}, index=False)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(endor.FormatError, match="truncated"):
        SourceCheckpoint(src)


def test_index_that_lies(tmp_path):
    t = tensors()
    src = write_dir(tmp_path, {"one.safetensors": {"a": t["a"]}})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "one.safetensors", "zzz": "one.safetensors"}}))
    with pytest.raises(endor.FormatError, match="zzz"):
        SourceCheckpoint(src)
    (src / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(endor.FormatError, match="index"):
        SourceCheckpoint(src)


def test_tensor_stored_twice(tmp_path):
    t = tensors()
    src = write_dir(tmp_path, {"model-00001-of-00002.safetensors": {"a": t["a"]},
                               "model-00002-of-00002.safetensors": {"a": t["a"]}}, index=False)
    with pytest.raises(endor.FormatError, match="twice"):
        SourceCheckpoint(src)


def test_pickled_weights_are_refused_by_name(tmp_path):
    tmp_path.joinpath("config.json").write_text("{}")
    tmp_path.joinpath("pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(endor.FormatError, match="pytorch_model.bin.*pickled"):
        SourceCheckpoint(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        SourceCheckpoint(tmp_path / "nope")
    with pytest.raises(endor.FormatError, match="config.json"):
        SourceCheckpoint(tmp_path)


def test_open_source_tells_endor_checkpoints_apart(tmp_path):
    src = write_dir(tmp_path, {"model.safetensors": tensors()}, index=False)
    assert isinstance(open_source(src), SourceCheckpoint)
    (src / "endor.json").write_text(json.dumps({"weights": "endor"}))  # not a real manifest
    with pytest.raises(endor.FormatError, match="not an Endor checkpoint manifest"):
        open_source(src)
    assert "a" in SourceCheckpoint(src)  # the plain reader still reads the files


def test_a_file_that_vanishes_is_a_clear_error(tmp_path):
    src = write_dir(tmp_path, {"model.safetensors": tensors()}, index=False)
    source = SourceCheckpoint(src)
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(endor.FormatError, match="'b'.*ended"):
        source.read("b")
    shutil.rmtree(src)
    with pytest.raises(endor.FormatError, match="cannot read"):
        source.read("b")
