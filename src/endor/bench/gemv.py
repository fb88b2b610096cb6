"""`endor bench gemv`: y = x @ W.T for a few rows of x (decode), on the same matrix in the same
run: torch's dense GEMV on the dense W, and per value codec (`--values`, default raw,exp,int4)
Endor's fused kernel on the compressed W and Endor decompress + dense GEMM (what a layer kept
compressed costs without the fused kernel).

Runs are interleaved (one of each method per round) and reported as medians. `bytes` is what a
method reads of W per call: the dense bytes for torch and decompress+gemm's GEMM, the compressed
bytes (bitmap + tile index + the codec's parts) for fused, and `gbps` is bytes / median time.
int4 rows quantize W (round to nearest, groups of 128 columns): the dense baseline is the
unquantized W, same shape and dtype. `fused_vs_dense` = dense time / fused time (> 1: fused
faster); `crossover` per dtype and codec is the first batch at which decompress + GEMM beats
fused; `fused_max_rows` the last batch before it (where the runtime switches:
runtime/fused.py FUSED_MAX_ROWS). Done when
fused_vs_dense >= 1.5 at batch 1 for raw bfloat16 and float16, 4096x14336 at 50% (the
byte-ratio limit is 1.78); exp and int4 read fewer bytes and should be faster still."""

from __future__ import annotations

from types import SimpleNamespace
import math
import statistics
import time

import torch

from ..format import compress
from ..kernels import decompress, linear
from . import harness

NAME = "gemv"
DEFAULT_SHAPE = [4096, 14336]
QUICK_SHAPE = [256, 1024]
DONE_WHEN = {"fused_vs_dense_batch1_min": 1.5}
TABLE_COLUMNS = ["dtype", "batch", "method", "values", "ms", "mbytes", "gbps", "fused_vs_dense",
                 "fused_vs_decompress_gemm", "n"]
METHODS = ("dense", "fused", "decompress+gemm")
CODECS = ("raw", "exp", "int4", "int8")


def add_arguments(parser) -> None:
    parser.add_argument("--shape", type=harness.int_list, default=None,
                        help=f"W as out,in (default {DEFAULT_SHAPE}; --quick {QUICK_SHAPE})")
    parser.add_argument("--dtypes", type=harness.dtype_list, default="bf16,fp16")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--values", type=lambda v: [c.strip() for c in v.split(",") if c.strip()],
                        default="raw,exp,int4",
                        help=f"value codecs of the compressed W, of {CODECS} (default raw,exp,int4)")
    parser.add_argument("--batches", type=harness.int_list, default="1,2,4,8,16",
                        help="rows of x (default 1,2,4,8,16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, for every method alike (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the C kernel; cuda: the Triton kernel vs cuBLAS (default cpu)")
    parser.add_argument("--seed", type=int, default=0)


def _interleaved(fns: dict, warmup: int, repeat: int, device: torch.device) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            harness.synchronize(device)
            t0 = time.perf_counter()
            fn()
            harness.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: harness.Stats(statistics.median(t), min(t), max(t), len(t))
            for name, t in times.items()}


def _compress(weight: torch.Tensor, codec: str):
    options = {"group_size": 128} if codec in ("int4", "int8") else {}
    return compress(weight, values=codec, **options)


def _measure_dtype(dtype, shape, args, device, results, ratios, crossover) -> None:
    name = harness.dtype_name(dtype)
    weight = harness.random_sparse(shape, dtype, args.sparsity, seed=args.seed)
    ets = {codec: _compress(weight, codec).to(device) for codec in args.values}
    weight = weight.to(device)
    dense_bytes = weight.numel() * weight.element_size()
    packed = {codec: et.nbytes for codec, et in ets.items()}
    scratch = torch.empty(weight.numel(), dtype=dtype, device=device)
    g = torch.Generator().manual_seed(args.seed + 1)
    for batch in args.batches:
        x = torch.randn(batch, shape[1], generator=g).to(dtype).to(device)
        fns = {("dense", "-"): lambda: torch.nn.functional.linear(x, weight)}
        for codec, et in ets.items():
            fns[("fused", codec)] = lambda et=et: linear(x, et)
            # into a reused buffer, as the runtime's EndorLinear does (runtime/fused.py
            # dense_scratch): a fresh 100 MB tensor per call would time its page faults too
            fns[("decompress+gemm", codec)] = lambda et=et: torch.nn.functional.linear(
                x, decompress(et, out=scratch))
        stats = _interleaved(fns, args.warmup, args.repeat, device)
        dense_s = stats[("dense", "-")].median_s
        for (method, codec), st in stats.items():
            fused_s = stats[("fused", codec)].median_s if codec != "-" else None
            nbytes = packed[codec] if method == "fused" else dense_bytes
            results.append({
                "dtype": name, "batch": batch, "method": method, "values": codec,
                "ms": st.median_s * 1e3, "mbytes": nbytes / 1e6, "gbps": st.gbps(nbytes),
                "fused_vs_dense": dense_s / st.median_s if method == "fused" else None,
                "fused_vs_decompress_gemm": stats[("decompress+gemm", codec)].median_s /
                fused_s if method == "fused" else None,
                "dense_bytes": dense_bytes, "packed_bytes": packed.get(codec),
                **st.as_dict()})
        for codec in ets:
            fused_s = stats[("fused", codec)].median_s
            if batch == 1:
                ratios[f"fused_vs_dense_batch1_{name}_{codec}"] = dense_s / fused_s
            key = f"{name}_{codec}"
            if key not in crossover and stats[("decompress+gemm", codec)].median_s < fused_s:
                crossover[key] = batch
        # The fused result against the dense GEMV on the same (decoded) weight, once per batch.
        for codec, et in ets.items():
            want = torch.nn.functional.linear(x, decompress(et).view(shape)).double()
            got = linear(x, et).double()
            dense_w = decompress(et).view(shape).double()
            scale = (x.double().abs() @ dense_w.abs().T).max().item()
            results.append({"dtype": name, "batch": batch, "method": "check", "values": codec,
                            "max_abs_diff_vs_dense_rel": (got - want).abs().max().item() /
                            max(scale, 1e-30)})


