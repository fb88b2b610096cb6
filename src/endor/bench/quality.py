"""`endor bench quality`: perplexity after pruning (and quantizing), per model, method, sparsity
pattern and value codec.

For each model (SmolLM2-135M-Instruct and Gemma-3-270M, shipped offline) the dense model is the
baseline, measured in the same run; each method (magnitude, Wanda, SparseGPT) at each pattern
(50% unstructured, 2:4) is converted with `endor convert`, loaded back with `load_in_memory`,
and scored with `endor.evaluate.perplexity` on the first --max-windows windows of the evaluation
part of the 1911 Britannica article on Shakespeare (`article_split()`; --scored validation
scores its validation part instead, to choose settings without looking at the evaluation
part). Wanda and SparseGPT calibrate on --calib: by default the article's calibration part,
which no scored window reaches (in-domain, as WikiText-2's train split is for its test split);
`pydoc` is `endor convert`'s default text, the Python docs (out of domain: SparseGPT fits it,
and pays on the article).
Each row also records the decoder-Linear sparsity measured on the loaded weights (exact zeros),
the checkpoint's compression ratio and bits per decoder-Linear element.

--values raw,int8,int4 adds quantized rows, each compared with the same pruned model with raw
values ("vs_raw"). Each (model, method, pattern) is pruned once, to raw values; round-to-nearest
rows ("rtn") quantize that checkpoint with `convert --method none`, so they share its masks
exactly. SparseGPT's "joint" rows run `convert --method sparsegpt --values intN` (each column
quantized as it is pruned, its rounding error folded into the columns after it); --rounding
chooses joint and/or rtn for SparseGPT (magnitude and Wanda always round to nearest).
--merge keeps the rows of an earlier result file this run does not measure, so a long
benchmark can run one model or method at a time. --quick: SmolLM2 only, few windows, little
calibration."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..convert import convert
from ..data.models import resolve_model
from ..data.calib import load_calibration_text
from ..data.text import article_split, calibration_text
from ..evaluate import perplexity
from ..prune import DAMPING, check_damping
from ..reference_loader import load_in_memory
from . import harness

NAME = "quality"
MODELS = ("smollm2", "gemma3-270m")
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = {"50%": (0.5, None), "2:4": (0.5, (2, 4))}
VALUES = ("raw", "int8", "int4")
ROUNDINGS = ("joint", "rtn")
TABLE_COLUMNS = ["model", "method", "pattern", "values", "rounding", "damping", "perplexity",
                 "vs_dense", "vs_raw", "linear_sparsity", "ratio", "linear_bits_per_element",
                 "quantization_error", "convert_s", "eval_s"]
QUICK = {"models": ("smollm2",), "max_windows": 4, "calib_samples": 8}
# 16 x 512 tokens scored, 32 x 256 calibration: 8.4 min for both models on our 2-core machine;
# 32 windows x 64 samples took the better part of an hour under load. With half the calibration
# SparseGPT loses a little more than Wanda, both stay far below magnitude.
FULL = {"max_windows": 16, "calib_samples": 32}
# Parameters a merged result file must share with this run for its perplexities to compare.
COMPARABLE = ("window", "max_windows", "calib_samples", "group_size", "calib", "damping",
              "scored")
SCORED_PARTS = ("evaluation", "validation")  # of article_split()
# --calib: the article's own calibration part (in-domain, never scored) or the Python docs
# (out of domain: the default calibration text of `endor convert`)
CALIB_TEXTS = {
    "article": ("the 1911 Britannica 'Shakespeare', calibration part (endor.data.text."
                "article_split)", lambda: article_split()[2]),
    "pydoc": ("pydoc_data.topics (endor.data.text.calibration_text)", calibration_text),
}
DEFAULT_CALIB = "article"
# SparseGPT's dampening with the in-domain calibration text: chosen on a validation part of the
# article that is neither scored nor calibrated on (characters 34 k-60 k; SmolLM2 50%, 32
# segments): 1% gave raw 35.22 and int4 joint 40.03 (1.137x), 10% 36.29 and 42.37 (1.167x);
# 128 segments instead of 32 gained 1% on both at 3.5x the conversion time.
DEFAULT_DAMPING = 0.01
# What a result file written before a parameter existed ran with.
LEGACY_PARAMS = {"calib": "pydoc", "damping": DAMPING, "scored": "evaluation"}


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
    parser.add_argument("--values", type=_names(VALUES), default=("raw",),
                        help="comma-separated value codecs: raw, int8, int4 (default raw); "
                             "int8/int4 round the kept weights of the raw pruned checkpoint to "
                             "nearest, and (SparseGPT) quantize jointly as it prunes")
    parser.add_argument("--rounding", type=_names(ROUNDINGS), default=ROUNDINGS,
                        help="SparseGPT's int8/int4 rows: joint (quantized as it prunes) and/or "
                             "rtn (round-to-nearest on its raw checkpoint); default both")
    parser.add_argument("--group-size", type=int, default=128,
                        help="input columns per int8/int4 scale (default 128)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (512)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help=f"windows scored per model (default {FULL['max_windows']}; --quick "
                             f"{QUICK['max_windows']})")
    parser.add_argument("--calib-samples", type=int, default=None,
                        help=f"calibration segments of 256 tokens (default "
                             f"{FULL['calib_samples']}; --quick {QUICK['calib_samples']})")
    parser.add_argument("--calib", default=DEFAULT_CALIB, metavar="TEXT",
                        help="calibration text for Wanda and SparseGPT: article (default: the "
                             "evaluation article's own calibration part, which no scored window "
                             "reaches), pydoc (the Python docs, `endor convert`'s default), or "
                             "anything `endor convert --calib` takes")
    parser.add_argument("--damping", type=float, default=None, metavar="F",
                        help=f"SparseGPT's dampening (default {DEFAULT_DAMPING}; `endor "
                             f"convert`'s is {DAMPING})")
    parser.add_argument("--scored", choices=SCORED_PARTS, default="evaluation",
                        help="which part of the article is scored: evaluation (default), or "
                             "validation, to choose settings without looking at it")
    parser.add_argument("--merge", default=None, metavar="JSON",
                        help="an earlier quality.json: its rows this run does not measure are "
                             "kept in the result, its dense rows reused (same windows, "
                             "calibration and group size)")
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
              quick, values=("raw",), group_size=128, rounding=ROUNDINGS,
              calib=DEFAULT_CALIB, damping=None, scored="evaluation") -> dict:
    base = QUICK if quick else FULL
    models = models or (QUICK["models"] if quick else MODELS)
    max_windows = max_windows if max_windows is not None else base["max_windows"]
    samples = calib_samples if calib_samples is not None else base["calib_samples"]
    if window < 2:
        raise ValueError(f"--window must be at least 2, got {window}")
    if max_windows < 1 or samples < 1:
        raise ValueError("--max-windows and --calib-samples must be at least 1")
    if not models:
        raise ValueError("--models names no model")
    return {"models": list(models), "methods": list(methods),
            "patterns": list(patterns), "values": list(values), "rounding": list(rounding),
            "group_size": group_size, "window": window, "max_windows": max_windows,
            "calib_samples": samples, "calib": calib,
            "damping": check_damping(DEFAULT_DAMPING if damping is None else damping),
            "scored": scored}


def calibration(name: str) -> tuple[str, str]:
    """(description, text) of --calib `name`: a CALIB_TEXTS name, else what `endor convert
    --calib` takes."""
    if name in CALIB_TEXTS:
        description, text = CALIB_TEXTS[name]
        return description, text()
    return name, load_calibration_text(name)


def _report(row: dict) -> None:
    """One line per finished case on stderr: a full run takes minutes."""
    rounding = f" {row['rounding']}" if row.get("rounding") else ""
    print(f"quality: {row['model']} {row['method']} {row['pattern']} {row['values']}{rounding}: "
          f"perplexity {row['perplexity']:.3f}, decoder-Linear sparsity "
          f"{row['linear_sparsity']:.3f}", file=sys.stderr, flush=True)


def row_plan(method: str, params: dict) -> list[tuple[str, str | None]]:
    """The (values, rounding) rows of one (model, method, pattern), in order."""
    plan = [("raw", None)] if "raw" in params["values"] else []
    for values in params["values"]:
        if values != "raw":
            roundings = params["rounding"] if method == "sparsegpt" else ["rtn"]
            plan += [(values, rounding) for rounding in roundings]
    return plan


def _row(summary: dict, evaluated: dict, *, model, method, pattern, values, rounding, dense,
         params, convert_s) -> dict:
    sparsity, nm = PATTERNS[pattern]
    linear = summary.get("decoder_linear", {})
    return {"model": model, "method": method, "pattern": pattern, "values": values,
            "rounding": rounding, "group_size": params["group_size"] if rounding else None,
            "damping": params["damping"] if method == "sparsegpt" else None,
            "sparsity": sparsity, "nm": f"{nm[0]}:{nm[1]}" if nm else None, **evaluated,
            "vs_dense": round(evaluated["perplexity"] / dense["perplexity"], 4),
            "ratio": summary["total"]["ratio"],
            "linear_bits_per_element": round(8 * linear["stored_bytes"] / linear["numel"], 4)
            if linear.get("numel") else None,
            "quantization_error": summary.get("quantization_error"), "convert_s": convert_s,
            "load_avg": harness.system_load()}


def _pattern_rows(source, work: Path, model, method, pattern, dense, params, text, calib):
    """The rows of one (model, method, pattern): prune once to raw values, then quantize."""
    sparsity, nm = PATTERNS[pattern]
    plan = row_plan(method, params)
    common = {"progress": False, "resume": False, "calib_samples": params["calib_samples"]}
    damping = {"damping": params["damping"]} if method == "sparsegpt" else {}

    def timed_convert(src, out, **options):
        t0 = time.perf_counter()
        summary = convert(src, out, **common, **options)
        return summary, round(time.perf_counter() - t0, 2)

    def scored(out, summary, convert_s, values, rounding):
        row = _row(summary, _evaluate(out, text, params["window"], params["max_windows"]),
                   model=model, method=method, pattern=pattern, values=values,
                   rounding=rounding, dense=dense, params=params, convert_s=convert_s)
        _report(row)
        return row

    rows = []
    raw_dir = work / f"{method}-{pattern.replace(':', 'of').replace('%', 'pct')}-raw"
    if any(rounding in (None, "rtn") for _, rounding in plan):
        summary, seconds = timed_convert(source, raw_dir, method=method, sparsity=sparsity,
                                         nm=nm, calib_text=calib, values="raw", **damping)
        if "raw" in params["values"]:
            rows.append(scored(raw_dir, summary, seconds, "raw", None))
    try:
        for values, rounding in plan:
            if rounding is None:
                continue
            out = work / f"{raw_dir.name[:-4]}{values}-{rounding}"
            if rounding == "rtn":  # the raw checkpoint's weights, rounded: the same masks
                summary, seconds = timed_convert(raw_dir, out, method="none", values=values,
                                                 group_size=params["group_size"])
            else:
                summary, seconds = timed_convert(source, out, method=method, sparsity=sparsity,
                                                 nm=nm, calib_text=calib, values=values,
                                                 group_size=params["group_size"], **damping)
            rows.append(scored(out, summary, seconds, values, rounding))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    return rows


def _key(row: dict) -> tuple:
    return (row["model"], row["method"], row["pattern"], row.get("values") or "raw",
            row.get("rounding"))


def _order(rows: list[dict]) -> list[dict]:
    """Models in order of appearance; per model the dense row, then methods, patterns, values
    and roundings in their option order."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods, patterns = ("dense", *METHODS), ("dense", *PATTERNS)
    values, roundings = ("dense", *VALUES), (None, *ROUNDINGS)

    def rank(r):
        return (models.index(r["model"]), methods.index(r["method"]),
                patterns.index(r["pattern"]), values.index(r.get("values") or "raw"),
                roundings.index(r.get("rounding")))
    return sorted(rows, key=rank)


