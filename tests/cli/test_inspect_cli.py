import json

import torch

import endor
from endor.cli import main
from tests.helpers import sparse_tensor


def test_inspect_file(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    endor.save_file({"w": endor.compress(sparse_tensor((64, 64), torch.bfloat16, 0.75)),
                     "b": torch.ones(64)}, path)
    assert main(["inspect", str(path), "--verify", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["w"]["compressed"] and abs(rows["w"]["sparsity"] - 0.75) < 0.05
    assert rows["w"]["dense_bytes"] == 64 * 64 * 2 and rows["b"]["dense_bytes"] == 256
    assert rows["w"]["values_codec"] == "exp" and rows["b"]["values_codec"] is None
    assert rows["w"]["bits_per_element"] < 0.25 * 16 + 1 and rows["b"]["checksum"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 tensors" in out and "values exp: 1 tensors" in out and "bits per element" in out


def test_inspect_shows_bits_per_codec(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    t = sparse_tensor((64, 64), torch.bfloat16, 0.5)
    endor.save_file({"a": endor.compress(t, values="raw"), "b": endor.compress(t)}, path)
    assert main(["inspect", str(path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("values ")]
    bits = {ln.split()[1].rstrip(":"): float(ln.split()[-4]) for ln in lines}
    assert set(bits) == {"raw", "exp"} and bits["exp"] < bits["raw"]


def test_inspect_corrupt_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["inspect", str(path)]) == 1
    assert "endor inspect: error" in capsys.readouterr().err


def test_table_has_a_header_and_one_dtype_vocabulary(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    endor.save_file({"w": endor.compress(sparse_tensor((8, 8), torch.bfloat16, 0.5)),
                     "b": torch.ones(8, dtype=torch.bfloat16)}, path)
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["tensor", "shape", "dtype", "values", "sparsity", "bytes"]
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert "bfloat16" in rows["b"] and "bfloat16" in rows["w"] and "BF16" not in rows["b"]


def test_checkpoint_prints_the_smallest_budget_the_runtime_accepts(tiny, capsys):
    """The line is load_model's floor (embedding rows on demand, head streamed), far below the
    non-layer weights that earlier versions printed as the least."""
    from endor.cli.inspect import size
    from endor.runtime.budget import least_budget
    path, _, _ = tiny("llama", "endor")
    assert main(["inspect", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines()
                if x.startswith("smallest --max-memory"))
    least = least_budget(path)
    assert f"smallest --max-memory: {size(least.bytes)} (embedding rows" in line
    assert f"non-layer weights resident: {size(least.rest_resident_bytes)};" in line
    assert size(least.bytes) == f"{least.bytes} B" and size(12_345_678) == "12.3 MB"
