"""CPU decode of int4/int8 vs raw, same run, one thread, interleaved repeats; CPU time per decode
(time.thread_time), so that a loaded shared machine's waiting does not count. Prints dense-output
GB/s (median) per codec and the ratios to raw. Usage: python scripts/quant-decode-speed.py [ISA]"""
import statistics
import sys
import time

import torch

import endor
from endor.kernels import cpu

torch.manual_seed(0)
rows, cols = 8192, 2048  # 16M elements, 32 MiB of bf16 output
w = torch.randn(rows, cols).to(torch.bfloat16)
w[torch.rand(rows, cols) < 0.5] = 0
ets = {c: endor.compress(w, values=c) for c in ("raw", "int8", "int4")}
out = torch.empty(rows * cols, dtype=torch.bfloat16)
isa = sys.argv[1] if len(sys.argv) > 1 else None
times = {c: [] for c in ets}
for _ in range(11):
    for c, et in ets.items():
        t0 = time.thread_time()
        cpu.decompress(et, out, isa=isa, threads=1)
        times[c].append(time.thread_time() - t0)
gbps = {c: rows * cols * 2 / statistics.median(t) / 1e9 for c, t in times.items()}
print(f"isa {isa or 'auto'}, bf16 {rows}x{cols} at 50%, one thread, CPU-time medians of 11:")
for c in ets:
    print(f"  {c:5s} {gbps[c]:6.2f} GB/s  ({gbps[c] / gbps['raw']:.2f}x raw)  "
          f"{8 * ets[c].nbytes / (rows * cols):.3f} bits/element")