def earlier_rows(path, params: dict) -> list[dict]:
    """The rows of the earlier result file `path`, checked to compare with this run's."""
    try:
        earlier = json.loads(Path(path).read_text())
        old_params, old_rows = earlier["params"], earlier["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--merge {path}: not a quality result file ({e})") from None
    if earlier.get("benchmark") != NAME:
        raise ValueError(f"--merge {path}: a {earlier.get('benchmark')!r} result, not {NAME!r}")
    old_params = {**LEGACY_PARAMS, **old_params}
    differ = [k for k in COMPARABLE if old_params.get(k, params[k]) != params[k]]
    if differ:
        raise ValueError(f"--merge {path}: its {', '.join(differ)} differ from this run's "
                         f"({', '.join(f'{k}={old_params.get(k)}' for k in differ)}); rerun "
                         "with the same options")
    return old_rows


def merged(rows: list[dict], earlier: list[dict]) -> list[dict]:
    """`rows` plus the `earlier` rows that `rows` lack."""
    mine = {_key(r) for r in rows}
    return _order(rows + [r for r in earlier if _key(r) not in mine])


def with_vs_raw(rows: list[dict]) -> list[dict]:
    """Each row's perplexity over its raw-valued twin's (same model, method, pattern)."""
    raw = {_key(r)[:3]: r["perplexity"] for r in rows if (r.get("values") or "raw") == "raw"}
    for r in rows:
        base = raw.get(_key(r)[:3])
        r["vs_raw"] = round(r["perplexity"] / base, 4) if base and r["method"] != "dense" \
            else None
    return rows


