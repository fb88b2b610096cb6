import json
import struct

import pytest
import torch
from safetensors import safe_open

import endor
from endor.checkpoint import CheckpointWriter
from endor.convert import outdir


def header_of(path) -> bytes:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n]


def test_shards_are_byte_reproducible(tmp_path):
    tensors = {"w": endor.compress(torch.randn(33, 17)), "b": torch.randn(17)}
    meta = {f"key{i}": f"value {i} \u00e9\n\"" for i in range(12)}
    writer = CheckpointWriter(tmp_path, ["layers.0"])
    first = writer.write(0, tensors, meta).read_bytes()
    for _ in range(3):
        assert writer.write(0, tensors, meta).read_bytes() == first
    header = json.loads(header_of(writer.path(0)))
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(writer.path(0)), framework="pt") as f:  # still a valid safetensors file
        assert f.metadata()["key3"] == meta["key3"]
    with endor.open_file(writer.path(0)) as f:
        assert torch.equal(f.get_tensor("b"), tensors["b"])
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.tmp"))


def test_side_files_are_copied_but_never_weights(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "chat_template.jinja", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "endor.json", "x.gguf", ".gitattributes"):
        (src / name).write_text(name)
    copied = outdir.copy_side_files(src, out)
    assert copied == ["chat_template.jinja", "config.json", "generation_config.json",
                      "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                      "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == copied
    assert (out / "config.json").read_text() == "config.json"


def test_overwrite_removes_only_conversion_files(tmp_path):
    writer = CheckpointWriter(tmp_path, ["layers.0", "rest"])
    for name in ("model-00001-of-00002.safetensors", "model-00009-of-00009.safetensors",
                 "model-00002-of-00002.safetensors.tmp", "endor.json",
                 "model.safetensors.index.json", "notes.txt", "config.json"):
        (tmp_path / name).write_text("x")
    assert outdir.prepare(writer, {"method": "none"}, resume=False) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt"]


def test_resume_refuses_foreign_shards(tmp_path):
    writer = CheckpointWriter(tmp_path, ["layers.0", "rest"])
    endor.save_file({"x": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(outdir.SettingsMismatch, match="not written by this conversion"):
        outdir.prepare(writer, {"method": "none"}, resume=True)
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    (tmp_path / "model-00003-of-00005.safetensors").write_text("x")
    with pytest.raises(outdir.SettingsMismatch, match="different layout"):
        outdir.prepare(writer, {"method": "none"}, resume=True)


def test_resume_over_a_damaged_shard_says_what_to_do(tmp_path):
    writer = CheckpointWriter(tmp_path, ["layers.0", "rest"])
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(endor.FormatError, match="delete this shard.*--overwrite"):
        outdir.prepare(writer, {"method": "none"}, resume=True)


def _old_checkpoint(out):
    out.mkdir()
    for name in ("endor.json", "model-00001-of-00002.safetensors", "tokenizer.json",
                 "chat_template.jinja"):
        (out / name).write_text("old " + name)


def test_replacing_swaps_the_new_checkpoint_in_whole(tmp_path):
    out = tmp_path / "out"
    _old_checkpoint(out)
    with outdir.replacing(out, replace=True) as work:
        assert work != out and work.parent == out.parent
        (work / "endor.json").write_text("new")
        assert (out / "tokenizer.json").read_text() == "old tokenizer.json"  # untouched so far
    assert sorted(p.name for p in out.iterdir()) == ["endor.json"]  # no stale file survives
    assert (out / "endor.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging (old) removed


def test_replacing_that_fails_midway_leaves_the_old_checkpoint(tmp_path):
    out = tmp_path / "out"
    _old_checkpoint(out)
    before = {p.name: p.read_text() for p in out.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        with outdir.replacing(out, replace=True) as work:
            (work / "endor.json").write_text("half")
            raise OSError(28, "disk full")
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replacing_clears_a_killed_runs_staging_and_writes_in_place_when_empty(tmp_path):
    out = tmp_path / "out"
    _old_checkpoint(out)
    stale = outdir.staging_dir(out)
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_text("half of a killed run")
    with outdir.replacing(out, replace=True) as work:
        assert sorted(work.iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with outdir.replacing(empty, replace=True) as work:
        assert work == empty
    with outdir.replacing(out, replace=False) as work:  # resuming writes into OUT itself
        assert work == out


def test_replacing_refuses_a_directory_that_is_no_checkpoint(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="holds no Endor checkpoint.*new or empty"):
        with outdir.replacing(home, replace=True):
            pass
    assert (home / "thesis.tex").read_text() == "precious"


def test_settings_differences_read_as_options_not_dicts():
    theirs = {"method": "wanda", "calibration": {"samples": 64, "text_sha256": "a"},
              "source": "sha256:1"}
    ours = {"method": "wanda", "calibration": {"samples": 8, "text_sha256": "b"},
            "source": "sha256:2"}
    text = outdir._differences(theirs, ours)
    assert text == ("calibration.samples 64 in OUT, 8 now; calibration text differs; "
                    "it was converted from another source model")
