"""`endor bench e2e` (src/endor/bench/e2e.py): the quick document, its plot, the options'
checks, and every `endor bench` command line of scripts/device-check.sh parses."""

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

from endor.bench import e2e, plot
from endor.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device-check.sh"


def _args(*argv) -> dict:
    """run()'s keyword arguments: the options as parsed, plus the common ones."""
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    return vars(parser.parse_args(list(argv))) | {"quick": True, "repeat": 1, "warmup": 0}


def test_quick_e2e_document_and_plot(tmp_path):
    args = _args("--workdir", str(tmp_path), "--systems", "endor,dense,accelerate-cold",
                 "--new-tokens", "3", "--endor-prefetch", "2", "--prefetch", "1",
                 "--values", "raw,exp", "--compute", "dense", "--plan-budgets", "0.5,0.9")
    doc = e2e.run(**args)
    assert doc["schema"] == "endor-bench/1" and doc["benchmark"] == "e2e"
    _check_memory_plan(doc, [0.5, 0.9])
    assert doc["params"]["device"] == "cpu" and doc["params"]["offload"] == "disk"
    rows = {r["system"]: r for r in doc["results"]}
    assert set(rows) == {"endor-raw-dense", "endor-exp-dense", "dense", "accelerate-cold",
                         "ideal-raw", "ideal-exp", "disk"}
    for name in ("endor-raw-dense", "endor-exp-dense", "dense", "accelerate-cold"):
        assert rows[name]["tokens_match"] and rows[name]["decode_tokens_per_s"] > 0
        assert rows[name]["streamed_layers"] == 4 and rows[name]["resident_layers"] == 0
    raw, exp = rows["endor-raw-dense"], rows["endor-exp-dense"]
    assert (raw["values"], exp["values"], raw["compute"]) == ("raw", "exp", "dense")
    assert exp["mb_read_per_token"] < raw["mb_read_per_token"] < rows["dense"][
        "mb_read_per_token"]
    # --endor-prefetch 2: three read slots of an Endor shard; dense, prefetch 1: two
    endor_dir = next(tmp_path.glob("llama-*/endor-raw"))
    endor_shard = max(p.stat().st_size for p in e2e._shards(endor_dir)[0])
    assert raw["buffer_bytes"] >= 3 * endor_shard
    assert doc["params"]["endor_prefetch"] == 2 and doc["params"]["prefetch"] == 1
    assert raw["decompress_ms"] > 0 and "decompress_ms" not in rows["accelerate-cold"]
    assert rows["ideal-exp"]["s_per_token"] == rows["dense"]["s_per_token"] * \
        exp["mb_read_per_token"] / rows["dense"]["mb_read_per_token"]
    ratios = doc["ratios"]
    assert ratios["exp_vs_raw"] == raw["s_per_token"] / exp["s_per_token"]
    assert ratios["exp_vs_dense"] == rows["dense"]["s_per_token"] / exp["s_per_token"]
    assert ratios["exp_vs_raw_dense"] == ratios["exp_vs_raw"]
    assert {"endor-raw-dense_time_vs_read", "endor-exp-dense_vs_ideal_time",
            "exp_vs_accelerate_cold"} <= set(ratios)
    assert {"exp_vs_raw", "exp_vs_dense", "exp_vs_accelerate_cold"} <= set(doc["met"])
    assert doc["params"]["budget_bytes"] <= 0.1 * doc["params"]["model_bytes"]
    png = plot.draw("e2e", doc, tmp_path / "e2e.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _check_memory_plan(doc: dict, fractions: list[float]) -> None:
    """The plan rows: load_model's own counts at each budget, compressed layers cheaper."""
    plan = doc["memory_plan"]
    rows = {(r["budget_fraction"], r["checkpoint"]): r for r in plan["rows"]}
    assert doc["params"]["plan_budgets"] == fractions
    for f in fractions:
        dense, raw, exp = (rows[(f, k)] for k in ("dense", "raw", "exp"))
        assert dense["budget_bytes"] == int(f * doc["params"]["model_bytes"])
        assert exp["layer_budget_bytes"] < raw["layer_budget_bytes"] < \
            dense["layer_budget_bytes"]
        assert dense["resident_layers"] <= raw["resident_layers"] <= exp["resident_layers"]
        assert (raw["compute"], dense["compute"]) == ("auto", "dense")
        for r in (dense, raw, exp):
            assert r["resident_bytes"] <= r["budget_bytes"]
            assert r["resident_layers"] + r["streamed_layers"] == 4
    top = rows[(fractions[-1], "dense")]["resident_layers"]
    assert top >= 2
    name = f"raw_resident_layers_vs_dense_at_{fractions[-1]}"
    assert plan["ratios"][name] == rows[(fractions[-1], "raw")]["resident_layers"] / top
    assert doc["met"][name] == (plan["ratios"][name] >= 1.7)


def test_quick_e2e_int4_fused_batches_and_in_ram_rows(tmp_path):
    args = _args("--workdir", str(tmp_path), "--systems", "endor,ram-dense,ram-endor",
                 "--new-tokens", "3", "--batch", "1,2", "--values", "int4,raw",
                 "--compute", "fused,auto")
    doc = e2e.run(**args)
    rows = {(r["system"], r.get("batch")): r for r in doc["results"]}
    systems = ("endor-int4-fused", "endor-int4-auto", "endor-raw-fused", "endor-raw-auto",
               "ram-dense", "ram-endor-int4", "ram-endor-raw")
    for system in systems:
        for b in (1, 2):
            row = rows[(system, b)]
            assert row["decode_tokens_per_s"] > 0
            # tokens/s counts every prompt of the batch
            assert row["decode_tokens_per_s"] == pytest.approx(b / row["s_per_token"])
    # lossy int4: compared with the int4 model held in memory (dense compute); the fused
    # compute may differ from it only where two logits are within the kernel's bound
    assert rows[("ram-dense", 1)]["tokens_match"]
    assert rows[("ram-endor-int4", 1)]["streamed_layers"] == 0
    assert rows[("ram-endor-int4", 1)]["compute"] == "fused"
    assert rows[("ram-dense", 1)]["mb_read_per_token"] == 0
    assert rows[("endor-int4-fused", 1)]["mb_read_per_token"] < \
        rows[("endor-raw-fused", 1)]["mb_read_per_token"]
    assert {"endor-int4-fused_batch2_vs_batch1", "ram-endor-int4_vs_ram_dense"} <= \
        set(doc["ratios"])
    assert doc["params"]["batch"] == [1, 2] and doc["params"]["values"] == ["int4", "raw"]
    assert "dense" in doc["params"]["checkpoint_bytes"]


def test_conversions_in_parallel_processes_match_sequential_ones(tmp_path):
    from endor.convert.synthetic import write_synthetic_checkpoint

    config, _ = e2e._config(e2e.Options(**_args("--layers", "2", "--vocab", "512")))
    hf = write_synthetic_checkpoint(tmp_path / "hf", config, dtype=torch.bfloat16)
    outs = {f"{w}-{mode}": tmp_path / f"{w}-{mode}"
            for w in ("endor", "dense") for mode in ("seq", "par")}
    e2e._convert_all(hf, {w: outs[w + "-seq"] for w in ("endor", "dense")}, 0.5, parallel=False)
    e2e._convert_all(hf, {w: (outs[w + "-par"], w, "exp") for w in ("endor", "dense")}, 0.5,
                     parallel=True)
    for w in ("endor", "dense"):
        seq, par = (sorted(p.relative_to(outs[f"{w}-{m}"]) for p in outs[f"{w}-{m}"].rglob(
            "*.safetensors")) for m in ("seq", "par"))
        assert seq == par and seq
        for rel in seq:
            assert (outs[f"{w}-seq"] / rel).read_bytes() == (outs[f"{w}-par"] / rel).read_bytes()


def test_a_failed_child_conversion_raises_with_its_error(tmp_path):
    with pytest.raises(RuntimeError, match="converting to endor weights failed"):
        e2e._convert_all(tmp_path / "missing", {"endor": tmp_path / "a", "dense": tmp_path / "b"},
                         0.5, parallel=True)


def test_embeddings_above_the_budget_stream_every_layer(tmp_path):
    """The device check's shape (a large vocabulary on 4 layers): the non-layer weights exceed
    10% of the model, so the budget becomes the least possible instead of an error."""
    args = _args("--workdir", str(tmp_path), "--systems", "endor", "--vocab", "16384",
                 "--new-tokens", "2", "--max-seconds", "1e-9", "--values", "exp",
                 "--compute", "dense")
    doc = e2e.run(**args | {"repeat": 3})
    assert doc["params"]["budget_least"] and doc["params"]["budget_bytes"] == 0
    (endor,) = [r for r in doc["results"] if r["system"] == "endor-exp-dense"]
    assert endor["streamed_layers"] == 4 and endor["decode_tokens_per_s"] > 0
    assert endor["n"] == 1  # --max-seconds: one timed round of the three asked for


@pytest.mark.parametrize("argv, message", [
    (("--offload", "cpu"), "needs --device cuda"),
    (("--systems", "endor,accelerate"), "unknown systems"),  # "accelerate" is the cpu-offload one
    (("--new-tokens", "1"), "--new-tokens"),
    (("--batch", "0"), "--batch"),
    (("--values", "exp,zstd"), "--values"),
    (("--compute", "sparse"), "--compute"),
    (("--plan-budgets", "0.5,2"), "--plan-budgets"),
])
def test_bad_options_fail_before_any_work(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        e2e.run(**_args("--workdir", str(tmp_path / "never"), *argv))
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no CUDA device"):
        e2e.run(**_args("--device", "cuda", "--workdir", str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


def _script_bench_commands() -> list[list[str]]:
    """Each `-m endor bench ...` command of the script as argv after `endor`, its shell
    variables expanded: loop variables to each value of their `for` list, others to a path."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    loops = {m.group(1): m.group(2).split()
             for m in re.finditer(r"for (\w+) in ([^;]+);", text)}
    commands = []
    for line in text.splitlines():
        m = re.search(r"-m endor (bench .*)$", line)
        if not m:
            continue
        used = [v for v in loops if re.search(rf"\$\{{?{v}\b", m.group(1))]
        for value in (loops[used[0]] if used else [None]):
            expanded = re.sub(r"\$\{?(\w+)\}?",
                              lambda v: value if v.group(1) in used else "/tmp/x", m.group(1))
            commands.append(shlex.split(expanded))
    return commands


def test_device_check_script_uses_only_existing_options():
    commands = _script_bench_commands()
    names = {c[1] for c in commands}
    assert {"decompress", "transfer", "e2e"} <= names, names
    assert sum(c[1] == "e2e" for c in commands) == 2  # --offload cpu and disk
    parser = build_parser()
    for argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"scripts/device-check.sh: `endor {' '.join(argv)}` does not parse")
        assert args.benchmark == argv[1]
        if argv[1] == "e2e":
            assert args.device == "cuda" and args.offload in ("cpu", "disk")