def bars(rows: list[dict]) -> list[dict]:
    """The quality bars of issue 10, per model and pattern, where the rows allow: int8 within
    1% of the same pruned model with raw values; int4 joint SparseGPT within 15% of raw
    SparseGPT and below round-to-nearest int4 (Wanda's masks and SparseGPT's own)."""
    by_key = {_key(r): r["perplexity"] for r in rows}
    checks = []
    for model, method, pattern, values, rounding in by_key:
        ppl = by_key[(model, method, pattern, values, rounding)]
        raw = by_key.get((model, method, pattern, "raw", None))
        where = {"model": model, "pattern": pattern}
        if values == "int8" and raw:
            checks.append({**where, "bar": f"{method} int8 {rounding} <= 1.01 x raw",
                           "ratio": round(ppl / raw, 4), "met": ppl <= 1.01 * raw})
        if values == "int4" and rounding == "joint" and raw:
            checks.append({**where, "bar": "sparsegpt int4 joint <= 1.15 x raw",
                           "ratio": round(ppl / raw, 4), "met": ppl <= 1.15 * raw})
            for other in ("wanda", "sparsegpt"):
                rtn = by_key.get((model, other, pattern, "int4", "rtn"))
                if rtn:
                    checks.append({**where, "bar": f"sparsegpt int4 joint < {other} int4 rtn",
                                   "ratio": round(ppl / rtn, 4), "met": ppl < rtn})
    return checks


