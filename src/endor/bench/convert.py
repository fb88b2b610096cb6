"""`endor bench convert`: conversion throughput and peak memory on a synthetic checkpoint larger
than the memory budget it must stay under.

Writes a random-weight Llama-shaped fp16 checkpoint (default 3.2 GB; --quick a few MB), evicts it
from the page cache, and converts it with `endor convert` in a child process, so that the child's
peak RSS (getrusage of that child: anonymous + file-backed pages) is the conversion's alone. GB/s
is source bytes / wall time. Baselines measured in the same run: a plain streaming copy of the
same files (read + write, cold cache: the I/O bound of any conversion) and the peak RSS of a child
that only imports what `endor convert` imports. Done when peak RSS <= 1.5 GB on >= 3 GB.

Each conversion is one cold, uninterrupted run, as a user runs it: `--conversions` sets how many
(default 1); the common --repeat / --warmup options time the copy baseline."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from ..checkpoint import WEIGHT_KINDS
from ..convert.synthetic import write_synthetic_checkpoint
from ..prune import check_sparsity
from . import harness

NAME = "convert"
DEFAULT_SIZE_GB = 3.2
DONE_WHEN = {"peak_rss_gb_max": 1.5, "source_gb_min": 3.0}
TABLE_COLUMNS = ["case", "source_gb", "seconds", "gbps", "peak_rss_gb", "peak_rss_anon_gb",
                 "peak_rss_file_gb", "ratio", "n"]
_IMPORTS = ("import endor.convert.pipeline, endor.convert.structure, endor.prune, transformers, "
            "accelerate, tqdm")


def add_arguments(parser) -> None:
    parser.add_argument("--size-gb", type=float, default=None,
                        help=f"synthetic checkpoint size in GB (default {DEFAULT_SIZE_GB}; "
                             "--quick: a few MB)")
    parser.add_argument("--method", default="magnitude", choices=("none", "magnitude"),
                        help="pruning method (calibrated methods need a tokenizer; default "
                             "magnitude)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--weights", choices=WEIGHT_KINDS, default="endor",
                        help="how the converted weights are stored (default endor)")
    parser.add_argument("--conversions", type=int, default=1,
                        help="cold conversions to time (default 1)")
    parser.add_argument("--workdir", default=None,
                        help="where the synthetic source and the output go, in a temporary "
                             "directory removed afterwards (default: the system's temp dir)")


def synthetic_config(size_gb: float | None, quick: bool):
    """A Llama-shaped config of about `size_gb` GB in fp16 (more layers for more GB)."""
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from transformers import LlamaConfig

    if quick and size_gb is None:
        return LlamaConfig(hidden_size=256, intermediate_size=704, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1024, num_hidden_layers=4,
                           tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    size = (size_gb or DEFAULT_SIZE_GB) * 1e9
    hidden, inter, vocab = 2560, 6912, 32000
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    outside = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, math.ceil((size - outside) / per_layer))
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=20,
                       num_key_value_heads=20, vocab_size=vocab, num_hidden_layers=layers,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


# A fresh, tiny interpreter forks the measured command and reports its rusage: the kernel carries
# a process's peak RSS across exec, so a command forked straight from this (large) process would
# report at least this process's RSS.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status),
               "peak_rss": usage.ru_maxrss * 1024}, f)
"""


def _rss_poller(pid: int, peaks: dict, stop: threading.Event) -> None:
    """Peaks of RssAnon / RssFile of the launcher's child, from /proc (Linux), every 50 ms."""
    try:
        launcher = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            for child in launcher.children():
                with open(f"/proc/{child.pid}/status") as f:
                    for line in f:
                        key = line.split(":", 1)[0]
                        if key in ("RssAnon", "RssFile"):
                            peaks[key] = max(peaks.get(key, 0), int(line.split()[1]) * 1024)
        except (OSError, ValueError, psutil.Error):
            pass
        stop.wait(0.05)


def run_child(argv: list[str], log: Path) -> dict:
    """Run `argv`, return its wall time, exit code and peak RSS (whole, and anon/file)."""
    peaks: dict = {}
    stop = threading.Event()
    report = log.with_suffix(".rusage.json")
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        launcher = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(report), *argv],
                                    stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
        poller = threading.Thread(target=_rss_poller, args=(launcher.pid, peaks, stop),
                                  daemon=True)
        poller.start()
        launcher.wait()
        seconds = time.perf_counter() - t0
        stop.set()
        poller.join()
    if launcher.returncode != 0 or not report.is_file():
        raise RuntimeError(f"the measuring launcher failed ({launcher.returncode})")
    result = json.loads(report.read_text())
    return {"seconds": seconds, **result,
            "peak_rss_anon": peaks.get("RssAnon"), "peak_rss_file": peaks.get("RssFile")}


