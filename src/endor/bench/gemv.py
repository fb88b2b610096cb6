"""`endor bench gemv`: y = x @ W.T for a few rows of x (decode), three ways on the same matrix in
the same run: torch's dense GEMV on the dense W, Endor's fused kernel on the compressed W, and
Endor decompress + dense GEMM (what a layer kept compressed costs without the fused kernel).

Runs are interleaved (one of each method per round) and reported as medians. GB/s is the bytes
of W each method reads: dense bytes for torch, compressed bytes (bitmap + values + tile index)
for fused. `fused_vs_dense` = dense time / fused time (> 1: fused faster); `crossover` per dtype
is the first batch at which decompress + GEMM beats fused (where the runtime should switch:
runtime/fused.py FUSED_MAX_ROWS). Done when fused_vs_dense >= 1.5 at batch 1 for bfloat16 and
float16, 4096x14336 at 50% (the byte-ratio limit is 1.78)."""

from __future__ import annotations

from types import SimpleNamespace
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
TABLE_COLUMNS = ["dtype", "batch", "method", "ms", "gbps", "fused_vs_dense",
                 "fused_vs_decompress_gemm", "n"]
METHODS = ("dense", "fused", "decompress+gemm")


def add_arguments(parser) -> None:
    parser.add_argument("--shape", type=harness.int_list, default=None,
                        help=f"W as out,in (default {DEFAULT_SHAPE}; --quick {QUICK_SHAPE})")
    parser.add_argument("--dtypes", type=harness.dtype_list, default="bf16,fp16")
    parser.add_argument("--sparsity", type=float, default=0.5)
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


def run(**options) -> dict:
    args = SimpleNamespace(**options)  # the options as keywords (cli/bench.py)
    load_before = harness.system_load()
    shape = args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"--shape must be out,in with both >= 1, got {shape}")
    if any(b < 1 for b in args.batches):
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    results, ratios, crossover = [], {}, {}
    try:
        for dtype in args.dtypes:
            name = harness.dtype_name(dtype)
            weight = harness.random_sparse(shape, dtype, args.sparsity, seed=args.seed)
            et = compress(weight, values="raw").to(device)
            weight = weight.to(device)
            dense_bytes = weight.numel() * weight.element_size()
            packed_bytes = sum(t.numel() * t.element_size()
                               for t in (et.bitmap, et.values, et.tiles))
            g = torch.Generator().manual_seed(args.seed + 1)
            for batch in args.batches:
                x = torch.randn(batch, shape[1], generator=g).to(dtype).to(device)
                fns = {"dense": lambda: torch.nn.functional.linear(x, weight),
                       "fused": lambda: linear(x, et),
                       "decompress+gemm": lambda: torch.nn.functional.linear(
                           x, decompress(et))}
                want = fns["dense"]().double()
                got = fns["fused"]().double()
                scale = (x.double().abs() @ weight.double().abs().T).max().item()
                stats = _interleaved(fns, args.warmup, args.repeat, device)
                for method, s in stats.items():
                    results.append({
                        "dtype": name, "batch": batch, "method": method,
                        "ms": s.median_s * 1e3,
                        "gbps": s.gbps(packed_bytes if method == "fused" else dense_bytes),
                        "fused_vs_dense": stats["dense"].median_s / stats["fused"].median_s
                        if method == "fused" else None,
                        "fused_vs_decompress_gemm": stats["decompress+gemm"].median_s /
                        stats["fused"].median_s if method == "fused" else None,
                        "max_abs_diff_vs_dense_rel": (got - want).abs().max().item() /
                        max(scale, 1e-30) if method == "fused" else None,
                        "dense_bytes": dense_bytes, "packed_bytes": packed_bytes,
                        **s.as_dict()})
                if batch == 1:
                    ratios[f"fused_vs_dense_batch1_{name}"] = \
                        stats["dense"].median_s / stats["fused"].median_s
                if name not in crossover and \
                        stats["decompress+gemm"].median_s < stats["fused"].median_s:
                    crossover[name] = batch
            del weight, et
    finally:
        torch.set_num_threads(before)
    met = {k: v >= DONE_WHEN["fused_vs_dense_batch1_min"] for k, v in ratios.items()}
    params = {"load_avg": {"before": load_before, "after": harness.system_load()},
              "device": str(device), "shape": list(shape), "dtypes": [harness.dtype_name(d) for d in args.dtypes],
              "sparsity": args.sparsity, "batches": list(args.batches),
              "threads": args.threads or before, "seed": args.seed, "quick": args.quick,
              "warmup": args.warmup, "repeat": args.repeat}
    return harness.envelope(NAME, params, results, ratios=ratios, done_when=DONE_WHEN, met=met,
                            crossover_batch=crossover, table_columns=TABLE_COLUMNS)
