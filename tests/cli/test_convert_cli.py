import json

import pytest
import torch

from endor.cli import build_parser, main
from tests.convert.conftest import CALIB_TEXT, make_model_dir


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("src"), "llama", dtype=torch.float16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse(*argv):
    return build_parser().parse_args(["convert", "SRC", "OUT", *argv])


def test_defaults_and_options():
    args = parse()
    assert (args.method, args.sparsity, args.nm, args.weights, args.keep_dense, args.verify,
            args.overwrite) == ("none", 0.5, None, "endor", [], True, False)
    args = parse("--method", "sparsegpt", "--sparsity", "0.6", "--nm", "2:4", "--weights",
                 "dense", "--keep-dense", "a*", "b*", "--keep-dense", "c*", "--no-verify",
                 "--overwrite", "--calib-samples", "8", "--calib-seqlen", "32")
    assert args.nm == (2, 4) and args.sparsity == 0.6 and args.weights == "dense"
    assert args.keep_dense == ["a*", "b*", "c*"] and not args.verify and args.overwrite
    assert (args.calib_samples, args.calib_seqlen) == (8, 32)
    assert parse("--format", "dense").weights == "dense"  # the option's former name
    assert "--format" not in build_parser()._subparsers._group_actions[0].choices[
        "convert"].format_help()
    assert parse().device is None and parse("--device", "cpu").device == "cpu"
    assert parse().damping is None and parse("--damping", "0.01").damping == 0.01


@pytest.mark.parametrize("value", ["2-4", "2:4:8", "0:4", "5:4", "a:b", "", ":4", "2:"])
def test_malformed_nm_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        parse("--method", "magnitude", "--nm", value)
    assert e.value.code == 2
    assert "--nm" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--sparsity", "1.5"], ["--sparsity", "half"],
                                  ["--method", "random"], ["--weights", "gzip"],
                                  ["--format", "gzip"], ["--calib-samples", "0"],
                                  ["--damping", "tenth"]])
def test_other_bad_values_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_convert_end_to_end(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--method", "magnitude", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mlp.down_proj" in printed and "wrote" in printed and "0 already complete" in printed
    manifest = json.loads((out / "endor.json").read_text())
    assert manifest["method"] == "magnitude" and manifest["sparsity"] == 0.5
    assert main(["convert", str(src), str(out), "--method", "magnitude", "--quiet"]) == 0
    assert "4 already complete" in capsys.readouterr().out


def test_dense_twin_of_a_converted_checkpoint(src, tmp_path, capsys):
    pruned, twin = tmp_path / "pruned", tmp_path / "twin"
    assert main(["convert", str(src), str(pruned), "--method", "magnitude", "--quiet"]) == 0
    assert main(["convert", str(pruned), str(twin), "--weights", "dense", "--quiet"]) == 0
    manifest = json.loads((twin / "endor.json").read_text())
    assert manifest["weights"] == "dense" and manifest["prior_pruning"][0]["method"] == "magnitude"
    assert abs(manifest["summary"]["decoder_linear"]["sparsity"] - 0.5) < 0.005


def test_calibration_file_and_nm(src, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--method", "wanda", "--nm", "2:4", "--calib",
                 str(calib), "--calib-samples", "4", "--calib-seqlen", "16", "--quiet"]) == 0
    manifest = json.loads((out / "endor.json").read_text())
    assert manifest["nm"] == [2, 4] and manifest["calibration"]["samples"] == 4
    assert abs(manifest["summary"]["decoder_linear"]["sparsity"] - 0.5) < 0.005


def test_errors_are_reported_not_raised(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--method", "magnitude", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", str(src), str(out), "--method", "magnitude", "--sparsity", "0.75",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "endor convert: error" in err and "--overwrite" in err
    assert main(["convert", str(src), str(out), "--method", "magnitude", "--sparsity", "0.75",
                 "--overwrite", "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "missing"), str(out), "--quiet"]) == 1
    assert "endor convert: error" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "d"), "--method", "sparsegpt", "--damping",
                 "0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damping must be" in err


def test_calibration_from_a_local_data_file(src, tmp_path, capsys):
    pytest.importorskip("datasets")
    records = tmp_path / "calib.jsonl"
    records.write_text("\n".join(json.dumps({"text": line}) for line in
                                 CALIB_TEXT.split(". ")) + "\n")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--method", "wanda", "--calib", str(records),
                 "--calib-samples", "4", "--calib-seqlen", "16", "--device", "cpu",
                 "--quiet"]) == 0
    assert "layers/s on cpu" in capsys.readouterr().out
    manifest = json.loads((out / "endor.json").read_text())
    assert manifest["calibration"]["samples"] == 4
    assert main(["convert", str(src), str(tmp_path / "o2"), "--method", "wanda", "--calib",
                 str(records), "--calib-column", "body", "--quiet"]) != 0
    assert "--calib-column" in capsys.readouterr().err
