"""`convert(..., values="int8"|"int4")`: round-to-nearest after magnitude/Wanda, joint with
SparseGPT, quantizing an already pruned checkpoint with method "none"; the manifest records the
codec, the group size and the measured quantization error."""

import json

import pytest
import torch

import endor
from endor.checkpoint import Checkpoint
from endor.cli import main
from endor.convert import convert
from endor.format.equal import bit_equal
from endor.prune import prune_weight
from tests.convert.conftest import CALIB_TEXT, SAMPLES, SEQLEN
from tests.convert.test_pipeline import converted, is_linear, source_tensors

CALIB = dict(calib_text=CALIB_TEXT, calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_magnitude_int4_is_round_to_nearest_of_the_pruned_weights(model_dirs, tmp_path, dtype):
    src = model_dirs("llama", dtype)
    summary = convert(src, tmp_path / "out", method="magnitude", values="int4", group_size=32,
                      progress=False)
    got = converted(tmp_path / "out")
    ck = Checkpoint(tmp_path / "out")
    for name, w in source_tensors(src).items():
        if name not in got:
            continue
        if is_linear(name):
            pruned = prune_weight(w, method="magnitude", sparsity=0.5)
            want = endor.decompress(endor.compress(pruned, values="int4", group_size=32))
            assert ck.file_of(name).entry(name).codec == "int4"
        else:
            want = w
        assert bit_equal(got[name], want), name
    assert summary["values"] == [{"codec": "int4", "group_size": 32, "tensors": 21}]
    assert 0.01 < summary["quantization_error"] < 0.2
    manifest = json.loads((tmp_path / "out" / "endor.json").read_text())
    assert manifest["values"] == "int4"
    assert manifest["quantization"] == {"group_size": 32, "rounding": "rtn"}
    assert manifest["summary"]["quantization_error"] == summary["quantization_error"]


def test_sparsegpt_joint_int8(model_dirs, tmp_path):
    src = model_dirs("llama", torch.float16)
    summary = convert(src, tmp_path / "q", method="sparsegpt", values="int8", **CALIB)
    raw = convert(src, tmp_path / "raw", method="sparsegpt", values="raw", **CALIB)
    assert summary["values"][0]["codec"] == "int8"
    assert 0 < summary["quantization_error"] < 0.03
    assert summary["decoder_linear"]["sparsity"] >= 0.5
    # int8 at 50%: bitmap + 8 bits + one 16-bit scale per 64 columns of these tiny rows
    assert summary["decoder_linear"]["stored_bytes"] < 0.66 * raw["decoder_linear"]["stored_bytes"]
    manifest = json.loads((tmp_path / "q" / "endor.json").read_text())
    assert manifest["quantization"]["rounding"] == "joint"


def test_method_none_quantizes_a_pruned_checkpoint(model_dirs, tmp_path):
    src = model_dirs("llama", torch.bfloat16)
    convert(src, tmp_path / "pruned", method="wanda", **CALIB)
    convert(tmp_path / "pruned", tmp_path / "q", method="none", values="int8", progress=False)
    pruned, quantized = converted(tmp_path / "pruned"), converted(tmp_path / "q")
    for name, w in pruned.items():
        want = endor.decompress(endor.compress(w, values="int8")) if is_linear(name) else w
        assert bit_equal(quantized[name], want), name


def test_bad_options(model_dirs, tmp_path):
    src = model_dirs("llama", torch.float16)
    with pytest.raises(ValueError, match="dense weights"):
        convert(src, tmp_path / "a", values="int4", weights="dense", progress=False)
    with pytest.raises(ValueError, match="group_size"):
        convert(src, tmp_path / "b", values="raw", group_size=64, progress=False)
    with pytest.raises(ValueError, match="values"):
        convert(src, tmp_path / "c", values="int3", progress=False)


def test_cli(model_dirs, tmp_path, capsys):
    src = model_dirs("llama", torch.float16)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--method", "magnitude", "--values", "int4",
                 "--group-size", "16", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "values int4, group size 16" in printed and "quantization error" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int4" in printed and "group size 16" in printed and "quantization error" in printed
