"""`endor bench <name>` end to end through the CLI entry point: each benchmark runs with --quick in
seconds, writes an envelope JSON with sane values and a PNG, and prints a table; benchmarks whose
former name still works; bad options are usage errors."""

import json
import sys
import types

import pytest

from endor.bench import harness
from endor.cli import bench as bench_cli
from endor.cli import build_parser, main

ENVELOPE = {"schema", "benchmark", "command", "date", "machine", "load_avg_at_end", "params",
            "results"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(name, tmp_path, *extra):
    out = tmp_path / "out"
    rc = main(["bench", name, "--quick", "--repeat", "1", "--out", str(out), *extra])
    assert rc == 0
    doc = json.loads((out / f"{name}.json").read_text())
    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    assert ENVELOPE <= set(doc) and doc["schema"] == harness.SCHEMA
    assert doc["benchmark"] == name and doc["results"]
    assert doc["command"].startswith(f"endor bench {name} ")  # rerunnable as written
    assert doc["params"]["quick"] is True and doc["params"]["repeat"] == 1
    assert set(doc["params"]["load_avg"]) == {"before", "after"}  # contention, recorded
    return doc


def test_bench_formats(tmp_path, capsys):
    doc = _run("formats", tmp_path)
    for r in doc["results"]:
        if r["format"] == "endor":
            bound = (1 - r["sparsity"]) * {"float32": 32}.get(r["dtype"], 16) + 1
            assert bound <= r["bits_per_element"] <= bound + 0.1
    assert {r["format"] for r in doc["results"]} >= {"dense", "endor", "csr", "coo"}
    printed = capsys.readouterr().out
    assert "bits_per_element" in printed and "formats.png" in printed


def test_bench_decompress(tmp_path, capsys):
    doc = _run("decompress", tmp_path)
    methods = {r["method"] for r in doc["results"]}
    assert {"copy", "numpy", "reference"} <= methods
    assert all(r["gbps"] > 0 for r in doc["results"])
    assert "ratio_vs_copy" in capsys.readouterr().out


def test_bench_transfer(tmp_path):
    doc = _run("transfer", tmp_path, "--dir", str(tmp_path), "--size-mib", "8")
    links = {r["link"] for r in doc["results"]}
    assert {"disk", "host_memcpy"} <= links
    assert all(r["gbps"] > 0 for r in doc["results"])


def _subcommands():
    parser = build_parser()
    bench = next(a for a in parser._subparsers._group_actions[0].choices["bench"]._actions
                 if a.dest == "benchmark")
    return set(bench.choices)


def test_decode_is_the_former_name_of_decompress():
    assert {"formats", "decompress", "decode", "transfer"} <= _subcommands()
    args = build_parser().parse_args(["bench", "decode", "--quick"])
    assert args.benchmark == "decompress"  # written as decompress.json


def test_every_benchmark_module_is_a_subcommand_and_helpers_are_not():
    import importlib
    import pkgutil

    import endor.bench
    modules = {m.name: importlib.import_module(f"endor.bench.{m.name}")
               for m in pkgutil.iter_modules(endor.bench.__path__)}
    benchmarks = {n for n, m in modules.items()
                  if hasattr(m, "add_arguments") and hasattr(m, "run")}
    names = _subcommands()
    assert names == benchmarks | {a for names in bench_cli.ALIASES.values() for a in names}
    assert not names & {"harness", "plot", "peers"}


def test_a_broken_benchmark_module_is_not_hidden(monkeypatch):
    def broken_import(name, *a, **k):
        if name == "endor.bench.formats":
            raise ModuleNotFoundError("No module named 'somedependency'", name="somedependency")
        return real_import(name, *a, **k)
    real_import = bench_cli.importlib.import_module
    monkeypatch.setattr(bench_cli.importlib, "import_module", broken_import)
    with pytest.raises(ModuleNotFoundError, match="somedependency"):
        build_parser()


def test_another_engineers_benchmark_gets_the_common_options_and_outputs(tmp_path, monkeypatch,
                                                                        capsys):
    # Stands in for endor.bench.e2e, written elsewhere against the same contract.
    module = types.ModuleType("endor.bench.e2e")
    module.__doc__ = "End to end tokens/s."
    module.add_arguments = lambda p: p.add_argument("--model", default="smollm2")
    # run() takes its options as keyword arguments, nothing of the command line.
    module.run = lambda *, model, quick, repeat, warmup: harness.envelope(
        "e2e", {"model": model, "quick": quick, "repeat": repeat},
        [{"pipeline": "endor", "tokens_per_s": 4.0}, {"pipeline": "dense", "tokens_per_s": 3.0}])
    monkeypatch.setitem(sys.modules, "endor.bench.e2e", module)
    assert main(["bench", "e2e", "--quick", "--out", str(tmp_path), "--model", "x"]) == 0
    doc = json.loads((tmp_path / "e2e.json").read_text())
    assert doc["params"] == {"model": "x", "quick": True, "repeat": 2}  # --quick default repeat
    assert (tmp_path / "e2e.png").read_bytes()[:8] == PNG_MAGIC
    assert "tokens_per_s" in capsys.readouterr().out


def test_bad_options_are_usage_errors(tmp_path, capsys):
    for argv in (["bench", "formats", "--repeat", "0"], ["bench", "formats", "--warmup", "-1"],
                 ["bench", "formats", "--sparsities", "half"],
                 ["bench", "formats", "--dtypes", "fp8"], ["bench", "nosuch"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    capsys.readouterr()
    assert main(["bench", "formats", "--shape", "0,4", "--out", str(tmp_path)]) == 1
    assert "no elements" in capsys.readouterr().err
    assert not (tmp_path / "formats.json").exists()
