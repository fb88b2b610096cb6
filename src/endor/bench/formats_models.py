"""`endor bench formats --source models`: the formats compared on real pruned weights, the decoder
weight matrices of the embedded models (SmolLM2-135M, Gemma-3-270m), as `endor convert` prunes
them (magnitude or Wanda, 50% unstructured or 2:4; Wanda calibrated on `calibration_text()`).

Each (model, method, pattern) is converted once, with raw values, and every matrix the conversion
compressed is read back decompressed: the bfloat16 weights exactly as stored (both models are
cached in bfloat16, endor.data.models). The float16 rows are the same weights cast to float16
(exact for every value in float16's normal range; the rows count those that are not).

Sizes cover every decoder weight matrix: bits per element is every stored byte over every element.
Every matrix's round trip is checked bit-exact in every format. Decode speed is timed on the
matrices of one decoder layer (the middle one by default: every projection shape once), dense
bytes produced over the summed median times, next to a dense copy of the same matrices."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..convert import convert
from ..data.models import resolve_model
from . import harness

MODELS = ("smollm2", "gemma3-270m")
METHODS = ("magnitude", "wanda")
PATTERNS = {"50%": (0.5, None), "2:4": (0.5, (2, 4))}
CALIB_SAMPLES = 32  # x 256 tokens; what `endor bench quality` calibrates on
# Both embedded models are cached in bfloat16; other dtypes' rows are its values cast.


def checkpoint_dir(workdir: Path, model: str, method: str, pattern: str) -> Path:
    name = Path(model).name if Path(model).is_dir() else model
    return workdir / f"{name}-{method}-{pattern.replace(':', 'of').replace('%', 'pct')}"


def pruned_checkpoint(model: str, method: str, pattern: str, *, workdir: Path,
                      calib_samples: int) -> tuple[Path, float]:
    """`endor convert` of `model` into workdir (raw values); a complete conversion with the same
    settings already there is reused (convert resumes). Returns (directory, seconds)."""
    sparsity, nm = PATTERNS[pattern]
    out = checkpoint_dir(workdir, model, method, pattern)
    t0 = time.perf_counter()
    convert(resolve_model(model), out, method=method, sparsity=sparsity, nm=nm, values="raw",
            calib_samples=calib_samples, progress=False, resume=True)
    return out, round(time.perf_counter() - t0, 2)


def origin(dtype: torch.dtype, stored: torch.dtype) -> str:
    """What a row's values are, recorded beside them."""
    if dtype == stored:
        return f"{harness.dtype_name(stored)} as stored in the model"
    return f"the model's {harness.dtype_name(stored)} weights cast to {harness.dtype_name(dtype)}"


def decoder_matrices(path: Path) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(layer index, name, dense weight) for every tensor the conversion compressed inside the
    decoder layers: the pruned weight matrices, decompressed as stored."""
    ckpt = Checkpoint(path)
    for shard in ckpt.shards:
        if not shard.group.startswith("layers."):
            continue
        layer = int(shard.group.removeprefix("layers."))
        f = ckpt.open(shard.file)
        for name in f.keys():
            if f.is_compressed(name):
                yield layer, name, f.get_tensor(name)


INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def cast_inexact(weight: torch.Tensor, dtype: torch.dtype) -> int:
    """How many values the cast to `dtype` changes (e.g. bfloat16 values outside float16's
    normal range): the rows in `dtype` hold exactly the model's weights when this is 0."""
    back = weight.to(dtype).to(weight.dtype)
    return int((back.view(INT_VIEW[weight.dtype]) != weight.view(INT_VIEW[weight.dtype])).sum())


class Totals:
    """One format's sums over the matrices of one (model, method, pattern, dtype)."""

    def __init__(self):
        self.stored = self.numel = self.matrices = 0
        self.lossless = True
        self.timed_bytes, self.timed_s, self.timed_n = 0, 0.0, 0
        self.encode_s = 0.0
        self.escapes = self.nnz = None

    def add(self, row: dict, numel: int, timed: bool) -> None:
        self.stored += row["stored_bytes"]
        self.numel += numel
        self.matrices += 1
        self.lossless &= row["lossless"]
        self.encode_s += row["encode_s"]
        if "escapes" in row:
            self.escapes = (self.escapes or 0) + row["escapes"]
            self.nnz = (self.nnz or 0) + row["nnz"]
        if timed:
            self.timed_bytes += row["dense_bytes"]
            self.timed_s += row["median_s"]
            self.timed_n = row["n"]

    def row(self) -> dict:
        return {"bits_per_element": 8 * self.stored / self.numel if self.numel else None,
                "stored_bytes": self.stored, "numel": self.numel, "matrices": self.matrices,
                "lossless": self.lossless, "encode_s": round(self.encode_s, 3),
                "timed_bytes": self.timed_bytes, "timed_s": self.timed_s, "n": self.timed_n,
                "decode_gbps": self.timed_bytes / self.timed_s / 1e9 if self.timed_s else None,
                **({"escapes": self.escapes, "escape_fraction": self.escapes / self.nnz
                    if self.nnz else 0.0} if self.escapes is not None else {})}