def run(**options) -> dict:
    args = SimpleNamespace(**options)  # the options as keywords (cli/bench.py)
    load_before = harness.system_load()
    shape = args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"--shape must be out,in with both >= 1, got {shape}")
    if any(b < 1 for b in args.batches):
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    values = getattr(args, "values", ["raw", "exp", "int4"])
    if isinstance(values, str):
        values = [c.strip() for c in values.split(",") if c.strip()]
    bad = [c for c in values if c not in CODECS]
    if bad or not values:
        raise ValueError(f"--values must name codecs of {CODECS}, got {values}")
    args.values = values
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    results, ratios, crossover = [], {}, {}
    try:
        for dtype in args.dtypes:
            _measure_dtype(dtype, list(shape), args, device, results, ratios, crossover)
    finally:
        torch.set_num_threads(before)
    met = {k: v >= DONE_WHEN["fused_vs_dense_batch1_min"] for k, v in ratios.items()
           if k.endswith("_raw")}
    # runtime/fused.py FUSED_MAX_ROWS: the last batch measured before decompress + GEMM first
    # wins (the largest measured where it never does)
    batches = sorted(args.batches)
    max_rows = {f"{harness.dtype_name(d)}_{c}": max(
        [b for b in batches if b < crossover.get(f"{harness.dtype_name(d)}_{c}", math.inf)],
        default=0) for d in args.dtypes for c in values}
    params = {"load_avg": {"before": load_before, "after": harness.system_load()},
              "device": str(device), "shape": list(shape),
              "dtypes": [harness.dtype_name(d) for d in args.dtypes], "values": values,
              "sparsity": args.sparsity, "batches": list(args.batches),
              "threads": args.threads or before, "seed": args.seed, "quick": args.quick,
              "warmup": args.warmup, "repeat": args.repeat}
    return harness.envelope(NAME, params, results, ratios=ratios, done_when=DONE_WHEN, met=met,
                            crossover_batch=crossover, fused_max_rows=max_rows,
                            table_columns=TABLE_COLUMNS)


def draw(doc: dict):
    """Per dtype: median ms per call against batch size, one line per method and codec."""
    from .plot import _figure, _title
    rows = [r for r in doc["results"] if r.get("method") != "check"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = _figure(len(dtypes), width=5.5)
    styles = {"dense": "k-", "fused": "-", "decompress+gemm": ":"}
    for col, dtype in enumerate(dtypes):
        ax = axes[0][col]
        series: dict[str, list[dict]] = {}
        for r in rows:
            if r["dtype"] == dtype:
                series.setdefault(f"{r['method']} {r['values']}".replace(" -", ""), []).append(r)
        for label, pts in series.items():
            method = pts[0]["method"]
            color = {"raw": "C0", "exp": "C2", "int4": "C3", "int8": "C4"}.get(pts[0]["values"],
                                                                               "k")
            ax.plot([p["batch"] for p in pts], [p["ms"] for p in pts], styles[method],
                    color=color if method != "dense" else "k", marker="o", markersize=3,
                    label=label, linewidth=2.2 if method == "dense" else 1.4)
        ax.set(title=dtype, xlabel="batch (rows of x)", ylabel="ms per call (median)",
               xscale="log", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    params = doc.get("params", {})
    _title(fig, doc, f"{'x'.join(map(str, params.get('shape', [])))} at "
           f"{params.get('sparsity', 0):.0%}, {params.get('threads')} threads, load "
           f"{params.get('load_avg', {}).get('before')}")
    return fig
