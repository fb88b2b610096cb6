import json

import pytest
import torch

import endor
from endor.checkpoint import Checkpoint, CheckpointWriter
from endor.convert.endor_source import EndorSource
from endor.convert.endor_source import open_source
from endor.format.equal import bit_equal
from tests.helpers import sparse_tensor


def tensors():
    return {"layers.0.w": sparse_tensor((830, 545), torch.float16, 0.5, seed=1),
            "layers.0.v": sparse_tensor((7, 13), torch.bfloat16, 0.0, seed=2),
            "layers.0.e": torch.zeros(0, 4),
            "layers.0.norm": torch.randn(13, generator=torch.Generator().manual_seed(4)),
            "embed": sparse_tensor((33, 17), torch.float32, 0.9, seed=3),
            "ids": torch.arange(5)}


def write_checkpoint(path, *, weights="endor", manifest=None):
    """An Endor checkpoint: w, v, e compressed (when weights is endor), the rest dense."""
    t = tensors()
    writer = CheckpointWriter(path, ["layers.0", "rest"], weights=weights)
    compressed = {"layers.0.w", "layers.0.v", "layers.0.e"} if weights == "endor" else set()
    stored = {n: endor.compress(v) if n in compressed else v for n, v in t.items()}
    writer.write(0, {n: v for n, v in stored.items() if n.startswith("layers.0.")})
    writer.write(1, {n: v for n, v in stored.items() if not n.startswith("layers.0.")})
    writer.finish(manifest or {"method": "wanda", "sparsity": 0.5, "nm": None,
                               "calibration": {"samples": 4}})
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("weights", ["endor", "dense"])
def test_reads_every_tensor_decompressed(tmp_path, weights):
    src = open_source(write_checkpoint(tmp_path, weights=weights))
    assert isinstance(src, EndorSource)
    want = tensors()
    assert src.names() == sorted(want)
    ck = Checkpoint(tmp_path)
    for name, t in want.items():
        got = src.read(name)
        assert src.dtype(name) == t.dtype and tuple(src.shape(name)) == tuple(t.shape)
        if t.is_floating_point() and t.numel():
            assert bit_equal(got, t), name
        else:
            assert torch.equal(got, t) and got.dtype == t.dtype
        assert src.nbytes(name) == sum(e - s for s, e in ck.file_of(name).byte_ranges(name))
    assert src.total_bytes == sum(src.nbytes(n) for n in want)
    if weights == "endor":  # read as stored: 9-ish bits per element at 50%, not 16
        assert src.nbytes("layers.0.w") < 0.6 * 830 * 545 * 2


def test_prior_pruning_carries_over(tmp_path):
    pruned = EndorSource(write_checkpoint(tmp_path / "a"))
    assert pruned.prior_pruning() == [{"method": "wanda", "sparsity": 0.5, "nm": None,
                                       "calibration": {"samples": 4}}]
    twin = EndorSource(write_checkpoint(tmp_path / "b", manifest={
        "method": "none", "sparsity": None, "nm": None, "calibration": None,
        "prior_pruning": pruned.prior_pruning()}))
    assert twin.prior_pruning() == pruned.prior_pruning()
    with pytest.raises(endor.FormatError, match="prior_pruning"):
        EndorSource(write_checkpoint(tmp_path / "c", manifest={"prior_pruning": "wanda"}))


def test_fingerprint_follows_the_data(tmp_path):
    a = EndorSource(write_checkpoint(tmp_path / "a")).fingerprint()
    assert EndorSource(write_checkpoint(tmp_path / "b")).fingerprint() == a
    other = write_checkpoint(tmp_path / "c", manifest={"method": "magnitude", "sparsity": 0.5})
    assert EndorSource(other).fingerprint() != a


def test_corrupt_values_are_caught_by_the_checksum(tmp_path):
    path = write_checkpoint(tmp_path)
    ck = Checkpoint(path)
    shard = path / ck.weight_map["layers.0.w"]
    ranges = ck.file_of("layers.0.w").part_ranges("layers.0.w")
    start, end = next(r for part, r in ranges.items() if part not in ("bitmap", "tiles"))
    data = bytearray(shard.read_bytes())
    data[(start + end) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    src = EndorSource(path)
    with pytest.raises(endor.FormatError, match="'layers.0.w'.*checksum"):
        src.read("layers.0.w")
    assert bit_equal(src.read("layers.0.v"), tensors()["layers.0.v"])  # the others still read


def test_broken_checkpoints_are_clear_errors(tmp_path):
    path = write_checkpoint(tmp_path / "ok")
    (path / "config.json").unlink()
    with pytest.raises(endor.FormatError, match="config.json"):
        EndorSource(path)
    path = write_checkpoint(tmp_path / "truncated")
    shard = path / Checkpoint(path).weight_map["layers.0.w"]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(endor.FormatError, match="truncated"):
        EndorSource(path)
    path = write_checkpoint(tmp_path / "missing")
    (path / Checkpoint(path).weight_map["embed"]).unlink()
    with pytest.raises(endor.FormatError, match="missing"):
        EndorSource(path)
    path = write_checkpoint(tmp_path / "newer")
    manifest = json.loads((path / "endor.json").read_text())
    (path / "endor.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(endor.FormatError, match="upgrade"):
        EndorSource(path)
    with pytest.raises(KeyError):
        EndorSource(write_checkpoint(tmp_path / "fine")).read("nope")