def measure_case(matrices, codecs, dtypes, *, measure: Callable, timed_layer: int) -> dict:
    """{dtype: {format: Totals}} plus counts, over `matrices` (an iterator of (layer, name,
    weight as stored)); `measure(codec, tensor, timed)` is formats.measure_codec with its timing
    settings, called with timed=False (size and exactness only) outside `timed_layer`."""
    totals = {d: {c.name: Totals() for c in codecs} for d in dtypes}
    counts = {d: {"zeros": 0, "numel": 0, "cast_inexact": 0, "stored": set()} for d in dtypes}
    for layer, _name, weight in matrices:
        timed = layer == timed_layer
        for dtype in dtypes:
            tensor = weight.to(dtype)
            counts[dtype]["zeros"] += int((tensor == 0).sum())
            counts[dtype]["numel"] += tensor.numel()
            counts[dtype]["cast_inexact"] += cast_inexact(weight, dtype)
            counts[dtype]["stored"].add(weight.dtype)
            for codec in codecs:
                row = measure(codec, tensor, timed)
                totals[dtype][codec.name].add(row, tensor.numel(), timed)
    return {"totals": totals, "counts": counts}


def case_rows(model: str, method: str, pattern: str, measured: dict, convert_s: float) -> list:
    rows = []
    for dtype, by_format in measured["totals"].items():
        count = measured["counts"][dtype]
        copy = by_format["dense"].row()["decode_gbps"]
        for name, totals in by_format.items():
            row = totals.row()
            bits = dtype.itemsize * 8
            rows.append({
                "model": model, "method": method, "pattern": pattern,
                "dtype": harness.dtype_name(dtype),
                "values_from": "; ".join(origin(dtype, s)
                                         for s in sorted(count["stored"], key=str)),
                "sparsity": round(count["zeros"] / count["numel"], 6) if count["numel"] else None,
                "format": name, **row,
                "compression_ratio": bits / row["bits_per_element"]
                if row["bits_per_element"] else None,
                "decode_vs_copy": row["decode_gbps"] / copy
                if row["decode_gbps"] and copy else None,
                "cast_inexact": count["cast_inexact"], "convert_s": convert_s,
                "load_avg": harness.system_load()})
    return rows


def _report(rows: list[dict]) -> None:
    """One line per case on stderr: a full run takes many minutes."""
    for r in rows:
        if r["format"] == "endor-exp":
            print(f"formats: {r['model']} {r['method']} {r['pattern']} {r['dtype']}: endor-exp "
                  f"{r['bits_per_element']:.3f} bits/element over {r['matrices']} matrices",
                  file=sys.stderr, flush=True)


def model_rows(*, models, methods, patterns, dtypes, codecs, measure: Callable,
               calib_samples: int, workdir, timed_layer: int | None) -> tuple[list, dict]:
    """Every (model, method, pattern) case's rows, and what the run used per model."""
    keep = workdir is not None
    work = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="endor-bench-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, used = [], {}
    try:
        for model in models:
            for method in methods:
                for pattern in patterns:
                    path, seconds = pruned_checkpoint(model, method, pattern, workdir=work,
                                                      calib_samples=calib_samples)
                    layers = sum(s.group.startswith("layers.") for s in Checkpoint(path).shards)
                    timed = layers // 2 if timed_layer is None else timed_layer
                    if not 0 <= timed < layers:
                        raise ValueError(f"--timed-layer {timed} is not a decoder layer of "
                                         f"{model} (0 to {layers - 1})")
                    used[model] = {"num_layers": layers, "timed_layer": timed}
                    measured = measure_case(decoder_matrices(path), codecs, dtypes,
                                            measure=measure, timed_layer=timed)
                    case = case_rows(model, method, pattern, measured, seconds)
                    _report(case)
                    rows.extend(case)
                    if not keep:
                        shutil.rmtree(path, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return rows, used


def draw(doc: dict):
    """Per model and dtype: bits per element (top) and decode GB/s of the timed layer (bottom),
    one bar per format in each (method, pattern) case."""
    from .plot import _figure, _title  # lazy: matplotlib only when drawing
    rows = [r for r in doc["results"] if r["format"] != "endor-reference"]
    panels = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows))
    names = list(dict.fromkeys(r["format"] for r in rows))
    fig, axes = _figure(len(panels), 2, width=5.5)
    for col, (model, dtype) in enumerate(panels):
        mine = [r for r in rows if (r["model"], r["dtype"]) == (model, dtype)]
        cases = list(dict.fromkeys(f"{r['method']} {r['pattern']}" for r in mine))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            by_case = {f"{r['method']} {r['pattern']}": r for r in mine if r["format"] == name}
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(cases))]
            for ax, key in ((axes[0][col], "bits_per_element"), (axes[1][col], "decode_gbps")):
                ax.bar(xs, [(by_case.get(c) or {}).get(key) or 0 for c in cases], width,
                       label=name, color=f"C{k % 10}",
                       hatch=None if all((by_case.get(c) or {}).get("lossless", True)
                                         for c in cases) else "//")
        for ax, label in ((axes[0][col], "bits / element"),
                          (axes[1][col], "decompress GB/s (dense bytes)")):
            ax.set_xticks(range(len(cases)), cases, fontsize=7)
            ax.set(title=f"{model} {dtype}", ylabel=label)
            ax.grid(alpha=0.3, axis="y")
        axes[1][col].set_yscale("log")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _title(fig, doc, "pruned decoder weights of real models (hatched: not lossless)")
    return fig