def _copy_files(files: list[Path], dest: Path) -> None:
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        with open(f, "rb", buffering=0) as src, open(dest / f.name, "wb", buffering=0) as dst:
            while n := src.readinto(buf):
                dst.write(view[:n])


def _gb(n) -> float | None:
    return None if n is None else round(n / 1e9, 4)


def run(*, size_gb, method, sparsity, weights, conversions, workdir, quick, warmup,
        repeat) -> dict:
    if conversions < 1:
        raise ValueError(f"--conversions must be at least 1, got {conversions}")
    check_sparsity(sparsity)
    config = synthetic_config(size_gb, quick)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="endor-bench-convert-", dir=workdir))
    load_before = harness.system_load()
    try:
        src = write_synthetic_checkpoint(work / "src", config, dtype=torch.float16)
        files = sorted(src.glob("*.safetensors"))
        source_bytes = sum(f.stat().st_size for f in files)
        results = []

        def copy():
            shutil.rmtree(work / "copy", ignore_errors=True)
            _copy_files(files, work / "copy")
        copy_stats = harness.measure(copy, warmup=warmup, repeat=repeat,
                                     setup=lambda: harness.evict_files(files))
        shutil.rmtree(work / "copy", ignore_errors=True)
        results.append({"case": "copy (read + write, cold)", "source_gb": _gb(source_bytes),
                        "seconds": copy_stats.median_s, "gbps": copy_stats.gbps(source_bytes),
                        "n": copy_stats.n, "stats": copy_stats.as_dict()})

        imports = run_child([sys.executable, "-c", _IMPORTS], work / "imports.log")
        results.append({"case": "imports only", "peak_rss_gb": _gb(imports["peak_rss"]),
                        "peak_rss_anon_gb": _gb(imports["peak_rss_anon"]),
                        "peak_rss_file_gb": _gb(imports["peak_rss_file"]), "n": 1})

        runs = []
        for k in range(conversions):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            cold = harness.evict_files(files)
            load = harness.system_load()
            argv = [sys.executable, "-m", "endor", "convert", str(src), str(out),
                    "--method", method, "--sparsity", str(sparsity),
                    "--weights", weights, "--quiet"]
            child = run_child(argv, work / f"convert{k}.log")
            if child["returncode"] != 0:
                raise RuntimeError(f"endor convert failed ({child['returncode']}):\n"
                                   + (work / f"convert{k}.log").read_text()[-4000:])
            stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            runs.append({**child, "cold_cache": cold, "stored_bytes": stored,
                         "load_avg_before": load})
        times = [r["seconds"] for r in runs]
        stats = harness.Stats(sorted(times)[len(times) // 2], min(times), max(times), len(times))
        peak = max(r["peak_rss"] for r in runs)
        worst = max(runs, key=lambda r: r["peak_rss"])
        results.append({
            "case": f"convert {method} {sparsity:g} -> {weights}",
            "source_gb": _gb(source_bytes), "seconds": stats.median_s,
            "gbps": stats.gbps(source_bytes), "peak_rss_gb": _gb(peak),
            "peak_rss_anon_gb": _gb(worst["peak_rss_anon"]),
            "peak_rss_file_gb": _gb(worst["peak_rss_file"]),
            "ratio": round(source_bytes / runs[0]["stored_bytes"], 4), "n": stats.n,
            "stats": stats.as_dict(), "runs": runs,
            "vs_copy": round(copy_stats.median_s / stats.median_s, 4)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    met = peak <= DONE_WHEN["peak_rss_gb_max"] * 1e9 and source_bytes >= \
        DONE_WHEN["source_gb_min"] * 1e9
    params = {"load_avg": {"before": load_before, "after": harness.system_load()},
              "method": method, "sparsity": sparsity, "weights": weights,
              "quick": quick, "dtype": "float16", "source_bytes": source_bytes,
              "config": {k: getattr(config, k) for k in (
                  "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}}
    return harness.envelope(NAME, params, results, table_columns=TABLE_COLUMNS,
                            done_when={**DONE_WHEN, "met": met})
