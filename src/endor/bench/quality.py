"""`endor bench quality`: perplexity after pruning, per model, method and sparsity pattern.

For each model (SmolLM2-135M-Instruct and Gemma-3-270M, shipped offline) the dense model is the
baseline, measured in the same run; each method (magnitude, Wanda, SparseGPT) at each pattern
(50% unstructured, 2:4) is converted with `endor convert` (calibration: `calibration_text()`),
loaded back with `load_in_memory`, and scored with `endor.evaluate.perplexity` on the first
--max-windows windows of `evaluation_text()` (the 1911 Britannica article on Shakespeare).
Each row also records the decoder-Linear sparsity measured on the loaded weights (exact zeros)
and the checkpoint's compression ratio. Expect SparseGPT and Wanda close to each other and far
better than magnitude, and 2:4 worse than 50% unstructured. --quick: SmolLM2 only, few windows,
little calibration."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..convert import convert
from ..data.models import resolve_model
from ..data.text import calibration_text, evaluation_text
from ..evaluate import perplexity
from ..reference_loader import load_in_memory
from . import harness

NAME = "quality"
MODELS = ("smollm2", "gemma3-270m")
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = {"50%": (0.5, None), "2:4": (0.5, (2, 4))}
TABLE_COLUMNS = ["model", "method", "pattern", "perplexity", "vs_dense", "linear_sparsity",
                 "ratio", "convert_s", "eval_s"]
QUICK = {"models": ("smollm2",), "max_windows": 4, "calib_samples": 8}
# 16 x 512 tokens scored, 32 x 256 calibration: 8.4 min for both models on our 2-core machine;
# 32 windows x 64 samples took the better part of an hour under load. With half the calibration
# SparseGPT loses a little more than Wanda, both stay far below magnitude.
FULL = {"max_windows": 16, "calib_samples": 32}


def _names(choices):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names
    return parse


def add_arguments(parser) -> None:
    parser.add_argument("--models", type=lambda t: tuple(m for m in t.split(",") if m),
                        default=None,
                        help=f"comma-separated aliases or model paths (default "
                             f"{','.join(MODELS)}; --quick: smollm2)")
    parser.add_argument("--methods", type=_names(METHODS), default=METHODS,
                        help=f"comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--patterns", type=_names(tuple(PATTERNS)), default=tuple(PATTERNS),
                        help="comma-separated: 50%%, 2:4 (default both)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (512)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help=f"windows scored per model (default {FULL['max_windows']}; --quick "
                             f"{QUICK['max_windows']})")
    parser.add_argument("--calib-samples", type=int, default=None,
                        help=f"calibration segments of 256 tokens (default "
                             f"{FULL['calib_samples']}; --quick {QUICK['calib_samples']})")
    parser.add_argument("--workdir", default=None,
                        help="where converted checkpoints go, in a temporary directory removed "
                             "afterwards (default: the system's temp dir)")


def decoder_linear_sparsity(model) -> float:
    """Fraction of exact zeros over every nn.Linear weight inside the decoder layers."""
    zeros = total = 0
    for name, module in model.named_modules():
        if ".layers." in name and isinstance(module, torch.nn.Linear):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def _evaluate(path, text: str, window: int, max_windows: int) -> dict:
    model, tokenizer = load_in_memory(path)
    t0 = time.perf_counter()
    result = perplexity(model, tokenizer, text, window=window, max_windows=max_windows)
    return {"perplexity": result["perplexity"], "nll": result["nll"],
            "linear_sparsity": round(decoder_linear_sparsity(model), 6),
            "eval_s": round(time.perf_counter() - t0, 2),
            "eval": {k: result[k] for k in ("tokens", "windows", "window", "add_bos")}}


def _settings(*, models, methods, patterns, window, max_windows, calib_samples,
              quick) -> dict:
    base = QUICK if quick else FULL
    models = models or (QUICK["models"] if quick else MODELS)
    max_windows = max_windows if max_windows is not None else base["max_windows"]
    calib = calib_samples if calib_samples is not None else base["calib_samples"]
    if window < 2:
        raise ValueError(f"--window must be at least 2, got {window}")
    if max_windows < 1 or calib < 1:
        raise ValueError("--max-windows and --calib-samples must be at least 1")
    if not models:
        raise ValueError("--models names no model")
    return {"models": list(models), "methods": list(methods),
            "patterns": list(patterns), "window": window, "max_windows": max_windows,
            "calib_samples": calib}


def _report(row: dict) -> None:
    """One line per finished case on stderr: a full run takes minutes."""
    print(f"quality: {row['model']} {row['method']} {row['pattern']}: perplexity "
          f"{row['perplexity']:.3f}, decoder-Linear sparsity {row['linear_sparsity']:.3f}",
          file=sys.stderr, flush=True)


def run(*, models, methods, patterns, window, max_windows, calib_samples, workdir, quick,
        warmup, repeat) -> dict:
    """`warmup` and `repeat` are the common benchmark options; perplexity is computed once."""
    params = _settings(models=models, methods=methods, patterns=patterns, window=window,
                       max_windows=max_windows, calib_samples=calib_samples, quick=quick)
    text, calib = evaluation_text(), calibration_text()
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="endor-bench-quality-", dir=workdir))
    results = []
    try:
        for model in params["models"]:
            source = resolve_model(model)
            dense = _evaluate(source, text, params["window"], params["max_windows"])
            results.append({"model": model, "method": "dense", "pattern": "dense",
                            "sparsity": 0.0, "nm": None, **dense, "vs_dense": 1.0,
                            "ratio": 1.0, "convert_s": None})
            _report(results[-1])
            for method in params["methods"]:
                for pattern in params["patterns"]:
                    sparsity, nm = PATTERNS[pattern]
                    out = work / f"{len(results)}-{method}"
                    t0 = time.perf_counter()
                    summary = convert(source, out, method=method, sparsity=sparsity, nm=nm,
                                      calib_text=calib, progress=False, resume=False,
                                      calib_samples=params["calib_samples"])
                    convert_s = round(time.perf_counter() - t0, 2)
                    row = _evaluate(out, text, params["window"], params["max_windows"])
                    results.append({
                        "model": model, "method": method, "pattern": pattern,
                        "sparsity": sparsity, "nm": f"{nm[0]}:{nm[1]}" if nm else None, **row,
                        "vs_dense": round(row["perplexity"] / dense["perplexity"], 4),
                        "ratio": summary["total"]["ratio"], "convert_s": convert_s})
                    _report(results[-1])
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return harness.envelope(NAME, params, results, table_columns=TABLE_COLUMNS,
                            text={"evaluation": "1911 Britannica 'Shakespeare' (endor.data.text)",
                                  "calibration": "pydoc_data.topics (endor.data.text)"})


def draw(doc: dict):
    """The benchmark's picture: per model, perplexity (log scale) of each method at each pattern,
    the dense model as a dashed line. Returns a matplotlib Figure (Agg canvas, no pyplot)."""
    # lazy: matplotlib is heavy; only drawing needs it
    from matplotlib.figure import Figure

    rows = doc["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(5.5 * len(models), 3.8), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        patterns = list(dict.fromkeys(r["pattern"] for r in mine if r["method"] != "dense"))
        methods = list(dict.fromkeys(r["method"] for r in mine if r["method"] != "dense"))
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            ppl = {r["pattern"]: r["perplexity"] for r in mine if r["method"] == method}
            xs = [k + i * width for k, p in enumerate(patterns) if p in ppl]
            bars = ax.bar(xs, [ppl[p] for p in patterns if p in ppl], width, label=method,
                          color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        for r in mine:
            if r["method"] == "dense":
                ax.axhline(r["perplexity"], color="k", linestyle="--", linewidth=1,
                           label=f"dense {r['perplexity']:.1f}")
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(patterns))], patterns)
        ax.set(title=model, ylabel="perplexity (lower is better)", yscale="log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    params = doc.get("params", {})
    fig.suptitle(f"endor bench quality: perplexity after pruning, {params.get('max_windows')} "
                 f"windows of {params.get('window')} tokens", fontsize=10)
    return fig