def run(*, models, methods, patterns, window, max_windows, calib_samples, workdir, quick,
        warmup, repeat, values=("raw",), group_size=128, rounding=ROUNDINGS,
        calib=DEFAULT_CALIB, damping=None, scored="evaluation", merge=None) -> dict:
    """`warmup` and `repeat` are the common benchmark options; perplexity is computed once."""
    params = _settings(models=models, methods=methods, patterns=patterns, window=window,
                       max_windows=max_windows, calib_samples=calib_samples, quick=quick,
                       values=values, group_size=group_size, rounding=rounding,
                       calib=calib, damping=damping, scored=scored)
    # a bad file fails now, not after an hour of converting
    earlier = [] if merge is None else earlier_rows(merge, params)
    calib_description, calib = calibration(params["calib"])
    text = article_split()[SCORED_PARTS.index(params["scored"])]
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="endor-bench-quality-", dir=workdir))
    results = []
    try:
        for model in params["models"]:
            source = resolve_model(model)
            # the dense model scores the same on the same windows: an earlier row serves
            dense = next((r for r in earlier if r["model"] == model and r["method"] == "dense"),
                         None)
            if dense is None:
                dense = _evaluate(source, text, params["window"], params["max_windows"])
                dense = {"model": model, "method": "dense", "pattern": "dense",
                         "values": "dense", "rounding": None, "sparsity": 0.0, "nm": None,
                         **dense, "vs_dense": 1.0, "ratio": 1.0, "quantization_error": None,
                         "convert_s": None, "load_avg": harness.system_load()}
                _report(dense)
            results.append(dense)
            for method in params["methods"]:
                for pattern in params["patterns"]:
                    results += _pattern_rows(source, work, model, method, pattern, dense,
                                             params, text, calib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = merged(results, earlier)
    results = with_vs_raw(results)
    return harness.envelope(NAME, params, results, table_columns=TABLE_COLUMNS,
                            bars=bars(results),
                            text={"evaluation": f"1911 Britannica 'Shakespeare', "
                                                f"{params['scored']} part "
                                                "(endor.data.text.article_split)",
                                  "calibration": calib_description})


def _label(row: dict) -> str:
    """A bar's name: the method, plus the value codec (and rounding) when it is not raw."""
    values = row.get("values") or "raw"
    if values in ("raw", "dense"):
        return row["method"]
    rounding = row.get("rounding")
    if row["method"] == "sparsegpt" and rounding:
        return f"{row['method']} {values} {rounding}"
    return f"{row['method']} {values}"


def draw(doc: dict):
    """The benchmark's picture: per model, perplexity (log scale) of each method at each pattern,
    the dense model as a dashed line. Returns a matplotlib Figure (Agg canvas, no pyplot)."""
    # lazy: matplotlib is heavy; only drawing needs it
    from matplotlib.figure import Figure

    rows = doc["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys(_label(r) for r in rows if r["method"] != "dense"))
    width_in = max(5.5, 0.45 * len(labels) * 2 + 1.5)
    fig = Figure(figsize=(width_in, 3.8 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        patterns = list(dict.fromkeys(r["pattern"] for r in mine if r["method"] != "dense"))
        methods = list(dict.fromkeys(_label(r) for r in mine if r["method"] != "dense"))
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            ppl = {r["pattern"]: r["perplexity"] for r in mine if _label(r) == method}
            xs = [k + i * width for k, p in enumerate(patterns) if p in ppl]
            bars_ = ax.bar(xs, [ppl[p] for p in patterns if p in ppl], width, label=method,
                           color=f"C{i % 10}", hatch="//" if i >= 10 else None)
            ax.bar_label(bars_, fmt="%.0f", fontsize=6)
        for r in mine:
            if r["method"] == "dense":
                ax.axhline(r["perplexity"], color="k", linestyle="--", linewidth=1,
                           label=f"dense {r['perplexity']:.1f}")
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(patterns))], patterns)
        ax.set(title=model, ylabel="perplexity (lower is better)", yscale="log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=6, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    params = doc.get("params", {})
    fig.suptitle(f"endor bench quality: perplexity after pruning, {params.get('max_windows')} "
                 f"windows of {params.get('window')} tokens", fontsize=10)
    return fig
