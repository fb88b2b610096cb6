"""Two builds of the fused CPU linear (_fused*.so, e.g. before and after a kernel change) on the
same matrices in one process: rounds interleaved (each build, then torch's dense GEMV), medians of
the calling thread's CPU time (one kernel thread runs on the caller), so other processes on a
shared machine move the figures less than wall time does. Both builds must agree bit for bit
where the sum order is the same, and stay within kernels/fused.py's bound; the script only times.

    python scripts/compare-fused-builds.py BEFORE.so AFTER.so --shapes 4096x14336,2048x5632 \
        --dtypes bf16,fp16 --values raw,exp,int4 --batches 1,4 --out results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

from endor.bench.harness import random_sparse
from endor.format import compress
from endor.kernels.cpu import fused as cpu_fused

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_build(path: str):
    spec = importlib.util.spec_from_file_location("endor.kernels.cpu._fused", path)
    if spec is None:
        raise SystemExit(f"{path}: not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.thread_time() - c0, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--shapes", default="4096x14336")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--values", default="raw,exp,int4")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    builds = {"before": load_build(args.before), "after": load_build(args.after)}
    torch.set_num_threads(1)
    rows = []
    load_before = os.getloadavg()[0]
    for shape_text in args.shapes.split(","):
        shape = [int(v) for v in shape_text.split("x")]
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            weight = random_sparse(shape, dtype, args.sparsity, seed=0)
            for codec in args.values.split(","):
                options = {"group_size": 128} if codec in ("int4", "int8") else {}
                et = compress(weight, values=codec, **options)
                for batch in (int(b) for b in args.batches.split(",")):
                    g = torch.Generator().manual_seed(1)
                    x = torch.randn(batch, shape[1], generator=g).to(dtype)
                    xf = x.float()
                    fns = {"dense": lambda: torch.nn.functional.linear(x, weight)}
                    for name, module in builds.items():
                        def run(module=module):
                            cpu_fused._fused = module
                            return cpu_fused.matmul(xf, et, threads=1)
                        fns[name] = run
                    for fn in fns.values():
                        fn()
                    cpu, wall = {k: [] for k in fns}, {k: [] for k in fns}
                    for _ in range(args.repeat):
                        for name, fn in fns.items():
                            c, w = timed(fn)
                            cpu[name].append(c)
                            wall[name].append(w)
                    row = {"shape": shape, "dtype": dtype_name, "values": codec, "batch": batch}
                    for name in fns:
                        row[f"{name}_cpu_ms"] = statistics.median(cpu[name]) * 1e3
                        row[f"{name}_wall_ms"] = statistics.median(wall[name]) * 1e3
                    row["after_vs_before"] = row["before_cpu_ms"] / row["after_cpu_ms"]
                    row["after_vs_dense"] = row["dense_cpu_ms"] / row["after_cpu_ms"]
                    rows.append(row)
                    print(f"{shape_text} {dtype_name} {codec:4s} b{batch}: before "
                          f"{row['before_cpu_ms']:.3f} ms, after {row['after_cpu_ms']:.3f} ms "
                          f"({row['after_vs_before']:.2f}x), dense {row['dense_cpu_ms']:.3f} ms",
                          flush=True)
    doc = {"command": " ".join(["python", *sys.argv]), "threads": 1, "repeat": args.repeat,
           "sparsity": args.sparsity, "timing": "median thread CPU time (and wall), interleaved",
           "load_avg": {"before": load_before, "after": os.getloadavg()[0]}, "results": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
